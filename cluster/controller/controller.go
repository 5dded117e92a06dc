package controller

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/sirupsen/logrus"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/client/v3/concurrency"

	"github.com/duplex-ha/duplex/cluster"
)

// Workload is what an agent says about one workload of its host.
type Workload struct {
	Name   string `json:"name"`
	State  string `json:"state"` // running, frozen, checkpointed, migrated, ...
	Memory uint64 `json:"memory,omitempty"`
	Pinned bool   `json:"pinned,omitempty"` // bound to its host: never moved, cleared by rejuvenation
}

// Moved is the outcome of one migration, for the history.
type Moved struct {
	Strategy string        `json:"strategy"`
	Frozen   time.Duration `json:"frozen"`
	Downtime time.Duration `json:"downtime"`
	Bytes    int64         `json:"bytes"`
}

// Agents reaches the hosts' duplexd. The real one talks to their agents over
// mutual TLS; tests and the scale benchmark use in-process fakes.
type Agents interface {
	// Workloads lists host's workloads.
	Workloads(ctx context.Context, host cluster.Host) ([]Workload, error)
	// Migrate has host from move workload to host to, live; it returns when the
	// migration committed or rolled back.
	Migrate(ctx context.Context, from cluster.Host, workload, to, strategy string) (Moved, error)
	// Rejuvenate signals host to rejuvenate for cycle; it returns once the host
	// accepted (before it restarts).
	Rejuvenate(ctx context.Context, host cluster.Host, cycle string) error
}

// Config configures a controller.
type Config struct {
	Name     string // who this controller is (its host's name)
	Store    *cluster.Store
	Agents   Agents
	Policy   Policy
	Log      *logrus.Entry
	Registry prometheus.Registerer // optional
}

// Controller drives the cluster's cycles while it is the elected leader.
type Controller struct {
	cfg Config
	log *logrus.Entry

	leading atomic.Bool
	writes  atomic.Int64 // transactions committed, for the scale benchmark

	mLeader  prometheus.Gauge
	mCycles  *prometheus.CounterVec
	mBlocked prometheus.Gauge
	mMoves   *prometheus.CounterVec
}

// ErrNotLeader means this controller lost its leadership while acting.
var ErrNotLeader = errors.New("controller is not the leader")

// New checks cfg and returns a controller.
func New(cfg Config) (*Controller, error) {
	cfg.Policy.Defaults()
	if err := cfg.Policy.Validate(); err != nil {
		return nil, fmt.Errorf("controller policy: %w", err)
	}
	if cfg.Store == nil || cfg.Agents == nil || cfg.Name == "" {
		return nil, errors.New("controller: needs a name, a store and agents")
	}
	if cfg.Log == nil {
		l := logrus.New()
		l.SetLevel(logrus.WarnLevel)
		cfg.Log = logrus.NewEntry(l)
	}
	c := &Controller{cfg: cfg, log: cfg.Log.WithField("part", "controller")}
	c.mLeader = prometheus.NewGauge(prometheus.GaugeOpts{Name: "duplex_controller_leader", Help: "1 while this duplexd's controller is the elected leader."})
	c.mCycles = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "duplex_controller_cycles_total", Help: "Cycles started and ended, by outcome."}, []string{"event"})
	c.mBlocked = prometheus.NewGauge(prometheus.GaugeOpts{Name: "duplex_controller_blocked_cycles", Help: "Cycles waiting on something (no target, budget, load, window, failures): the alert."})
	c.mMoves = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "duplex_controller_migrations_total", Help: "Workload migrations driven by the controller, by result."}, []string{"result"})
	if cfg.Registry != nil {
		for _, m := range []prometheus.Collector{c.mLeader, c.mCycles, c.mBlocked, c.mMoves} {
			if err := cfg.Registry.Register(m); err != nil {
				return nil, fmt.Errorf("controller metrics: %w", err)
			}
		}
	}
	return c, nil
}

// Leading says whether this controller is the leader now.
func (c *Controller) Leading() bool { return c.leading.Load() }

// Writes is the number of transactions this controller committed.
func (c *Controller) Writes() int64 { return c.writes.Load() }

