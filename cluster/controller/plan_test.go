package controller_test

import (
	"reflect"
	"testing"
	"time"

	"github.com/duplex-ha/duplex/cluster"
	"github.com/duplex-ha/duplex/cluster/controller"
)

// Unit tests of the pure policy in plan.go: every Snapshot is built by hand, no etcd.

const (
	mib = uint64(1) << 20
	gib = uint64(1) << 30
)

// planNow is the snapshots' clock: noon, in UTC so that window tests do not depend
// on the machine's zone.
var planNow = time.Date(2024, 3, 10, 12, 0, 0, 0, time.UTC)

// newSnap is an empty cluster in mode m at planNow.
func newSnap(m cluster.Mode) *controller.Snapshot {
	return &controller.Snapshot{
		Now:       planNow,
		Mode:      m,
		Hosts:     map[string]cluster.Host{},
		Members:   map[string]cluster.Member{},
		Available: map[string]bool{},
		Reports:   map[string]cluster.Report{},
		Cycles:    map[string]cluster.Cycle{},
		Requests:  map[string]cluster.Request{},
		Rejoins:   map[string]cluster.Rejoin{},
	}
}

// addHost registers a live, available, stable host with role r, capacity capacity
// and used bytes in use (MemAvailable does not limit it), booted two days ago.
func addHost(s *controller.Snapshot, name string, r cluster.Role, capacity, used uint64) {
	s.Hosts[name] = cluster.Host{Name: name, Started: planNow.Add(-48 * time.Hour)}
	s.Members[name] = cluster.Member{Name: name, Role: r, Since: planNow.Add(-48 * time.Hour)}
	s.Available[name] = true
	s.Reports[name] = cluster.Report{
		Host: name, Time: planNow, MemTotal: 64 * gib, MemAvailable: 64 * gib,
		Capacity: capacity, Used: used, CPUs: 4, Load1: 1, Workloads: 1,
		Booted: planNow.Add(-48 * time.Hour),
	}
}

// defaulted is the default policy with f applied.
func defaulted(f func(p *controller.Policy)) controller.Policy {
	var p controller.Policy
	if f != nil {
		f(&p)
	}
	p.Defaults()
	return p
}

func TestReportFree(t *testing.T) {
	for _, tc := range []struct {
		name                     string
		capacity, used, memAvail uint64
		want                     uint64
	}{
		{"capacity minus used", 10 * gib, 4 * gib, 64 * gib, 6 * gib},
		{"mem available is lower", 10 * gib, 4 * gib, 3 * gib, 3 * gib},
		{"mem available equal", 10 * gib, 4 * gib, 6 * gib, 6 * gib},
		{"used equals capacity", 10 * gib, 10 * gib, 64 * gib, 0},
		{"used above capacity does not wrap", 10 * gib, 11 * gib, 64 * gib, 0},
		{"no mem available", 10 * gib, 4 * gib, 0, 0},
		{"empty report", 0, 0, 0, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := cluster.Report{Capacity: tc.capacity, Used: tc.used, MemAvailable: tc.memAvail}
			if got := r.Free(); got != tc.want {
				t.Errorf("Free() of capacity %d used %d available %d = %d, want %d", tc.capacity, tc.used, tc.memAvail, got, tc.want)
			}
		})
	}
}

