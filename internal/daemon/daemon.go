// Package daemon is duplexd: it owns the managed workloads of one host and serves
// duplexctl on a root-only unix socket. Only cmd/duplexd uses it.
package daemon

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"time"

	"github.com/sirupsen/logrus"
	"golang.org/x/sys/unix"

	"github.com/duplex-ha/duplex/checkpoint"
	"github.com/duplex-ha/duplex/cluster"
	"github.com/duplex-ha/duplex/cluster/controller"
	"github.com/duplex-ha/duplex/internal/api"
	"github.com/duplex-ha/duplex/internal/detect"
	"github.com/duplex-ha/duplex/internal/reaper"
	"github.com/duplex-ha/duplex/internal/workload"
	"github.com/duplex-ha/duplex/netfail"
	"github.com/duplex-ha/duplex/rejuv"
)

// Version is duplex's release, set at build time with -ldflags.
var Version = "dev"

// Config is duplexd's configuration.
type Config struct {
	StateDir     string `json:"state_dir"`
	Socket       string `json:"socket"`
	CRIU         string `json:"criu"`
	CgroupParent string `json:"cgroup_parent"`
	// CRIUHardwareBreakpoints lets CRIU use hardware breakpoints (see
	// checkpoint.Engine.HardwareBreakpoints); off, dumps freeze for less in VMs.
	CRIUHardwareBreakpoints bool `json:"criu_hardware_breakpoints"`
	// RunDir holds transient migration images (tmpfs is best).
	RunDir string `json:"run_dir"`

	// Cluster membership; Listen empty means a single host without an agent.
	Name          string   `json:"name"`
	Listen        string   `json:"listen"`    // agent (mutual TLS) address, e.g. 10.0.0.1:7440
	Advertise     string   `json:"advertise"` // address other hosts use; default Listen
	Certs         string   `json:"certs"`     // this host's certificate directory
	EtcdEndpoints []string `json:"etcd_endpoints"`
	EtcdListen    string   `json:"etcd_listen"` // embedded etcd client URL; default https://ADVERTISE-IP:2379
	EtcdPeer      string   `json:"etcd_peer"`   // embedded etcd peer URL; default http://127.0.0.1:2380

	// MetricsListen is where Prometheus metrics are served ("" for nowhere).
	MetricsListen string `json:"metrics_listen"`
	// NoEBPF runs the cgroup probes only.
	NoEBPF bool `json:"no_ebpf"`
	// EBPFMemory turns on the per-process memory probe (kmem/rss_stat), which
	// costs several percent of a core while processes allocate furiously.
	EBPFMemory bool `json:"ebpf_memory"`
	// SampleInterval is how often the monitor samples the host; 0 means 1 s.
	SampleInterval time.Duration `json:"-"`
	// Detect configures the aging detector (thresholds, hold period, trend window).
	Detect detect.Config `json:"-"`

	// Role is what this host joins the cluster as the first time: primary or spare.
	// A host keeps the role the controller gave it when it restarts.
	Role string `json:"role"`
	// NoController keeps this duplexd out of the controller election.
	NoController bool `json:"no_controller"`
	// NoMemoryReserve skips setting an incoming migration's memory aside at
	// Prepare (see migrate.Target.NoReserve).
	NoMemoryReserve bool `json:"no_memory_reserve"`
	// Controller is the cluster controller's policy (used while this host leads).
	Controller controller.Policy `json:"controller"`
	// Rejuvenate is this host's rejuvenation ladder.
	Rejuvenate rejuv.Config `json:"rejuvenate"`
	// Capacity is the memory workloads may use on this host, e.g. "24GiB"
	// (default: all of it); active/active placement uses it.
	Capacity string `json:"capacity"`

	// SocketMode is the permission of the socket file; only root may connect
	// whatever it is, because the daemon checks each peer's credentials.
	SocketMode os.FileMode `json:"-"`
}