// Run campaigns for leadership and, while it leads, drives every cycle. Another
// controller takes over when this one stops or dies (its session lease expires).
// Run returns when ctx ends.
func (c *Controller) Run(ctx context.Context) error {
	for {
		err := c.term(ctx)
		if ctx.Err() != nil {
			return nil
		}
		c.log.WithError(err).Warn("leadership ended; campaigning again")
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(time.Second):
		}
	}
}

// term is one session: campaign, lead until the session or ctx ends.
func (c *Controller) term(ctx context.Context) error {
	cli := c.cfg.Store.Client()
	sess, err := concurrency.NewSession(cli, concurrency.WithTTL(int(c.cfg.Policy.LeaseTTL.D().Seconds())), concurrency.WithContext(ctx))
	if err != nil {
		return fmt.Errorf("controller session: %w", err)
	}
	defer sess.Close()
	el := concurrency.NewElection(sess, cluster.ElectionPrefix)
	if err := el.Campaign(ctx, c.cfg.Name); err != nil {
		return fmt.Errorf("campaign: %w", err)
	}
	lctx, cancel := context.WithCancel(ctx)
	defer cancel()
	go func() {
		select {
		case <-sess.Done():
			cancel()
		case <-lctx.Done():
		}
	}()
	c.leading.Store(true)
	c.mLeader.Set(1)
	defer func() { c.leading.Store(false); c.mLeader.Set(0) }()
	c.log.WithField("controller", c.cfg.Name).Info("elected leader")
	l := &leader{c: c, el: el, sess: sess, runners: map[string]bool{}}
	err = l.lead(lctx)
	if ctx.Err() == nil {
		// Hand over at once rather than after the lease expires.
		rctx, rc := context.WithTimeout(context.Background(), 2*time.Second)
		_ = el.Resign(rctx)
		rc()
	}
	return err
}

// leader is one term of leadership.
type leader struct {
	c    *Controller
	el   *concurrency.Election
	sess *concurrency.Session
	v    *view

	mu      sync.Mutex
	runners map[string]bool // hosts whose cycle has a runner

	selectMu sync.Mutex // one target selection at a time
	budgetMu sync.Mutex // one rejuvenation decision at a time
	wg       sync.WaitGroup
}

func (l *leader) lead(ctx context.Context) error {
	cli := l.c.cfg.Store.Client()
	v, rev, err := loadView(ctx, cli)
	if err != nil {
		return err
	}
	l.v = v
	werr := make(chan error, 1)
	go func() { werr <- v.watch(ctx, cli, rev) }()
	defer l.wg.Wait()

	if b, err := json.Marshal(l.c.cfg.Policy); err == nil {
		_ = l.commit(ctx, nil, clientv3.OpPut(cluster.PolicyKey, string(b)))
	}
	trim := time.NewTicker(10 * time.Minute)
	defer trim.Stop()
	for {
		snap, changed := v.snapshot()
		snap.Now = time.Now()
		l.reconcile(ctx, &snap)
		// Wake on the next change (debounced) or after a while.
		select {
		case <-ctx.Done():
			return ctx.Err()
		case err := <-werr:
			return err
		case <-trim.C:
			_ = l.c.cfg.Store.TrimHistory(ctx, 0)
		case <-changed:
			// Debounced: in a large cluster reports change all the time.
			select {
			case <-ctx.Done():
			case <-time.After(50 * time.Millisecond):
			}
		case <-time.After(time.Second):
		}
	}
}

// reconcile starts cycles that are due and a runner for every cycle without one.
func (l *leader) reconcile(ctx context.Context, s *Snapshot) {
	blocked := 0
	for _, cy := range s.Cycles {
		if cy.Blocked != "" {
			blocked++
		}
	}
	l.c.mBlocked.Set(float64(blocked))
	for _, h := range sortedKeys(s.Hosts) {
		if _, ok := s.Cycles[h]; ok {
			continue
		}
		kind, reason := "", ""
		if r, ok := s.Requests[h]; ok {
			kind, reason = r.Kind, r.Kind+" requested by "+r.By
		} else if action, why := startOrNot(s, l.c.cfg.Policy, h); action == "start cycle" {
			kind, reason = cluster.KindUnstable, why
		}
		if kind == "" {
			continue
		}
		if err := l.start(ctx, s, h, kind, reason); err != nil && ctx.Err() == nil {
			l.c.log.WithError(err).WithField("host", h).Warn("starting a cycle")
		}
	}
	for h := range s.Cycles {
		l.mu.Lock()
		running := l.runners[h]
		if !running {
			l.runners[h] = true
		}
		l.mu.Unlock()
		if running {
			continue
		}
		l.wg.Add(1)
		go func() {
			defer l.wg.Done()
			defer func() { l.mu.Lock(); delete(l.runners, h); l.mu.Unlock() }()
			l.run(ctx, h)
		}()
	}
}

