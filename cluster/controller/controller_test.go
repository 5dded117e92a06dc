package controller_test

import (
	"context"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/duplex-ha/duplex/cluster"
	"github.com/duplex-ha/duplex/cluster/controller"
	"github.com/duplex-ha/duplex/internal/testutil"
)

func fastPolicy() controller.Policy {
	return controller.Policy{UnstableFor: controller.Duration(300 * time.Millisecond), Retry: controller.Duration(100 * time.Millisecond),
		LeaseTTL: controller.Duration(2 * time.Second), Parallel: 1}
}

func member(t *testing.T, s *cluster.Store, host string) cluster.Member {
	t.Helper()
	m, _, err := s.Member(context.Background(), host)
	if err != nil {
		t.Fatal(err)
	}
	return m
}

// wantSubsequence checks that want appears in got in this order.
func wantSubsequence(t *testing.T, got, want []string) {
	t.Helper()
	i := 0
	for _, g := range got {
		if i < len(want) && g == want[i] {
			i++
		}
	}
	if i < len(want) {
		t.Fatalf("history %q lacks %q (in this order)", got, want[i:])
	}
}

func TestCycleActiveStandby(t *testing.T) {
	e := testutil.StartEtcd(t)
	s := e.Connect(t)
	f := newFakeCluster(t, s)
	defer f.close()
	f.addHost("a", cluster.RolePrimary, "web", "db", "cache")
	f.addHost("b", cluster.RolePrimary, "other")
	f.addHost("s", cluster.RoleSpare)
	startController(t, "ctl", s, f, fastPolicy())

	f.setUnstable("a", time.Now())
	testutil.Eventually(t, 20*time.Second, "a back as a spare", func() bool {
		m := member(t, s, "a")
		return m.Role == cluster.RoleSpare && !m.Rejuvenated.IsZero()
	})
	for _, w := range []string{"web", "db", "cache"} {
		if got := f.where(w); !slices.Equal(got, []string{"s"}) {
			t.Errorf("%s runs on %v, want [s]", w, got)
		}
	}
	if got := f.where("other"); !slices.Equal(got, []string{"b"}) {
		t.Errorf("other runs on %v", got)
	}
	if m := member(t, s, "s"); m.Role != cluster.RolePrimary {
		t.Errorf("the spare that took the workloads is %s, want primary", m.Role)
	}
	avail, _ := s.Available(context.Background())
	if !avail["a"] || !avail["s"] || !avail["b"] {
		t.Errorf("available list %v", avail)
	}
	wantSubsequence(t, steps(t, s, "a"), []string{"cycle started", "target selected", "moved", "moved", "moved", "duplexed",
		"decided to rejuvenate", "removed from available list", "rejuvenation signalled", "rejuvenated", "registered as spare"})
	if cy, _ := s.Cycles(context.Background()); len(cy) != 0 {
		t.Errorf("cycles left: %+v", cy)
	}
}

func TestCycleActiveActiveBestFit(t *testing.T) {
	e := testutil.StartEtcd(t)
	s := e.Connect(t)
	if err := s.SetMode(context.Background(), cluster.ActiveActive, "test"); err != nil {
		t.Fatal(err)
	}
	f := newFakeCluster(t, s)
	defer f.close()
	f.addHost("a", cluster.RolePrimary, "w1", "w2", "w3")
	big := f.addHost("big", cluster.RolePrimary, "x")
	tight := f.addHost("tight", cluster.RolePrimary, "y")
	small := f.addHost("small", cluster.RolePrimary)
	big.capacity, tight.capacity, small.capacity = 8<<30, 1<<30, 512<<20 // free: 7.75 GiB, 768 MiB, 512 MiB; need 768 MiB
	for _, h := range []string{"big", "tight", "small"} {
		_ = f.publish(h)
	}
	startController(t, "ctl", s, f, fastPolicy())
	f.setUnstable("a", time.Now())
	testutil.Eventually(t, 20*time.Second, "a back as a spare", func() bool { return member(t, s, "a").Role == cluster.RoleSpare })
	for _, w := range []string{"w1", "w2", "w3"} {
		if got := f.where(w); !slices.Equal(got, []string{"tight"}) {
			t.Errorf("%s runs on %v, want [tight] (best fit)", w, got)
		}
	}
}

