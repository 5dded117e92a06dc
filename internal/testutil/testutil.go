package testutil

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/duplex-ha/duplex/checkpoint"
	"github.com/duplex-ha/duplex/internal/vmtest"
)

// OnCI reports whether the tests run under CI (CI=true), where a missing
// prerequisite that `make deps` installs is a failure, not a skip.
func OnCI() bool { return os.Getenv("CI") == "true" }

// missing skips the test, or fails it on CI where the prerequisite must be present.
func missing(t testing.TB, what string) {
	t.Helper()
	if OnCI() {
		t.Fatalf("%s (CI=true: 'make deps' must provide it)", what)
	}
	t.Skip(what)
}

// RequiresVM skips a test that boots a VM guest (internal/vmtest) where the host
// cannot; with CI=true that is a failure, since 'make deps' provides it.
func RequiresVM(t testing.TB) {
	t.Helper()
	RequiresRoot(t)
	if err := vmtest.Available(); err != nil {
		if OnCI() {
			t.Fatalf("%v (CI=true: 'make deps' must provide it)", err)
		}
		t.Skip(err)
	}
}

// RequiresRoot skips a test that needs root when not running as root.
func RequiresRoot(t testing.TB) {
	t.Helper()
	if testing.Short() {
		t.Skip("needs root: skipped in -short mode")
	}
	if os.Geteuid() != 0 {
		if OnCI() {
			t.Fatal("test needs root and CI runs as root")
		}
		t.Skip("needs root")
	}
}

var (
	criuOnce sync.Once
	criuErr  string
)

// RequiresCRIU skips a test unless a working CRIU (criu check passes) is installed
// and has each named feature (`criu check --feature`).
func RequiresCRIU(t testing.TB, features ...string) *checkpoint.Engine {
	t.Helper()
	RequiresRoot(t)
	eng := checkpoint.New("")
	criuOnce.Do(func() {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		ok, msg, err := eng.Check(ctx)
		switch {
		case err != nil:
			criuErr = fmt.Sprintf("no usable CRIU at %s: %v (run 'make deps')", eng.Path(), err)
		case !ok:
			criuErr = fmt.Sprintf("criu check fails at %s: %s (run 'make deps')", eng.Path(), msg)
		}
	})
	if criuErr != "" {
		missing(t, criuErr)
	}
	for _, f := range features {
		ok, err := eng.HasFeature(context.Background(), f)
		if err != nil || !ok {
			t.Skipf("CRIU reports feature %s missing on this host", f)
		}
	}
	return eng
}

// Unique returns prefix plus a random suffix: names for netns, cgroups and
// workloads that cannot collide with another run.
func Unique(prefix string) string {
	b := make([]byte, 4)
	_, _ = rand.Read(b)
	return prefix + hex.EncodeToString(b)
}

// CgroupParent returns a unique cgroup parent for a test's workloads and removes
// it (and any empty children) when the test ends.
func CgroupParent(t testing.TB) string {
	t.Helper()
	parent := Unique("duplex-test-")
	t.Cleanup(func() {
		for _, root := range []string{"/sys/fs/cgroup/memory", "/sys/fs/cgroup/unified", "/sys/fs/cgroup"} {
			dir := filepath.Join(root, parent)
			subs, _ := os.ReadDir(dir)
			for _, s := range subs {
				if s.IsDir() {
					_ = os.Remove(filepath.Join(dir, s.Name()))
				}
			}
			_ = os.Remove(dir)
		}
	})
	return parent
}

// Logger returns a logrus entry that writes to t.Log.
func Logger(t testing.TB) *logrus.Entry {
	l := logrus.New()
	l.SetOutput(tWriter{t})
	l.SetLevel(logrus.DebugLevel)
	return logrus.NewEntry(l)
}

type tWriter struct{ t testing.TB }

func (w tWriter) Write(p []byte) (int, error) {
	w.t.Helper()
	w.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}

var (
	buildMu  sync.Mutex
	binDir   string
	binCache = map[string]string{}
)

// Main runs a package's tests and removes what the helpers built.
func Main(m *testing.M) int {
	code := m.Run()
	if binDir != "" {
		os.RemoveAll(binDir)
	}
	return code
}

// EnvTestBinDir names the environment variable that makes Build use prebuilt binaries
// instead of running the go tool: DIR/NAME for package ./.../NAME. It is for test
// binaries that run where no go tool or source is, such as inside an internal/vmtest guest.
const EnvTestBinDir = "DUPLEX_TESTBIN_DIR"

// Build compiles a main package of this module once per test binary and returns
// the binary's path, e.g. Build(t, "./internal/testprog"). With $DUPLEX_TESTBIN_DIR set,
// it returns the prebuilt binary there instead.
func Build(t testing.TB, pkg string) string {
	t.Helper()
	buildMu.Lock()
	defer buildMu.Unlock()
	if p, ok := binCache[pkg]; ok {
		return p
	}
	if dir := os.Getenv(EnvTestBinDir); dir != "" {
		p := filepath.Join(dir, filepath.Base(pkg))
		if st, err := os.Stat(p); err != nil || !st.Mode().IsRegular() {
			t.Fatalf("%s=%s but no prebuilt %s there for %s", EnvTestBinDir, dir, filepath.Base(pkg), pkg)
		}
		binCache[pkg] = p
		return p
	}
	if binDir == "" {
		d, err := os.MkdirTemp("", "duplex-testbin-")
		if err != nil {
			t.Fatal(err)
		}
		binDir = d
	}
	out := filepath.Join(binDir, filepath.Base(pkg))
	cmd := exec.Command("go", "build", "-o", out, pkg)
	cmd.Dir = ModuleRoot(t)
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("build %s: %v\n%s", pkg, err, b)
	}
	binCache[pkg] = out
	return out
}

// ModuleRoot returns the directory holding go.mod.
func ModuleRoot(t testing.TB) string {
	t.Helper()
	_, file, _, _ := runtime.Caller(0)
	return filepath.Clean(filepath.Join(filepath.Dir(file), "..", ".."))
}

// Eventually polls cond every 10 ms until it holds or timeout passes.
func Eventually(t testing.TB, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for %s", timeout, what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}