// start opens a cycle for host (claim 1: judged unstable, or asked by hand).
func (l *leader) start(ctx context.Context, s *Snapshot, host, kind, reason string) error {
	now := time.Now()
	cy := cluster.Cycle{
		ID: host + "-" + now.UTC().Format("20060102T150405.000"), Host: host, Kind: kind, Reason: reason,
		Phase: cluster.PhaseSelecting, Started: now, Updated: now, PhaseSince: now, By: l.c.cfg.Name,
	}
	b, _ := json.Marshal(cy)
	ck, mk := cluster.CyclesPrefix+host, cluster.MembersPrefix+host
	ops := []clientv3.Op{clientv3.OpPut(ck, string(b)), clientv3.OpDelete(cluster.RequestsPrefix + host)}
	ops = append(ops, l.events(cluster.Event{Time: now, Cycle: cy.ID, Host: host, Step: "cycle started", Detail: reason})...)
	err := l.commit(ctx, []clientv3.Cmp{
		clientv3.Compare(clientv3.CreateRevision(ck), "=", 0),
		clientv3.Compare(clientv3.ModRevision(mk), "=", l.v.rev(mk)),
	}, ops...)
	if err == nil {
		l.c.mCycles.WithLabelValues("started").Inc()
		l.c.log.WithFields(logrus.Fields{"host": host, "cycle": cy.ID, "kind": kind}).Warn("cycle started: " + reason)
	}
	return err
}

var errConflict = errors.New("the cluster state changed meanwhile")

// commit runs ops in one transaction that holds only while this controller leads
// and every cmp holds.
func (l *leader) commit(ctx context.Context, cmps []clientv3.Cmp, ops ...clientv3.Op) error {
	cmps = append(cmps, clientv3.Compare(clientv3.CreateRevision(l.el.Key()), "=", l.el.Rev()))
	tctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	resp, err := l.c.cfg.Store.Client().Txn(tctx).If(cmps...).Then(ops...).Commit()
	if err != nil {
		return fmt.Errorf("commit: %w", err)
	}
	l.c.writes.Add(1)
	if !resp.Succeeded {
		// Which compare failed matters only to tell a lost leadership apart.
		if g, err := l.c.cfg.Store.Client().Get(tctx, l.el.Key()); err == nil && (len(g.Kvs) == 0 || g.Kvs[0].CreateRevision != l.el.Rev()) {
			return ErrNotLeader
		}
		return errConflict
	}
	return nil
}

// events turns history events into puts.
func (l *leader) events(evs ...cluster.Event) []clientv3.Op {
	ops := make([]clientv3.Op, 0, len(evs))
	for i, e := range evs {
		e.By, e.Term = l.c.cfg.Name, fmt.Sprintf("%x", int64(l.sess.Lease()))
		b, _ := json.Marshal(e)
		ops = append(ops, clientv3.OpPut(cluster.HistoryKey(e.Time, e.Host, i), string(b)))
	}
	return ops
}

// readCycle reads host's cycle fresh from the store with its revision.
func (l *leader) readCycle(ctx context.Context, host string) (cluster.Cycle, int64, bool, error) {
	resp, err := l.c.cfg.Store.Client().Get(ctx, cluster.CyclesPrefix+host)
	if err != nil {
		return cluster.Cycle{}, 0, false, fmt.Errorf("read cycle of %s: %w", host, err)
	}
	if len(resp.Kvs) == 0 {
		return cluster.Cycle{}, 0, false, nil
	}
	var cy cluster.Cycle
	if err := json.Unmarshal(resp.Kvs[0].Value, &cy); err != nil {
		return cluster.Cycle{}, 0, false, fmt.Errorf("cycle of %s: %w", host, err)
	}
	return cy, resp.Kvs[0].ModRevision, true, nil
}

