// Command demo shows duplex's whole cycle on one machine, run by the cluster
// controller itself. Three hosts and a client are network namespaces on one
// bridge; duplexd runs on each host (embedded etcd on h0) in active-standby mode,
// h0 and h1 primaries and h2 the spare. h0 serves a ticker; h1 serves a TCP echo
// service on a service address, with the client streaming through it, and a
// counter; then a pinned agent on h1 starts leaking memory. h1's monitor turns unstable, the controller
// duplexes h1's workloads live to the spare h2, takes h1 off the available list
// and signals its rejuvenation, whose ladder ends in a restart (the harness plays
// h1's hardware: it restarts h1's duplexd when it exits with status 75), and
// registers h1 again as the spare. The demo narrates each step from
// `duplexctl hosts`, `status`, `plan` and `history`, then proves that the client
// kept its TCP connection and that the service address now answers from h2.
//
// It fails (exit 1) if the cycle does not complete within --cycle-timeout (two
// minutes) of the leak, printing the end of each duplexd's output. It cleans up
// after itself, also on failure and Ctrl-C (exit 130): workloads, duplexd,
// namespaces, cgroups, temporary files, and checks that none is left. `make demo`
// builds the binaries and runs it as root.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io/fs"
	"net/netip"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"time"

	"github.com/duplex-ha/duplex/cluster"
	"github.com/duplex-ha/duplex/integration/harness"
	"github.com/duplex-ha/duplex/internal/api"
)

const (
	streamRate = 512 << 10 // the client's bytes per second
	pollEvery  = 300 * time.Millisecond
	tailBytes  = 4000 // of each duplexd's output on failure
)

// options are the programs the demo runs (run makes their paths absolute) and
// how long the cycle may take.
type options struct {
	duplexd, duplexctl, echo, load string
	cycleTimeout                   time.Duration // from the leak to h1 back as a spare
}

func main() {
	var o options
	flag.StringVar(&o.duplexd, "duplexd", "bin/duplexd", "duplexd binary")
	flag.StringVar(&o.duplexctl, "duplexctl", "bin/duplexctl", "duplexctl binary")
	flag.StringVar(&o.echo, "echoserver", "bin/echoserver", "echo server binary (the service the client streams through)")
	flag.StringVar(&o.load, "duplex-load", "bin/duplex-load", "duplex-load binary (the leaking agent)")
	flag.DurationVar(&o.cycleTimeout, "cycle-timeout", 2*time.Minute, "fail unless h1 is back as a spare this long after the leak starts")
	flag.Parse()
	verdict, err := run(o)
	if err != nil {
		if errors.Is(err, context.Canceled) {
			fmt.Fprintln(os.Stderr, "demo: interrupted")
			os.Exit(130)
		}
		fmt.Fprintf(os.Stderr, "demo: %s\n", err)
		os.Exit(1)
	}
	say("%s", verdict)
}

func say(format string, a ...any) {
	fmt.Printf("\n\033[1m==> "+format+"\033[0m\n", a...)
}

// note prints indented text under a say.
func note(format string, a ...any) {
	for _, l := range strings.Split(fmt.Sprintf(format, a...), "\n") {
		fmt.Println("    " + l)
	}
}

// hostConfig is every host's duplexd.yaml, as in the integration cycle tests
// (harness.CycleConfig).
func hostConfig(dir string) func(host string) string { return harness.CycleConfig(dir, "") }

// hostArgs makes h2 the spare; h0 and h1 join as primaries.
func hostArgs(host string) []string {
	if host == "h2" {
		return []string{"--role", "spare"}
	}
	return nil
}

