package checkpoint

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// CRIU probes the kernel's features (its "kerndat") at every start: some 25-35 ms
// on a 2-vCPU host, paid by each dump, restore and lazy-pages daemon, and so twice
// or three times within a migration's downtime. It keeps the result in
// /run/criu.kdat, but only when /run is a tmpfs, so that the cache dies with the
// boot. On hosts whose /run is a plain filesystem it never caches, and a
// criu.kdat.tmp a crashed CRIU left behind blocks its saving for good.
//
// EnsureKerndatCache makes the cache there: CRIU writes it inside a private mount
// namespace with a tmpfs on /run, and it is copied out beside a stamp naming the
// boot, the kernel and the CRIU binary it belongs to. A stamp that does not match
// (a reboot, another kernel or CRIU) makes it again; CRIU itself still checks the
// file's size and magic when it loads it.

var (
	kdatDir  = "/run"
	kdatName = "criu.kdat"
)

// kdatStampSuffix names the stamp beside the cache.
const kdatStampSuffix = ".duplex-stamp"

var kdat struct {
	mu     sync.Mutex
	failed time.Time // the last failure to make the cache
}

// kdatRetry is how long a failure to make the cache stops further tries.
const kdatRetry = time.Minute

// WarmKerndat makes sure the cache is there before a CRIU starts: the engine calls
// it before each dump, restore, restorer, page server and lazy-pages daemon, all
// of which start outside the downtime or just before the freeze. When the cache is
// in place (the usual case) it costs a few stat calls; when it went missing (another
// CRIU build replaced it, someone removed it) it is made again here rather than
// probed by every CRIU of the next migration. A failure only costs time (duplexd
// reports it at start) and is not retried for a minute.
func (e *Engine) WarmKerndat() {
	kdat.mu.Lock()
	defer kdat.mu.Unlock()
	if !kdat.failed.IsZero() && time.Since(kdat.failed) < kdatRetry {
		return
	}
	if err := e.EnsureKerndatCache(); err != nil {
		kdat.failed = time.Now()
		return
	}
	kdat.failed = time.Time{}
}

// EnsureKerndatCache makes CRIU's kerndat cache usable on this host (see above).
// On a host whose /run is a tmpfs CRIU keeps its own cache and this does nothing.
func (e *Engine) EnsureKerndatCache() error {
	var st unix.Statfs_t
	if err := unix.Statfs(kdatDir, &st); err != nil {
		return fmt.Errorf("kerndat cache: %w", err)
	}
	if st.Type == unix.TMPFS_MAGIC {
		return nil
	}
	cache := filepath.Join(kdatDir, kdatName)
	stamp, err := kdatStamp(e.Path())
	if err != nil {
		return fmt.Errorf("kerndat cache: %w", err)
	}
	if old, err := os.ReadFile(cache + kdatStampSuffix); err == nil && string(old) == stamp {
		if fi, err := os.Stat(cache); err == nil && fi.Size() > 0 {
			return nil
		}
	}
	// CRIU cannot save next to a leftover it created with O_EXCL; on a non-tmpfs
	// /run it never saves there anyway, so the leftover is always stale.
	_ = os.Remove(cache + ".tmp")
	_ = os.Remove(cache)

	tmp, err := os.MkdirTemp("", "duplex-kdat-")
	if err != nil {
		return fmt.Errorf("kerndat cache: %w", err)
	}
	defer os.RemoveAll(tmp)
	out := filepath.Join(tmp, kdatName)
	script := `mount -t tmpfs duplex-kdat "$1" && "$2" check >/dev/null 2>&1; cp "$1/$3" "$4"`
	cmd := exec.Command("unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", kdatDir, e.Path(), kdatName, out)
	if b, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("kerndat cache: criu check in a private /run: %w: %s", err, strings.TrimSpace(string(b)))
	}
	b, err := os.ReadFile(out)
	if err != nil || len(b) == 0 {
		return fmt.Errorf("kerndat cache: CRIU wrote no cache (%v)", err)
	}
	if err := writeAtomic(cache, b); err != nil {
		return fmt.Errorf("kerndat cache: %w", err)
	}
	if err := writeAtomic(cache+kdatStampSuffix, []byte(stamp)); err != nil {
		_ = os.Remove(cache)
		return fmt.Errorf("kerndat cache: %w", err)
	}
	return nil
}

// kdatStamp names what a cache belongs to: this boot, this kernel, this CRIU.
func kdatStamp(criuPath string) (string, error) {
	boot, err := os.ReadFile("/proc/sys/kernel/random/boot_id")
	if err != nil {
		return "", err
	}
	var u unix.Utsname
	if err := unix.Uname(&u); err != nil {
		return "", err
	}
	var b bytes.Buffer
	fmt.Fprintf(&b, "boot %s\nkernel %s %s\n", strings.TrimSpace(string(boot)), unix.ByteSliceToString(u.Release[:]), unix.ByteSliceToString(u.Version[:]))
	// The binary CRIU runs and, behind a wrapper script, the prefix it runs from.
	for _, p := range []string{criuPath, filepath.Join(filepath.Dir(filepath.Dir(criuPath)), "criu-root", "usr", "sbin", "criu")} {
		if fi, err := os.Stat(p); err == nil {
			fmt.Fprintf(&b, "criu %s %d %s\n", p, fi.Size(), fi.ModTime().UTC().Format(time.RFC3339Nano))
		}
	}
	return b.String(), nil
}

func writeAtomic(path string, b []byte) error {
	f, err := os.CreateTemp(filepath.Dir(path), filepath.Base(path)+".duplex-*")
	if err != nil {
		return err
	}
	_, werr := f.Write(b)
	cerr := f.Close()
	if werr == nil {
		werr = cerr
	}
	if werr == nil {
		werr = os.Chmod(f.Name(), 0o600)
	}
	if werr == nil {
		werr = os.Rename(f.Name(), path)
	}
	if werr != nil {
		os.Remove(f.Name())
	}
	return werr
}