// update applies f to host's cycle in a transaction, retrying on conflicts. f
// returns the extra ops of the transition (member, list, history...). A cycle
// deleted by f (del true) ends.
func (l *leader) update(ctx context.Context, host string, f func(cy *cluster.Cycle) (ops []clientv3.Op, cmps []clientv3.Cmp, del bool, err error)) error {
	for attempt := 0; ; attempt++ {
		cy, rev, ok, err := l.readCycle(ctx, host)
		if err != nil {
			return err
		}
		if !ok {
			return fmt.Errorf("cycle of %s: gone", host)
		}
		ops, cmps, del, err := f(&cy)
		if err != nil {
			return err
		}
		cy.Updated, cy.By = time.Now(), l.c.cfg.Name
		key := cluster.CyclesPrefix + host
		if del {
			ops = append(ops, clientv3.OpDelete(key))
		} else {
			b, _ := json.Marshal(cy)
			ops = append(ops, clientv3.OpPut(key, string(b)))
		}
		cmps = append(cmps, clientv3.Compare(clientv3.ModRevision(key), "=", rev))
		err = l.commit(ctx, cmps, ops...)
		if !errors.Is(err, errConflict) || attempt >= 20 {
			return err
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(time.Duration(10*(attempt+1)) * time.Millisecond):
		}
	}
}

// block records why a cycle waits (the alert), once per distinct reason.
func (l *leader) block(ctx context.Context, host, why string) {
	cy, _, ok, err := l.readCycle(ctx, host)
	if err != nil || !ok || cy.Blocked == why {
		return
	}
	l.c.log.WithFields(logrus.Fields{"host": host, "cycle": cy.ID, "phase": cy.Phase}).Warn("cycle blocked: " + why)
	_ = l.update(ctx, host, func(cy *cluster.Cycle) ([]clientv3.Op, []clientv3.Cmp, bool, error) {
		cy.Blocked, cy.BlockedSince = why, time.Now()
		return l.events(cluster.Event{Time: time.Now(), Cycle: cy.ID, Host: host, Step: "alert", Target: cy.Target, Detail: why}), nil, false, nil
	})
}

func memberOp(m cluster.Member) clientv3.Op {
	b, _ := json.Marshal(m)
	return clientv3.OpPut(cluster.MembersPrefix+m.Name, string(b))
}

func (l *leader) lockOp(host string, cy *cluster.Cycle, why string) clientv3.Op {
	b, _ := json.Marshal(cluster.Lock{Host: host, Holder: l.c.cfg.Name, Cycle: cy.ID, Why: why, Since: time.Now()})
	return clientv3.OpPut(cluster.LocksPrefix+host, string(b), clientv3.WithLease(l.sess.Lease()))
}

// run drives host's cycle step by step until it ends or leadership is lost.
func (l *leader) run(ctx context.Context, host string) {
	log := l.c.log.WithField("host", host)
	for ctx.Err() == nil {
		cy, _, ok, err := l.readCycle(ctx, host)
		if err != nil {
			log.WithError(err).Warn("reading the cycle")
			sleep(ctx, l.c.cfg.Policy.Retry.D())
			continue
		}
		if !ok {
			return
		}
		wait, err := l.step(ctx, cy)
		switch {
		case errors.Is(err, ErrNotLeader):
			log.Warn("lost leadership in the middle of a step")
			return
		case err != nil && ctx.Err() == nil:
			log.WithError(err).WithField("phase", cy.Phase).Warn("cycle step failed; retrying")
			if wait == 0 {
				wait = l.c.cfg.Policy.Retry.D()
			}
		}
		if wait > 0 {
			l.waitChange(ctx, wait)
		}
	}
}

// waitChange waits up to d, or until the view changes (at least 200 ms).
func (l *leader) waitChange(ctx context.Context, d time.Duration) {
	changed := l.v.next()
	floor := time.NewTimer(min(d, 200*time.Millisecond))
	defer floor.Stop()
	select {
	case <-ctx.Done():
		return
	case <-floor.C:
	}
	select {
	case <-ctx.Done():
	case <-changed:
	case <-time.After(d - min(d, 200*time.Millisecond)):
	}
}

