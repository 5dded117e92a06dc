package migrate

import (
	"errors"
	"os"
	"path/filepath"
	"testing"
	"time"
)

type readResult struct {
	files int
	err   error
}

// receive reads s's stream into a new directory, as the destination does.
func receive(t *testing.T, s *imageStream) (string, <-chan readResult) {
	dst := t.TempDir()
	ch := make(chan readResult, 1)
	go func() {
		n, _, err := ReadImages(s.r, dst, DefaultLimits)
		s.r.CloseWithError(errors.New("receiver done"))
		ch <- readResult{n, err}
	}()
	return dst, ch
}

func waitFile(t *testing.T, path, want string) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for time.Now().Before(deadline) {
		if b, err := os.ReadFile(path); err == nil && string(b) == want {
			return
		}
		time.Sleep(time.Millisecond)
	}
	b, err := os.ReadFile(path)
	t.Fatalf("%s = %q, %v; want %q", path, b, err, want)
}

func TestImageStreamSendsFilesAsTheyClose(t *testing.T) {
	src := t.TempDir()
	writeFiles(t, src, map[string]string{"duplex-workload.json": "{}"}) // there before the watch
	s, err := startImageStream(src)
	if err != nil {
		t.Fatal(err)
	}
	defer s.abort(nil)
	dst, got := receive(t, s)

	// A closed file reaches the receiver before the stream ends.
	writeFiles(t, src, map[string]string{"core-1.img": "core", "dump.log": "stays here"})
	waitFile(t, filepath.Join(dst, "core-1.img"), "core")
	// Changed after it went: sent again at the end. Never closed while watched: sent at the end.
	writeFiles(t, src, map[string]string{"core-1.img": "core, rewritten"})
	if err := os.WriteFile(filepath.Join(src, "inventory.img"), []byte("inv"), 0o600); err != nil {
		t.Fatal(err)
	}
	n, err := s.finish()
	if err != nil {
		t.Fatal(err)
	}
	r := <-got
	if r.err != nil || r.files != 3 {
		t.Fatalf("received %d files: %v", r.files, r.err)
	}
	if n < int64(len("{}core, rewrittencoreinv")) {
		t.Errorf("finish counted %d bytes", n)
	}
	for name, want := range map[string]string{"core-1.img": "core, rewritten", "inventory.img": "inv", "duplex-workload.json": "{}"} {
		if b, _ := os.ReadFile(filepath.Join(dst, name)); string(b) != want {
			t.Errorf("%s = %q, want %q", name, b, want)
		}
	}
	if _, err := os.Stat(filepath.Join(dst, "dump.log")); err == nil {
		t.Error("the log travelled")
	}
}

func TestImageStreamAbortRestoresNothing(t *testing.T) {
	src := t.TempDir()
	s, err := startImageStream(src)
	if err != nil {
		t.Fatal(err)
	}
	dst, got := receive(t, s)
	writeFiles(t, src, map[string]string{"core-1.img": "core"})
	waitFile(t, filepath.Join(dst, "core-1.img"), "core")
	s.abort(errors.New("the dump failed"))
	r := <-got
	if r.err == nil {
		t.Fatal("an aborted stream was accepted")
	}
	if ents, _ := os.ReadDir(dst); len(ents) != 0 {
		t.Errorf("an aborted stream left %d files", len(ents))
	}
	// finish after abort fails rather than sending a manifest.
	if _, err := s.finish(); err == nil {
		t.Error("finish after abort succeeded")
	}
}

func TestImageStreamNeedsItsDirectory(t *testing.T) {
	src := t.TempDir()
	if _, err := startImageStream(filepath.Join(src, "missing")); err == nil {
		t.Error("watching a missing directory succeeded")
	}
}
