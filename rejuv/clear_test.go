package rejuv_test

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/duplex-ha/duplex/internal/testutil"
	"github.com/duplex-ha/duplex/rejuv"
)

// clearState runs clear-state on dirs against this machine's /proc (for its mountinfo).
func clearState(t *testing.T, dirs ...string) (rejuv.StepResult, error) {
	t.Helper()
	return runOne(t, rejuv.Config{Actions: []string{"clear-state"}, Scratch: dirs}, (&machine{}).options(""))
}

// write creates path, and its parents, holding size bytes of "x".
func write(t *testing.T, path string, size int) {
	t.Helper()
	writeString(t, path, strings.Repeat("x", size))
}

func writeString(t *testing.T, path, content string) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
}

func symlink(t *testing.T, target, link string) {
	t.Helper()
	if err := os.Symlink(target, link); err != nil {
		t.Fatal(err)
	}
}

func requireEmptyDir(t *testing.T, dir string) {
	t.Helper()
	fi, err := os.Lstat(dir)
	if err != nil || !fi.IsDir() {
		t.Fatalf("scratch %s is gone or no longer a directory: %v", dir, err)
	}
	left, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	if len(left) > 0 {
		var names []string
		for _, e := range left {
			names = append(names, e.Name())
		}
		t.Fatalf("scratch %s still holds %q", dir, names)
	}
}

func requireContent(t *testing.T, path, want string) {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("%s did not survive: %v", path, err)
	}
	if string(b) != want {
		t.Fatalf("%s holds %q, want %q", path, b, want)
	}
}