func sleep(ctx context.Context, d time.Duration) {
	select {
	case <-ctx.Done():
	case <-time.After(d):
	}
}

// step performs the next step of a cycle and says how long to wait before the
// following one (0: at once).
func (l *leader) step(ctx context.Context, cy cluster.Cycle) (time.Duration, error) {
	p := l.c.cfg.Policy
	switch cy.Phase {
	case cluster.PhaseSelecting:
		return l.selectTarget(ctx, cy)
	case cluster.PhaseDuplexing:
		return l.duplex(ctx, cy)
	case cluster.PhaseDeciding:
		return l.decide(ctx, cy)
	case cluster.PhaseRejuvenating:
		return l.rejuvenate(ctx, cy)
	}
	l.block(ctx, cy.Host, "unknown phase "+string(cy.Phase))
	return p.Retry.D(), nil
}

// selectTarget picks where the host's workloads go (claims 4, 5).
func (l *leader) selectTarget(ctx context.Context, cy cluster.Cycle) (time.Duration, error) {
	if h, ok := l.v.host(cy.Host); ok {
		// A host with nothing to move needs no target.
		wls, err := l.c.cfg.Agents.Workloads(ctx, h)
		if err == nil && len(movable(wls)) == 0 {
			return 0, l.update(ctx, cy.Host, func(c *cluster.Cycle) ([]clientv3.Op, []clientv3.Cmp, bool, error) {
				now := time.Now()
				c.Phase, c.PhaseSince, c.Blocked = cluster.PhaseDeciding, now, ""
				return l.events(cluster.Event{Time: now, Cycle: c.ID, Host: c.Host, Step: "duplexed", Detail: "no workload to move"}), nil, false, nil
			})
		}
	}
	l.selectMu.Lock()
	defer l.selectMu.Unlock()
	snap, _ := l.v.snapshot()
	snap.Now = time.Now()
	sel := Select(&snap, l.c.cfg.Policy, cy.Host)
	if sel.Target == "" {
		l.block(ctx, cy.Host, sel.Why)
		return l.c.cfg.Policy.Retry.D(), nil
	}
	t := sel.Target
	tk := cluster.MembersPrefix + t
	// The view may lag a selection made a moment ago: the target's record is read
	// fresh, checked, and guarded at that revision, so two cycles never get one spare.
	tresp, err := l.c.cfg.Store.Client().Get(ctx, tk)
	if err != nil {
		return 0, fmt.Errorf("read member %s: %w", t, err)
	}
	if len(tresp.Kvs) == 0 {
		return l.c.cfg.Policy.Retry.D(), nil
	}
	var tm cluster.Member
	if err := json.Unmarshal(tresp.Kvs[0].Value, &tm); err != nil || tm.Role != snap.Members[t].Role {
		return 200 * time.Millisecond, nil // changed meanwhile: select again
	}
	trev := tresp.Kvs[0].ModRevision
	err = l.update(ctx, cy.Host, func(c *cluster.Cycle) ([]clientv3.Op, []clientv3.Cmp, bool, error) {
		if c.Phase != cluster.PhaseSelecting {
			return nil, nil, false, errConflict
		}
		now := time.Now()
		c.Phase, c.PhaseSince, c.Target, c.Blocked = cluster.PhaseDuplexing, now, t, ""
		ops := []clientv3.Op{
			memberOp(cluster.Member{Name: cy.Host, Role: cluster.RoleDuplexing, Since: now, Cycle: c.ID, Rejuvenated: snap.Members[cy.Host].Rejuvenated}),
			l.lockOp(cy.Host, c, "source of the cycle"), l.lockOp(t, c, "target of "+c.ID),
		}
		if tm.Role == cluster.RoleSpare {
			// Claim 6: the duplexed spare is switched to a primary.
			tm.Role, tm.Since, tm.Cycle = cluster.RolePrimary, now, c.ID
			ops = append(ops, memberOp(tm), clientv3.OpPut(cluster.AvailablePrefix+t, string(cluster.RolePrimary)))
		}
		ops = append(ops, l.events(cluster.Event{Time: now, Cycle: c.ID, Host: cy.Host, Step: "target selected", Target: t, Detail: sel.Why})...)
		return ops, []clientv3.Cmp{clientv3.Compare(clientv3.ModRevision(tk), "=", trev)}, false, nil
	})
	if errors.Is(err, errConflict) {
		return 200 * time.Millisecond, nil // the target changed meanwhile: select again
	}
	if err == nil {
		l.c.log.WithFields(logrus.Fields{"host": cy.Host, "target": t}).Warn("target selected: " + sel.Why)
	}
	return 0, err
}

