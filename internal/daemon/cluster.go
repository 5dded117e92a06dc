package daemon

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/docker/go-units"
	"github.com/sirupsen/logrus"

	"github.com/duplex-ha/duplex/cluster"
	"github.com/duplex-ha/duplex/cluster/controller"
	"github.com/duplex-ha/duplex/internal/pki"
	"github.com/duplex-ha/duplex/migrate"
	"github.com/duplex-ha/duplex/netfail"
)

// vipController puts service addresses on this host's interfaces (netfail).
type vipController struct {
	m   *netfail.Manager
	ctx context.Context // owns the background announcement bursts
}

func (v *vipController) parse(s string) (netfail.VIP, error) { return netfail.ParseVIP(s) }

func (v *vipController) Check(s string) error {
	_, err := v.parse(s)
	return err
}

func (v *vipController) Add(ctx context.Context, s string) error {
	vip, err := v.parse(s)
	if err != nil {
		return err
	}
	return v.m.Add(ctx, vip)
}

// Hold keeps copies of the packets arriving for the addresses (migrate.PacketHolder).
func (v *vipController) Hold(vips []string) (migrate.HeldPackets, error) {
	parsed := make([]netfail.VIP, 0, len(vips))
	for _, s := range vips {
		vip, err := v.parse(s)
		if err != nil {
			return nil, err
		}
		parsed = append(parsed, vip)
	}
	return v.m.Hold(parsed)
}

// Replay hands held packets to this host's stack (migrate.PacketReplayer).
func (v *vipController) Replay(pkts [][]byte) (int, error) { return v.m.Replay(pkts) }

func (v *vipController) Remove(ctx context.Context, s string) error {
	vip, err := v.parse(s)
	if err != nil {
		return err
	}
	return v.m.Remove(ctx, vip)
}

// Announce sends one round at once (what moves the peers) and the rest of the
// bursts in the background, like keepalived.
func (v *vipController) Announce(ctx context.Context, s string) error {
	vip, err := v.parse(s)
	if err != nil {
		return err
	}
	if err := v.m.Announce(ctx, vip, netfail.Announce{Count: 1, NoRepeat: true}); err != nil {
		return err
	}
	go func() { _ = v.m.Announce(v.ctx, vip, netfail.Announce{Count: netfail.DefaultCount - 1}) }()
	return nil
}

// clusterNode is this daemon's membership in a cluster: the store, its registration
// and the agent server other hosts migrate to.
type clusterNode struct {
	store  *cluster.Store
	etcd   *cluster.Embedded
	reg    *cluster.Registration
	agent  *http.Server
	stop   context.CancelFunc // ends the janitor
	swept  chan struct{}
	tls    *tls.Config
	files  pki.Files
	source *migrate.Source
	member cluster.Member // as the store held it when this host joined

	ctrl     *controller.Controller
	stopCtrl context.CancelFunc
	ctrlDone chan struct{}
}

func (n *clusterNode) close() {
	if n.stopCtrl != nil {
		n.stopCtrl()
		<-n.ctrlDone
	}
	if n.stop != nil {
		n.stop()
		<-n.swept
	}
	if n.agent != nil {
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
		_ = n.agent.Shutdown(ctx)
		cancel()
	}
	if n.reg != nil {
		_ = n.reg.Close()
	}
	if n.store != nil {
		_ = n.store.Close()
	}
	if n.etcd != nil {
		n.etcd.Close()
	}
}