func TestSelect(t *testing.T) {
	// The unstable host "src" has 2 GiB of workloads in every case.
	for _, tc := range []struct {
		name      string
		mode      cluster.Mode
		minSpares int
		setup     func(s *controller.Snapshot)
		want      controller.Selection
	}{
		{
			name: "active-standby takes a spare, not a roomier primary",
			mode: cluster.ActiveStandby,
			setup: func(s *controller.Snapshot) {
				addHost(s, "p1", cluster.RolePrimary, 16*gib, 0)
				addHost(s, "s1", cluster.RoleSpare, 4*gib, 0)
			},
			want: controller.Selection{Target: "s1", Why: "spare s1: 4.0 GiB free for 2.0 GiB of workloads (best fit of 1)"},
		},
		{
			name: "active-standby takes the tightest spare; an exact fit fits",
			mode: cluster.ActiveStandby,
			setup: func(s *controller.Snapshot) {
				addHost(s, "s1", cluster.RoleSpare, 8*gib, 0)
				addHost(s, "s2", cluster.RoleSpare, 3*gib, 0)
				addHost(s, "s3", cluster.RoleSpare, 3*gib, 1*gib) // 2 GiB free: exactly the need
				addHost(s, "s4", cluster.RoleSpare, 2*gib-1, 0)   // one byte short
			},
			want: controller.Selection{Target: "s3", Why: "spare s3: 2.0 GiB free for 2.0 GiB of workloads (best fit of 3)"},
		},
		{
			name: "equal fits go by name",
			mode: cluster.ActiveStandby,
			setup: func(s *controller.Snapshot) {
				addHost(s, "s2", cluster.RoleSpare, 4*gib, 0)
				addHost(s, "s1", cluster.RoleSpare, 4*gib, 0)
			},
			want: controller.Selection{Target: "s1", Why: "spare s1: 4.0 GiB free for 2.0 GiB of workloads (best fit of 2)"},
		},
		{
			name: "active-active takes the tightest primary before a tighter spare",
			mode: cluster.ActiveActive,
			setup: func(s *controller.Snapshot) {
				addHost(s, "p1", cluster.RolePrimary, 16*gib, 8*gib) // 8 GiB free
				addHost(s, "p2", cluster.RolePrimary, 16*gib, 13*gib)
				addHost(s, "p3", cluster.RolePrimary, 16*gib, 15*gib) // 1 GiB free: too small
				addHost(s, "s1", cluster.RoleSpare, 2*gib+512*mib, 0)
			},
			want: controller.Selection{Target: "p2", Why: "primary p2: 3.0 GiB free for 2.0 GiB of workloads (best fit of 3)"},
		},
		{
			name: "active-active falls back to a spare when no primary fits",
			mode: cluster.ActiveActive,
			setup: func(s *controller.Snapshot) {
				addHost(s, "p1", cluster.RolePrimary, 16*gib, 15*gib)
				addHost(s, "p2", cluster.RolePrimary, 16*gib, 16*gib-512*mib)
				addHost(s, "s1", cluster.RoleSpare, 4*gib, 0)
			},
			want: controller.Selection{Target: "s1", Why: "spare s1: 4.0 GiB free for 2.0 GiB of workloads (best fit of 1)"},
		},
		{
			name:      "active-active: min_spares does not stop taking a primary",
			mode:      cluster.ActiveActive,
			minSpares: 1,
			setup: func(s *controller.Snapshot) {
				addHost(s, "p1", cluster.RolePrimary, 16*gib, 12*gib)
				addHost(s, "s1", cluster.RoleSpare, 4*gib, 0)
			},
			want: controller.Selection{Target: "p1", Why: "primary p1: 4.0 GiB free for 2.0 GiB of workloads (best fit of 2)"},
		},
		{
			name: "active-active never takes a duplexing or rejuvenating host",
			mode: cluster.ActiveActive,
			setup: func(s *controller.Snapshot) {
				addHost(s, "d1", cluster.RoleDuplexing, 16*gib, 0)
				addHost(s, "r1", cluster.RoleRejuvenating, 16*gib, 0)
			},
			want: controller.Selection{Why: "no primary or spare with enough free capacity available (mode active-active)"},
		},
		{
			name:      "min_spares keeps the last spare",
			mode:      cluster.ActiveStandby,
			minSpares: 1,
			setup: func(s *controller.Snapshot) {
				addHost(s, "s1", cluster.RoleSpare, 4*gib, 0)
			},
			want: controller.Selection{Why: "taking spare s1 would leave 0 spare(s), below min_spares 1"},
		},
		{
			name:      "min_spares allows a spare when another remains",
			mode:      cluster.ActiveStandby,
			minSpares: 1,
			setup: func(s *controller.Snapshot) {
				addHost(s, "s1", cluster.RoleSpare, 4*gib, 0)
				addHost(s, "s2", cluster.RoleSpare, 8*gib, 0)
			},
			want: controller.Selection{Target: "s1", Why: "spare s1: 4.0 GiB free for 2.0 GiB of workloads (best fit of 2)"},
		},
		{
			name:      "min_spares counts a too-small spare as a spare",
			mode:      cluster.ActiveStandby,
			minSpares: 1,
			setup: func(s *controller.Snapshot) {
				addHost(s, "s1", cluster.RoleSpare, 4*gib, 0)
				addHost(s, "s2", cluster.RoleSpare, 1*gib, 0)
			},
			want: controller.Selection{Target: "s1", Why: "spare s1: 4.0 GiB free for 2.0 GiB of workloads (best fit of 1)"},
		},
		{
			name:      "min_spares does not count an unstable spare",
			mode:      cluster.ActiveStandby,
			minSpares: 1,
			setup: func(s *controller.Snapshot) {
				addHost(s, "s1", cluster.RoleSpare, 4*gib, 0)
				addHost(s, "s2", cluster.RoleSpare, 8*gib, 0)
				r := s.Reports["s2"]
				r.Unstable = true
				s.Reports["s2"] = r
			},
			want: controller.Selection{Why: "taking spare s1 would leave 0 spare(s), below min_spares 1"},
		},
		{
			name:      "active-active: min_spares keeps the last spare when no primary fits",
			mode:      cluster.ActiveActive,
			minSpares: 1,
			setup: func(s *controller.Snapshot) {
				addHost(s, "p1", cluster.RolePrimary, 16*gib, 15*gib)
				addHost(s, "s1", cluster.RoleSpare, 4*gib, 0)
			},
			want: controller.Selection{Why: "taking spare s1 would leave 0 spare(s), below min_spares 1"},
		},
		{
			name:  "active-standby with only primaries",
			mode:  cluster.ActiveStandby,
			setup: func(s *controller.Snapshot) { addHost(s, "p1", cluster.RolePrimary, 16*gib, 0) },
			want:  controller.Selection{Why: "no spare host available (mode active-standby)"},
		},
		{
			name: "active-standby lists the spares too small with their free memory",
			mode: cluster.ActiveStandby,
			setup: func(s *controller.Snapshot) {
				addHost(s, "s2", cluster.RoleSpare, 512*mib, 0)
				addHost(s, "s1", cluster.RoleSpare, 1*gib, 0)
				addHost(s, "p1", cluster.RolePrimary, 16*gib, 0)
			},
			want: controller.Selection{Why: "no spare host: need 2.0 GiB; s1 has 1.0 GiB free, s2 has 512 MiB free"},
		},
		{
			name: "active-active lists primaries and spares too small",
			mode: cluster.ActiveActive,
			setup: func(s *controller.Snapshot) {
				addHost(s, "p1", cluster.RolePrimary, 16*gib, 15*gib)
				addHost(s, "s1", cluster.RoleSpare, 512*mib, 0)
			},
			want: controller.Selection{Why: "no primary or spare with enough free capacity: need 2.0 GiB; p1 has 1.0 GiB free, s1 has 512 MiB free"},
		},
		{
			name: "free memory is capped by MemAvailable",
			mode: cluster.ActiveStandby,
			setup: func(s *controller.Snapshot) {
				addHost(s, "s1", cluster.RoleSpare, 8*gib, 0)
				r := s.Reports["s1"]
				r.MemAvailable = 1 * gib
				s.Reports["s1"] = r
			},
			want: controller.Selection{Why: "no spare host: need 2.0 GiB; s1 has 1.0 GiB free"},
		},
		{
			name: "used above capacity is 0 free",
			mode: cluster.ActiveStandby,
			setup: func(s *controller.Snapshot) {
				addHost(s, "s1", cluster.RoleSpare, 8*gib, 9*gib)
			},
			want: controller.Selection{Why: "no spare host: need 2.0 GiB; s1 has 0 B free"},
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := newSnap(tc.mode)
			addHost(s, "src", cluster.RolePrimary, 16*gib, 2*gib)
			tc.setup(s)
			got := controller.Select(s, defaulted(func(p *controller.Policy) { p.MinSpares = tc.minSpares }), "src")
			if got != tc.want {
				t.Errorf("Select:\n got  %+v\n want %+v", got, tc.want)
			}
		})
	}
}