func TestNoTargetAlertsThenStartsWhenASpareAppears(t *testing.T) {
	e := testutil.StartEtcd(t)
	s := e.Connect(t)
	f := newFakeCluster(t, s)
	defer f.close()
	f.addHost("a", cluster.RolePrimary, "web")
	f.addHost("b", cluster.RolePrimary)
	startController(t, "ctl", s, f, fastPolicy())
	f.setUnstable("a", time.Now())
	testutil.Eventually(t, 10*time.Second, "an alert", func() bool {
		cy, _ := s.Cycles(context.Background())
		return strings.Contains(cy["a"].Blocked, "no spare")
	})
	time.Sleep(500 * time.Millisecond)
	if got := f.where("web"); !slices.Equal(got, []string{"a"}) {
		t.Fatalf("web moved to %v with no spare", got)
	}
	if !slices.Contains(steps(t, s, "a"), "alert") {
		t.Error("no alert in the history")
	}
	f.addHost("s", cluster.RoleSpare)
	testutil.Eventually(t, 20*time.Second, "web on the new spare", func() bool { return slices.Equal(f.where("web"), []string{"s"}) })
	testutil.Eventually(t, 20*time.Second, "a back as a spare", func() bool { return member(t, s, "a").Role == cluster.RoleSpare })
}

func TestBudgetAndMinSparesHold(t *testing.T) {
	e := testutil.StartEtcd(t)
	s := e.Connect(t)
	f := newFakeCluster(t, s)
	f.downFor = 500 * time.Millisecond
	defer f.close()
	f.addHost("a", cluster.RolePrimary, "wa")
	f.addHost("b", cluster.RolePrimary, "wb")
	f.addHost("s1", cluster.RoleSpare)
	f.addHost("s2", cluster.RoleSpare)
	p := fastPolicy()
	p.MaxRejuvenating, p.MinSpares, p.Parallel = 1, 1, 2

	// Watch the roles all along: never two rejuvenating, never fewer spares than 1.
	ctx, cancel := context.WithCancel(context.Background())
	var mu sync.Mutex
	var violations []string
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for ctx.Err() == nil {
			ms, err := s.Members(ctx)
			if err == nil {
				rej, spares := 0, 0
				for _, m := range ms {
					switch m.Role {
					case cluster.RoleRejuvenating:
						rej++
					case cluster.RoleSpare:
						spares++
					}
				}
				if rej > 1 || spares < 1 {
					mu.Lock()
					violations = append(violations, time.Now().Format("15:04:05.000")+": "+strings.Repeat("R", rej)+" spares="+string(rune('0'+spares)))
					mu.Unlock()
				}
			}
			time.Sleep(5 * time.Millisecond)
		}
	}()
	startController(t, "ctl", s, f, p)
	now := time.Now()
	f.setUnstable("a", now)
	f.setUnstable("b", now)
	testutil.Eventually(t, 30*time.Second, "both rejuvenated", func() bool {
		cy, _ := s.Cycles(context.Background())
		return len(cy) == 0 && !member(t, s, "a").Rejuvenated.IsZero() && !member(t, s, "b").Rejuvenated.IsZero()
	})
	cancel()
	wg.Wait()
	if len(violations) > 0 {
		t.Fatalf("budget or min spares broken: %v", violations)
	}
	// One of them had to wait for a spare: the alert names min_spares.
	evs, _ := s.History(context.Background(), "", 0)
	sawMinSpares := false
	for _, e := range evs {
		if e.Step == "alert" && strings.Contains(e.Detail, "min_spares") {
			sawMinSpares = true
		}
	}
	if !sawMinSpares {
		t.Error("no min_spares alert in the history")
	}
	for w, home := range map[string]string{"wa": "a", "wb": "b"} {
		if got := f.where(w); len(got) != 1 || got[0] == home {
			t.Errorf("%s runs on %v", w, got)
		}
	}
}

