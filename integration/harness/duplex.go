package harness

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/duplex-ha/duplex/internal/pki"
)

// DuplexOptions configures duplexd on every host of a cluster.
type DuplexOptions struct {
	Duplexd   string // duplexd binary
	Duplexctl string // duplexctl binary
	Dir       string // root for state, sockets, certificates; each host gets Dir/<host>
	// CgroupParent is shared by the hosts (they share one kernel); unique per run.
	CgroupParent string
	LogLevel     string // default "info"
	Extra        []string
	// Config, if set, returns the YAML config file of a host (by name); it is
	// written to the host's directory and passed with --config.
	Config func(host string) string
	// Args, if set, returns extra flags for a host (by name).
	Args func(host string) []string
}

// Duplex is duplexd running on every host of a Cluster: h0 runs the embedded etcd,
// the others join it. Each host has its own state directory, socket and certificate.
type Duplex struct {
	c     *Cluster
	o     DuplexOptions
	Hosts []*Daemon
	CA    string // the cluster CA's directory
}

// Daemon is one host's duplexd.
type Daemon struct {
	Node   *Node
	Dir    string
	Socket string
	Certs  string
	Proc   *Proc
	d      *Duplex

	mu       sync.Mutex
	stopping bool
	restarts int
	changed  chan struct{} // closed and replaced on every simulated restart
}

// AgentPort is the agents' port on every host.
const AgentPort = 7440

// StartDuplex issues certificates and starts duplexd on every host, then waits until
// every host is listed in the cluster store.
func StartDuplex(ctx context.Context, c *Cluster, o DuplexOptions) (*Duplex, error) {
	if o.LogLevel == "" {
		o.LogLevel = "info"
	}
	d := &Duplex{c: c, o: o, CA: filepath.Join(o.Dir, "ca")}
	if err := pki.InitCA(d.CA, c.Name+" CA", 24*time.Hour); err != nil {
		return nil, err
	}
	for _, n := range c.Hosts {
		dd := &Daemon{Node: n, Dir: filepath.Join(o.Dir, n.Name), d: d}
		dd.Socket = filepath.Join(dd.Dir, "duplexd.sock")
		dd.Certs = filepath.Join(dd.Dir, "certs")
		if err := pki.Issue(d.CA, n.Name, []string{n.Addr.Addr().String()}, dd.Certs, 24*time.Hour); err != nil {
			return nil, err
		}
		d.Hosts = append(d.Hosts, dd)
	}
	for _, dd := range d.Hosts {
		if err := dd.Start(ctx); err != nil {
			return nil, err
		}
	}
	deadline := time.Now().Add(60 * time.Second)
	for {
		out, err := d.Hosts[0].Ctl(ctx, "hosts", "-o", "json")
		if err == nil && strings.Count(out, `"alive": true`) >= len(d.Hosts) {
			return d, nil
		}
		if time.Now().After(deadline) {
			return nil, fmt.Errorf("hosts did not all register within 60 s: %v\n%s", err, out)
		}
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-time.After(200 * time.Millisecond):
		}
	}
}

func (dd *Daemon) etcdURL() string {
	return "https://" + net.JoinHostPort(dd.d.Hosts[0].Node.Addr.Addr().String(), "2379")
}