// run shows the cycle and returns the verdict, printed once everything is cleaned
// up.
func run(o options) (verdict string, err error) {
	if os.Geteuid() != 0 {
		return "", errors.New("needs root (namespaces, cgroups, CRIU)")
	}
	for _, p := range []*string{&o.duplexd, &o.duplexctl, &o.echo, &o.load} {
		abs, err := filepath.Abs(*p)
		if err != nil {
			return "", fmt.Errorf("resolve %s: %w", *p, err)
		}
		if _, err := os.Stat(abs); err != nil {
			return "", fmt.Errorf("%w (run 'make demo', which builds it)", err)
		}
		*p = abs
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	defer func() {
		// A step cut short by Ctrl-C fails in its own words; the cause is the interrupt.
		if err != nil && ctx.Err() != nil {
			err = ctx.Err()
		}
	}()
	began := time.Now()

	say("Building a cluster on this machine: hosts h0, h1, h2 and a client c0, each a network namespace on one bridge")
	c, err := harness.New(ctx, harness.Options{Prefix: "dpxdemo", Hosts: 3, Clients: 1})
	if err != nil {
		return "", fmt.Errorf("build the cluster: %w", err)
	}
	var d *harness.Duplex
	dir := ""
	defer func() {
		if cerr := cleanup(c, d, dir); cerr != nil {
			cerr = fmt.Errorf("clean up: %w", cerr)
			fmt.Fprintf(os.Stderr, "demo: %s\n", cerr)
			err = errors.Join(err, cerr)
		}
	}()
	for _, n := range c.Nodes() {
		fmt.Printf("    %-3s %-15s %s\n", n.Name, n.Addr, n.MAC)
	}

	dir, err = os.MkdirTemp("", "duplex-demo-")
	if err != nil {
		return "", fmt.Errorf("make the state directory: %w", err)
	}
	if err := os.Chmod(dir, 0o755); err != nil {
		return "", fmt.Errorf("open up %s: %w", dir, err)
	}
	config := hostConfig(dir)
	say("Each host's duplexd.yaml (h1's shown)")
	note("%s", strings.TrimRight(config("h1"), "\n"))
	note(`
The namespace hosts share one kernel: host-wide memory would make them all
unstable together, so the detector watches each workload's memory (a rise held
for 5 s, or a trend over 10 s that predicts exhaustion). The controller starts a
cycle once a host has been unstable for 2 s. The ladder ends with "reboot: exit":
duplexd exits with status 75 and the harness plays the host's hardware, killing
everything in the host's namespace, wiping its state and starting duplexd again.`)

	say("Starting duplexd on h0, h1 and h2 (mutual TLS between agents, embedded etcd on h0, h2 joins as a spare)")
	d, err = harness.StartDuplex(ctx, c, harness.DuplexOptions{
		Duplexd: o.duplexd, Duplexctl: o.duplexctl, Dir: dir, CgroupParent: filepath.Base(dir),
		Config: config, Args: hostArgs,
	})
	if err != nil {
		return "", fmt.Errorf("start duplexd: %w", err)
	}
	defer func() {
		if err != nil && ctx.Err() == nil {
			for _, h := range d.Hosts {
				fmt.Fprintf(os.Stderr, "\n--- end of duplexd's output on %s ---\n%s\n", h.Node.Name, tail(h.Proc.Output(), tailBytes))
			}
		}
	}()
	h0, h1, h2, client := d.Hosts[0], d.Hosts[1], d.Hosts[2], c.Clients[0]

	say("Operation mode: active-standby (a spare serves nothing until an unstable host's workloads move to it)")
	if err := show(ctx, h0, "mode", string(cluster.ActiveStandby)); err != nil {
		return "", err
	}

	vip := c.VIP(0)
	addr := netip.AddrPortFrom(vip.Addr(), 9000)
	say("Workloads: a ticker on h0; on h1 an echo service bound to the service address %s, and a counter", vip.Addr())
	if _, err := h0.Ctl(ctx, "run", "ticker", "--", "sh", "-c", "while :; do date +%T; sleep 1; done"); err != nil {
		return "", err
	}
	if _, err := h1.Ctl(ctx, "run", "echo", "--vip", vip.String()+"@eth0", "--env", "GODEBUG=multipathtcp=0", "--", o.echo, "-listen", addr.String()); err != nil {
		return "", err
	}
	if _, err := h1.Ctl(ctx, "run", "counter", "--", "sh", "-c", "i=0; while :; do i=$((i+1)); echo $i; sleep 0.05; done"); err != nil {
		return "", err
	}
	if err := waitFor(ctx, 10*time.Second, "the echo service to listen", func() (bool, error) {
		out, err := h1.Ctl(ctx, "logs", "echo")
		return strings.Contains(out, "LISTENING"), err
	}); err != nil {
		return "", err
	}
	if err := show(ctx, h1, "ps"); err != nil {
		return "", err
	}

	say("The client c0 streams %d KiB/s through %s and checks every echoed byte", streamRate>>10, addr)
	s, err := harness.StartStream(ctx, client, addr, streamRate, 4096)
	if err != nil {
		return "", err
	}
	defer s.Stop()
	if err := waitFor(ctx, 10*time.Second, "the client's stream", func() (bool, error) {
		return s.Stats().BytesVerified > 64<<10, nil
	}); err != nil {
		return "", err
	}
	st := s.Stats()
	note("verified so far: %d KiB, longest pause %s; c0 resolves %s to %s (h1 is %s)",
		st.BytesVerified>>10, st.MaxGap.Round(time.Millisecond), vip.Addr(), neighbourMAC(client, vip.Addr()), h1.Node.MAC)

	say("Waiting until every host's monitor reports stable")
	if err := waitFor(ctx, 30*time.Second, "every host reporting stable", func() (bool, error) {
		v, err := clusterView(ctx, h0)
		if err != nil {
			return false, err
		}
		for _, hv := range v.Hosts {
			if hv.Report == nil || hv.Report.Unstable {
				return false, nil
			}
		}
		return len(v.Hosts) == len(d.Hosts), nil
	}); err != nil {
		return "", err
	}
	if err := show(ctx, h0, "hosts"); err != nil {
		return "", err
	}

	if err := os.WriteFile(filepath.Join(h1.Dir, "scratch", "junk"), []byte("state that rejuvenation clears\n"), 0o644); err != nil {
		return "", fmt.Errorf("write h1's scratch state: %w", err)
	}
	say("Injecting a leak on h1: a pinned host agent that grows by 20 MiB/s (up to 1 GiB)")
	note("Pinned: the agent belongs to h1; it is never migrated, and h1's rejuvenation stops it.\nh1's scratch directory also holds a file the clear-state step must remove.")
	if _, err := h1.Ctl(ctx, "run", "agent", "--pin", "--", o.load, "leak", "--rate", "20M", "--max", "1G"); err != nil {
		return "", err
	}
	leaked := time.Now()
	deadline := leaked.Add(o.cycleTimeout)
	restarts, _ := h1.Restarts()

	say("Watching h1's monitor until its verdict turns UNSTABLE")
	var lastLog string
	if err := waitUntil(ctx, deadline, pollEvery, "h1's verdict to turn unstable", func() (bool, error) {
		var st api.Status
		if err := ctlJSON(ctx, h1, &st, "status"); err != nil {
			return false, err
		}
		if st.Verdict.Unstable {
			return true, nil
		}
		if l := lastLine(h1, "agent"); l != "" && l != lastLog && time.Since(leaked) > time.Second {
			lastLog = l
			note("%4.1fs  h1 stable; agent says %q", time.Since(leaked).Seconds(), l)
		}
		return false, nil
	}); err != nil {
		return "", cycleFailed(ctx, h0, o.cycleTimeout, err)
	}
	note("%4.1fs after the leak started:", time.Since(leaked).Seconds())
	if err := show(ctx, h1, "status"); err != nil {
		return "", err
	}

	say("The controller's dry run: a cycle starts once h1 has been unstable for unstable_for")
	shownWait := false
	if err := waitUntil(ctx, deadline, 100*time.Millisecond, "the controller to plan h1's cycle", func() (bool, error) {
		action, err := planAction(ctx, h0, "h1")
		if err != nil {
			return false, err
		}
		if action == "wait" && !shownWait {
			shownWait = true
			return false, show(ctx, h0, "plan")
		}
		return action != "wait", nil
	}); err != nil {
		return "", cycleFailed(ctx, h0, o.cycleTimeout, err)
	}
	if err := show(ctx, h0, "plan"); err != nil {
		return "", err
	}

	say("Following the controller's history as it runs the cycle (duplexctl history, new lines only)")
	target, err := follow(ctx, d, restarts, deadline)
	if err != nil {
		return "", cycleFailed(ctx, h0, o.cycleTimeout, err)
	}
	if target != h2 {
		return "", fmt.Errorf("the controller moved h1's workloads to %s, want the spare h2", target.Node.Name)
	}
	took := time.Since(leaked)

	say("The cluster after the cycle: h1 the spare, %s a primary serving h1's workloads", target.Node.Name)
	if err := show(ctx, h0, "hosts"); err != nil {
		return "", err
	}
	v, err := clusterView(ctx, h0)
	if err != nil {
		return "", err
	}
	for _, hv := range v.Hosts {
		switch {
		case hv.Name == "h1" && hv.Role != cluster.RoleSpare:
			return "", fmt.Errorf("h1 is %s after its cycle, want spare", hv.Role)
		case hv.Name == target.Node.Name && hv.Role != cluster.RolePrimary:
			return "", fmt.Errorf("the target %s is %s after the cycle, want primary", hv.Name, hv.Role)
		}
	}
	if err := show(ctx, target, "ps"); err != nil {
		return "", err
	}
	if err := show(ctx, h1, "ps", "-a"); err != nil {
		return "", err
	}
	note("h1 runs nothing: its rejuvenation stopped the pinned agent, and h1 came back from its restart empty")
	if _, err := os.Stat(filepath.Join(h1.Dir, "scratch", "junk")); !errors.Is(err, fs.ErrNotExist) {
		return "", fmt.Errorf("h1's scratch state survived its rejuvenation (stat: %w)", err)
	}
	note("h1's scratch directory is empty: clear-state removed the junk file")

	say("What the client saw")
	before := s.Stats().BytesVerified
	if err := waitFor(ctx, 10*time.Second, "stream traffic through "+target.Node.Name, func() (bool, error) {
		return s.Stats().BytesVerified > before+128<<10, nil
	}); err != nil {
		return "", err
	}
	st = s.Stop()
	mac := neighbourMAC(client, vip.Addr())
	note("bytes sent %d KiB, verified %d KiB, error: %s, reconnects: %d", st.BytesSent>>10, st.BytesVerified>>10, errText(st.Err), st.Reconnects)
	note("longest pause between echoes: %s", st.MaxGap.Round(time.Millisecond))
	note("c0 now resolves %s to %s (%s is %s)", vip.Addr(), mac, target.Node.Name, target.Node.MAC)
	if st.Err != nil {
		return "", fmt.Errorf("the client's stream broke: %w", st.Err)
	}
	if mac != target.Node.MAC.String() {
		return "", fmt.Errorf("c0 resolves %s to %s, want %s's %s", vip.Addr(), mac, target.Node.Name, target.Node.MAC)
	}
	say("Whole cycle in %s after the leak started (%s into the demo): detected, duplexed to %s, rejuvenated, back as the spare",
		took.Round(100*time.Millisecond), time.Since(began).Round(time.Second), target.Node.Name)
	return fmt.Sprintf("client kept its connection: %d KiB verified, longest pause %d ms, %d resets",
		st.BytesVerified>>10, st.MaxGap.Round(time.Millisecond).Milliseconds(), st.Reconnects), nil
}

// follow prints the cluster's history as the controller writes it, narrating each
// step, until h1 is back on the available list as a spare. It returns the
// cycle's target.
func follow(ctx context.Context, d *harness.Duplex, restarts int, deadline time.Time) (*harness.Daemon, error) {
	h0, h1 := d.Hosts[0], d.Hosts[1]
	seen := map[string]bool{}
	target, registered, restartSaid, movedSaid := "", false, false, false
	var last error // of the latest failed poll
	restarted := func() {
		if n, _ := h1.Restarts(); n > restarts && !restartSaid {
			restartSaid = true
			say("h1 restarts: its duplexd exited with status 75 (reboot: exit); the harness, playing h1's hardware,\n    killed everything in h1's namespace, wiped its state and started duplexd again (restart %d)", n)
		}
	}
	fmt.Printf("    %-12s  %-4s %-28s %-6s %-8s %s\n", "TIME", "HOST", "STEP", "TARGET", "WORKLOAD", "DETAIL")
	t := time.NewTicker(pollEvery)
	defer t.Stop()
	for {
		var evs []cluster.Event
		if err := ctlJSON(ctx, h0, &evs, "history", "--limit", "0"); err != nil {
			if ctx.Err() != nil {
				return nil, ctx.Err()
			}
			last = err
		}
		for _, e := range evs {
			key := fmt.Sprint(e.Time.UnixNano(), e.Host, e.Step, e.Workload, e.Detail)
			if seen[key] {
				continue
			}
			seen[key] = true
			switch e.Step {
			case "cycle started":
				say("Detection: %s has been unstable for unstable_for; the controller (on %s) starts a cycle", e.Host, e.By)
			case "target selected":
				target = e.Target
				say("Target selected: %s (active-standby: the spare takes all of the unstable host's workloads)", e.Target)
			case "moved":
				if !movedSaid {
					movedSaid = true
					say("Duplexing: each workload is checkpointed on h1 and restored on %s while it runs; the service address moves with echo", e.Target)
				}
			case "duplexed":
				say("Duplexed: every workload runs on %s; only the pinned agent is left on h1", orDash(e.Target, target))
			case "decided to rejuvenate":
				say("Decided: rejuvenate %s now, out of the available-server list", e.Host)
			case "rejuvenation signalled":
				say("Rejuvenation signalled: h1 runs its ladder (drop caches, compact memory, clear scratch state, reboot)")
			case "rejuvenated":
				restarted()
				say("Rejuvenated: h1 came back and reported stable")
			case "registered as spare":
				if e.Host == "h1" {
					registered = true
				}
				say("Registered as spare: %s is back on the available list", e.Host)
			case "alert", "migration failed":
				say("%s: %s", e.Step, e.Detail)
			}
			fmt.Printf("    %-12s  %-4s %-28s %-6s %-8s %s\n", e.Time.Local().Format("15:04:05.000"), e.Host, e.Step, orDash(e.Target, "-"), orDash(e.Workload, "-"), e.Detail)
		}
		restarted()
		if registered {
			v, err := clusterView(ctx, h0)
			if err != nil {
				last = err
			}
			for _, hv := range v.Hosts {
				if hv.Name == "h1" && hv.Alive && hv.Role == cluster.RoleSpare && hv.Available && hv.Cycle == nil {
					if !restartSaid {
						return nil, errors.New("h1 came back as a spare but the harness never restarted it")
					}
					if t := d.Host(target); t != nil {
						return t, nil
					}
					return nil, fmt.Errorf("the cycle's target %q is not a host of the demo", target)
				}
			}
		}
		if time.Now().After(deadline) {
			if last != nil {
				return nil, fmt.Errorf("wait for h1 back as a spare: timed out; last error: %w", last)
			}
			return nil, errors.New("wait for h1 back as a spare: timed out")
		}
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-t.C:
		}
	}
}