// Defaults fills unset fields.
func (c *Config) Defaults() {
	if c.StateDir == "" {
		c.StateDir = "/var/lib/duplex"
	}
	if c.Socket == "" {
		c.Socket = api.DefaultSocket
	}
	if c.CRIU == "" {
		c.CRIU = checkpoint.FindCRIU()
	}
	if c.CgroupParent == "" {
		c.CgroupParent = "duplex"
	}
	if c.RunDir == "" {
		c.RunDir = "/run/duplex"
	}
	if c.Name == "" {
		c.Name, _ = os.Hostname()
	}
	if c.Role == "" {
		c.Role = string(cluster.RolePrimary)
	}
	if c.SocketMode == 0 {
		c.SocketMode = 0o600
	}
}

// Daemon is a running duplexd.
type Daemon struct {
	cfg     Config
	log     *logrus.Entry
	eng     *checkpoint.Engine
	wl      *workload.Manager
	vips    *vipController
	cluster *clusterNode // nil on a single host
	mon     *monitor
	rj      rejuvenation
	done    chan struct{} // closed when Run returns
}

// Run serves until ctx ends, then stops serving and leaves the workloads running
// for the next duplexd to adopt.
func Run(ctx context.Context, cfg Config, log *logrus.Entry) error {
	cfg.Defaults()
	if os.Geteuid() != 0 {
		return errors.New("duplexd must run as root (it creates namespaces and cgroups and runs CRIU)")
	}
	if err := reaper.SetSubreaper(); err != nil {
		return err
	}
	if err := os.MkdirAll(cfg.StateDir, 0o700); err != nil {
		return fmt.Errorf("state directory %s: %w", cfg.StateDir, err)
	}
	lock, err := lockState(cfg.StateDir)
	if err != nil {
		return err
	}
	defer lock.Close()

	eng := checkpoint.New(cfg.CRIU)
	eng.HardwareBreakpoints = cfg.CRIUHardwareBreakpoints
	// Every dump, restore and lazy-pages daemon of a migration would otherwise probe
	// the kernel again, inside the downtime.
	if err := eng.EnsureKerndatCache(); err != nil {
		log.WithError(err).Warn("CRIU's kernel-feature cache is unavailable; each CRIU start probes the kernel (~30 ms)")
	}
	nf, err := netfail.New("")
	if err != nil {
		return fmt.Errorf("service addresses: %w", err)
	}
	defer nf.Close()
	vctx, stopAnnouncing := context.WithCancel(context.Background())
	defer stopAnnouncing()
	vips := &vipController{m: nf, ctx: vctx}
	wl, err := workload.New(workload.Config{
		StateDir:     filepath.Join(cfg.StateDir, "workloads"),
		CgroupParent: cfg.CgroupParent,
		Checkpointer: eng,
		VIPs:         vips,
		Log:          log,
	})
	if err != nil {
		return err
	}
	defer wl.Cleanup() // the shared cgroup parent, once empty
	defer wl.Close()
	d := &Daemon{cfg: cfg, log: log, eng: eng, wl: wl, vips: vips, done: make(chan struct{})}
	d.rj.restart = make(chan struct{})
	defer close(d.done)
	// A bad cluster configuration is refused before anything starts.
	if _, err := cluster.ParseRole(cfg.Role); err != nil {
		return err
	}
	if _, err := d.cfg.Rejuvenate.Ladder(d.rejuvOptions()); err != nil {
		return fmt.Errorf("rejuvenate: %w", err)
	}
	if err := validPolicy(cfg.Controller); err != nil {
		return err
	}
	if _, err := capacityBytes(cfg.Capacity); err != nil {
		return err
	}
	interval := cfg.SampleInterval
	if interval <= 0 {
		interval = time.Second
	}
	// A bad detector configuration is refused before anything starts.
	if d.mon, err = newMonitor(d, interval, cfg.Detect); err != nil {
		return fmt.Errorf("detector configuration: %w", err)
	}
	if cfg.Listen != "" {
		if d.cluster, err = d.joinCluster(ctx); err != nil {
			return err
		}
		defer d.cluster.close()
		if m := d.cluster.member; m.Role == cluster.RoleRejuvenating {
			// Back from a rejuvenation: rejoin once the figures are normal. A repeated
			// signal for the same cycle is acknowledged without a second ladder.
			d.rj.cycle = m.Cycle
			go d.awaitRejoin(m.Cycle)
		}
	}
	stopMonitor, err := d.mon.start(ctx, cfg.MetricsListen)
	if err != nil {
		return fmt.Errorf("metrics on %s: %w", cfg.MetricsListen, err)
	}
	defer stopMonitor()

	ln, err := listen(cfg.Socket, cfg.SocketMode)
	if err != nil {
		return err
	}
	srv := &http.Server{
		Handler:           d.routes(),
		ReadHeaderTimeout: 10 * time.Second,
		ConnContext:       peerContext,
	}

	rctx, stopReaper := context.WithCancel(ctx)
	reaped := make(chan struct{})
	go func() {
		defer close(reaped)
		reaper.Run(rctx, 2*time.Second, wl.Tracked, func(pid int, ws unix.WaitStatus) {
			log.WithFields(logrus.Fields{"pid": pid, "status": int(ws)}).Debug("reaped orphan")
		})
	}()
	defer func() { stopReaper(); <-reaped }()

	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(ln) }()
	log.WithFields(logrus.Fields{"socket": cfg.Socket, "state_dir": cfg.StateDir, "criu": cfg.CRIU, "version": Version}).Info("duplexd serving")

	restart := false
	select {
	case <-ctx.Done():
	case <-d.rj.restart:
		restart = true
		log.Warn("host restart requested by the rejuvenation ladder; exiting")
	case err := <-errc:
		return fmt.Errorf("serve %s: %w", cfg.Socket, err)
	}
	log.Info("shutting down; workloads keep running")
	sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	err = srv.Shutdown(sctx)
	_ = os.Remove(cfg.Socket)
	if errors.Is(err, context.DeadlineExceeded) {
		_ = srv.Close()
		err = nil
	}
	if restart {
		return ErrHostRestart
	}
	return err
}

