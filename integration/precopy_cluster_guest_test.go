package integration

import (
	"context"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/duplex-ha/duplex/internal/testutil"
	"github.com/duplex-ha/duplex/internal/vmtest"
)

// TestPreCopyBetweenHostsInGuest proves pre-copy duplexd to duplexd: this build
// machine's kernel lacks dirty-memory tracking, so this package's own precopy
// subtests (two namespace hosts with their own duplexd and embedded etcd, a counter
// moved by `duplexctl migrate --strategy precopy`, and an echo service whose client
// streams through its address meanwhile) run inside a VM guest booting Debian's 6.1
// kernel, which has it. There they skip nothing: a missing feature would show as a
// skip, which fails this test.
func TestPreCopyBetweenHostsInGuest(t *testing.T) {
	testutil.RequiresVM(t)
	dir := t.TempDir()
	bin := filepath.Join(dir, "bin")
	build := func(args ...string) { goCmd(t, args...) }
	// Stripped: the guest holds its files in memory and unpacks them under emulation.
	build("test", "-c", "-ldflags=-s -w", "-o", filepath.Join(dir, "integration.test"), "./integration")
	for _, pkg := range []string{"./cmd/duplexd", "./cmd/duplexctl", "./integration/harness/echoserver"} {
		build("build", "-ldflags=-s -w", "-o", filepath.Join(bin, filepath.Base(pkg)), pkg)
	}

	subtests := []string{"TestMigrateCounterBetweenHosts/precopy", "TestMigrateKeepsClientConnection/precopy"}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	res, err := vmtest.Run(ctx, vmtest.Config{
		Files: map[string]string{
			"/duplex/integration.test": filepath.Join(dir, "integration.test"),
			"/duplex/bin":              bin,
		},
		Env: []string{testutil.EnvTestBinDir + "=/duplex/bin"},
		Command: []string{"/duplex/integration.test", "-test.v", "-test.count=1",
			"-test.run", "^(TestMigrateCounterBetweenHosts|TestMigrateKeepsClientConnection)$/^precopy$"},
		MemoryMiB: 3072,
		Timeout:   4 * time.Minute,
	})
	if err != nil {
		if res != nil {
			t.Logf("guest output so far:\n%s", tailOf(res.Output, 6000))
		}
		t.Fatal(err)
	}
	t.Logf("guest (%s) ran in %s, exit %d", res.Accel, res.Wall.Round(time.Millisecond), res.ExitCode)
	// The guest tests' own figures: rounds, frozen time, downtime, the client's stream.
	for _, l := range strings.Split(res.Output, "\n") {
		l = strings.TrimSpace(l)
		if strings.HasPrefix(l, "---") || strings.Contains(l, "migrate_test.go") || strings.Contains(l, "pre-copy round") ||
			strings.HasPrefix(l, "downtime (ms)") {
			t.Log(l)
		}
	}
	if res.ExitCode != 0 {
		t.Errorf("integration.test exited %d in the guest:\n%s", res.ExitCode, tailOf(res.Output, 6000))
	}
	for _, name := range subtests {
		if !strings.Contains(res.Output, "--- PASS: "+name+" ") {
			t.Errorf("%s did not pass in the guest", name)
		}
	}
	// They ran, not skipped: the rounds are in their logs.
	if !regexp.MustCompile(`pre-copy: [1-9]\d* rounds`).MatchString(res.Output) {
		t.Errorf("no pre-copy rounds in the counter's migration: it did not really run")
	}
	if !strings.Contains(res.Output, "pre-copy round 1:") {
		t.Errorf("no pre-copy round in the echo service's migration summary: it did not really run")
	}
}