// cycleFailed says that the cycle did not complete in time and adds the cluster's
// view and history.
func cycleFailed(ctx context.Context, h0 *harness.Daemon, timeout time.Duration, err error) error {
	if ctx.Err() != nil {
		return ctx.Err()
	}
	ctx2, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
	defer cancel()
	hosts, _ := h0.Ctl(ctx2, "hosts")
	hist, _ := h0.Ctl(ctx2, "history", "--limit", "0")
	return fmt.Errorf("the cycle did not complete within %s of the leak: %w\n\n$ duplexctl hosts\n%s\n$ duplexctl history\n%s", timeout, err, hosts, hist)
}

// show runs duplexctl on h and prints the command and its output.
func show(ctx context.Context, h *harness.Daemon, args ...string) error {
	out, err := h.Ctl(ctx, args...)
	fmt.Printf("    $ duplexctl %s   (on %s)\n", strings.Join(args, " "), h.Node.Name)
	note("%s", strings.TrimRight(out, "\n"))
	return err
}

// ctlJSON runs duplexctl with -o json on h and decodes its output into v.
func ctlJSON(ctx context.Context, h *harness.Daemon, v any, args ...string) error {
	out, err := h.Ctl(ctx, append(args, "-o", "json")...)
	if err != nil {
		return err
	}
	if err := json.Unmarshal([]byte(out), v); err != nil {
		return fmt.Errorf("decode duplexctl %s on %s: %w", strings.Join(args, " "), h.Node.Name, err)
	}
	return nil
}

