package integration

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/duplex-ha/duplex/internal/testutil"
	"github.com/duplex-ha/duplex/internal/vmtest"
)

// TestPreCopyInGuest proves pre-copy end to end where the kernel tracks dirty
// memory: this build machine's kernel does not, so migrate's own pre-copy test
// (real CRIU pre-dump rounds through page channels into per-round directories, a
// final incremental dump, a lazy restore, and a workload that checks every page
// of its memory afterwards) runs inside a VM guest booting Debian's 6.1 kernel.
func TestPreCopyInGuest(t *testing.T) {
	testutil.RequiresVM(t)
	dir := t.TempDir()
	build := func(args ...string) { goCmd(t, args...) }
	build("test", "-c", "-o", filepath.Join(dir, "migrate.test"), "./migrate")
	build("build", "-o", filepath.Join(dir, "bin", "testprog"), "./internal/testprog")

	tests := []string{"TestMigratePreCopy"}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	res, err := vmtest.Run(ctx, vmtest.Config{
		Files: map[string]string{
			"/duplex/migrate.test": filepath.Join(dir, "migrate.test"),
			"/duplex/bin":          filepath.Join(dir, "bin"),
		},
		// 32 MiB, of which 4 MiB are rewritten at 4 MiB/s: several rounds under
		// emulation, and well within a couple of minutes.
		Env: []string{testutil.EnvTestBinDir + "=/duplex/bin", "DUPLEX_PRECOPY_SIZE=32M", "DUPLEX_PRECOPY_HOT=4M"},
		Command: []string{"/duplex/migrate.test", "-test.v", "-test.count=1",
			"-test.run", "^(" + strings.Join(tests, "|") + ")$"},
		Timeout: 4 * time.Minute,
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("guest (%s) ran in %s, exit %d", res.Accel, res.Wall.Round(time.Millisecond), res.ExitCode)
	// The guest test's own figures: rounds, frozen time, downtime.
	for _, l := range strings.Split(res.Output, "\n") {
		if strings.Contains(l, "pre-copy:") || strings.Contains(l, "progress:") || strings.HasPrefix(strings.TrimSpace(l), "---") || strings.Contains(l, "migrate_test.go") {
			t.Log(strings.TrimSpace(l))
		}
	}
	if res.ExitCode != 0 {
		t.Errorf("migrate.test exited %d in the guest:\n%s", res.ExitCode, tailOf(res.Output, 60))
	}
	for _, name := range tests {
		if !strings.Contains(res.Output, "--- PASS: "+name+" ") {
			t.Errorf("%s did not pass in the guest", name)
		}
	}
	// It ran, not skipped: the rounds are in its log.
	if !regexp.MustCompile(`pre-copy: [1-9]\d* rounds`).MatchString(res.Output) {
		t.Errorf("no pre-copy rounds in the guest's output: the test did not really run")
	}
}

// goCmd runs the go tool in the module, statically linked (the guest has no libc).
func goCmd(t *testing.T, args ...string) {
	t.Helper()
	cmd := exec.Command("go", args...)
	cmd.Dir = testutil.ModuleRoot(t)
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go %s: %v\n%s", strings.Join(args, " "), err, out)
	}
}