// TestSelectExcludes puts a tightly fitting spare "bad" next to a loose one "good":
// whatever makes "bad" unusable must make Select take "good".
func TestSelectExcludes(t *testing.T) {
	for _, tc := range []struct {
		name  string
		spoil func(s *controller.Snapshot)
	}{
		{"dead (not registered)", func(s *controller.Snapshot) { delete(s.Hosts, "bad") }},
		{"off the available list", func(s *controller.Snapshot) { delete(s.Available, "bad") }},
		{"available false", func(s *controller.Snapshot) { s.Available["bad"] = false }},
		{"unstable", func(s *controller.Snapshot) {
			r := s.Reports["bad"]
			r.Unstable, r.UnstableSince = true, planNow.Add(-time.Minute)
			s.Reports["bad"] = r
		}},
		{"no report", func(s *controller.Snapshot) { delete(s.Reports, "bad") }},
		{"source of another cycle", func(s *controller.Snapshot) {
			s.Cycles["bad"] = cluster.Cycle{ID: "bad-1", Host: "bad", Kind: cluster.KindUnstable, Phase: cluster.PhaseSelecting}
		}},
	} {
		for _, mode := range []cluster.Mode{cluster.ActiveStandby, cluster.ActiveActive} {
			t.Run(tc.name+"/"+string(mode), func(t *testing.T) {
				s := newSnap(mode)
				addHost(s, "src", cluster.RolePrimary, 16*gib, 2*gib)
				addHost(s, "bad", cluster.RoleSpare, 2*gib, 0)
				addHost(s, "good", cluster.RoleSpare, 8*gib, 0)
				tc.spoil(s)
				got := controller.Select(s, defaulted(nil), "src")
				want := controller.Selection{Target: "good", Why: "spare good: 8.0 GiB free for 2.0 GiB of workloads (best fit of 1)"}
				if got != want {
					t.Errorf("Select:\n got  %+v\n want %+v", got, want)
				}
			})
		}
	}
	t.Run("the host itself", func(t *testing.T) {
		s := newSnap(cluster.ActiveActive)
		addHost(s, "src", cluster.RolePrimary, 16*gib, 2*gib) // 14 GiB free, but it is the source
		got := controller.Select(s, defaulted(nil), "src")
		want := controller.Selection{Why: "no primary or spare with enough free capacity available (mode active-active)"}
		if got != want {
			t.Errorf("Select:\n got  %+v\n want %+v", got, want)
		}
	})
}

// decideSnap is a host "h" that was duplexed onto "t" and now waits in phase
// deciding for a minute; it booted two days ago and has load 1 on 4 CPUs.
func decideSnap() (*controller.Snapshot, cluster.Cycle) {
	s := newSnap(cluster.ActiveStandby)
	addHost(s, "h", cluster.RoleDuplexing, 16*gib, 0)
	addHost(s, "t", cluster.RolePrimary, 16*gib, 2*gib)
	c := cluster.Cycle{
		ID: "h-1", Host: "h", Kind: cluster.KindUnstable, Phase: cluster.PhaseDeciding, Target: "t",
		Started: planNow.Add(-5 * time.Minute), PhaseSince: planNow.Add(-time.Minute),
	}
	return s, c
}

