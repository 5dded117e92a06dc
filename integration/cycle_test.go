package integration

import (
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/duplex-ha/duplex/cluster"
	"github.com/duplex-ha/duplex/integration/harness"
	"github.com/duplex-ha/duplex/internal/api"
	"github.com/duplex-ha/duplex/internal/testutil"
	"github.com/duplex-ha/duplex/internal/workload"
)

// cycleCluster is hosts namespace hosts and a client with the cycle config. h0
// serves the embedded etcd and is never the unstable host.
func cycleCluster(t *testing.T, hosts int, controller string, args func(host string) []string) (*harness.Cluster, *harness.Duplex, string) {
	t.Helper()
	return startCluster(t, hosts, harness.DuplexOptions{LogLevel: "info", Args: args},
		func(dir, host string) string { return harness.CycleConfig(dir, controller)(host) })
}

func clusterView(t *testing.T, h *harness.Daemon) api.ClusterView {
	t.Helper()
	var v api.ClusterView
	if err := json.Unmarshal([]byte(must(t, h, "hosts", "-o", "json")), &v); err != nil {
		t.Fatal(err)
	}
	return v
}

func hostView(t *testing.T, h *harness.Daemon, name string) api.HostView {
	for _, hv := range clusterView(t, h).Hosts {
		if hv.Name == name {
			return hv
		}
	}
	t.Fatalf("hosts does not list %s", name)
	return api.HostView{}
}

// The whole cycle: a leak on h1 → unstable → all of h1's workloads (three, one
// with a client's TCP stream through its VIP) duplexed to the target the mode
// picks → h1 off the available list → rejuvenated (simulated restart) → back as a
// spare, every step in the store's history.
func TestCycleActiveStandby(t *testing.T) {
	wholeCycle(t, cluster.ActiveStandby)
}

func TestCycleActiveActive(t *testing.T) {
	wholeCycle(t, cluster.ActiveActive)
}

