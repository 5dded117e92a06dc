package migrate

import (
	"archive/tar"
	"bufio"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"hash"
	"io"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// The images a source streams to its destination travel as a tar stream of regular
// files followed by a manifest of their sizes and SHA-256 sums. The receiver treats
// the stream as untrusted: names are confined to the image directory, sizes and
// counts are bounded, nothing is overwritten, and every file must match the manifest
// before a restore may use it.

// manifestName is the last entry of an image stream.
const manifestName = "duplex-manifest.json"

// ErrBadImages means an image stream was malformed, oversized or corrupt.
var ErrBadImages = errors.New("bad image stream")

// Limits bound what a receiver accepts.
type Limits struct {
	MaxFiles int
	MaxFile  int64
	MaxTotal int64
}

// DefaultLimits suit the non-memory images of one workload (memory travels through
// the page server).
var DefaultLimits = Limits{MaxFiles: 4096, MaxFile: 256 << 20, MaxTotal: 1 << 30}

type manifest struct {
	Files map[string]fileSum `json:"files"`
}

type fileSum struct {
	Size   int64  `json:"size"`
	SHA256 string `json:"sha256"`
}

var imageNameRe = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,200}$`)

// skipImage reports files of an images directory that do not travel.
func skipImage(name string) bool {
	return strings.HasSuffix(name, ".log") || strings.HasPrefix(name, ".") || strings.HasSuffix(name, ".socket")
}

// WriteImages streams the regular files of dir (CRIU's images and duplex's
// workload description; logs excluded) to w and returns the bytes of file content sent.
func WriteImages(w io.Writer, dir string) (int64, error) {
	s := newImageWriter(w, dir)
	return s.finish()
}

// imageWriter writes an image stream a file at a time: a file may be sent, and
// sent again if it changed since, until finish writes the manifest.
type imageWriter struct {
	dir   string
	bw    *bufio.Writer
	tw    *tar.Writer
	m     manifest
	sent  map[string]sentAs
	total int64 // file content written, resent files included
}

// sentAs is what a file looked like when it was sent.
type sentAs struct {
	ino, size int64
	mtime     time.Time
}

func newImageWriter(w io.Writer, dir string) *imageWriter {
	// Buffered: the stream is mostly small files, and each write would otherwise
	// become its own TLS record and system call on the agents' connection.
	bw := bufio.NewWriterSize(w, 256<<10)
	return &imageWriter{dir: dir, bw: bw, tw: tar.NewWriter(bw), m: manifest{Files: map[string]fileSum{}}, sent: map[string]sentAs{}}
}

// send writes the file name of the directory to the stream (again, if it was sent
// before and changed since).
func (s *imageWriter) send(name string) error {
	if skipImage(name) {
		return nil
	}
	n, sum, as, err := sendFile(s.tw, filepath.Join(s.dir, name), name)
	if err != nil {
		return fmt.Errorf("send image %s: %w", name, err)
	}
	s.total += n
	s.m.Files[name] = fileSum{Size: n, SHA256: sum}
	s.sent[name] = as
	return nil
}

// flush pushes what was written so far to the connection.
func (s *imageWriter) flush() error { return s.bw.Flush() }

// finish sends the directory's files that were not sent yet or changed since they
// were, then the manifest, and returns the bytes of file content written.
func (s *imageWriter) finish() (int64, error) {
	ents, err := os.ReadDir(s.dir)
	if err != nil {
		return s.total, fmt.Errorf("send images: %w", err)
	}
	for _, e := range ents {
		if !e.Type().IsRegular() || skipImage(e.Name()) {
			continue
		}
		if as, ok := s.sent[e.Name()]; ok {
			if now, err := statAs(filepath.Join(s.dir, e.Name())); err == nil && now == as {
				continue
			}
		}
		if err := s.send(e.Name()); err != nil {
			return s.total, err
		}
	}
	b, err := json.Marshal(s.m)
	if err != nil {
		return s.total, err
	}
	if err := s.tw.WriteHeader(&tar.Header{Name: manifestName, Mode: 0o600, Size: int64(len(b)), Typeflag: tar.TypeReg}); err != nil {
		return s.total, err
	}
	if _, err := s.tw.Write(b); err != nil {
		return s.total, err
	}
	if err := s.tw.Close(); err != nil {
		return s.total, err
	}
	return s.total, s.bw.Flush()
}

func statAs(path string) (sentAs, error) {
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		return sentAs{}, err
	}
	return sentAs{ino: int64(st.Ino), size: st.Size, mtime: time.Unix(st.Mtim.Unix())}, nil
}

func sendFile(tw *tar.Writer, path, name string) (int64, string, sentAs, error) {
	f, err := os.Open(path)
	if err != nil {
		return 0, "", sentAs{}, err
	}
	defer f.Close()
	var st unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &st); err != nil {
		return 0, "", sentAs{}, err
	}
	as := sentAs{ino: int64(st.Ino), size: st.Size, mtime: time.Unix(st.Mtim.Unix())}
	if err := tw.WriteHeader(&tar.Header{Name: name, Mode: 0o600, Size: st.Size, Typeflag: tar.TypeReg}); err != nil {
		return 0, "", as, err
	}
	h := sha256.New()
	n, err := io.Copy(io.MultiWriter(tw, h), f)
	if err != nil {
		return n, "", as, err
	}
	if n != st.Size {
		return n, "", as, fmt.Errorf("size changed while sending (%d != %d)", n, st.Size)
	}
	return n, hex.EncodeToString(h.Sum(nil)), as, nil
}

// ReadImages receives an image stream into dir, which must exist. It returns the
// number of files and bytes received. On any error the files it wrote are removed
// and the error matches ErrBadImages when the stream itself was at fault.
func ReadImages(r io.Reader, dir string, lim Limits) (files int, total int64, err error) {
	var written []string
	defer func() {
		if err != nil {
			for _, p := range written {
				os.Remove(p)
			}
		}
	}()
	bad := func(format string, a ...any) error {
		return fmt.Errorf("%w: %s", ErrBadImages, fmt.Sprintf(format, a...))
	}
	got := map[string]fileSum{}
	entries := 0
	tr := tar.NewReader(r)
	for {
		hdr, err := tr.Next()
		if err == io.EOF {
			return files, total, bad("stream ended without a manifest")
		}
		if err != nil {
			return files, total, bad("%v", err)
		}
		if hdr.Typeflag != tar.TypeReg {
			return files, total, bad("entry %q is not a regular file", hdr.Name)
		}
		if !imageNameRe.MatchString(hdr.Name) {
			return files, total, bad("entry name %q is not a plain file name", hdr.Name)
		}
		if hdr.Size < 0 || hdr.Size > lim.MaxFile {
			return files, total, bad("entry %q is %d bytes, limit %d", hdr.Name, hdr.Size, lim.MaxFile)
		}
		if hdr.Name == manifestName {
			if err := checkManifest(tr, hdr.Size, got); err != nil {
				return files, total, err
			}
			// The manifest is the last entry: read the end of the archive.
			if _, err := tr.Next(); err != io.EOF {
				return files, total, bad("entries after the manifest")
			}
			return files, total, nil
		}
		// A file the sender saw change after sending it comes again and replaces
		// what this stream wrote; a name it did not write is never touched.
		_, again := got[hdr.Name]
		if !again {
			if files++; files > lim.MaxFiles {
				return files, total, bad("more than %d files", lim.MaxFiles)
			}
		}
		if entries++; entries > 2*lim.MaxFiles {
			return files, total, bad("more than %d entries", 2*lim.MaxFiles)
		}
		if total += hdr.Size; total > lim.MaxTotal {
			return files, total, bad("more than %d bytes", lim.MaxTotal)
		}
		path := filepath.Join(dir, hdr.Name)
		flags := os.O_WRONLY | os.O_CREATE | os.O_EXCL
		if again {
			flags = os.O_WRONLY | os.O_TRUNC
		}
		f, err := os.OpenFile(path, flags, 0o600)
		if err != nil {
			return files, total, bad("entry %q: %v", hdr.Name, err)
		}
		if !again {
			written = append(written, path)
		}
		h := sha256.New()
		n, err := io.CopyN(io.MultiWriter(f, h), tr, hdr.Size)
		cerr := f.Close()
		if err != nil {
			return files, total, bad("entry %q: %v", hdr.Name, err)
		}
		if cerr != nil {
			return files, total, fmt.Errorf("write image %s: %w", hdr.Name, cerr)
		}
		got[hdr.Name] = fileSum{Size: n, SHA256: sumHex(h)}
	}
}

func sumHex(h hash.Hash) string { return hex.EncodeToString(h.Sum(nil)) }

func checkManifest(r io.Reader, size int64, got map[string]fileSum) error {
	var m manifest
	if err := json.NewDecoder(io.LimitReader(r, size)).Decode(&m); err != nil {
		return fmt.Errorf("%w: manifest: %v", ErrBadImages, err)
	}
	var problems []string
	for name, s := range got {
		want, ok := m.Files[name]
		switch {
		case !ok:
			problems = append(problems, name+" not in the manifest")
		case want != s:
			problems = append(problems, fmt.Sprintf("%s: got %d bytes sha256 %.12s, manifest says %d bytes %.12s", name, s.Size, s.SHA256, want.Size, want.SHA256))
		}
	}
	for name := range m.Files {
		if _, ok := got[name]; !ok {
			problems = append(problems, name+" listed but not sent")
		}
	}
	if len(problems) > 0 {
		sort.Strings(problems)
		return fmt.Errorf("%w: %s", ErrBadImages, strings.Join(problems, "; "))
	}
	return nil
}