// movable lists the workloads a cycle moves or waits for: all but pinned ones
// and those that ended.
func movable(wls []Workload) []string {
	var out []string
	for _, w := range wls {
		if !w.Pinned && (w.State == "running" || w.State == "frozen" || w.State == "checkpointed") {
			out = append(out, w.Name)
		}
	}
	return out
}

// duplex moves every workload of the host to the target (claim 1's duplexing).
func (l *leader) duplex(ctx context.Context, cy cluster.Cycle) (time.Duration, error) {
	p := l.c.cfg.Policy
	src, ok := l.v.host(cy.Host)
	if !ok {
		l.block(ctx, cy.Host, "the host's duplexd is not registered: waiting for it")
		return p.Retry.D(), nil
	}
	if _, ok := l.v.host(cy.Target); !ok {
		l.block(ctx, cy.Host, "target "+cy.Target+" is not registered: waiting for it")
		return p.Retry.D(), nil
	}
	// The locks live under this leader's lease: a new leader puts them again.
	if err := l.commit(ctx, nil, l.lockOp(cy.Host, &cy, "source of the cycle"), l.lockOp(cy.Target, &cy, "target of "+cy.ID)); err != nil {
		return 0, err
	}
	wls, err := l.c.cfg.Agents.Workloads(ctx, src)
	if err != nil {
		l.block(ctx, cy.Host, "listing the host's workloads: "+err.Error())
		return p.Retry.D(), nil
	}
	moved := map[string]bool{}
	for _, w := range cy.Moved {
		moved[w] = true
	}
	var todo, inFlight, found []string
	for _, w := range wls {
		switch {
		case w.Pinned:
		case w.State == "running":
			todo = append(todo, w.Name)
		case w.State == "frozen" || w.State == "checkpointed":
			inFlight = append(inFlight, w.Name)
		case w.State == "migrated" && !moved[w.Name]:
			found = append(found, w.Name) // moved while no controller recorded it
		}
	}
	if len(found) > 0 {
		sort.Strings(found)
		if err := l.update(ctx, cy.Host, func(c *cluster.Cycle) ([]clientv3.Op, []clientv3.Cmp, bool, error) {
			c.Moved = append(c.Moved, found...)
			return l.events(cluster.Event{Time: time.Now(), Cycle: c.ID, Host: c.Host, Step: "found moved", Target: c.Target,
				Detail: "moved before this controller took over: " + strings.Join(found, ", ")}), nil, false, nil
		}); err != nil {
			return 0, err
		}
	}
	if len(inFlight) > 0 {
		return p.Retry.D() / 2, nil // a migration started by the previous leader is ending
	}
	if len(todo) == 0 {
		return 0, l.update(ctx, cy.Host, func(c *cluster.Cycle) ([]clientv3.Op, []clientv3.Cmp, bool, error) {
			now := time.Now()
			c.Phase, c.PhaseSince, c.Blocked = cluster.PhaseDeciding, now, ""
			return l.events(cluster.Event{Time: now, Cycle: c.ID, Host: c.Host, Step: "duplexed", Target: c.Target,
				Detail: fmt.Sprintf("%d workload(s) moved: %s", len(c.Moved), strings.Join(c.Moved, ", "))}), nil, false, nil
		})
	}
	sort.Strings(todo)
	var (
		wg     sync.WaitGroup
		sem    = make(chan struct{}, p.Parallel)
		mu     sync.Mutex
		failed []string
		errs   []error
	)
	for _, w := range todo {
		if cy.Failures[w] >= p.MaxFailures {
			mu.Lock()
			failed = append(failed, w)
			mu.Unlock()
		}
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			l.c.log.WithFields(logrus.Fields{"host": cy.Host, "workload": w, "target": cy.Target}).Info("moving workload")
			res, err := l.c.cfg.Agents.Migrate(ctx, src, w, cy.Target, p.Strategy)
			now := time.Now()
			if err != nil {
				l.c.mMoves.WithLabelValues("failed").Inc()
				mu.Lock()
				errs = append(errs, fmt.Errorf("%s: %w", w, err))
				mu.Unlock()
				uerr := l.update(ctx, cy.Host, func(c *cluster.Cycle) ([]clientv3.Op, []clientv3.Cmp, bool, error) {
					if c.Failures == nil {
						c.Failures = map[string]int{}
					}
					c.Failures[w]++
					return l.events(cluster.Event{Time: now, Cycle: c.ID, Host: c.Host, Step: "migration failed", Target: c.Target, Workload: w,
						Detail: err.Error()}), nil, false, nil
				})
				if uerr != nil && ctx.Err() == nil {
					l.c.log.WithError(uerr).Warn("recording a failed migration")
				}
				return
			}
			l.c.mMoves.WithLabelValues("moved").Inc()
			uerr := l.update(ctx, cy.Host, func(c *cluster.Cycle) ([]clientv3.Op, []clientv3.Cmp, bool, error) {
				c.Moved = append(c.Moved, w)
				return l.events(cluster.Event{Time: now, Cycle: c.ID, Host: c.Host, Step: "moved", Target: c.Target, Workload: w,
					Detail: fmt.Sprintf("%s, frozen %s, downtime %s, %s", res.Strategy, res.Frozen.Round(time.Millisecond), res.Downtime.Round(time.Millisecond), bytes(uint64(res.Bytes)))}), nil, false, nil
			})
			if uerr != nil && ctx.Err() == nil {
				l.c.log.WithError(uerr).Warn("recording a migration")
			}
		}()
	}
	wg.Wait()
	if len(errs) > 0 {
		if len(failed) > 0 {
			l.block(ctx, cy.Host, fmt.Sprintf("%s failed to move %d times or more; retrying (last: %s)", strings.Join(failed, ", "), p.MaxFailures, errors.Join(errs...).Error()))
		}
		return p.Retry.D(), nil
	}
	return 0, nil
}