func TestDecide(t *testing.T) {
	setReport := func(s *controller.Snapshot, f func(r *cluster.Report)) {
		r := s.Reports["h"]
		f(&r)
		s.Reports["h"] = r
	}
	rejuvenating := func(s *controller.Snapshot, names ...string) {
		for _, n := range names {
			s.Members[n] = cluster.Member{Name: n, Role: cluster.RoleRejuvenating}
		}
	}
	for _, tc := range []struct {
		name    string
		policy  func(p *controller.Policy)
		setup   func(s *controller.Snapshot, c *cluster.Cycle)
		want    controller.Decision
		wantWhy string
	}{
		{
			name:    "nothing holds it back",
			want:    controller.DecideNow,
			wantWhy: "load 0.25 per CPU, running for 48h0m0s",
		},
		{
			name:    "drain finishes",
			setup:   func(s *controller.Snapshot, c *cluster.Cycle) { c.Kind = cluster.KindDrain },
			want:    controller.DecideDone,
			wantWhy: "drained by request: back to the list as a spare",
		},
		{
			name: "drain finishes without a report and over budget",
			setup: func(s *controller.Snapshot, c *cluster.Cycle) {
				c.Kind = cluster.KindDrain
				delete(s.Reports, "h")
				rejuvenating(s, "r1")
			},
			want:    controller.DecideDone,
			wantWhy: "drained by request: back to the list as a spare",
		},
		{
			name:    "no report waits",
			setup:   func(s *controller.Snapshot, c *cluster.Cycle) { delete(s.Reports, "h") },
			want:    controller.DecideWait,
			wantWhy: "no report from the host (is its duplexd running?)",
		},
		{
			name:   "manual rejuvenation without a report waits",
			policy: func(p *controller.Policy) { p.MinRunning = controller.Duration(time.Hour) },
			setup: func(s *controller.Snapshot, c *cluster.Cycle) {
				c.Kind = cluster.KindRejuvenate
				delete(s.Reports, "h")
			},
			want:    controller.DecideWait,
			wantWhy: "no report from the host (is its duplexd running?)",
		},
		// min_running
		{
			name:   "ran less than min_running since boot: skip",
			policy: func(p *controller.Policy) { p.MinRunning = controller.Duration(time.Hour) },
			setup: func(s *controller.Snapshot, c *cluster.Cycle) {
				setReport(s, func(r *cluster.Report) { r.Booted = planNow.Add(-30 * time.Minute) })
			},
			want:    controller.DecideSkip,
			wantWhy: "running for 30m0s, below min_running 1h0m0s",
		},
		{
			name:   "ran exactly min_running: rejuvenate",
			policy: func(p *controller.Policy) { p.MinRunning = controller.Duration(time.Hour) },
			setup: func(s *controller.Snapshot, c *cluster.Cycle) {
				setReport(s, func(r *cluster.Report) { r.Booted = planNow.Add(-time.Hour) })
			},
			want:    controller.DecideNow,
			wantWhy: "load 0.25 per CPU, running for 1h0m0s",
		},
		{
			name:   "running time counts from a rejuvenation later than the boot",
			policy: func(p *controller.Policy) { p.MinRunning = controller.Duration(time.Hour) },
			setup: func(s *controller.Snapshot, c *cluster.Cycle) {
				m := s.Members["h"]
				m.Rejuvenated = planNow.Add(-10 * time.Minute)
				s.Members["h"] = m
			},
			want:    controller.DecideSkip,
			wantWhy: "running for 10m0s, below min_running 1h0m0s",
		},
		{
			name:   "running time counts from the boot when later than the rejuvenation",
			policy: func(p *controller.Policy) { p.MinRunning = controller.Duration(time.Hour) },
			setup: func(s *controller.Snapshot, c *cluster.Cycle) {
				m := s.Members["h"]
				m.Rejuvenated = planNow.Add(-3 * time.Hour)
				s.Members["h"] = m
				setReport(s, func(r *cluster.Report) { r.Booted = planNow.Add(-20 * time.Minute) })
			},
			want:    controller.DecideSkip,
			wantWhy: "running for 20m0s, below min_running 1h0m0s",
		},
		{
			name:   "an old rejuvenation does not shorten a long run",
			policy: func(p *controller.Policy) { p.MinRunning = controller.Duration(time.Hour) },
			setup: func(s *controller.Snapshot, c *cluster.Cycle) {
				m := s.Members["h"]
				m.Rejuvenated = planNow.Add(-72 * time.Hour)
				s.Members["h"] = m
			},
			want:    controller.DecideNow,
			wantWhy: "load 0.25 per CPU, running for 48h0m0s",
		},
		{
			name: "min_running is checked before the load",
			policy: func(p *controller.Policy) {
				p.MinRunning = controller.Duration(time.Hour)
				p.MaxLoadPerCPU = 1
			},
			setup: func(s *controller.Snapshot, c *cluster.Cycle) {
				setReport(s, func(r *cluster.Report) { r.Booted, r.Load1 = planNow.Add(-30*time.Minute), 40 })
			},
			want:    controller.DecideSkip,
			wantWhy: "running for 30m0s, below min_running 1h0m0s",
		},
		// max_load_per_cpu and max_wait
		{
			name:    "load above the bound waits",
			policy:  func(p *controller.Policy) { p.MaxLoadPerCPU = 1 },
			setup:   func(s *controller.Snapshot, c *cluster.Cycle) { setReport(s, func(r *cluster.Report) { r.Load1 = 6 }) },
			want:    controller.DecideWait,
			wantWhy: "load 1.50 per CPU above max_load_per_cpu 1.00",
		},
		{
			name:    "load exactly at the bound does not wait",
			policy:  func(p *controller.Policy) { p.MaxLoadPerCPU = 0.5 },
			setup:   func(s *controller.Snapshot, c *cluster.Cycle) { setReport(s, func(r *cluster.Report) { r.Load1 = 2 }) },
			want:    controller.DecideNow,
			wantWhy: "load 0.50 per CPU, running for 48h0m0s",
		},
		{
			name:   "no CPU count: the load is not judged",
			policy: func(p *controller.Policy) { p.MaxLoadPerCPU = 1 },
			setup: func(s *controller.Snapshot, c *cluster.Cycle) {
				setReport(s, func(r *cluster.Report) { r.Load1, r.CPUs = 40, 0 })
			},
			want:    controller.DecideNow,
			wantWhy: "load 40.00 per CPU, running for 48h0m0s",
		},
		{
			name: "load above, max_wait not yet elapsed: wait",
			policy: func(p *controller.Policy) {
				p.MaxLoadPerCPU, p.MaxWait = 1, controller.Duration(10*time.Minute)
			},
			setup: func(s *controller.Snapshot, c *cluster.Cycle) {
				setReport(s, func(r *cluster.Report) { r.Load1 = 6 })
				c.PhaseSince = planNow.Add(-10*time.Minute + time.Second)
			},
			want:    controller.DecideWait,
			wantWhy: "load 1.50 per CPU above max_load_per_cpu 1.00",
		},
		{
			name: "load above, max_wait elapsed: rejuvenate anyway",
			policy: func(p *controller.Policy) {
				p.MaxLoadPerCPU, p.MaxWait = 1, controller.Duration(10*time.Minute)
			},
			setup: func(s *controller.Snapshot, c *cluster.Cycle) {
				setReport(s, func(r *cluster.Report) { r.Load1 = 6 })
				c.PhaseSince = planNow.Add(-10 * time.Minute)
				c.Started = planNow.Add(-time.Hour) // counted from the phase, not the cycle
			},
			want:    controller.DecideNow,
			wantWhy: "load 1.50 per CPU still above 1.00 after max_wait 10m0s",
		},
		{
			name: "max_wait counts from the phase, not the cycle start",
			policy: func(p *controller.Policy) {
				p.MaxLoadPerCPU, p.MaxWait = 1, controller.Duration(10*time.Minute)
			},
			setup: func(s *controller.Snapshot, c *cluster.Cycle) {
				setReport(s, func(r *cluster.Report) { r.Load1 = 6 })
				c.Started, c.PhaseSince = planNow.Add(-time.Hour), planNow.Add(-time.Minute)
			},
			want:    controller.DecideWait,
			wantWhy: "load 1.50 per CPU above max_load_per_cpu 1.00",
		},
		{
			name:   "no max_wait: wait for ever",
			policy: func(p *controller.Policy) { p.MaxLoadPerCPU = 1 },
			setup: func(s *controller.Snapshot, c *cluster.Cycle) {
				setReport(s, func(r *cluster.Report) { r.Load1 = 6 })
				c.PhaseSince = planNow.Add(-30 * 24 * time.Hour)
			},
			want:    controller.DecideWait,
			wantWhy: "load 1.50 per CPU above max_load_per_cpu 1.00",
		},
		{
			name: "the load is judged before the window",
			policy: func(p *controller.Policy) {
				p.MaxLoadPerCPU, p.Window = 1, "02:00-05:00"
			},
			setup:   func(s *controller.Snapshot, c *cluster.Cycle) { setReport(s, func(r *cluster.Report) { r.Load1 = 6 }) },
			want:    controller.DecideWait,
			wantWhy: "load 1.50 per CPU above max_load_per_cpu 1.00",
		},
		// window
		{
			name:    "outside the window: wait",
			policy:  func(p *controller.Policy) { p.Window = "02:00-05:00" },
			want:    controller.DecideWait,
			wantWhy: "outside the maintenance window 02:00-05:00",
		},
		{
			name:    "inside the window: rejuvenate",
			policy:  func(p *controller.Policy) { p.Window = "02:00-05:00" },
			setup:   func(s *controller.Snapshot, c *cluster.Cycle) { s.Now = time.Date(2024, 3, 10, 3, 0, 0, 0, time.UTC) },
			want:    controller.DecideNow,
			wantWhy: "load 0.25 per CPU, running for 39h0m0s",
		},
		{
			name:    "window wrapping midnight, at 23:30: rejuvenate",
			policy:  func(p *controller.Policy) { p.Window = "22:00-02:00" },
			setup:   func(s *controller.Snapshot, c *cluster.Cycle) { s.Now = time.Date(2024, 3, 10, 23, 30, 0, 0, time.UTC) },
			want:    controller.DecideNow,
			wantWhy: "load 0.25 per CPU, running for 59h30m0s",
		},
		{
			name:    "window wrapping midnight, at 03:00: wait",
			policy:  func(p *controller.Policy) { p.Window = "22:00-02:00" },
			setup:   func(s *controller.Snapshot, c *cluster.Cycle) { s.Now = time.Date(2024, 3, 10, 3, 0, 0, 0, time.UTC) },
			want:    controller.DecideWait,
			wantWhy: "outside the maintenance window 22:00-02:00",
		},
		// budget
		{
			name:    "budget full: wait",
			setup:   func(s *controller.Snapshot, c *cluster.Cycle) { rejuvenating(s, "r1") },
			want:    controller.DecideWait,
			wantWhy: "budget: r1 already rejuvenating (max_rejuvenating 1)",
		},
		{
			name:    "budget with room: rejuvenate",
			policy:  func(p *controller.Policy) { p.MaxRejuvenating = 2 },
			setup:   func(s *controller.Snapshot, c *cluster.Cycle) { rejuvenating(s, "r1") },
			want:    controller.DecideNow,
			wantWhy: "load 0.25 per CPU, running for 48h0m0s",
		},
		{
			name:    "budget names the busy hosts in order",
			policy:  func(p *controller.Policy) { p.MaxRejuvenating = 2 },
			setup:   func(s *controller.Snapshot, c *cluster.Cycle) { rejuvenating(s, "r2", "r1") },
			want:    controller.DecideWait,
			wantWhy: "budget: r1, r2 already rejuvenating (max_rejuvenating 2)",
		},
		{
			name: "budget does not count the host itself",
			setup: func(s *controller.Snapshot, c *cluster.Cycle) {
				m := s.Members["h"]
				m.Role = cluster.RoleRejuvenating
				s.Members["h"] = m
			},
			want:    controller.DecideNow,
			wantWhy: "load 0.25 per CPU, running for 48h0m0s",
		},
		{
			name: "budget counts only the rejuvenating role",
			setup: func(s *controller.Snapshot, c *cluster.Cycle) {
				s.Members["d1"] = cluster.Member{Name: "d1", Role: cluster.RoleDuplexing}
				s.Members["s1"] = cluster.Member{Name: "s1", Role: cluster.RoleSpare}
				s.Members["p1"] = cluster.Member{Name: "p1", Role: cluster.RolePrimary}
				// A cycle in phase rejuvenating whose member record says otherwise is not counted.
				s.Cycles["p1"] = cluster.Cycle{ID: "p1-1", Host: "p1", Phase: cluster.PhaseRejuvenating}
			},
			want:    controller.DecideNow,
			wantWhy: "load 0.25 per CPU, running for 48h0m0s",
		},
		// manual rejuvenation
		{
			name: "manual rejuvenation skips min_running, load and window",
			policy: func(p *controller.Policy) {
				p.MinRunning, p.MaxLoadPerCPU, p.Window = controller.Duration(time.Hour), 1, "02:00-05:00"
			},
			setup: func(s *controller.Snapshot, c *cluster.Cycle) {
				c.Kind = cluster.KindRejuvenate
				setReport(s, func(r *cluster.Report) { r.Booted, r.Load1 = planNow.Add(-time.Minute), 40 })
			},
			want:    controller.DecideNow,
			wantWhy: "rejuvenation requested by hand",
		},
		{
			name: "manual rejuvenation honours the budget",
			setup: func(s *controller.Snapshot, c *cluster.Cycle) {
				c.Kind = cluster.KindRejuvenate
				rejuvenating(s, "r1")
			},
			want:    controller.DecideWait,
			wantWhy: "budget: r1 already rejuvenating (max_rejuvenating 1)",
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s, c := decideSnap()
			if tc.setup != nil {
				tc.setup(s, &c)
			}
			d, why := controller.Decide(s, defaulted(tc.policy), c)
			if d != tc.want || why != tc.wantWhy {
				t.Errorf("Decide:\n got  %s %q\n want %s %q", d, why, tc.want, tc.wantWhy)
			}
		})
	}
}