// joinCluster starts the agent, the cluster store (embedded unless endpoints are
// given) and registers this host.
func (d *Daemon) joinCluster(ctx context.Context) (*clusterNode, error) {
	cfg := d.cfg
	if cfg.Certs == "" {
		return nil, errors.New("--listen needs --certs: agents talk over mutual TLS (create certificates with 'duplexctl certs')")
	}
	n := &clusterNode{files: pki.HostFiles(cfg.Certs)}
	ok := false
	defer func() {
		if !ok {
			n.close()
		}
	}()
	var err error
	if n.tls, err = n.files.Config(); err != nil {
		return nil, err
	}
	advertise := cfg.Advertise
	if advertise == "" {
		advertise = cfg.Listen
	}
	host, _, err := net.SplitHostPort(advertise)
	if err != nil || host == "" || net.ParseIP(host).IsUnspecified() {
		return nil, fmt.Errorf("--advertise %q: give the address other hosts reach this agent at (IP:PORT)", advertise)
	}

	endpoints := cfg.EtcdEndpoints
	if len(endpoints) == 0 {
		client := cfg.EtcdListen
		if client == "" {
			client = "https://" + net.JoinHostPort(host, "2379")
		}
		peer := cfg.EtcdPeer
		if peer == "" {
			peer = "http://127.0.0.1:2380"
		}
		n.etcd, err = cluster.StartEmbedded(ctx, cluster.EmbeddedConfig{
			Name: cfg.Name, Dir: filepath.Join(cfg.StateDir, "etcd"), ClientURL: client, PeerURL: peer, TLS: &n.files,
		})
		if err != nil {
			return nil, err
		}
		endpoints = []string{client}
		d.log.WithField("client_url", client).Info("embedded etcd serving")
	}
	if n.store, err = cluster.Connect(ctx, endpoints, n.tls); err != nil {
		return nil, err
	}

	caps := func(ctx context.Context) (migrate.Capabilities, error) {
		return migrate.HostCapabilities(ctx, cfg.Name, d.eng)
	}
	target := &migrate.Target{
		Host: cfg.Name, Addr: host, WorkDir: filepath.Join(cfg.RunDir, "incoming"),
		Engine: d.eng, Workloads: d.wl, VIPs: d.vips, Caps: caps, Log: d.log.WithField("role", "destination"),
		NoReserve: cfg.NoMemoryReserve,
	}
	n.source = &migrate.Source{
		Host: cfg.Name, WorkDir: filepath.Join(cfg.RunDir, "outgoing"), Workloads: d.wl, VIPs: d.vips,
		Caps: caps, Log: d.log.WithField("role", "source"),
	}
	for _, dir := range []string{target.WorkDir, n.source.WorkDir} {
		if err := os.MkdirAll(dir, 0o700); err != nil {
			return nil, fmt.Errorf("migration directory: %w", err)
		}
	}

	// The janitor aborts incoming migrations whose source vanished.
	jctx, stop := context.WithCancel(context.Background())
	n.stop, n.swept = stop, make(chan struct{})
	go func() {
		defer close(n.swept)
		t := time.NewTicker(time.Minute)
		defer t.Stop()
		for {
			select {
			case <-jctx.Done():
				return
			case <-t.C:
				target.Sweep(jctx)
			}
		}
	}()

	ln, err := tls.Listen("tcp", cfg.Listen, n.tls)
	if err != nil {
		return nil, fmt.Errorf("agent listen on %s: %w", cfg.Listen, err)
	}
	n.agent = &http.Server{Handler: d.agentRoutes(migrate.Handler(target)), ReadHeaderTimeout: 10 * time.Second}
	go func() {
		if err := n.agent.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			d.log.WithError(err).Error("agent server stopped")
		}
	}()

	v, _ := d.eng.Version(ctx)
	c, _ := caps(ctx)
	var feats []string
	for f, ok := range c.Features {
		if ok {
			feats = append(feats, f)
		}
	}
	n.reg, err = n.store.Register(ctx, cluster.Host{
		Name: cfg.Name, Agent: advertise, Version: Version, CRIU: v.String(), Features: feats, Started: time.Now(),
	}, 10*time.Second)
	if err != nil {
		return nil, err
	}
	if n.member, err = n.store.JoinAs(ctx, cfg.Name, cluster.Role(cfg.Role)); err != nil {
		return nil, err
	}
	d.log.WithFields(logrus.Fields{"host": cfg.Name, "agent": advertise, "etcd": strings.Join(endpoints, ","), "role": n.member.Role}).Info("joined the cluster")
	if !cfg.NoController {
		n.ctrl, err = controller.New(controller.Config{Name: cfg.Name, Store: n.store, Agents: newAgentClient(n.tls), Policy: cfg.Controller,
			Log: d.log, Registry: d.mon.reg})
		if err != nil {
			return nil, err
		}
		cctx, stop := context.WithCancel(context.Background())
		n.stopCtrl, n.ctrlDone = stop, make(chan struct{})
		go func() {
			defer close(n.ctrlDone)
			_ = n.ctrl.Run(cctx)
		}()
	}
	ok = true
	return n, nil
}

// destination returns a client for another host's agent, found in the store.
func (n *clusterNode) destination(ctx context.Context, name string) (*migrate.Client, cluster.Host, error) {
	h, err := n.store.Host(ctx, name)
	if err != nil {
		return nil, h, err
	}
	return migrate.NewClient(h.Agent, n.tls), h, nil
}

// validPolicy checks the controller section of the configuration.
func validPolicy(p controller.Policy) error {
	p.Defaults()
	if err := p.Validate(); err != nil {
		return fmt.Errorf("controller: %w", err)
	}
	return nil
}

// capacityBytes reads the capacity setting ("" is 0: all of the host's memory).
func capacityBytes(s string) (uint64, error) {
	if s == "" {
		return 0, nil
	}
	n, err := units.RAMInBytes(s)
	if err != nil || n <= 0 {
		return 0, fmt.Errorf("capacity %q: give a memory size such as 24GiB", s)
	}
	return uint64(n), nil
}