// lockState takes an exclusive lock on the state directory so that two daemons
// never manage the same workloads.
func lockState(dir string) (*os.File, error) {
	f, err := os.OpenFile(filepath.Join(dir, "duplexd.lock"), os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		return nil, fmt.Errorf("lock state directory: %w", err)
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		f.Close()
		return nil, fmt.Errorf("state directory %s is in use by another duplexd: %w", dir, err)
	}
	return f, nil
}

// listen creates the unix socket, refusing to steal one a live daemon serves.
func listen(path string, mode os.FileMode) (net.Listener, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return nil, fmt.Errorf("socket directory: %w", err)
	}
	if c, err := net.DialTimeout("unix", path, time.Second); err == nil {
		c.Close()
		return nil, fmt.Errorf("another duplexd is already listening on %s", path)
	}
	_ = os.Remove(path) // stale socket of a daemon that died
	old := unix.Umask(0o177)
	ln, err := net.Listen("unix", path)
	unix.Umask(old)
	if err != nil {
		return nil, fmt.Errorf("listen on %s: %w", path, err)
	}
	if err := os.Chmod(path, mode); err != nil {
		ln.Close()
		return nil, fmt.Errorf("socket %s: %w", path, err)
	}
	return ln, nil
}

type peerKey struct{}

// peerContext records the connecting process's credentials (SO_PEERCRED).
func peerContext(ctx context.Context, c net.Conn) context.Context {
	uc, ok := c.(*net.UnixConn)
	if !ok {
		return ctx
	}
	raw, err := uc.SyscallConn()
	if err != nil {
		return ctx
	}
	var cred *unix.Ucred
	_ = raw.Control(func(fd uintptr) {
		cred, _ = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
	})
	if cred == nil {
		return ctx
	}
	return context.WithValue(ctx, peerKey{}, *cred)
}