// TestDecideMaxWaitKeepsBudget: max_wait ends the wait for the load only; the
// budget still bounds the hosts rejuvenating at once.
func TestDecideMaxWaitKeepsBudget(t *testing.T) {
	// Fixed: bug: Decide returns DecideNow as soon as max_wait has elapsed under high load, before the budget check, so a second host is rejuvenated while max_rejuvenating 1 is already used
	s, c := decideSnap()
	s.Members["r1"] = cluster.Member{Name: "r1", Role: cluster.RoleRejuvenating}
	r := s.Reports["h"]
	r.Load1 = 6
	s.Reports["h"] = r
	c.PhaseSince = planNow.Add(-time.Hour)
	p := defaulted(func(p *controller.Policy) { p.MaxLoadPerCPU, p.MaxWait = 1, controller.Duration(10*time.Minute) })
	d, why := controller.Decide(s, p, c)
	if want, wantWhy := controller.DecideWait, "budget: r1 already rejuvenating (max_rejuvenating 1)"; d != want || why != wantWhy {
		t.Errorf("Decide:\n got  %s %q\n want %s %q", d, why, want, wantWhy)
	}
}

// TestDecideMaxWaitKeepsWindow: max_wait ends the wait for the load only; the
// maintenance window still holds.
func TestDecideMaxWaitKeepsWindow(t *testing.T) {
	// Fixed: bug: Decide returns DecideNow as soon as max_wait has elapsed under high load, before the window check, so the host is rejuvenated outside the maintenance window
	s, c := decideSnap()
	r := s.Reports["h"]
	r.Load1 = 6
	s.Reports["h"] = r
	c.PhaseSince = planNow.Add(-time.Hour)
	p := defaulted(func(p *controller.Policy) {
		p.MaxLoadPerCPU, p.MaxWait, p.Window = 1, controller.Duration(10*time.Minute), "02:00-05:00"
	})
	d, why := controller.Decide(s, p, c)
	if want, wantWhy := controller.DecideWait, "outside the maintenance window 02:00-05:00"; d != want || why != wantWhy {
		t.Errorf("Decide:\n got  %s %q\n want %s %q", d, why, want, wantWhy)
	}
}

func TestPolicyInWindow(t *testing.T) {
	at := func(h, m int) time.Time { return time.Date(2024, 3, 10, h, m, 0, 0, time.UTC) }
	for _, tc := range []struct {
		window string
		t      time.Time
		want   bool
	}{
		{"", at(12, 0), true},
		{"02:00-05:00", at(1, 59), false},
		{"02:00-05:00", at(2, 0), true},
		{"02:00-05:00", at(4, 59), true},
		{"02:00-05:00", at(5, 0), false},
		{"02:00-05:00", at(12, 0), false},
		{"22:00-02:00", at(21, 59), false},
		{"22:00-02:00", at(22, 0), true},
		{"22:00-02:00", at(23, 30), true},
		{"22:00-02:00", at(0, 0), true},
		{"22:00-02:00", at(1, 0), true},
		{"22:00-02:00", at(1, 59), true},
		{"22:00-02:00", at(2, 0), false},
		{"22:00-02:00", at(3, 0), false},
		{"03:00-03:00", at(12, 0), true}, // an empty span means any time
		// The clock of t's own zone counts: 23:30 at UTC+2 is 21:30 UTC.
		{"22:00-02:00", time.Date(2024, 3, 10, 23, 30, 0, 0, time.FixedZone("UTC+2", 2*3600)), true},
		{"22:00-02:00", time.Date(2024, 3, 10, 21, 30, 0, 0, time.FixedZone("UTC+2", 2*3600)), false},
		// A bad window, which Validate refuses, restricts nothing.
		{"25:00-01:00", at(12, 0), true},
	} {
		p := controller.Policy{Window: tc.window}
		if got := p.InWindow(tc.t); got != tc.want {
			t.Errorf("window %q at %s: InWindow = %v, want %v", tc.window, tc.t.Format("15:04 MST"), got, tc.want)
		}
	}
}

