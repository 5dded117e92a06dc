package migrate

import (
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"
)

// copyBuffer is the chunk pages travel in: large, so that a gigabyte costs few
// system calls and TLS records are full.
const copyBuffer = 1 << 20

// socketBuffer is the send and receive buffer of the page channel's socket pairs.
const socketBuffer = 4 << 20

// bigSocketPair returns a connected socket pair with large buffers.
func bigSocketPair() (*os.File, *os.File, error) {
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, nil, err
	}
	for _, fd := range fds {
		// SO_*BUFFORCE ignores net.core.[rw]mem_max; we are root.
		_ = unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_SNDBUFFORCE, socketBuffer)
		_ = unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_RCVBUFFORCE, socketBuffer)
	}
	return os.NewFile(uintptr(fds[0]), "criu-pages"), os.NewFile(uintptr(fds[1]), "pages"), nil
}

// pageTunnel copies the page-server protocol between CRIU's socket and the page
// channel to the destination, in both directions, counting what goes out.
type pageTunnel struct {
	sent atomic.Int64
	done chan struct{}
	mu   sync.Mutex
	err  error
}

// carry connects a fresh socket pair to the page channel and returns the end CRIU
// gets (--ps-socket). The channel closes when CRIU and the page server are done.
func carry(channel io.ReadWriteCloser) (*os.File, *pageTunnel, error) {
	criuEnd, ourEnd, err := bigSocketPair()
	if err != nil {
		channel.Close()
		return nil, nil, fmt.Errorf("page channel: %w", err)
	}
	local, err := net.FileConn(ourEnd)
	ourEnd.Close()
	if err != nil {
		criuEnd.Close()
		channel.Close()
		return nil, nil, fmt.Errorf("page channel: %w", err)
	}
	t := &pageTunnel{done: make(chan struct{})}
	var wg sync.WaitGroup
	wg.Add(2)
	go func() { // CRIU -> destination
		defer wg.Done()
		_, err := io.CopyBuffer(countingWriter{channel, &t.sent}, local, make([]byte, copyBuffer))
		if !errors.Is(err, net.ErrClosed) { // closed below once the page server finished
			t.fail(err)
		}
		// The dump is over (or failed): let the far end see it.
		if cw, ok := channel.(interface{ CloseWrite() error }); ok {
			_ = cw.CloseWrite()
		}
	}()
	go func() { // destination -> CRIU (acknowledgements)
		defer wg.Done()
		_, err := io.CopyBuffer(local, channel, make([]byte, 64<<10))
		if err != nil && !errors.Is(err, net.ErrClosed) {
			t.fail(err)
		}
		local.Close()
	}()
	go func() {
		wg.Wait()
		channel.Close()
		close(t.done)
	}()
	return criuEnd, t, nil
}

func (t *pageTunnel) fail(err error) {
	if err == nil {
		return
	}
	t.mu.Lock()
	if t.err == nil {
		t.err = err
	}
	t.mu.Unlock()
}

func (t *pageTunnel) bytes() int64 { return t.sent.Load() }

// wait returns once both directions ended, or after timeout.
func (t *pageTunnel) wait(timeout time.Duration) error {
	select {
	case <-t.done:
	case <-time.After(timeout):
		return errors.New("page channel did not close")
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.err
}

// tick reports the bytes sent every 200 ms until the returned stop is called.
func (t *pageTunnel) tick(report func(int64)) (stop func()) {
	quit := make(chan struct{})
	go func() {
		tk := time.NewTicker(200 * time.Millisecond)
		defer tk.Stop()
		for {
			select {
			case <-quit:
				return
			case <-tk.C:
				report(t.sent.Load())
			}
		}
	}()
	var once sync.Once
	return func() { once.Do(func() { close(quit) }) }
}

type countingWriter struct {
	w io.Writer
	n *atomic.Int64
}

func (c countingWriter) Write(p []byte) (int, error) {
	n, err := c.w.Write(p)
	c.n.Add(int64(n))
	return n, err
}