// planAction is the controller's next step for host in `duplexctl plan`.
func planAction(ctx context.Context, h *harness.Daemon, host string) (string, error) {
	var p api.PlanResponse
	if err := ctlJSON(ctx, h, &p, "plan"); err != nil {
		return "", err
	}
	for _, st := range p.Steps {
		if st.Host == host {
			return st.Action, nil
		}
	}
	return "", fmt.Errorf("plan on %s lists no %s", h.Node.Name, host)
}

func clusterView(ctx context.Context, h *harness.Daemon) (api.ClusterView, error) {
	var v api.ClusterView
	err := ctlJSON(ctx, h, &v, "hosts")
	return v, err
}

// lastLine is the last line a workload printed.
func lastLine(h *harness.Daemon, name string) string {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	out, err := h.Ctl(ctx, "logs", name)
	if err != nil {
		return ""
	}
	lines := strings.Split(strings.TrimSpace(out), "\n")
	return lines[len(lines)-1]
}

// waitFor polls cond until it holds, fails or timeout passes.
func waitFor(ctx context.Context, timeout time.Duration, what string, cond func() (bool, error)) error {
	return waitUntil(ctx, time.Now().Add(timeout), pollEvery, what, cond)
}

// waitUntil polls cond every interval until it holds, fails or deadline passes.
func waitUntil(ctx context.Context, deadline time.Time, every time.Duration, what string, cond func() (bool, error)) error {
	t := time.NewTicker(every)
	defer t.Stop()
	var last error
	for {
		ok, err := cond()
		if ok {
			return nil
		}
		if err != nil {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			last = err
		}
		if time.Now().After(deadline) {
			if last != nil {
				return fmt.Errorf("wait for %s: timed out; last error: %w", what, last)
			}
			return fmt.Errorf("wait for %s: timed out", what)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-t.C:
		}
	}
}

