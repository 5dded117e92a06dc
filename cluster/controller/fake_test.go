package controller_test

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"sync"
	"testing"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/duplex-ha/duplex/cluster"
	"github.com/duplex-ha/duplex/cluster/controller"
)

const wlMemory = 256 << 20

// fakeCluster is in-process hosts on a real etcd: each registers with a lease,
// publishes reports and answers the controller as agents would. Workloads are
// names with a state; a migration moves the name.
type fakeCluster struct {
	t     testing.TB
	store *cluster.Store

	mu    sync.Mutex
	hosts map[string]*fakeHost
	moves map[string][]string // workload -> hosts it was moved to, in order
	// migrate, if set, runs inside every migration before it completes.
	migrate func(from, workload, to string)
	// started records when each workload's first migration started.
	started map[string]time.Time
	// downFor is how long a rejuvenating host stays away.
	downFor time.Duration
}

type fakeHost struct {
	name     string
	reg      *cluster.Registration
	wls      map[string]string // name -> state
	pinned   map[string]bool
	unstable time.Time // zero: stable
	capacity uint64
	booted   time.Time
	signals  int
}

func newFakeCluster(t testing.TB, store *cluster.Store) *fakeCluster {
	return &fakeCluster{t: t, store: store, hosts: map[string]*fakeHost{}, moves: map[string][]string{},
		started: map[string]time.Time{}, downFor: 100 * time.Millisecond}
}

func (f *fakeCluster) addHost(name string, role cluster.Role, workloads ...string) *fakeHost {
	f.t.Helper()
	h := &fakeHost{name: name, wls: map[string]string{}, pinned: map[string]bool{}, capacity: 8 << 30, booted: time.Now().Add(-24 * time.Hour)}
	for _, w := range workloads {
		h.wls[w] = "running"
	}
	f.mu.Lock()
	f.hosts[name] = h
	f.mu.Unlock()
	if err := f.up(h, role); err != nil {
		f.t.Fatal(err)
	}
	return h
}

// up registers h, joins it with role (a rejuvenated host keeps its record) and
// publishes its report.
func (f *fakeCluster) up(h *fakeHost, role cluster.Role) error {
	ctx := context.Background()
	reg, err := f.store.Register(ctx, cluster.Host{Name: h.name, Agent: "fake:" + h.name}, 3*time.Second)
	if err != nil {
		return err
	}
	f.mu.Lock()
	h.reg = reg
	f.mu.Unlock()
	if _, err := f.store.JoinAs(ctx, h.name, role); err != nil {
		return err
	}
	return f.publish(h.name)
}

func (f *fakeCluster) report(h *fakeHost) cluster.Report {
	used := uint64(0)
	n := 0
	for _, st := range h.wls {
		if st == "running" {
			used += wlMemory
			n++
		}
	}
	r := cluster.Report{Host: h.name, Time: time.Now(), MemTotal: 16 << 30, MemAvailable: 12 << 30, Capacity: h.capacity, Used: used,
		CPUs: 4, Load1: 0.5, Workloads: n, Booted: h.booted}
	if !h.unstable.IsZero() {
		r.Unstable, r.UnstableSince, r.Reasons = true, h.unstable, []string{"memory leak (test)"}
	}
	return r
}

func (f *fakeCluster) publish(name string) error {
	f.mu.Lock()
	h := f.hosts[name]
	r, reg := f.report(h), h.reg
	f.mu.Unlock()
	if reg == nil {
		return nil
	}
	return f.store.PublishReport(context.Background(), r, reg.Lease())
}

func (f *fakeCluster) setUnstable(name string, since time.Time) {
	f.t.Helper()
	f.mu.Lock()
	f.hosts[name].unstable = since
	f.mu.Unlock()
	if err := f.publish(name); err != nil {
		f.t.Fatal(err)
	}
}

// where lists the hosts on which workload w runs.
func (f *fakeCluster) where(w string) []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	var out []string
	for name, h := range f.hosts {
		if h.wls[w] == "running" {
			out = append(out, name)
		}
	}
	sort.Strings(out)
	return out
}

// Agents.

