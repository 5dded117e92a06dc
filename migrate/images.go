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
	ents, err := os.ReadDir(dir)
	if err != nil {
		return 0, fmt.Errorf("send images: %w", err)
	}
	// Buffered: the stream is mostly small files, and each write would otherwise
	// become its own TLS record and system call on the agents' connection.
	bw := bufio.NewWriterSize(w, 256<<10)
	tw := tar.NewWriter(bw)
	m := manifest{Files: map[string]fileSum{}}
	var total int64
	for _, e := range ents {
		if !e.Type().IsRegular() || skipImage(e.Name()) {
			continue
		}
		n, sum, err := sendFile(tw, filepath.Join(dir, e.Name()), e.Name())
		if err != nil {
			return total, fmt.Errorf("send image %s: %w", e.Name(), err)
		}
		total += n
		m.Files[e.Name()] = fileSum{Size: n, SHA256: sum}
	}
	b, err := json.Marshal(m)
	if err != nil {
		return total, err
	}
	if err := tw.WriteHeader(&tar.Header{Name: manifestName, Mode: 0o600, Size: int64(len(b)), Typeflag: tar.TypeReg}); err != nil {
		return total, err
	}
	if _, err := tw.Write(b); err != nil {
		return total, err
	}
	if err := tw.Close(); err != nil {
		return total, err
	}
	return total, bw.Flush()
}

func sendFile(tw *tar.Writer, path, name string) (int64, string, error) {
	f, err := os.Open(path)
	if err != nil {
		return 0, "", err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return 0, "", err
	}
	if err := tw.WriteHeader(&tar.Header{Name: name, Mode: 0o600, Size: st.Size(), Typeflag: tar.TypeReg}); err != nil {
		return 0, "", err
	}
	h := sha256.New()
	n, err := io.Copy(io.MultiWriter(tw, h), f)
	if err != nil {
		return n, "", err
	}
	if n != st.Size() {
		return n, "", fmt.Errorf("size changed while sending (%d != %d)", n, st.Size())
	}
	return n, hex.EncodeToString(h.Sum(nil)), nil
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
		if files++; files > lim.MaxFiles {
			return files, total, bad("more than %d files", lim.MaxFiles)
		}
		if total += hdr.Size; total > lim.MaxTotal {
			return files, total, bad("more than %d bytes", lim.MaxTotal)
		}
		if _, dup := got[hdr.Name]; dup {
			return files, total, bad("entry %q sent twice", hdr.Name)
		}
		path := filepath.Join(dir, hdr.Name)
		f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
		if err != nil {
			return files, total, bad("entry %q: %v", hdr.Name, err)
		}
		written = append(written, path)
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
