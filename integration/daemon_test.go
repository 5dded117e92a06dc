package integration

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/duplex-ha/duplex/internal/testutil"
	"github.com/duplex-ha/duplex/internal/workload"
)

func TestMain(m *testing.M) { os.Exit(testutil.Main(m)) }

// host is one duplexd under test, with its own state directory, socket and cgroups.
type host struct {
	t      testing.TB
	extra  []string // more duplexd flags
	dir    string
	socket string
	cg     string
	ctl    string // duplexctl binary
	daemon *exec.Cmd
	logs   *bytes.Buffer
	exited chan error
}

// newHost builds the binaries and starts a duplexd that is stopped (and its
// workloads killed) when the test ends.
func newHost(t testing.TB, extra ...string) *host {
	t.Helper()
	testutil.RequiresRoot(t)
	base, err := os.MkdirTemp("", "duplex-it-")
	if err != nil {
		t.Fatal(err)
	}
	// World-traversable, so a non-root client can reach the socket and binaries.
	if err := os.Chmod(base, 0o755); err != nil {
		t.Fatal(err)
	}
	h := &host{t: t, dir: base, socket: filepath.Join(base, "duplexd.sock"), cg: testutil.CgroupParent(t), extra: extra}
	h.ctl = filepath.Join(base, "duplexctl")
	copyFile(t, testutil.Build(t, "./cmd/duplexctl"), h.ctl)
	h.start()
	t.Cleanup(func() {
		// Kill whatever still runs, then the daemon, then remove the files.
		out, _, _ := h.run("ps", "-o", "json")
		var recs []workload.Record
		_ = json.Unmarshal([]byte(out), &recs)
		for _, r := range recs {
			h.run("stop", "--timeout", "0s", r.Name)
		}
		h.stop()
		if t.Failed() {
			t.Logf("duplexd log:\n%s", h.logs.String())
		}
		os.RemoveAll(base)
	})
	return h
}

func copyFile(t testing.TB, src, dst string) {
	b, err := os.ReadFile(src)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(dst, b, 0o755); err != nil {
		t.Fatal(err)
	}
}

func (h *host) start() {
	h.t.Helper()
	bin := testutil.Build(h.t, "./cmd/duplexd")
	h.logs = &bytes.Buffer{}
	args := []string{"--state-dir", filepath.Join(h.dir, "state"), "--socket", h.socket,
		"--cgroup-parent", h.cg, "--log-level", "debug", "--run-dir", filepath.Join(h.dir, "run")}
	if !slices.Contains(h.extra, "--config") {
		args = append(args, "--config", "/dev/null")
	}
	if !slices.Contains(h.extra, "--metrics-listen") {
		args = append(args, "--metrics-listen", "")
	}
	h.daemon = exec.Command(bin, append(args, h.extra...)...)
	h.daemon.Stdout, h.daemon.Stderr = h.logs, h.logs
	if err := h.daemon.Start(); err != nil {
		h.t.Fatal(err)
	}
	h.exited = make(chan error, 1)
	go func(c *exec.Cmd) { h.exited <- c.Wait() }(h.daemon)
	testutil.Eventually(h.t, 10*time.Second, "duplexd to listen", func() bool {
		_, _, code := h.run("version")
		_, err := os.Stat(h.socket)
		return code == 0 && err == nil
	})
}

// stop ends duplexd with SIGTERM, as systemd would.
func (h *host) stop() {
	if h.daemon == nil {
		return
	}
	_ = h.daemon.Process.Signal(syscall.SIGTERM)
	select {
	case <-h.exited:
	case <-time.After(10 * time.Second):
		_ = h.daemon.Process.Kill()
		<-h.exited
		h.t.Errorf("duplexd did not stop on SIGTERM")
	}
	h.daemon = nil
}

// run runs duplexctl against this host and returns stdout, stderr and exit code.
func (h *host) run(args ...string) (string, string, int) {
	return h.runAs(nil, args...)
}