// Start starts (or restarts) this host's duplexd and waits for its socket.
func (dd *Daemon) Start(ctx context.Context) error {
	n := dd.Node
	ip := n.Addr.Addr().String()
	config := "/dev/null"
	if dd.d.o.Config != nil {
		config = filepath.Join(dd.Dir, "duplexd.yaml")
		if err := os.WriteFile(config, []byte(dd.d.o.Config(n.Name)), 0o600); err != nil {
			return err
		}
	}
	args := []string{
		"--config", config,
		"--name", n.Name,
		"--state-dir", filepath.Join(dd.Dir, "state"),
		"--run-dir", filepath.Join(dd.Dir, "run"),
		"--socket", dd.Socket,
		"--cgroup-parent", dd.d.o.CgroupParent,
		"--listen", net.JoinHostPort(ip, fmt.Sprint(AgentPort)),
		"--certs", dd.Certs,
		"--log-level", dd.d.o.LogLevel,
	}
	if n == dd.d.Hosts[0].Node {
		args = append(args, "--etcd-listen", dd.etcdURL(), "--etcd-peer", "http://127.0.0.1:2380")
	} else {
		args = append(args, "--etcd-endpoints", dd.etcdURL())
	}
	args = append(args, dd.d.o.Extra...)
	if dd.d.o.Args != nil {
		args = append(args, dd.d.o.Args(n.Name)...)
	}
	p, err := dd.d.c.Start(n, dd.d.o.Duplexd, args...)
	if err != nil {
		return fmt.Errorf("start duplexd on %s: %w", n.Name, err)
	}
	dd.mu.Lock()
	dd.Proc = p
	if dd.changed == nil {
		dd.changed = make(chan struct{})
	}
	dd.mu.Unlock()
	go dd.supervise(p)
	deadline := time.Now().Add(60 * time.Second)
	for {
		if _, err := dd.Ctl(ctx, "version"); err == nil {
			if _, err := os.Stat(dd.Socket); err == nil {
				return nil
			}
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("duplexd on %s did not come up in 60 s:\n%s", n.Name, p.Output())
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// Ctl runs duplexctl against this host's daemon and returns its stdout; the error
// carries stderr.
func (dd *Daemon) Ctl(ctx context.Context, args ...string) (string, error) {
	cmd := exec.CommandContext(ctx, dd.d.o.Duplexctl, append([]string{"--socket", dd.Socket}, args...)...)
	var out, errb strings.Builder
	cmd.Stdout, cmd.Stderr = &out, &errb
	if err := cmd.Run(); err != nil {
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			return out.String(), fmt.Errorf("duplexctl %s on %s: %s", strings.Join(args, " "), dd.Node.Name, strings.TrimSpace(errb.String()))
		}
		return out.String(), err
	}
	return out.String(), nil
}

// Host returns the daemon of host name.
func (d *Duplex) Host(name string) *Daemon {
	for _, dd := range d.Hosts {
		if dd.Node.Name == name {
			return dd
		}
	}
	return nil
}

// Stop stops every duplexd (their workloads were stopped by the caller or die with
// the cluster's namespaces), h0 last: it serves the others' etcd.
func (d *Duplex) Stop() {
	for i := len(d.Hosts) - 1; i >= 0; i-- {
		dd := d.Hosts[i]
		dd.mu.Lock()
		dd.stopping = true
		p := dd.Proc
		dd.mu.Unlock()
		if p != nil {
			_ = p.Stop(syscall.SIGTERM, 10*time.Second)
		}
	}
}

// RestartExitCode is duplexd's exit status when its rejuvenation ladder asks for a
// host restart (rejuvenate.reboot: exit).
const RestartExitCode = 75

// supervise plays the host's hardware: when duplexd exits asking for a restart,
// it simulates a reboot (SimulateRestart) and starts duplexd again.
func (dd *Daemon) supervise(p *Proc) {
	err := p.Wait()
	var ee *exec.ExitError
	if !errors.As(err, &ee) || ee.ExitCode() != RestartExitCode {
		return
	}
	dd.mu.Lock()
	stopping := dd.stopping
	dd.mu.Unlock()
	if stopping {
		return
	}
	if err := dd.SimulateRestart(); err != nil {
		fmt.Fprintf(os.Stderr, "harness: simulated restart of %s: %v\n", dd.Node.Name, err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	if err := dd.Start(ctx); err != nil {
		fmt.Fprintf(os.Stderr, "harness: start %s after its restart: %v\n", dd.Node.Name, err)
	}
	dd.mu.Lock()
	dd.restarts++
	close(dd.changed)
	dd.changed = make(chan struct{})
	dd.mu.Unlock()
}

// Restarts returns how many simulated restarts the host went through, and a
// channel closed at the next one.
func (dd *Daemon) Restarts() (int, <-chan struct{}) {
	dd.mu.Lock()
	defer dd.mu.Unlock()
	if dd.changed == nil {
		dd.changed = make(chan struct{})
	}
	return dd.restarts, dd.changed
}

// SimulateRestart does to the host what a reboot would: every process in its
// network namespace is killed, its addresses other than its own are flushed, and
// its state and run directories are wiped (h0 keeps the embedded etcd's data:
// on a real cluster etcd runs elsewhere). duplexd must already have exited.
func (dd *Daemon) SimulateRestart() error {
	n := dd.Node
	out, err := exec.Command("ip", "netns", "pids", n.NetNS).Output()
	if err != nil {
		return fmt.Errorf("list processes of %s: %w", n.NetNS, err)
	}
	for _, f := range strings.Fields(string(out)) {
		if pid, err := strconv.Atoi(f); err == nil {
			_ = syscall.Kill(pid, syscall.SIGKILL)
		}
	}
	// Service addresses other than the host's own go, as with a reboot.
	if out, err := n.Command(context.Background(), "ip", "-4", "-o", "addr", "show", "dev", n.Link).Output(); err == nil {
		for _, line := range strings.Split(string(out), "\n") {
			f := strings.Fields(line)
			for i := 0; i+1 < len(f); i++ {
				if f[i] == "inet" && f[i+1] != n.Addr.String() {
					_ = n.Command(context.Background(), "ip", "addr", "del", f[i+1], "dev", n.Link).Run()
				}
			}
		}
	}
	var errs []error
	for _, dir := range []string{filepath.Join(dd.Dir, "state"), filepath.Join(dd.Dir, "run")} {
		entries, err := os.ReadDir(dir)
		if err != nil && !os.IsNotExist(err) {
			errs = append(errs, err)
		}
		for _, e := range entries {
			if e.Name() == "etcd" {
				continue
			}
			errs = append(errs, os.RemoveAll(filepath.Join(dir, e.Name())))
		}
	}
	return errors.Join(errs...)
}