func TestLeaderKilledMidCycle(t *testing.T) {
	e := testutil.StartEtcd(t)
	s := e.Connect(t)
	f := newFakeCluster(t, s)
	defer f.close()
	f.addHost("a", cluster.RolePrimary, "w1", "w2", "w3")
	f.addHost("s", cluster.RoleSpare)

	// The first controller leads; it is killed (its etcd connection cut, no
	// resignation) right after its first migration, before it records it.
	first := e.Connect(t)
	c1, _ := startController(t, "first", first, f, fastPolicy())
	testutil.Eventually(t, 10*time.Second, "first to lead", c1.Leading)
	c2, _ := startController(t, "second", e.Connect(t), f, fastPolicy())

	killed := make(chan struct{})
	var once sync.Once
	f.migrate = func(from, w, to string) {
		once.Do(func() {
			first.Close()
			close(killed)
		})
	}
	f.setUnstable("a", time.Now())
	<-killed
	testutil.Eventually(t, 20*time.Second, "second to lead", c2.Leading)
	testutil.Eventually(t, 30*time.Second, "a back as a spare", func() bool {
		m := member(t, s, "a")
		return m.Role == cluster.RoleSpare && !m.Rejuvenated.IsZero()
	})
	for _, w := range []string{"w1", "w2", "w3"} {
		if got := f.where(w); !slices.Equal(got, []string{"s"}) {
			t.Errorf("%s runs on %v, want [s]", w, got)
		}
		f.mu.Lock()
		if n := len(f.moves[w]); n != 1 {
			t.Errorf("%s moved %d times: %v", w, n, f.moves[w])
		}
		f.mu.Unlock()
	}
	f.mu.Lock()
	signals := f.hosts["a"].signals
	f.mu.Unlock()
	if signals != 1 {
		t.Errorf("a was signalled to rejuvenate %d times", signals)
	}
	evs, _ := s.History(context.Background(), "a", 0)
	by := map[string]bool{}
	for _, e := range evs {
		by[e.By] = true
	}
	if !by["first"] || !by["second"] {
		t.Errorf("history written by %v, want both controllers", by)
	}
}

func TestManualDrainAndRejuvenate(t *testing.T) {
	e := testutil.StartEtcd(t)
	s := e.Connect(t)
	f := newFakeCluster(t, s)
	defer f.close()
	f.addHost("a", cluster.RolePrimary, "w1")
	f.addHost("s", cluster.RoleSpare)
	startController(t, "ctl", s, f, fastPolicy())
	ctx := context.Background()
	if err := s.Ask(ctx, cluster.Request{Host: "a", Kind: cluster.KindDrain, By: "test"}); err != nil {
		t.Fatal(err)
	}
	testutil.Eventually(t, 20*time.Second, "a drained", func() bool {
		return slices.Contains(steps(t, s, "a"), "drained") && member(t, s, "a").Role == cluster.RoleSpare
	})
	if got := f.where("w1"); !slices.Equal(got, []string{"s"}) {
		t.Fatalf("w1 on %v", got)
	}
	if f.hosts["a"].signals != 0 {
		t.Fatal("a drain rejuvenated the host")
	}
	if err := s.Ask(ctx, cluster.Request{Host: "nope", Kind: cluster.KindDrain}); err == nil {
		t.Error("a request for an unknown host was accepted")
	}
	if err := s.Ask(ctx, cluster.Request{Host: "a", Kind: cluster.KindRejuvenate, By: "test"}); err != nil {
		t.Fatal(err)
	}
	testutil.Eventually(t, 20*time.Second, "a rejuvenated", func() bool { return !member(t, s, "a").Rejuvenated.IsZero() })
}
