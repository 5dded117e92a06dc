package migrate

import (
	"archive/tar"
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func writeFiles(t *testing.T, dir string, files map[string]string) {
	for n, c := range files {
		if err := os.WriteFile(filepath.Join(dir, n), []byte(c), 0o600); err != nil {
			t.Fatal(err)
		}
	}
}

func TestImagesRoundTrip(t *testing.T) {
	src, dst := t.TempDir(), t.TempDir()
	writeFiles(t, src, map[string]string{"inventory.img": "inv", "core-1.img": strings.Repeat("c", 100000), "dump.log": "not sent"})
	var buf bytes.Buffer
	n, err := WriteImages(&buf, src)
	if err != nil || n != 100003 {
		t.Fatalf("WriteImages = %d, %v", n, err)
	}
	files, total, err := ReadImages(&buf, dst, DefaultLimits)
	if err != nil || files != 2 || total != 100003 {
		t.Fatalf("ReadImages = %d files %d bytes, %v", files, total, err)
	}
	if b, _ := os.ReadFile(filepath.Join(dst, "core-1.img")); len(b) != 100000 {
		t.Errorf("core-1.img has %d bytes", len(b))
	}
	if _, err := os.Stat(filepath.Join(dst, "dump.log")); err == nil {
		t.Error("logs travelled")
	}
}

// entry is one raw tar entry for hand-made (hostile) streams.
type entry struct {
	hdr  tar.Header
	body string
}

func stream(t *testing.T, entries ...entry) *bytes.Buffer {
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, e := range entries {
		h := e.hdr
		if h.Typeflag == 0 {
			h.Typeflag = tar.TypeReg
		}
		if h.Typeflag == tar.TypeReg && h.Size == 0 {
			h.Size = int64(len(e.body))
		}
		h.Mode = 0o600
		if err := tw.WriteHeader(&h); err != nil {
			t.Fatal(err)
		}
		if h.Typeflag == tar.TypeReg {
			tw.Write([]byte(e.body))
		}
	}
	tw.Close()
	return &buf
}

func TestImagesRejectHostileStreams(t *testing.T) {
	outside := t.TempDir()
	good := manifestFor(t, map[string]string{"a.img": "hello"})
	for _, tc := range []struct {
		name string
		s    []entry
		want string
	}{
		{"path traversal", []entry{{hdr: tar.Header{Name: "../escape.img"}, body: "x"}}, "not a plain file name"},
		{"absolute path", []entry{{hdr: tar.Header{Name: filepath.Join(outside, "abs.img")}, body: "x"}}, "not a plain file name"},
		{"subdirectory", []entry{{hdr: tar.Header{Name: "sub/x.img"}, body: "x"}}, "not a plain file name"},
		{"symlink", []entry{{hdr: tar.Header{Name: "link.img", Typeflag: tar.TypeSymlink, Linkname: "/etc/passwd"}}}, "not a regular file"},
		{"oversized file", []entry{{hdr: tar.Header{Name: "big.img"}, body: strings.Repeat("x", 2000)}}, "limit"},
		{"no manifest", []entry{{hdr: tar.Header{Name: "a.img"}, body: "hello"}}, "without a manifest"},
		{"corrupt content", []entry{{hdr: tar.Header{Name: "a.img"}, body: "HELLO"}, {hdr: tar.Header{Name: manifestName}, body: good}}, "manifest says"},
		{"unlisted file", []entry{{hdr: tar.Header{Name: "a.img"}, body: "hello"}, {hdr: tar.Header{Name: "b.img"}, body: "b"}, {hdr: tar.Header{Name: manifestName}, body: good}}, "not in the manifest"},
		{"resent, then no manifest", []entry{{hdr: tar.Header{Name: "a.img"}, body: "hello"}, {hdr: tar.Header{Name: "a.img"}, body: "hello"}}, "without a manifest"},
		{"resent without end", []entry{{hdr: tar.Header{Name: "a.img"}, body: "x"}, {hdr: tar.Header{Name: "a.img"}, body: "x"}, {hdr: tar.Header{Name: "a.img"}, body: "x"},
			{hdr: tar.Header{Name: "a.img"}, body: "x"}, {hdr: tar.Header{Name: "a.img"}, body: "x"}}, "more than 4 entries"},
	} {
		dst := t.TempDir()
		lim := Limits{MaxFiles: 10, MaxFile: 1000, MaxTotal: 10000}
		if strings.HasPrefix(tc.name, "resent without end") {
			lim.MaxFiles = 2
		}
		_, _, err := ReadImages(stream(t, tc.s...), dst, lim)
		if !errors.Is(err, ErrBadImages) || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: %v, want ErrBadImages mentioning %q", tc.name, err, tc.want)
		}
		if ents, _ := os.ReadDir(dst); len(ents) != 0 {
			t.Errorf("%s: left %d files in the image directory", tc.name, len(ents))
		}
	}
	if ents, _ := os.ReadDir(outside); len(ents) != 0 {
		t.Errorf("a stream wrote outside the image directory: %v", ents)
	}
	if _, err := os.Stat(filepath.Join(filepath.Dir(outside), "escape.img")); err == nil {
		t.Error("path traversal wrote escape.img")
	}
	// A file already there (the page server's pages) is never overwritten.
	dst := t.TempDir()
	writeFiles(t, dst, map[string]string{"pages-1.img": "real pages"})
	_, _, err := ReadImages(stream(t, entry{hdr: tar.Header{Name: "pages-1.img"}, body: "forged"}), dst, DefaultLimits)
	if !errors.Is(err, ErrBadImages) {
		t.Errorf("overwrite attempt: %v", err)
	}
	if b, _ := os.ReadFile(filepath.Join(dst, "pages-1.img")); string(b) != "real pages" {
		t.Errorf("pages-1.img overwritten: %q", b)
	}
}