func wholeCycle(t *testing.T, mode cluster.Mode) {
	// active/standby: h0 and h1 primaries, h2 the spare.
	// active/active: three primaries; h2 has the least free capacity that fits h1's
	// workloads, so it is the best fit, and h0 has room to spare.
	args := func(host string) []string {
		switch {
		case mode == cluster.ActiveStandby && host == "h2":
			return []string{"--role", "spare"}
		case mode == cluster.ActiveActive && host == "h0":
			return []string{"--capacity", "16GiB"}
		case mode == cluster.ActiveActive && host == "h2":
			return []string{"--capacity", "2GiB"}
		}
		return nil
	}
	c, d, _ := cycleCluster(t, 3, "", args)
	h0, h1, h2, client := d.Hosts[0], d.Hosts[1], d.Hosts[2], c.Clients[0]
	must(t, h0, "mode", string(mode))

	// h1's workloads: an echo service on a VIP with a streaming client, a counter,
	// a sleeper, and a pinned host agent that will leak.
	vip := c.VIP(0)
	runEcho(t, h1, vip, 10*time.Second)
	must(t, h1, "run", "counter", "--", "sh", "-c", "i=0; while :; do i=$((i+1)); echo $i; sleep 0.05; done")
	must(t, h1, "run", "sleeper", "--", "sleep", "3600")
	s := streamTo(t, client, vip, 256<<10, 4096, 64<<10)
	// A target is expected to be stable before the leak starts.
	testutil.Eventually(t, 20*time.Second, "every host reporting stable", func() bool {
		for _, hv := range clusterView(t, h0).Hosts {
			if hv.Report == nil || hv.Report.Unstable {
				return false
			}
		}
		return true
	})
	if p := must(t, h0, "plan"); !strings.Contains(p, "stable") {
		t.Errorf("plan before the leak:\n%s", p)
	}
	if st := must(t, h1, "status"); !strings.Contains(st, "cluster   primary, on the available list; mode "+string(mode)) {
		t.Errorf("status of h1 before the leak:\n%s", st)
	}

	if err := os.WriteFile(filepath.Join(h1.Dir, "scratch", "junk"), []byte("state that rejuvenation clears"), 0o644); err != nil {
		t.Fatal(err)
	}
	load := testutil.Build(t, "./cmd/duplex-load")
	copyFile(t, load, filepath.Join(h1.Dir, "duplex-load"))
	must(t, h1, "run", "agent", "--pin", "--", filepath.Join(h1.Dir, "duplex-load"), "leak", "--rate", "20M", "--max", "1G")
	restarts, restarted := h1.Restarts()

	want := "h2"
	testutil.Eventually(t, 90*time.Second, "h1 back as a spare after its rejuvenation", func() bool {
		hv := hostView(t, h0, "h1")
		return hv.Alive && hv.Role == cluster.RoleSpare && hv.Available && hv.Cycle == nil
	})
	select {
	case <-restarted:
	default:
		t.Fatal("h1 was never restarted")
	}
	if n, _ := h1.Restarts(); n != restarts+1 {
		t.Errorf("h1 restarted %d times, want 1", n-restarts)
	}

	// Every workload but the pinned agent runs on the target, and nothing on h1.
	for _, name := range []string{"echo", "counter", "sleeper"} {
		r, ok := recordOn(t, d.Host(want), name)
		if !ok || r.State != workload.Running {
			t.Errorf("%s on %s: %+v (listed %v)", name, want, r.State, ok)
		}
	}
	if out := must(t, h1, "ps", "-a", "-o", "json"); strings.TrimSpace(out) != "[]" && strings.TrimSpace(out) != "null" {
		t.Errorf("h1 still has workloads after its restart: %s", out)
	}
	if _, err := os.Stat(filepath.Join(h1.Dir, "scratch", "junk")); !os.IsNotExist(err) {
		t.Errorf("h1's scratch state survived its rejuvenation: %v", err)
	}
	other := h0
	if _, ok := recordOn(t, other, "echo"); ok {
		t.Errorf("echo also listed on %s", other.Node.Name)
	}

	// The client kept its connection and every byte; the VIP answers from the target.
	before := s.Stats().BytesVerified
	testutil.Eventually(t, 10*time.Second, "stream traffic after the cycle", func() bool { return s.Stats().BytesVerified > before+128<<10 })
	st := s.Stop()
	t.Logf("stream: %+v", st)
	if st.Err != nil {
		t.Fatalf("client stream broke: %v", st.Err)
	}
	if mac := neighbourMAC(t, client, vip.Addr()); mac != d.Host(want).Node.MAC.String() {
		t.Errorf("client resolves the VIP to %s, want %s's %s", mac, want, d.Host(want).Node.MAC)
	}

	// Roles and the history, step by step.
	if hv := hostView(t, h0, want); hv.Role != cluster.RolePrimary {
		t.Errorf("the target %s is %s, want primary", want, hv.Role)
	}
	var evs []cluster.Event
	if err := json.Unmarshal([]byte(must(t, h2, "history", "--host", "h1", "--limit", "0", "-o", "json")), &evs); err != nil {
		t.Fatal(err)
	}
	var stepsSeen []string
	moved := map[string]bool{}
	for _, e := range evs {
		stepsSeen = append(stepsSeen, e.Step)
		if e.Step == "target selected" && e.Target != want {
			t.Errorf("target %s selected, want %s (%s)", e.Target, want, e.Detail)
		}
		if e.Step == "moved" {
			moved[e.Workload] = true
		}
	}
	wantSteps := []string{"cycle started", "target selected", "duplexed", "decided to rejuvenate", "removed from available list",
		"rejuvenation signalled", "rejuvenated", "registered as spare"}
	i := 0
	for _, s := range stepsSeen {
		if i < len(wantSteps) && s == wantSteps[i] {
			i++
		}
	}
	if i < len(wantSteps) || len(moved) != 3 || !moved["echo"] || !moved["counter"] || !moved["sleeper"] {
		t.Errorf("history of h1: %q, moved %v; want %q in order and echo, counter, sleeper moved", stepsSeen, moved, wantSteps)
	}
	t.Logf("history:\n%s", must(t, h0, "history", "--host", "h1"))
}

