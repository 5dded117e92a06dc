package migrate

import (
	"errors"
	"fmt"
	"io"
	"os"
	"sync"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// imageStream sends a dump's images to the destination while CRIU writes them.
// Each file goes as soon as CRIU closes it (inotify's IN_CLOSE_WRITE), so that
// when the dump is over only its last files and the manifest are left to travel
// inside the downtime. A file that changes after it went is sent again when the
// stream ends (the receiver lets a stream replace its own files).
//
// fsnotify, the usual Go wrapper, offers close-after-write only as an
// experimental, unexported operation, hence inotify itself.
type imageStream struct {
	w      *imageWriter
	r      *io.PipeReader // the request body
	pw     *io.PipeWriter
	events *os.File // the inotify instance, non-blocking: a deadline ends a pending Read
	once   sync.Once
	done   chan struct{}
	err    error // the watcher's, read after done
}

// startImageStream watches dir, which must exist, and returns the stream to read
// the images from (its reader r).
func startImageStream(dir string) (*imageStream, error) {
	fd, err := unix.InotifyInit1(unix.IN_NONBLOCK | unix.IN_CLOEXEC)
	if err != nil {
		return nil, fmt.Errorf("image stream: inotify: %w", err)
	}
	if _, err := unix.InotifyAddWatch(fd, dir, unix.IN_CLOSE_WRITE|unix.IN_MOVED_TO); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("image stream: watch %s: %w", dir, err)
	}
	pr, pw := io.Pipe()
	s := &imageStream{w: newImageWriter(pw, dir), r: pr, pw: pw, events: os.NewFile(uintptr(fd), "inotify"), done: make(chan struct{})}
	go s.watch()
	return s, nil
}

func (s *imageStream) watch() {
	defer close(s.done)
	buf := make([]byte, 64<<10)
	for {
		n, err := s.events.Read(buf)
		if err != nil {
			return // closed: the stream ends or was abandoned
		}
		for _, name := range inotifyNames(buf[:n]) {
			if !imageNameRe.MatchString(name) || name == manifestName {
				continue // left to finish, which sends it for the receiver to refuse
			}
			if err := s.w.send(name); err != nil {
				s.err = err
				return
			}
		}
		if err := s.w.flush(); err != nil {
			s.err = err
			return
		}
	}
}

// inotifyNames returns the file names of the events in b.
func inotifyNames(b []byte) []string {
	var names []string
	for len(b) >= unix.SizeofInotifyEvent {
		ev := (*unix.InotifyEvent)(unsafe.Pointer(&b[0]))
		end := unix.SizeofInotifyEvent + int(ev.Len)
		if end > len(b) {
			break
		}
		if ev.Mask&unix.IN_Q_OVERFLOW == 0 && ev.Len > 0 {
			name := b[unix.SizeofInotifyEvent:end]
			for i, c := range name {
				if c == 0 {
					name = name[:i]
					break
				}
			}
			names = append(names, string(name))
		}
		b = b[end:]
	}
	return names
}

// finish stops watching, sends what is left (files not sent yet, or changed since)
// and the manifest, and ends the stream. It returns the bytes of file content sent.
func (s *imageStream) finish() (int64, error) {
	s.stop()
	<-s.done
	err := s.err
	if err == nil {
		_, err = s.w.finish()
	}
	if err != nil {
		s.pw.CloseWithError(err)
		return s.w.total, err
	}
	return s.w.total, s.pw.Close()
}

// abort ends the stream without a manifest: the receiver restores nothing.
func (s *imageStream) abort(cause error) {
	if cause == nil {
		cause = errors.New("image stream abandoned")
	}
	s.stop()
	s.pw.CloseWithError(cause)
	<-s.done
}

// stop ends the watcher's wait for events. Closing an inotify instance waits for
// the kernel's fsnotify SRCU grace period, 0.2-20 ms here: that happens in the
// background, out of the downtime.
func (s *imageStream) stop() {
	s.once.Do(func() {
		_ = s.events.SetReadDeadline(time.Now())
		go func() {
			<-s.done
			s.events.Close()
		}()
	})
}