func TestClearState(t *testing.T) {
	tmp := t.TempDir()
	scratch := filepath.Join(tmp, "scratch")
	outside := filepath.Join(tmp, "outside")
	missing := filepath.Join(tmp, "never-made")
	if err := os.Mkdir(scratch, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(scratch, os.ModeSticky|0o777); err != nil { // like /tmp, past the umask
		t.Fatal(err)
	}
	writeString(t, filepath.Join(outside, "keep.txt"), "precious")
	write(t, filepath.Join(scratch, "a.txt"), 1000)
	write(t, filepath.Join(scratch, ".hidden"), 24)
	write(t, filepath.Join(scratch, "nested/deeper/b.bin"), 2000)
	if err := os.Mkdir(filepath.Join(scratch, "nested/empty"), 0o700); err != nil {
		t.Fatal(err)
	}
	symlink(t, outside, filepath.Join(scratch, "link-dir"))
	symlink(t, filepath.Join(outside, "keep.txt"), filepath.Join(scratch, "link-file"))
	symlink(t, outside, filepath.Join(scratch, "nested/deeper/link-dir")) // inside a tree RemoveAll walks
	symlink(t, "/nonexistent/duplex", filepath.Join(scratch, "dangling"))
	if err := unix.Mkfifo(filepath.Join(scratch, "fifo"), 0o600); err != nil {
		t.Fatal(err)
	}

	r, err := clearState(t, scratch, missing)
	if err != nil {
		t.Fatal(err)
	}
	requireEmptyDir(t, scratch)
	if fi, _ := os.Stat(scratch); fi.Mode() != os.ModeDir|os.ModeSticky|0o777 {
		t.Errorf("scratch mode changed to %s", fi.Mode())
	}
	requireContent(t, filepath.Join(outside, "keep.txt"), "precious")
	// a.txt, .hidden, nested, link-dir, link-file, dangling, fifo; 3024 bytes of files
	want := "removed 7 entries (3.0 KiB) from " + scratch + "; " + missing + " missing, nothing to clear"
	if r.Detail != want {
		t.Fatalf("detail %q\nwant   %q", r.Detail, want)
	}

	// Cleared again: nothing to do, still no error.
	if r, err := clearState(t, scratch); err != nil || r.Detail != "removed 0 entries (0 B) from "+scratch {
		t.Fatalf("second clear: %q, %v", r.Detail, err)
	}
}

func TestClearStateNoScratch(t *testing.T) {
	r, err := clearState(t)
	if err != nil || r.Detail != "no scratch directories declared" {
		t.Fatalf("got %q, %v", r.Detail, err)
	}
}

// A scratch path under a symlinked parent is emptied where it really is.
func TestClearStateThroughParentSymlink(t *testing.T) {
	tmp := t.TempDir()
	real := filepath.Join(tmp, "real", "scratch")
	write(t, filepath.Join(real, "f"), 10)
	symlink(t, filepath.Join(tmp, "real"), filepath.Join(tmp, "via"))
	via := filepath.Join(tmp, "via", "scratch")

	r, err := clearState(t, via)
	if err != nil {
		t.Fatal(err)
	}
	requireEmptyDir(t, real)
	if want := "removed 1 entries (10 B) from " + via + " (" + real + ")"; r.Detail != want {
		t.Fatalf("detail %q, want %q", r.Detail, want)
	}
}

func TestClearStateRefuses(t *testing.T) {
	tmp := t.TempDir()
	target := filepath.Join(tmp, "target")
	write(t, filepath.Join(target, "keep.txt"), 0)
	link := filepath.Join(tmp, "scratch-link")
	symlink(t, target, link)
	file := filepath.Join(tmp, "plain-file")
	write(t, file, 5)
	cleared := filepath.Join(tmp, "cleared")
	write(t, filepath.Join(cleared, "gone.txt"), 7)

	for _, tt := range []struct{ dir, want string }{
		{link, "clear-state: scratch " + link + " is a symlink: unsafe scratch directory"},
		{file, "clear-state: scratch " + file + " is not a directory: unsafe scratch directory"},
	} {
		r, err := clearState(t, cleared, tt.dir)
		if !errors.Is(err, rejuv.ErrUnsafeScratch) {
			t.Fatalf("clear %s: err = %v, want ErrUnsafeScratch", tt.dir, err)
		}
		if err.Error() != tt.want {
			t.Fatalf("err %q\nwant %q", err, tt.want)
		}
		// The directory before it was cleared, and the detail says so.
		if !strings.HasPrefix(r.Detail, "removed ") || !strings.HasSuffix(r.Detail, " from "+cleared) {
			t.Errorf("detail %q does not report the directory cleared before the refusal", r.Detail)
		}
		write(t, filepath.Join(cleared, "gone.txt"), 7)
	}
	requireContent(t, filepath.Join(target, "keep.txt"), "")
	requireContent(t, file, "xxxxx")
}

// requiresMount mounts a filesystem (tmpfs, or a bind mount when source is a directory)
// on dir and unmounts it when the test ends, failed or not.
func requiresMount(t *testing.T, source, dir, fstype string, flags uintptr, data string) {
	t.Helper()
	if err := unix.Mount(source, dir, fstype, flags, data); err != nil {
		t.Fatalf("mount %s on %s: %v", source, dir, err)
	}
	t.Cleanup(func() {
		if err := unix.Unmount(dir, unix.MNT_DETACH); err != nil {
			t.Errorf("unmount %s: %v", dir, err)
		}
	})
}

func mounted(t *testing.T, dir string) bool {
	t.Helper()
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	for line := range strings.Lines(string(b)) {
		if f := strings.Fields(line); len(f) > 4 && f[4] == dir {
			return true
		}
	}
	return false
}

// A tmpfs scratch directory is emptied and stays mounted.
func TestClearStateTmpfs(t *testing.T) {
	testutil.RequiresRoot(t)
	dir := filepath.Join(t.TempDir(), "tmpfs")
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	requiresMount(t, "tmpfs", dir, "tmpfs", unix.MS_NOSUID|unix.MS_NODEV, "size=16m,mode=0750")
	write(t, filepath.Join(dir, "cache/blob"), 4096)
	write(t, filepath.Join(dir, "sock.lock"), 0)
	symlink(t, "/etc/hostname", filepath.Join(dir, "hostname-link"))

	r, err := clearState(t, dir)
	if err != nil {
		t.Fatal(err)
	}
	requireEmptyDir(t, dir)
	var st unix.Statfs_t
	if err := unix.Statfs(dir, &st); err != nil {
		t.Fatal(err)
	}
	if st.Type != unix.TMPFS_MAGIC || !mounted(t, dir) {
		t.Fatalf("%s is no longer a tmpfs mount point (f_type %#x)", dir, st.Type)
	}
	if fi, _ := os.Stat(dir); fi.Mode().Perm() != 0o750 {
		t.Errorf("tmpfs root mode changed to %s", fi.Mode())
	}
	if _, err := os.Stat("/etc/hostname"); err != nil {
		t.Errorf("the symlink's target is gone: %v", err)
	}
	if want := "removed 3 entries (4.0 KiB) from " + dir; r.Detail != want {
		t.Fatalf("detail %q, want %q", r.Detail, want)
	}
}

// A scratch directory with a filesystem mounted inside is refused whole: emptying it
// would empty the mounted filesystem too.
func TestClearStateRefusesMountInside(t *testing.T) {
	testutil.RequiresRoot(t)
	tmp := t.TempDir()
	outside := filepath.Join(tmp, "outside")
	write(t, filepath.Join(outside, "precious.txt"), 8)
	scratch := filepath.Join(tmp, "scratch")
	write(t, filepath.Join(scratch, "other.txt"), 3)
	mnt := filepath.Join(scratch, "deep", "mnt")
	if err := os.MkdirAll(mnt, 0o755); err != nil {
		t.Fatal(err)
	}
	requiresMount(t, outside, mnt, "", unix.MS_BIND, "")

	_, err := clearState(t, scratch)
	if !errors.Is(err, rejuv.ErrUnsafeScratch) {
		t.Fatalf("err = %v, want ErrUnsafeScratch", err)
	}
	if want := "clear-state: scratch " + scratch + " has a mount point inside, " + mnt + ": unsafe scratch directory"; err.Error() != want {
		t.Fatalf("err %q\nwant %q", err, want)
	}
	requireContent(t, filepath.Join(outside, "precious.txt"), "xxxxxxxx")
	requireContent(t, filepath.Join(scratch, "other.txt"), "xxx")
}