// decide judges whether to rejuvenate now (claim 6) and removes the host from the
// available list when it does.
func (l *leader) decide(ctx context.Context, cy cluster.Cycle) (time.Duration, error) {
	l.budgetMu.Lock()
	defer l.budgetMu.Unlock()
	snap, _ := l.v.snapshot()
	snap.Now = time.Now()
	// The budget counts from the store itself, not the view, which may lag a
	// decision taken a moment ago; only the hosts rejuvenating now are read.
	busy, err := l.c.cfg.Store.Client().Get(ctx, cluster.RejuvenatingPrefix, clientv3.WithPrefix(), clientv3.WithKeysOnly())
	if err != nil {
		return 0, fmt.Errorf("read the hosts rejuvenating: %w", err)
	}
	members := maps.Clone(snap.Members)
	for _, kv := range busy.Kvs {
		name := strings.TrimPrefix(string(kv.Key), cluster.RejuvenatingPrefix)
		m := members[name]
		m.Name, m.Role = name, cluster.RoleRejuvenating
		members[name] = m
	}
	snap.Members = members
	d, why := Decide(&snap, l.c.cfg.Policy, cy)
	m := members[cy.Host]
	switch d {
	case DecideWait:
		l.block(ctx, cy.Host, why)
		return l.c.cfg.Policy.Retry.D(), nil
	case DecideDone, DecideSkip:
		err := l.update(ctx, cy.Host, func(c *cluster.Cycle) ([]clientv3.Op, []clientv3.Cmp, bool, error) {
			now := time.Now()
			m.Role, m.Since, m.Cycle = cluster.RoleSpare, now, c.ID
			step := "rejuvenation skipped"
			if d == DecideDone {
				step = "drained"
			}
			ops := []clientv3.Op{memberOp(m), clientv3.OpPut(cluster.AvailablePrefix+c.Host, string(cluster.RoleSpare)),
				clientv3.OpDelete(cluster.LocksPrefix + c.Host), clientv3.OpDelete(cluster.LocksPrefix + c.Target)}
			ops = append(ops, l.events(
				cluster.Event{Time: now, Cycle: c.ID, Host: c.Host, Step: step, Detail: why},
				cluster.Event{Time: now, Cycle: c.ID, Host: c.Host, Step: "registered as spare", Detail: "back on the available list"},
			)...)
			return ops, nil, true, nil
		})
		if err == nil {
			l.c.mCycles.WithLabelValues(string(d)).Inc()
		}
		return 0, err
	}
	return 0, l.update(ctx, cy.Host, func(c *cluster.Cycle) ([]clientv3.Op, []clientv3.Cmp, bool, error) {
		now := time.Now()
		c.Phase, c.PhaseSince, c.Blocked, c.Signalled = cluster.PhaseRejuvenating, now, "", false
		m.Role, m.Since, m.Cycle = cluster.RoleRejuvenating, now, c.ID
		ops := []clientv3.Op{memberOp(m), clientv3.OpDelete(cluster.AvailablePrefix + c.Host), clientv3.OpDelete(cluster.LocksPrefix + c.Target),
			clientv3.OpPut(cluster.RejuvenatingPrefix+c.Host, c.ID)}
		ops = append(ops, l.events(
			cluster.Event{Time: now, Cycle: c.ID, Host: c.Host, Step: "decided to rejuvenate", Detail: why},
			cluster.Event{Time: now, Cycle: c.ID, Host: c.Host, Step: "removed from available list"},
		)...)
		return ops, nil, false, nil
	})
}