// neighbourMAC reads the client's neighbour entry for ip.
func neighbourMAC(client *harness.Node, ip netip.Addr) string {
	out, err := client.Command(context.Background(), "ip", "neigh", "show", ip.String()).CombinedOutput()
	if err != nil {
		return "?"
	}
	f := strings.Fields(string(out))
	for i, w := range f {
		if w == "lladdr" && i+1 < len(f) {
			return f[i+1]
		}
	}
	return "none"
}

// cleanup stops the workloads and duplexd, removes the namespaces, the cgroups
// and the state directory, then checks that nothing of the demo is left.
func cleanup(c *harness.Cluster, d *harness.Duplex, dir string) error {
	say("Cleaning up: workloads, duplexd, namespaces, cgroups, temporary files")
	var errs []error
	if d != nil {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		for _, h := range d.Hosts {
			out, _ := h.Ctl(ctx, "ps", "-q")
			for _, name := range strings.Fields(out) {
				_, _ = h.Ctl(ctx, "stop", "--timeout", "0s", name)
			}
		}
		cancel()
		d.Stop()
	}
	if err := c.Close(); err != nil {
		errs = append(errs, fmt.Errorf("close cluster %s: %w", c.Name, err))
	}
	parent := ""
	if dir != "" {
		parent = filepath.Base(dir)
		if err := removeCgroups(parent); err != nil {
			errs = append(errs, err)
		}
		if err := os.RemoveAll(dir); err != nil {
			errs = append(errs, fmt.Errorf("remove %s: %w", dir, err))
		}
	}
	if err := leftovers(c.Name, parent); err != nil {
		errs = append(errs, err)
	} else {
		note("nothing left: no %s-* namespace, no %s cgroup, no %s", c.Name, orDash(parent, "demo"), orDash(dir, "state directory"))
	}
	return errors.Join(errs...)
}