func TestPolicyDefaults(t *testing.T) {
	var p controller.Policy
	p.Defaults()
	want := controller.Policy{
		UnstableFor:     controller.Duration(10 * time.Second),
		MaxRejuvenating: 1,
		Parallel:        2,
		Strategy:        "auto",
		MaxFailures:     3,
		Retry:           controller.Duration(2 * time.Second),
		RejoinTimeout:   controller.Duration(15 * time.Minute),
		LeaseTTL:        controller.Duration(10 * time.Second),
	}
	if !reflect.DeepEqual(p, want) {
		t.Errorf("Defaults of the zero policy:\n got  %+v\n want %+v", p, want)
	}
	if err := p.Validate(); err != nil {
		t.Errorf("Validate of the defaults: %v", err)
	}

	set := controller.Policy{
		UnstableFor: controller.Duration(time.Minute), MaxRejuvenating: 3, MinSpares: 2, MaxLoadPerCPU: 0.8,
		MaxWait: controller.Duration(time.Hour), MinRunning: controller.Duration(24 * time.Hour), Window: "01:00-04:00",
		Parallel: 8, Strategy: "precopy", MaxFailures: 5, Retry: controller.Duration(time.Second),
		RejoinTimeout: controller.Duration(time.Hour), LeaseTTL: controller.Duration(30 * time.Second),
	}
	got := set
	got.Defaults()
	if !reflect.DeepEqual(got, set) {
		t.Errorf("Defaults changed set fields:\n got  %+v\n want %+v", got, set)
	}
}

func TestPolicyValidate(t *testing.T) {
	for _, tc := range []struct {
		name string
		f    func(p *controller.Policy)
		want string // "" for valid
	}{
		{"defaults", func(p *controller.Policy) {}, ""},
		{"negative unstable_for", func(p *controller.Policy) { p.UnstableFor = controller.Duration(-time.Second) }, "unstable_for -1s: must not be negative"},
		{"max_rejuvenating 0", func(p *controller.Policy) { p.MaxRejuvenating = 0 }, "max_rejuvenating 0: at least 1"},
		{"negative max_rejuvenating", func(p *controller.Policy) { p.MaxRejuvenating = -1 }, "max_rejuvenating -1: at least 1"},
		{"negative min_spares", func(p *controller.Policy) { p.MinSpares = -1 }, "min_spares -1: must not be negative"},
		{"negative max_load_per_cpu", func(p *controller.Policy) { p.MaxLoadPerCPU = -0.5 }, "max_load_per_cpu -0.5: must not be negative"},
		{"parallel 0", func(p *controller.Policy) { p.Parallel = 0 }, "parallel 0: use 1 to 64"},
		{"parallel 65", func(p *controller.Policy) { p.Parallel = 65 }, "parallel 65: use 1 to 64"},
		{"parallel 64", func(p *controller.Policy) { p.Parallel = 64 }, ""},
		{"parallel 1", func(p *controller.Policy) { p.Parallel = 1 }, ""},
		{"max_failures 0", func(p *controller.Policy) { p.MaxFailures = 0 }, "max_failures 0: at least 1"},
		{"lease_ttl 1s", func(p *controller.Policy) { p.LeaseTTL = controller.Duration(time.Second) }, "lease_ttl 1s: at least 2s"},
		{"lease_ttl 2s", func(p *controller.Policy) { p.LeaseTTL = controller.Duration(2 * time.Second) }, ""},
		{"window hour 25", func(p *controller.Policy) { p.Window = "25:00-01:00" }, `window "25:00-01:00": write it as HH:MM-HH:MM, e.g. 02:00-05:00`},
		{"window without minutes", func(p *controller.Policy) { p.Window = "2-5" }, `window "2-5": write it as HH:MM-HH:MM, e.g. 02:00-05:00`},
		{"window minute 60", func(p *controller.Policy) { p.Window = "02:00-03:60" }, `window "02:00-03:60": write it as HH:MM-HH:MM, e.g. 02:00-05:00`},
		{"window words", func(p *controller.Policy) { p.Window = "nightly" }, `window "nightly": write it as HH:MM-HH:MM, e.g. 02:00-05:00`},
		{"window wrapping midnight", func(p *controller.Policy) { p.Window = "22:00-02:00" }, ""},
		{"window 00:00-23:59", func(p *controller.Policy) { p.Window = "00:00-23:59" }, ""},
		{"first bad field wins", func(p *controller.Policy) { p.MinSpares, p.Parallel = -1, 65 }, "min_spares -1: must not be negative"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := defaulted(nil)
			tc.f(&p)
			err := p.Validate()
			switch {
			case tc.want == "" && err != nil:
				t.Errorf("Validate: %v, want no error", err)
			case tc.want != "" && err == nil:
				t.Errorf("Validate: no error, want %q", tc.want)
			case tc.want != "" && err.Error() != tc.want:
				t.Errorf("Validate:\n got  %q\n want %q", err, tc.want)
			}
		})
	}
	t.Run("the zero policy needs Defaults", func(t *testing.T) {
		err := controller.Policy{}.Validate()
		if want := "max_rejuvenating 0: at least 1"; err == nil || err.Error() != want {
			t.Errorf("Validate of the zero policy: %v, want %q", err, want)
		}
	})
}

// TestPolicyValidateRejectsLooseValues covers values Validate lets through.
func TestPolicyValidateRejectsLooseValues(t *testing.T) {
	// Fixed: bug: Validate accepts negative retry/max_wait/min_running/rejoin_timeout (a negative retry makes every blocked step retry at once, a hot loop on etcd; a negative max_wait rejuvenates at once under any load) and a window with trailing text such as "02:00-05:00,14:00-16:00" (Sscanf ignores the rest, so it silently means 02:00-05:00)
	for _, tc := range []struct {
		name string
		f    func(p *controller.Policy)
	}{
		{"negative retry", func(p *controller.Policy) { p.Retry = controller.Duration(-time.Second) }},
		{"negative max_wait", func(p *controller.Policy) { p.MaxWait = controller.Duration(-time.Second) }},
		{"negative min_running", func(p *controller.Policy) { p.MinRunning = controller.Duration(-time.Second) }},
		{"negative rejoin_timeout", func(p *controller.Policy) { p.RejoinTimeout = controller.Duration(-time.Second) }},
		{"window with trailing text", func(p *controller.Policy) { p.Window = "02:00-05:00,14:00-16:00" }},
	} {
		p := defaulted(nil)
		tc.f(&p)
		if err := p.Validate(); err == nil {
			t.Errorf("%s: Validate accepted %+v", tc.name, p)
		}
	}
}