// rejuvenate signals the host and, once it asks to rejoin, registers it as a spare.
func (l *leader) rejuvenate(ctx context.Context, cy cluster.Cycle) (time.Duration, error) {
	p := l.c.cfg.Policy
	if rj, ok := l.v.rejoin(cy.Host); ok && rj.Cycle == cy.ID {
		err := l.update(ctx, cy.Host, func(c *cluster.Cycle) ([]clientv3.Op, []clientv3.Cmp, bool, error) {
			now := time.Now()
			m := cluster.Member{Name: c.Host, Role: cluster.RoleSpare, Since: now, Cycle: c.ID, Rejuvenated: now}
			ops := []clientv3.Op{memberOp(m), clientv3.OpPut(cluster.AvailablePrefix+c.Host, string(cluster.RoleSpare)),
				clientv3.OpDelete(cluster.RejoinPrefix + c.Host), clientv3.OpDelete(cluster.LocksPrefix + c.Host),
				clientv3.OpDelete(cluster.RejuvenatingPrefix + c.Host)}
			ops = append(ops, l.events(
				cluster.Event{Time: now, Cycle: c.ID, Host: c.Host, Step: "rejuvenated", Detail: rj.Detail},
				cluster.Event{Time: now, Cycle: c.ID, Host: c.Host, Step: "registered as spare", Detail: "back on the available list after " + now.Sub(c.Started).Round(time.Second).String()},
			)...)
			return ops, nil, true, nil
		})
		if err == nil {
			l.c.mCycles.WithLabelValues("rejuvenated").Inc()
			l.c.log.WithFields(logrus.Fields{"host": cy.Host, "cycle": cy.ID}).Warn("host rejuvenated and back as a spare")
		}
		return 0, err
	}
	if cy.Signalled {
		if waited := time.Since(cy.PhaseSince); waited > p.RejoinTimeout.D() {
			l.block(ctx, cy.Host, fmt.Sprintf("no rejoin request %s after the rejuvenation signal", waited.Round(time.Second)))
		}
		return p.Retry.D(), nil
	}
	h, ok := l.v.host(cy.Host)
	if !ok {
		// Signalled by a leader that died before recording it: the host is restarting.
		return p.Retry.D(), nil
	}
	if err := l.c.cfg.Agents.Rejuvenate(ctx, h, cy.ID); err != nil {
		l.block(ctx, cy.Host, "signalling rejuvenation: "+err.Error())
		return p.Retry.D(), nil
	}
	return 0, l.update(ctx, cy.Host, func(c *cluster.Cycle) ([]clientv3.Op, []clientv3.Cmp, bool, error) {
		c.Signalled, c.Blocked = true, ""
		return l.events(cluster.Event{Time: time.Now(), Cycle: c.ID, Host: c.Host, Step: "rejuvenation signalled"}), nil, false, nil
	})
}