// cgroupDirs are the places a cgroup named parent can live: every v1 hierarchy
// and the v2 mount.
func cgroupDirs(parent string) []string {
	roots, _ := filepath.Glob("/sys/fs/cgroup/*")
	roots = append(roots, "/sys/fs/cgroup")
	var out []string
	for _, r := range roots {
		if dir := filepath.Join(r, parent); isDir(dir) {
			out = append(out, dir)
		}
	}
	return out
}

func isDir(p string) bool {
	fi, err := os.Stat(p)
	return err == nil && fi.IsDir()
}

// removeCgroups removes the cgroup parent of the demo's workloads and whatever
// is left below it (a pinned workload killed by the simulated restart keeps its
// cgroup), retrying while killed processes exit.
func removeCgroups(parent string) error {
	var errs []error
	for _, dir := range cgroupDirs(parent) {
		var dirs []string
		_ = filepath.WalkDir(dir, func(p string, e fs.DirEntry, err error) error {
			if err == nil && e.IsDir() {
				dirs = append(dirs, p)
			}
			return nil
		})
		slices.Reverse(dirs)
		for _, p := range dirs {
			var err error
			for range 50 {
				if err = os.Remove(p); err == nil || errors.Is(err, fs.ErrNotExist) {
					err = nil
					break
				}
				time.Sleep(100 * time.Millisecond)
			}
			if err != nil {
				errs = append(errs, fmt.Errorf("remove cgroup %s: %w", p, err))
			}
		}
	}
	return errors.Join(errs...)
}

// leftovers reports the demo's namespaces and cgroups that still exist.
func leftovers(cluster, parent string) error {
	var left []string
	out, err := exec.Command("ip", "netns", "list").Output()
	if err != nil {
		return fmt.Errorf("ip netns list: %w", err)
	}
	for _, l := range strings.Split(string(out), "\n") {
		if f := strings.Fields(l); len(f) > 0 && strings.HasPrefix(f[0], cluster+"-") {
			left = append(left, "netns "+f[0])
		}
	}
	if parent != "" {
		for _, dir := range cgroupDirs(parent) {
			left = append(left, "cgroup "+dir)
		}
	}
	if len(left) > 0 {
		return fmt.Errorf("left behind: %s", strings.Join(left, ", "))
	}
	return nil
}

func tail(s string, n int) string {
	if len(s) > n {
		return "..." + s[len(s)-n:]
	}
	return s
}

func orDash(s, dash string) string {
	if s == "" {
		return dash
	}
	return s
}

func errText(err error) string {
	if err == nil {
		return "none"
	}
	return err.Error()
}