func TestPolicyDurationText(t *testing.T) {
	var d controller.Duration
	if err := d.UnmarshalText([]byte("1m30s")); err != nil || d.D() != 90*time.Second {
		t.Errorf("UnmarshalText(1m30s) = %s, %v; want 1m30s", d.D(), err)
	}
	if b, err := d.MarshalText(); err != nil || string(b) != "1m30s" {
		t.Errorf("MarshalText = %q, %v; want 1m30s", b, err)
	}
	if err := d.UnmarshalText([]byte("soon")); err == nil || err.Error() != `duration "soon": time: invalid duration "soon"` {
		t.Errorf("UnmarshalText(soon) = %v", err)
	}
}

func TestPlan(t *testing.T) {
	p := defaulted(nil) // unstable_for 10s, max_rejuvenating 1, rejoin_timeout 15m
	unstable := func(s *controller.Snapshot, h string, since time.Duration, reasons ...string) {
		r := s.Reports[h]
		r.Unstable, r.UnstableSince, r.Reasons = true, planNow.Add(-since), reasons
		s.Reports[h] = r
	}
	inCycle := func(s *controller.Snapshot, h string, ph cluster.Phase, f func(c *cluster.Cycle)) {
		c := cluster.Cycle{ID: h + "-1", Host: h, Kind: cluster.KindUnstable, Phase: ph, PhaseSince: planNow.Add(-time.Minute)}
		if f != nil {
			f(&c)
		}
		s.Cycles[h] = c
	}
	for _, tc := range []struct {
		name  string
		setup func(s *controller.Snapshot)
		want  controller.Step
	}{
		{
			name:  "stable",
			setup: func(s *controller.Snapshot) {},
			want:  controller.Step{Host: "h", Role: cluster.RolePrimary, Action: "none", Why: "stable"},
		},
		{
			name:  "unstable for less than unstable_for",
			setup: func(s *controller.Snapshot) { unstable(s, "h", 5*time.Second, "psi memory", "oom") },
			want: controller.Step{Host: "h", Role: cluster.RolePrimary, Action: "wait",
				Why: "unstable for 5s (psi memory; oom), less than unstable_for 10s"},
		},
		{
			name:  "unstable for exactly unstable_for",
			setup: func(s *controller.Snapshot) { unstable(s, "h", 10*time.Second, "psi memory") },
			want:  controller.Step{Host: "h", Role: cluster.RolePrimary, Action: "start cycle", Why: "unstable for 10s (psi memory)"},
		},
		{
			name: "an unstable spare starts a cycle too",
			setup: func(s *controller.Snapshot) {
				s.Members["h"] = cluster.Member{Name: "h", Role: cluster.RoleSpare}
				unstable(s, "h", time.Minute, "leak")
			},
			want: controller.Step{Host: "h", Role: cluster.RoleSpare, Action: "start cycle", Why: "unstable for 1m0s (leak)"},
		},
		{
			name: "unstable while duplexing without a cycle",
			setup: func(s *controller.Snapshot) {
				s.Members["h"] = cluster.Member{Name: "h", Role: cluster.RoleDuplexing}
				unstable(s, "h", time.Minute, "leak")
			},
			want: controller.Step{Host: "h", Role: cluster.RoleDuplexing, Action: "none", Why: "unstable, but its role is duplexing"},
		},
		{
			name:  "no report",
			setup: func(s *controller.Snapshot) { delete(s.Reports, "h") },
			want:  controller.Step{Host: "h", Role: cluster.RolePrimary, Action: "none", Why: "no report yet"},
		},
		{
			name:  "dead host",
			setup: func(s *controller.Snapshot) { delete(s.Hosts, "h"); unstable(s, "h", time.Hour, "leak") },
			want:  controller.Step{Host: "h", Role: cluster.RolePrimary, Action: "none", Why: "not registered (duplexd down or host rebooting)"},
		},
		{
			name: "pending drain request",
			setup: func(s *controller.Snapshot) {
				s.Requests["h"] = cluster.Request{Host: "h", Kind: cluster.KindDrain, Time: planNow, By: "ops@console"}
			},
			want: controller.Step{Host: "h", Role: cluster.RolePrimary, Action: "start drain cycle", Why: "requested by ops@console"},
		},
		{
			name: "pending rejuvenate request beats the unstable verdict",
			setup: func(s *controller.Snapshot) {
				unstable(s, "h", time.Second, "leak")
				s.Requests["h"] = cluster.Request{Host: "h", Kind: cluster.KindRejuvenate, Time: planNow, By: "ops"}
			},
			want: controller.Step{Host: "h", Role: cluster.RolePrimary, Action: "start rejuvenate cycle", Why: "requested by ops"},
		},
		{
			name: "selecting without a target is blocked",
			setup: func(s *controller.Snapshot) {
				addHost(s, "p2", cluster.RolePrimary, 16*gib, 0)
				inCycle(s, "h", cluster.PhaseSelecting, nil)
			},
			want: controller.Step{Host: "h", Role: cluster.RolePrimary, Cycle: "h-1", Phase: "selecting", Action: "wait for a target",
				Why: "no spare host available (mode active-standby)", Blocked: true},
		},
		{
			name: "selecting with a target",
			setup: func(s *controller.Snapshot) {
				addHost(s, "s1", cluster.RoleSpare, 16*gib, 0)
				inCycle(s, "h", cluster.PhaseSelecting, nil)
			},
			want: controller.Step{Host: "h", Role: cluster.RolePrimary, Cycle: "h-1", Phase: "selecting", Action: "duplex every workload to s1",
				Why: "spare s1: 16.0 GiB free for 2.0 GiB of workloads (best fit of 1)"},
		},
		{
			name: "the cycle beats a request and a dead registration",
			setup: func(s *controller.Snapshot) {
				delete(s.Hosts, "h")
				s.Requests["h"] = cluster.Request{Host: "h", Kind: cluster.KindDrain, By: "ops"}
				inCycle(s, "h", cluster.PhaseDuplexing, func(c *cluster.Cycle) { c.Target, c.Moved = "s1", []string{"w1", "w2"} })
			},
			want: controller.Step{Host: "h", Role: cluster.RolePrimary, Cycle: "h-1", Phase: "duplexing", Target: "s1",
				Action: "go on duplexing to s1", Why: "2 workload(s) moved so far"},
		},
		{
			name: "duplexing blocked",
			setup: func(s *controller.Snapshot) {
				inCycle(s, "h", cluster.PhaseDuplexing, func(c *cluster.Cycle) { c.Target, c.Blocked = "s1", "target s1 is not registered: waiting for it" })
			},
			want: controller.Step{Host: "h", Role: cluster.RolePrimary, Cycle: "h-1", Phase: "duplexing", Target: "s1",
				Action: "retry duplexing to s1", Why: "target s1 is not registered: waiting for it", Blocked: true},
		},
		{
			name: "deciding: rejuvenate",
			setup: func(s *controller.Snapshot) {
				inCycle(s, "h", cluster.PhaseDeciding, func(c *cluster.Cycle) { c.Target = "s1" })
			},
			want: controller.Step{Host: "h", Role: cluster.RolePrimary, Cycle: "h-1", Phase: "deciding", Target: "s1",
				Action: "rejuvenate", Why: "load 0.25 per CPU, running for 48h0m0s"},
		},
		{
			name: "deciding over budget is blocked",
			setup: func(s *controller.Snapshot) {
				s.Members["r1"] = cluster.Member{Name: "r1", Role: cluster.RoleRejuvenating}
				inCycle(s, "h", cluster.PhaseDeciding, func(c *cluster.Cycle) { c.Target = "s1" })
			},
			want: controller.Step{Host: "h", Role: cluster.RolePrimary, Cycle: "h-1", Phase: "deciding", Target: "s1",
				Action: "wait", Why: "budget: r1 already rejuvenating (max_rejuvenating 1)", Blocked: true},
		},
		{
			name: "deciding: a drain finishes",
			setup: func(s *controller.Snapshot) {
				inCycle(s, "h", cluster.PhaseDeciding, func(c *cluster.Cycle) { c.Kind, c.Target = cluster.KindDrain, "s1" })
			},
			want: controller.Step{Host: "h", Role: cluster.RolePrimary, Cycle: "h-1", Phase: "deciding", Target: "s1",
				Action: "finish", Why: "drained by request: back to the list as a spare"},
		},
		{
			name:  "rejuvenating, not signalled",
			setup: func(s *controller.Snapshot) { inCycle(s, "h", cluster.PhaseRejuvenating, nil) },
			want: controller.Step{Host: "h", Role: cluster.RolePrimary, Cycle: "h-1", Phase: "rejuvenating",
				Action: "signal rejuvenation", Why: "removed from the available list"},
		},
		{
			name: "rejuvenating, signalled",
			setup: func(s *controller.Snapshot) {
				inCycle(s, "h", cluster.PhaseRejuvenating, func(c *cluster.Cycle) { c.Signalled = true })
			},
			want: controller.Step{Host: "h", Role: cluster.RolePrimary, Cycle: "h-1", Phase: "rejuvenating",
				Action: "wait for rejoin", Why: "rejuvenating"},
		},
		{
			name: "rejuvenating past rejoin_timeout is blocked",
			setup: func(s *controller.Snapshot) {
				inCycle(s, "h", cluster.PhaseRejuvenating, func(c *cluster.Cycle) {
					c.Signalled, c.PhaseSince = true, planNow.Add(-20*time.Minute)
				})
			},
			want: controller.Step{Host: "h", Role: cluster.RolePrimary, Cycle: "h-1", Phase: "rejuvenating",
				Action: "wait for rejoin", Why: "no rejoin request 20m0s after the signal (rejoin_timeout 15m0s)", Blocked: true},
		},
		{
			name: "rejuvenating, asked to rejoin",
			setup: func(s *controller.Snapshot) {
				inCycle(s, "h", cluster.PhaseRejuvenating, func(c *cluster.Cycle) { c.Signalled = true })
				s.Rejoins["h"] = cluster.Rejoin{Host: "h", Cycle: "h-1", Time: planNow}
			},
			want: controller.Step{Host: "h", Role: cluster.RolePrimary, Cycle: "h-1", Phase: "rejuvenating",
				Action: "register as spare", Why: "the host asked to rejoin"},
		},
		{
			name:  "unknown phase is blocked",
			setup: func(s *controller.Snapshot) { inCycle(s, "h", cluster.Phase("bogus"), nil) },
			want: controller.Step{Host: "h", Role: cluster.RolePrimary, Cycle: "h-1", Phase: "bogus",
				Action: "none", Why: "unknown phase bogus", Blocked: true},
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := newSnap(cluster.ActiveStandby)
			addHost(s, "h", cluster.RolePrimary, 16*gib, 2*gib)
			tc.setup(s)
			var got *controller.Step
			steps := controller.Plan(s, p)
			for i := range steps {
				if steps[i].Host == "h" {
					got = &steps[i]
				}
			}
			if got == nil {
				t.Fatalf("Plan has no step for h: %+v", steps)
			}
			if !reflect.DeepEqual(*got, tc.want) {
				t.Errorf("Plan step for h:\n got  %+v\n want %+v", *got, tc.want)
			}
		})
	}
}