// A file sent again (it changed after it was sent) replaces what the stream wrote
// before, and the manifest speaks for the last copy.
func TestImagesResentFileReplaces(t *testing.T) {
	dst := t.TempDir()
	good := manifestFor(t, map[string]string{"a.img": "hello", "b.img": "b"})
	files, total, err := ReadImages(stream(t,
		entry{hdr: tar.Header{Name: "a.img"}, body: "an older, longer a.img"},
		entry{hdr: tar.Header{Name: "b.img"}, body: "b"},
		entry{hdr: tar.Header{Name: "a.img"}, body: "hello"},
		entry{hdr: tar.Header{Name: manifestName}, body: good}), dst, DefaultLimits)
	if err != nil || files != 2 || total != int64(len("an older, longer a.img")+1+5) {
		t.Fatalf("ReadImages = %d files %d bytes, %v", files, total, err)
	}
	if b, _ := os.ReadFile(filepath.Join(dst, "a.img")); string(b) != "hello" {
		t.Errorf("a.img = %q, want the resent copy", b)
	}
	// The manifest checks the last copy: a stale one fails.
	dst = t.TempDir()
	_, _, err = ReadImages(stream(t,
		entry{hdr: tar.Header{Name: "a.img"}, body: "hello"},
		entry{hdr: tar.Header{Name: "b.img"}, body: "b"},
		entry{hdr: tar.Header{Name: "a.img"}, body: "HELLO"},
		entry{hdr: tar.Header{Name: manifestName}, body: good}), dst, DefaultLimits)
	if !errors.Is(err, ErrBadImages) {
		t.Fatalf("stale resend: %v, want ErrBadImages", err)
	}
	if ents, _ := os.ReadDir(dst); len(ents) != 0 {
		t.Errorf("left %d files after a failed stream", len(ents))
	}
}

func manifestFor(t *testing.T, files map[string]string) string {
	src := t.TempDir()
	writeFiles(t, src, files)
	var buf bytes.Buffer
	if _, err := WriteImages(&buf, src); err != nil {
		t.Fatal(err)
	}
	tr := tar.NewReader(&buf)
	for {
		h, err := tr.Next()
		if err != nil {
			t.Fatal(err)
		}
		if h.Name == manifestName {
			var b bytes.Buffer
			b.ReadFrom(tr)
			return b.String()
		}
	}
}

func FuzzReadImages(f *testing.F) {
	var buf bytes.Buffer
	src := f.TempDir()
	os.WriteFile(filepath.Join(src, "x.img"), []byte("data"), 0o600)
	WriteImages(&buf, src)
	f.Add(buf.Bytes())
	f.Fuzz(func(t *testing.T, b []byte) {
		dst := t.TempDir()
		parent := filepath.Dir(dst)
		before, _ := os.ReadDir(parent)
		ReadImages(bytes.NewReader(b), dst, Limits{MaxFiles: 10, MaxFile: 1 << 16, MaxTotal: 1 << 20})
		after, _ := os.ReadDir(parent)
		if len(after) != len(before) {
			t.Fatalf("stream created files beside the image directory")
		}
	})
}
