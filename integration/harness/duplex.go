package harness

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
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
		out, err := d.Hosts[0].Ctl(ctx, "hosts")
		if err == nil && strings.Count(out, "\n") >= len(d.Hosts)+1 {
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
	args := []string{
		"--config", "/dev/null",
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
	p, err := dd.d.c.Start(n, dd.d.o.Duplexd, args...)
	if err != nil {
		return fmt.Errorf("start duplexd on %s: %w", n.Name, err)
	}
	dd.Proc = p
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
		if p := d.Hosts[i].Proc; p != nil {
			_ = p.Stop(syscall.SIGTERM, 10*time.Second)
		}
	}
}