func (f *fakeCluster) Workloads(ctx context.Context, host cluster.Host) ([]controller.Workload, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	h, ok := f.hosts[host.Name]
	if !ok || h.reg == nil {
		return nil, fmt.Errorf("host %s is down", host.Name)
	}
	var out []controller.Workload
	for name, st := range h.wls {
		out = append(out, controller.Workload{Name: name, State: st, Memory: wlMemory, Pinned: h.pinned[name]})
	}
	return out, nil
}

func (f *fakeCluster) Migrate(ctx context.Context, from cluster.Host, w, to, strategy string) (controller.Moved, error) {
	f.mu.Lock()
	src, dst := f.hosts[from.Name], f.hosts[to]
	if src == nil || dst == nil || src.wls[w] != "running" {
		f.mu.Unlock()
		return controller.Moved{}, fmt.Errorf("%s is not running on %s", w, from.Name)
	}
	if _, ok := f.started[w]; !ok {
		f.started[w] = time.Now()
	}
	src.wls[w] = "frozen"
	hook := f.migrate
	f.mu.Unlock()
	if hook != nil {
		hook(from.Name, w, to)
	}
	f.mu.Lock()
	src.wls[w] = "migrated"
	dst.wls[w] = "running"
	f.moves[w] = append(f.moves[w], to)
	f.mu.Unlock()
	_ = f.publish(from.Name)
	_ = f.publish(to)
	return controller.Moved{Strategy: "stopcopy", Frozen: 40 * time.Millisecond, Downtime: 80 * time.Millisecond, Bytes: wlMemory}, nil
}

// Rejuvenate takes the host down for downFor, clears it like a reboot, brings it
// back stable and asks to rejoin, as duplexd does after a restart.
func (f *fakeCluster) Rejuvenate(ctx context.Context, host cluster.Host, cycle string) error {
	f.mu.Lock()
	h := f.hosts[host.Name]
	if h == nil || h.reg == nil {
		f.mu.Unlock()
		return errors.New("host down")
	}
	h.signals++
	reg := h.reg
	h.reg = nil
	f.mu.Unlock()
	go func() {
		_ = reg.Close()
		time.Sleep(f.downFor)
		f.mu.Lock()
		for w, st := range h.wls {
			if st != "running" || h.pinned[w] {
				delete(h.wls, w)
			}
		}
		h.unstable, h.booted = time.Time{}, time.Now()
		f.mu.Unlock()
		if err := f.up(h, cluster.RolePrimary); err != nil {
			f.t.Errorf("%s back up: %v", h.name, err)
			return
		}
		f.mu.Lock()
		lease := h.reg.Lease()
		f.mu.Unlock()
		if err := f.store.AskRejoin(context.Background(), cluster.Rejoin{Host: h.name, Cycle: cycle, Time: time.Now(), Detail: "figures normal (test)"}, lease); err != nil {
			f.t.Errorf("%s rejoin: %v", h.name, err)
		}
	}()
	return nil
}

func (f *fakeCluster) close() {
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, h := range f.hosts {
		if h.reg != nil {
			_ = h.reg.Close()
			h.reg = nil
		}
	}
}

// startController runs a controller until the test ends (or stop is called).
func startController(t testing.TB, name string, store *cluster.Store, agents controller.Agents, p controller.Policy) (c *controller.Controller, stop func()) {
	t.Helper()
	l := logrus.New()
	l.SetLevel(logrus.WarnLevel)
	l.SetOutput(testWriter{t})
	c, err := controller.New(controller.Config{Name: name, Store: store, Agents: agents, Policy: p, Log: logrus.NewEntry(l).WithField("controller", name)})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		_ = c.Run(ctx)
	}()
	var once sync.Once
	stop = func() { once.Do(func() { cancel(); <-done }) }
	t.Cleanup(stop)
	return c, stop
}

type testWriter struct{ t testing.TB }

func (w testWriter) Write(b []byte) (int, error) {
	w.t.Log(string(b))
	return len(b), nil
}

// steps returns the history steps of host, in order.
func steps(t testing.TB, s *cluster.Store, host string) []string {
	t.Helper()
	evs, err := s.History(context.Background(), host, 0)
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, e := range evs {
		out = append(out, e.Step)
	}
	return out
}