func (h *host) runAs(cred *syscall.Credential, args ...string) (string, string, int) {
	cmd := exec.Command(h.ctl, append([]string{"--socket", h.socket}, args...)...)
	cmd.Dir = h.dir
	if cred != nil {
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: cred}
	}
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	code := 0
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		code = ee.ExitCode()
	} else if err != nil {
		h.t.Fatalf("duplexctl %v: %v", args, err)
	}
	return out.String(), errb.String(), code
}

// must runs duplexctl and fails the test unless it succeeds.
func (h *host) must(args ...string) string {
	h.t.Helper()
	out, errs, code := h.run(args...)
	if code != 0 {
		h.t.Fatalf("duplexctl %s: exit %d\nstdout: %s\nstderr: %s", strings.Join(args, " "), code, out, errs)
	}
	return out
}

// fails runs duplexctl, expects exit status 1 and an error on stderr containing want.
func (h *host) fails(want string, args ...string) {
	h.t.Helper()
	out, errs, code := h.run(args...)
	if code != 1 || !strings.Contains(errs, want) {
		h.t.Errorf("duplexctl %s: exit %d, stderr %q; want exit 1 and %q\nstdout: %s", strings.Join(args, " "), code, errs, want, out)
	}
}

func (h *host) record(name string) workload.Record {
	h.t.Helper()
	var r []workload.Record
	if err := json.Unmarshal([]byte(h.must("ps", "-a", "-o", "json")), &r); err != nil {
		h.t.Fatal(err)
	}
	for _, x := range r {
		if x.Name == name {
			return x
		}
	}
	h.t.Fatalf("workload %s not listed", name)
	return workload.Record{}
}

// numbers parses the integers a counter printed.
func numbers(s string) []int {
	var out []int
	for _, l := range strings.Split(strings.TrimSpace(s), "\n") {
		if n, err := strconv.Atoi(l); err == nil {
			out = append(out, n)
		}
	}
	return out
}

func TestCLIWorkloadLifecycle(t *testing.T) {
	testutil.RequiresCRIU(t)
	h := newHost(t)
	prog := testutil.Build(t, "./internal/testprog")
	copyFile(t, prog, filepath.Join(h.dir, "testprog"))
	prog = filepath.Join(h.dir, "testprog")

	out := h.must("run", "counter", "--", prog, "counter")
	if !strings.Contains(out, "counter running (pid ") {
		t.Errorf("run printed %q", out)
	}
	ps := h.must("ps")
	if !strings.Contains(ps, "NAME") || !strings.Contains(ps, "counter") || !strings.Contains(ps, "running") {
		t.Errorf("ps table:\n%s", ps)
	}
	testutil.Eventually(t, 5*time.Second, "output in logs", func() bool {
		return len(numbers(h.must("logs", "counter"))) >= 10
	})
	if n := numbers(h.must("logs", "--tail", "3", "counter")); len(n) != 3 {
		t.Errorf("logs --tail 3 gave %v", n)
	}

	images := filepath.Join(h.dir, "images")
	out = h.must("checkpoint", "counter", "--dir", images)
	if !strings.Contains(out, "counter checkpointed: frozen ") {
		t.Errorf("checkpoint printed %q", out)
	}
	if r := h.record("counter"); r.State != workload.Checkpointed {
		t.Errorf("after checkpoint: %s", r.State)
	}
	if ps := h.must("ps"); strings.Contains(ps, "counter") {
		t.Errorf("ps lists a checkpointed workload without -a:\n%s", ps)
	}
	var res struct {
		Workload workload.Record
		Stats    struct {
			Pid       int     `json:"pid"`
			RestoreMS float64 `json:"restore_ms"`
		}
	}
	if err := json.Unmarshal([]byte(h.must("restore", "--dir", images, "-o", "json")), &res); err != nil {
		t.Fatal(err)
	}
	if res.Workload.State != workload.Running || res.Stats.Pid != res.Workload.Pid || res.Stats.RestoreMS <= 0 {
		t.Errorf("restore reply: %+v", res)
	}
	before := len(numbers(h.must("logs", "counter")))
	testutil.Eventually(t, 5*time.Second, "counting after restore", func() bool {
		return len(numbers(h.must("logs", "counter"))) > before+5
	})
	for i, n := range numbers(h.must("logs", "counter")) {
		if n != i+1 {
			t.Fatalf("log line %d is %d: counting did not continue where it stopped", i+1, n)
		}
	}

	h.must("stop", "--timeout", "100ms", "counter")
	if r := h.record("counter"); r.State != workload.Stopped {
		t.Errorf("after stop: %s", r.State)
	}
	h.must("rm", "counter")
	if out := h.must("ps", "-a"); strings.Contains(out, "counter") {
		t.Errorf("ps -a lists a removed workload:\n%s", out)
	}
}