// TestPlanCoversEveryHost: one step per member or registered host, by name.
func TestPlanCoversEveryHost(t *testing.T) {
	s := newSnap(cluster.ActiveStandby)
	addHost(s, "c", cluster.RolePrimary, 16*gib, 0)
	addHost(s, "a", cluster.RoleSpare, 16*gib, 0)
	s.Hosts["b"] = cluster.Host{Name: "b"}                              // registered, never joined
	s.Members["d"] = cluster.Member{Name: "d", Role: cluster.RoleSpare} // joined, now down
	got := controller.Plan(s, defaulted(nil))
	want := []controller.Step{
		{Host: "a", Role: cluster.RoleSpare, Action: "none", Why: "stable"},
		{Host: "b", Action: "none", Why: "no report yet"},
		{Host: "c", Role: cluster.RolePrimary, Action: "none", Why: "stable"},
		{Host: "d", Role: cluster.RoleSpare, Action: "none", Why: "not registered (duplexd down or host rebooting)"},
	}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("Plan:\n got  %+v\n want %+v", got, want)
	}
}

// TestPlanDeadHostWithRequest: the controller starts cycles only for registered
// hosts (reconcile ranges over Snapshot.Hosts), so the dry run must not promise a
// cycle for a host that is down.
func TestPlanDeadHostWithRequest(t *testing.T) {
	// Fixed: bug: Plan checks s.Requests before s.alive, so a host that is not registered but has a pending request shows "start drain cycle", while the controller's reconcile only starts cycles for hosts in Snapshot.Hosts and does nothing
	s := newSnap(cluster.ActiveStandby)
	addHost(s, "h", cluster.RolePrimary, 16*gib, 2*gib)
	delete(s.Hosts, "h")
	s.Requests["h"] = cluster.Request{Host: "h", Kind: cluster.KindDrain, By: "ops"}
	got := controller.Plan(s, defaulted(nil))
	want := []controller.Step{{Host: "h", Role: cluster.RolePrimary, Action: "none", Why: "not registered (duplexd down or host rebooting)"}}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("Plan:\n got  %+v\n want %+v", got, want)
	}
}