// The controller's duplexd is killed (SIGKILL) between two workload migrations and
// comes back (as systemd would restart it): the new leader finishes the cycle; no
// workload is lost or runs twice. h3 is the only host running a controller, so the
// leader is known; the others run with --no-controller.
func TestCycleControllerKilledMidCycle(t *testing.T) {
	args := func(host string) []string {
		switch host {
		case "h2":
			return []string{"--role", "spare", "--no-controller"}
		case "h3":
			return nil
		}
		return []string{"--no-controller"}
	}
	_, d, _ := cycleCluster(t, 4, "  parallel: 1", args)
	h0, h1, h2, h3 := d.Hosts[0], d.Hosts[1], d.Hosts[2], d.Hosts[3]
	testutil.Eventually(t, 20*time.Second, "h3 to lead", func() bool { return clusterView(t, h0).Leader == "h3" })

	names := []string{"c1", "c2", "c3", "c4"}
	for _, n := range names {
		must(t, h1, "run", n, "--", "sh", "-c", "i=0; while :; do i=$((i+1)); echo $i; sleep 0.05; done")
	}
	load := testutil.Build(t, "./cmd/duplex-load")
	copyFile(t, load, filepath.Join(h1.Dir, "duplex-load"))
	must(t, h1, "run", "agent", "--pin", "--", filepath.Join(h1.Dir, "duplex-load"), "leak", "--rate", "20M", "--max", "1G")

	moved := func() int {
		var evs []cluster.Event
		_ = json.Unmarshal([]byte(must(t, h0, "history", "--host", "h1", "--limit", "0", "-o", "json")), &evs)
		n := 0
		for _, e := range evs {
			if e.Step == "moved" {
				n++
			}
		}
		return n
	}
	testutil.Eventually(t, 60*time.Second, "the first workload moved", func() bool { return moved() >= 1 })
	if err := h3.Proc.Stop(syscall.SIGKILL, time.Second); err != nil {
		t.Fatal(err)
	}
	t.Logf("killed the controller's duplexd on h3 after %d migration(s)", moved())
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if err := h3.Start(ctx); err != nil {
		t.Fatal(err)
	}

	testutil.Eventually(t, 90*time.Second, "h1 back as a spare", func() bool {
		hv := hostView(t, h0, "h1")
		return hv.Alive && hv.Role == cluster.RoleSpare && hv.Available && hv.Cycle == nil
	})
	// Every workload runs exactly once, on h2, and kept counting from where it was.
	for _, n := range names {
		var on []string
		for _, h := range d.Hosts {
			if r, ok := recordOn(t, h, n); ok && r.State == workload.Running {
				on = append(on, h.Node.Name)
			}
		}
		if len(on) != 1 || on[0] != "h2" {
			t.Errorf("%s runs on %v, want only h2", n, on)
			continue
		}
		for i, v := range numbers(must(t, h2, "logs", n)) {
			if v != i+1 {
				t.Errorf("%s: line %d is %d: it did not continue where it stopped", n, i+1, v)
				break
			}
		}
	}
	var evs []cluster.Event
	if err := json.Unmarshal([]byte(must(t, h0, "history", "--host", "h1", "--limit", "0", "-o", "json")), &evs); err != nil {
		t.Fatal(err)
	}
	terms := map[string]bool{}
	for _, e := range evs {
		terms[e.Term] = true
	}
	if len(terms) < 2 {
		t.Errorf("the history was written in %d term(s) of leadership, want 2 (before and after the kill)", len(terms))
	}
	t.Logf("history:\n%s", must(t, h0, "history", "--host", "h1"))
}