func TestDaemonRestartAdoptsWorkloads(t *testing.T) {
	h := newHost(t)
	h.must("run", "sleeper", "--", "sleep", "300")
	before := h.record("sleeper")

	h.stop()
	if _, err := os.Stat(fmt.Sprintf("/proc/%d", before.Pid)); err != nil {
		t.Fatalf("workload died with the daemon: %v", err)
	}
	h.fails("duplexd is not reachable", "ps")

	h.start()
	after := h.record("sleeper")
	if after.State != workload.Running || after.Pid != before.Pid {
		t.Fatalf("after restart: %s pid %d, want running pid %d", after.State, after.Pid, before.Pid)
	}
	if !strings.Contains(h.logs.String(), "adopted running workload") {
		t.Errorf("daemon log does not mention the adoption:\n%s", h.logs.String())
	}
	h.must("stop", "--timeout", "0s", "sleeper")
	testutil.Eventually(t, 5*time.Second, "workload to die", func() bool {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", before.Pid))
		return err != nil || strings.Contains(string(b), ") Z ")
	})
}

func TestCLIBadInput(t *testing.T) {
	testutil.RequiresCRIU(t)
	h := newHost(t)

	h.fails("no such workload: ghost", "stop", "ghost")
	h.fails("no such workload: ghost", "logs", "ghost")
	h.fails("no such workload: ghost", "checkpoint", "ghost", "--dir", filepath.Join(h.dir, "x"))
	h.fails(`"no-such-command-xyz" not found in PATH`, "run", "bad", "--", "no-such-command-xyz")
	h.fails("no such file or directory", "run", "bad", "--", "/no/such/binary")
	h.fails("name", "run", "bad/name", "--", "true")
	h.fails("usage: duplexctl run NAME -- COMMAND", "run", "nodash", "true")
	h.fails("unknown output format", "ps", "-o", "yaml")
	h.fails("not a duplex checkpoint", "restore", "--dir", h.dir)
	if out := h.must("ps", "-a"); strings.Contains(out, "bad") {
		t.Errorf("failed runs left records:\n%s", out)
	}

	h.must("run", "dup", "--", "sleep", "300")
	h.fails("workload already exists: dup is running", "run", "dup", "--", "sleep", "1")
	// An image directory that cannot be created: its parent is a file.
	blocker := filepath.Join(h.dir, "blocker")
	if err := os.WriteFile(blocker, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	h.fails("image directory", "checkpoint", "dup", "--dir", filepath.Join(blocker, "images"))
	if r := h.record("dup"); r.State != workload.Running {
		t.Errorf("workload after a failed checkpoint: %s", r.State)
	}
}

func TestNonRootCallerIsRefused(t *testing.T) {
	h := newHost(t)
	nobody := &syscall.Credential{Uid: 65534, Gid: 65534}

	// The socket file is root-only.
	_, errs, code := h.runAs(nobody, "run", "evil", "--", "sleep", "1")
	if code != 1 || !strings.Contains(errs, "permission denied") || !strings.Contains(errs, "root-only") {
		t.Errorf("non-root on a 0600 socket: exit %d, stderr %q", code, errs)
	}
	// Even with the file opened up, the daemon checks the peer's credentials.
	if err := os.Chmod(h.socket, 0o666); err != nil {
		t.Fatal(err)
	}
	_, errs, code = h.runAs(nobody, "run", "evil", "--", "sleep", "1")
	if code != 1 || !strings.Contains(errs, "duplexd serves only root (caller uid 65534)") {
		t.Errorf("non-root on an open socket: exit %d, stderr %q", code, errs)
	}
	if out := h.must("ps", "-a"); strings.Contains(out, "evil") {
		t.Errorf("a refused caller created a workload:\n%s", out)
	}
}

func TestSecondDaemonRefused(t *testing.T) {
	h := newHost(t)
	bin := testutil.Build(t, "./cmd/duplexd")
	out, err := exec.Command(bin, "--state-dir", filepath.Join(h.dir, "state"), "--socket", filepath.Join(h.dir, "other.sock"), "--config", "/dev/null").CombinedOutput()
	if err == nil || !strings.Contains(string(out), "in use by another duplexd") {
		t.Errorf("second daemon on the same state dir: %v\n%s", err, out)
	}
	out, err = exec.Command(bin, "--state-dir", filepath.Join(h.dir, "state2"), "--socket", h.socket, "--config", "/dev/null").CombinedOutput()
	if err == nil || !strings.Contains(string(out), "already listening") {
		t.Errorf("second daemon on the same socket: %v\n%s", err, out)
	}
}

func TestDoctor(t *testing.T) {
	testutil.RequiresCRIU(t)
	h := newHost(t)
	out, errs, code := h.run("doctor", "-o", "json")
	if code != 0 {
		t.Fatalf("doctor exit %d on a host that passes 'criu check'\n%s\n%s", code, out, errs)
	}
	var rep struct {
		OK     bool `json:"ok"`
		Checks []struct {
			Name, Status, Detail string
			Required             bool
		} `json:"checks"`
	}
	if err := json.Unmarshal([]byte(out), &rep); err != nil {
		t.Fatal(err)
	}
	byName := map[string]string{}
	for _, c := range rep.Checks {
		byName[c.Name] = c.Status
	}
	for _, name := range []string{"kernel", "criu", "criu-check", "uffd", "lazy-dump", "dirty-tracking", "nftables-lock", "cgroups", "tracefs", "btf", "ebpf-tracepoint", "thp"} {
		if byName[name] == "" {
			t.Errorf("doctor has no %q check", name)
		}
	}
	for _, must := range []string{"criu", "criu-check", "nftables-lock", "cgroups", "pidns"} {
		if byName[must] != "ok" {
			t.Errorf("%s is %q on this host", must, byName[must])
		}
	}
	// The dirty-tracking verdict must match what CRIU itself answers.
	_, cerr := exec.Command(checkpointPath(), "check", "--feature", "mem_dirty_track").CombinedOutput()
	want := "ok"
	if cerr != nil {
		want = "missing"
	}
	if byName["dirty-tracking"] != want {
		t.Errorf("dirty-tracking reported %q, CRIU says %q", byName["dirty-tracking"], want)
	}

	table := h.must("doctor")
	if !strings.Contains(table, "CHECK") || !strings.Contains(table, "dirty-tracking") || !strings.Contains(table, "verdict:") {
		t.Errorf("doctor table:\n%s", table)
	}
	_, errs, code = h.run("doctor", "--criu", "/nonexistent/criu", "-o", "json")
	out, _, _ = h.run("doctor", "--criu", "/nonexistent/criu")
	if code != 1 || !strings.Contains(out, "make deps") {
		t.Errorf("doctor without CRIU: exit %d, output:\n%s%s", code, out, errs)
	}
}

func TestLogsFollowEndsWithWorkload(t *testing.T) {
	h := newHost(t)
	h.must("run", "talker", "--", "sh", "-c", "for i in 1 2 3 4 5; do echo line$i; echo err$i >&2; sleep 0.1; done")
	start := time.Now()
	out := h.must("logs", "-f", "--stream", "stdout", "talker")
	if time.Since(start) > 10*time.Second {
		t.Errorf("logs -f did not end with the workload")
	}
	if !strings.Contains(out, "line1") || !strings.Contains(out, "line5") || strings.Contains(out, "err1") {
		t.Errorf("logs -f --stream stdout printed:\n%s", out)
	}
	if errs := h.must("logs", "--stream", "stderr", "talker"); !strings.Contains(errs, "err5") || strings.Contains(errs, "line") {
		t.Errorf("logs --stream stderr printed:\n%s", errs)
	}
	h.fails("stream", "logs", "--stream", "bogus", "talker")
}

func TestConfigFile(t *testing.T) {
	testutil.RequiresRoot(t)
	bin := testutil.Build(t, "./cmd/duplexd")
	dir := t.TempDir()
	bad := filepath.Join(dir, "bad.yaml")
	if err := os.WriteFile(bad, []byte("state_dir: /tmp/x\nbogus_key: 1\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command(bin, "--config", bad).CombinedOutput()
	if err == nil || !strings.Contains(string(out), "bogus_key") {
		t.Errorf("config with an unknown key: %v\n%s", err, out)
	}
	out, err = exec.Command(bin, "--config", filepath.Join(dir, "missing.yaml")).CombinedOutput()
	if err == nil || !strings.Contains(string(out), "missing.yaml") {
		t.Errorf("missing config file: %v\n%s", err, out)
	}
	out, err = exec.Command(bin, "--config", "/dev/null", "--log-format", "xml").CombinedOutput()
	if err == nil || !strings.Contains(string(out), "--log-format") {
		t.Errorf("bad log format: %v\n%s", err, out)
	}

	// A good file is used; a flag given on the command line wins over it.
	sock := filepath.Join(dir, "from-config.sock")
	good := filepath.Join(dir, "good.yaml")
	cfg := fmt.Sprintf("state_dir: %s\nsocket: %s\ncgroup_parent: %s\nlog_format: json\n", filepath.Join(dir, "state"), sock, testutil.CgroupParent(t))
	if err := os.WriteFile(good, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	var logs bytes.Buffer
	d := exec.Command(bin, "--config", good, "--log-level", "debug", "--metrics-listen", "")
	d.Stderr = &logs
	if err := d.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { _ = d.Process.Signal(syscall.SIGTERM); _ = d.Wait() }()
	testutil.Eventually(t, 10*time.Second, "the socket from the config file", func() bool {
		_, err := os.Stat(sock)
		return err == nil
	})
	_ = d.Process.Signal(syscall.SIGTERM)
	_ = d.Wait()
	var first map[string]any
	line, _, _ := strings.Cut(logs.String(), "\n")
	if err := json.Unmarshal([]byte(line), &first); err != nil {
		t.Errorf("log_format: json from the file not applied: %q", line)
	}
}

func TestCheckpointLeaveStoppedThenResume(t *testing.T) {
	testutil.RequiresCRIU(t)
	h := newHost(t)
	h.must("run", "pausable", "--", "sh", "-c", "i=0; while :; do i=$((i+1)); echo $i; sleep 0.02; done")
	testutil.Eventually(t, 5*time.Second, "output", func() bool { return len(numbers(h.must("logs", "pausable"))) > 5 })
	h.must("checkpoint", "pausable", "--leave-stopped", "--dir", filepath.Join(h.dir, "img"))
	if r := h.record("pausable"); r.State != workload.Frozen {
		t.Fatalf("after --leave-stopped: %s", r.State)
	}
	n := len(numbers(h.must("logs", "pausable")))
	time.Sleep(200 * time.Millisecond)
	if m := len(numbers(h.must("logs", "pausable"))); m != n {
		t.Errorf("frozen workload kept printing (%d -> %d lines)", n, m)
	}
	h.fails("workload is not running", "checkpoint", "pausable", "--dir", filepath.Join(h.dir, "img2"))
	h.must("resume", "pausable")
	testutil.Eventually(t, 5*time.Second, "output after resume", func() bool { return len(numbers(h.must("logs", "pausable"))) > n+5 })
	h.fails("workload is not running", "resume", "pausable")
}
