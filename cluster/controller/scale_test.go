package controller_test

import (
	"bytes"
	"compress/gzip"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"runtime/pprof"
	"slices"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"text/tabwriter"
	"time"

	"github.com/sirupsen/logrus"
	"go.etcd.io/etcd/api/v3/mvccpb"
	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/protobuf/encoding/protowire"

	"github.com/duplex-ha/duplex/cluster"
	"github.com/duplex-ha/duplex/cluster/controller"
	"github.com/duplex-ha/duplex/internal/testutil"
)

// The controller against many simulated hosts: in-process agents with fake
// workloads and monitors on a real embedded etcd. It measures the time from an
// unstable verdict to the first migration of the host, the etcd writes and reads
// of a cycle, and the controller's CPU, at several cluster sizes so that growth
// shows. Run it with
//
//	go test -run '^$' -bench ControllerScale -benchtime 1x ./cluster/controller

// BenchmarkControllerScale runs the scenario at 100 and 1,000 hosts, reports
// each as metrics and prints both side by side on stdout. Each b.N is one round
// of scaleUnstable verdicts.
func BenchmarkControllerScale(b *testing.B) {
	rows := map[int]scaleResult{}
	sizes := []int{100, 1000}
	for _, n := range sizes {
		b.Run(fmt.Sprintf("hosts=%d", n), func(b *testing.B) {
			r := runScale(b, scaleConfig{hosts: n, unstable: scaleUnstable, wave: 100 * time.Millisecond, report: 3 * time.Second, window: 4 * time.Second}, b.N)
			b.ReportMetric(0, "ns/op") // a round's wall time says nothing
			b.ReportMetric(scaleMs(r.p50), "p50-ms")
			b.ReportMetric(scaleMs(r.p99), "p99-ms")
			b.ReportMetric(r.txnPerCycle, "txn/cycle")
			b.ReportMetric(r.revPerCycle, "rev/cycle")
			b.ReportMetric(r.readPerCycle, "keys-read/cycle")
			if r.profiled {
				b.ReportMetric(scaleMs(r.cycleCPU), "ctl-cpu-ms/cycle")
				b.ReportMetric(100*r.idleCtl, "ctl-idle-cpu-%")
			}
			rows[n] = r
		})
	}
	var got []scaleResult
	for _, n := range sizes {
		if r, ok := rows[n]; ok {
			got = append(got, r)
		}
	}
	// Not b.Log: a benchmark's log is cut to ten lines, and a parent's is shown
	// only with -v.
	fmt.Print(scaleTable(got))
}

// TestControllerScaleSmall runs the same scenario at 50 hosts so that it stays
// covered by go test.
func TestControllerScaleSmall(t *testing.T) {
	r := runScale(t, scaleConfig{hosts: 50, unstable: 8, wave: 100 * time.Millisecond, report: 2 * time.Second, window: time.Second}, 1)
	t.Log("\n" + scaleTable([]scaleResult{r}))
	if r.p99 > scaleTarget {
		t.Errorf("verdict to migration: p99 %s, above the target of %s", r.p99.Round(time.Millisecond), scaleTarget)
	}
	if len(r.sharedTargets) > 0 {
		t.Errorf("spares given the workloads of two hosts: %v", r.sharedTargets)
	}
}

// Eight verdicts at the same instant for five spares: no spare is given to two
// hosts (the view lags the selections just made), and the three cycles without a
// spare wait for the rejuvenated hosts to come back as spares.
func TestControllerNoSpareGivenTwice(t *testing.T) {
	r := runScale(t, scaleConfig{hosts: 50, unstable: 8, wave: 0, report: 2 * time.Second, window: time.Second}, 1)
	t.Log("\n" + scaleTable([]scaleResult{r}))
	if len(r.sharedTargets) > 0 {
		t.Errorf("spares given the workloads of two hosts: %v", r.sharedTargets)
	}
	if r.cycles != 8 {
		t.Errorf("%d cycles reached a migration, want 8", r.cycles)
	}
}

const (
	scaleUnstable = 40          // verdicts per round of the benchmark: enough CPU samples per cycle
	scaleTarget   = time.Second // p99 from verdict to migration
	scaleDownFor  = 100 * time.Millisecond
	scaleLabel    = "part" // pprof label on the controller's goroutines
	scaleCtl      = "controller"
)

// scaleConfig is one run of the scenario.
type scaleConfig struct {
	hosts    int           // simulated hosts; every tenth is a spare, the others primaries with 2-3 workloads
	unstable int           // hosts judged unstable per round
	wave     time.Duration // between two verdicts
	report   time.Duration // every host republishes its report this often, spread evenly
	window   time.Duration // length of the baseline and idle windows
}

// scalePolicy starts a cycle as soon as a verdict arrives.
func scalePolicy(k int) controller.Policy {
	return controller.Policy{
		UnstableFor: 1, // 0 would mean the 10 s default: 1 ns starts a cycle at once
		Retry:       controller.Duration(100 * time.Millisecond), LeaseTTL: controller.Duration(2 * time.Second), Parallel: 2,
		// The default budget (1) would serialise the rejuvenations and add alert
		// writes that depend on timing; the figures are a cycle's own cost.
		MaxRejuvenating: k,
	}
}

// scaleResult is what one run measured.
type scaleResult struct {
	hosts, cycles     int
	p50, p99, max     time.Duration
	txnPerCycle       float64       // Controller.Writes: transactions, failed compares included
	revPerCycle       float64       // etcd revisions written by the controller
	keysPerCycle      float64       // keys those revisions changed (history included)
	getsPerCycle      float64       // range reads by the controller
	readPerCycle      float64       // keys those reads returned
	reportsPerSec     float64       // the hosts' report traffic the controller watched
	baseProc          float64       // whole process, CPUs, hosts and etcd without controller
	idleProc          float64       // whole process, CPUs, controller leading, no verdict
	activeProc        float64       // whole process, CPUs, during the rounds
	profiled          bool          // the controller's share is known (no -cpuprofile)
	idleCtl           float64       // controller goroutines, CPUs, no verdict
	idleLoop          float64       // of which the main loop and the watch
	activeCtl         float64       // controller goroutines, CPUs, during the rounds
	cycleCPU          time.Duration // controller CPU in the cycles' runners, per cycle
	netCPU            time.Duration // controller CPU above its idle rate, per cycle
	sharedTargets     []string      // spares that received the workloads of two hosts
	unexpectedLogs    []string      // controller warnings other than a cycle's progress
	unexpectedLogsCnt int
}

// runScale sets up cfg.hosts hosts and a controller, measures a baseline window
// (hosts only), an idle window (controller leading, nothing unstable) and rounds
// of cfg.unstable verdicts, cfg.wave apart, each run until every cycle ended.
func runScale(tb testing.TB, cfg scaleConfig, rounds int) scaleResult {
	tb.Helper()
	ctx := context.Background()
	e := testutil.StartEtcd(tb)
	admin := e.Connect(tb)
	if err := admin.SetMode(ctx, cluster.ActiveStandby, "scale test"); err != nil {
		tb.Fatal(err)
	}
	f := newScaleCluster(tb, e, cfg)
	led := startScaleLedger(tb, e)
	res := scaleResult{hosts: cfg.hosts}

	// Baseline: the hosts' traffic with no controller.
	time.Sleep(500 * time.Millisecond)
	base := scaleWindow(tb, cfg.window, func() {}, nil, f, led, nil)
	res.baseProc = base.procCPUs()
	res.reportsPerSec = float64(base.end.published-base.start.published) / base.d().Seconds()

	logs := &scaleLog{}
	ctl, kv := startScaleController(tb, e, f, scalePolicy(cfg.unstable), logs)
	testutil.Eventually(tb, 20*time.Second, "the controller to lead and publish its policy", func() bool {
		g, err := admin.Client().Get(ctx, cluster.PolicyKey)
		return err == nil && len(g.Kvs) > 0 && ctl.Leading()
	})
	tb.Cleanup(func() {
		if tb.Failed() {
			tb.Logf("controller's last log lines:\n%s", strings.Join(logs.last(), ""))
		}
	})
	time.Sleep(500 * time.Millisecond)

	idle := scaleWindow(tb, cfg.window, func() {}, ctl, f, led, kv)
	res.idleProc = idle.procCPUs()
	if idle.profiled {
		res.idleCtl = idle.cpu.ctl.Seconds() / idle.d().Seconds()
		res.idleLoop = (idle.cpu.loop + idle.cpu.watch).Seconds() / idle.d().Seconds()
	}

	var lat []time.Duration
	picked := map[string]bool{}
	active := scaleWindow(tb, 0, func() {
		for range rounds {
			lat = append(lat, scaleRound(tb, cfg, admin, f, led, picked)...)
		}
	}, ctl, f, led, kv)
	res.cycles = active.end.ended - active.start.ended
	if res.cycles == 0 {
		tb.Fatal("no cycle completed")
	}
	n := float64(res.cycles)
	res.txnPerCycle = float64(active.end.txns-active.start.txns) / n
	res.revPerCycle = float64(active.end.ctlRevs-active.start.ctlRevs) / n
	res.keysPerCycle = float64(active.end.ctlKeys-active.start.ctlKeys) / n
	res.getsPerCycle = float64(active.end.gets-active.start.gets) / n
	res.readPerCycle = float64(active.end.keysRead-active.start.keysRead) / n
	res.activeProc = active.procCPUs()
	if active.profiled && idle.profiled {
		res.profiled = true
		res.activeCtl = active.cpu.ctl.Seconds() / active.d().Seconds()
		res.cycleCPU = active.cpu.cycles / time.Duration(res.cycles)
		res.netCPU = time.Duration((active.cpu.ctl.Seconds() - res.idleCtl*active.d().Seconds()) / n * float64(time.Second))
	}
	sort.Slice(lat, func(i, j int) bool { return lat[i] < lat[j] })
	res.p50, res.p99, res.max = scalePercentile(lat, 0.50), scalePercentile(lat, 0.99), lat[len(lat)-1]
	res.sharedTargets = f.sharedTargets()
	res.unexpectedLogs, res.unexpectedLogsCnt = logs.unexpected()
	return res
}

// scaleRound judges cfg.unstable fresh primaries unstable, cfg.wave apart, waits
// until every cycle ended and returns each host's time from verdict to migration.
func scaleRound(tb testing.TB, cfg scaleConfig, admin *cluster.Store, f *scaleCluster, led *scaleLedger, picked map[string]bool) []time.Duration {
	tb.Helper()
	ctx := context.Background()
	members, err := admin.Members(ctx)
	if err != nil {
		tb.Fatal(err)
	}
	var pool []string
	for _, name := range f.names {
		if members[name].Role == cluster.RolePrimary && f.running(name) > 0 && !picked[name] {
			pool = append(pool, name)
		}
	}
	if len(pool) < cfg.unstable {
		tb.Fatalf("%d primaries with workloads left for %d verdicts", len(pool), cfg.unstable)
	}
	hosts := make([]string, cfg.unstable)
	for i := range hosts {
		hosts[i] = pool[i*len(pool)/cfg.unstable] // spread over the names
		picked[hosts[i]] = true
	}
	before := led.counts()
	start := time.Now()
	for i, h := range hosts {
		time.Sleep(time.Until(start.Add(time.Duration(i) * cfg.wave)))
		if err := f.setUnstable(ctx, h); err != nil {
			tb.Fatal(err)
		}
	}
	deadline := time.Now().Add(30*time.Second + time.Duration(cfg.unstable)*time.Second)
	for {
		started, ended := led.cyclesOf(hosts, before)
		if ended == len(hosts) && started == len(hosts) {
			break
		}
		if time.Now().After(deadline) {
			cy, _ := admin.Cycles(ctx)
			var open []string
			for _, c := range cy {
				open = append(open, fmt.Sprintf("%s %s blocked=%q", c.Host, c.Phase, c.Blocked))
			}
			sort.Strings(open)
			tb.Fatalf("after %s: %d of %d cycles started, %d ended; open: %s", time.Since(start).Round(time.Second),
				started, len(hosts), ended, strings.Join(open, "; "))
		}
		time.Sleep(20 * time.Millisecond)
	}
	if extra := led.counts().started - before.started - len(hosts); extra != 0 {
		tb.Errorf("%d cycle(s) started on hosts that were not judged unstable", extra)
	}
	var lat []time.Duration
	for _, h := range hosts {
		v, m, ok := f.latency(h)
		switch {
		case !ok:
			tb.Errorf("the cycle of %s ended without a migration", h)
		case m.Before(v):
			tb.Errorf("%s: migration at %s before its verdict at %s", h, m.Format(time.StampMicro), v.Format(time.StampMicro))
		default:
			lat = append(lat, m.Sub(v))
		}
	}
	if len(lat) == 0 {
		tb.FailNow()
	}
	return lat
}

// scalePercentile is the nearest-rank percentile of sorted durations.
func scalePercentile(sorted []time.Duration, p float64) time.Duration {
	i := int(float64(len(sorted))*p+0.999999) - 1
	return sorted[max(0, min(i, len(sorted)-1))]
}

func scaleMs(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }

// scaleTable prints the results side by side, one size per column.
func scaleTable(rows []scaleResult) string {
	var b strings.Builder
	w := tabwriter.NewWriter(&b, 0, 0, 2, ' ', tabwriter.AlignRight)
	line := func(name string, f func(r scaleResult) string) {
		fmt.Fprint(w, name+"\t")
		for _, r := range rows {
			fmt.Fprint(w, f(r)+"\t")
		}
		fmt.Fprintln(w)
	}
	dur := func(d time.Duration) string { return fmt.Sprintf("%.1f ms", scaleMs(d)) }
	pct := func(x float64) string { return fmt.Sprintf("%.1f %%", 100*x) }
	cpu := func(get func(r scaleResult) string) func(r scaleResult) string {
		return func(r scaleResult) string {
			if !r.profiled {
				return "n/a"
			}
			return get(r)
		}
	}
	line("hosts", func(r scaleResult) string { return fmt.Sprint(r.hosts) })
	line("cycles completed", func(r scaleResult) string { return fmt.Sprint(r.cycles) })
	line("host reports/s watched", func(r scaleResult) string { return fmt.Sprintf("%.0f", r.reportsPerSec) })
	line("verdict -> migration p50", func(r scaleResult) string { return dur(r.p50) })
	line("verdict -> migration p99", func(r scaleResult) string { return dur(r.p99) })
	line("verdict -> migration max", func(r scaleResult) string { return dur(r.max) })
	line("controller txns/cycle", func(r scaleResult) string { return fmt.Sprintf("%.1f", r.txnPerCycle) })
	line("etcd revisions/cycle (controller)", func(r scaleResult) string { return fmt.Sprintf("%.1f", r.revPerCycle) })
	line("keys written/cycle (controller)", func(r scaleResult) string { return fmt.Sprintf("%.1f", r.keysPerCycle) })
	line("range reads/cycle (controller)", func(r scaleResult) string { return fmt.Sprintf("%.1f", r.getsPerCycle) })
	line("keys read/cycle (controller)", func(r scaleResult) string { return fmt.Sprintf("%.0f", r.readPerCycle) })
	line("ctl CPU/cycle, cycle goroutines", cpu(func(r scaleResult) string { return dur(r.cycleCPU) }))
	line("ctl CPU/cycle, above idle rate", cpu(func(r scaleResult) string { return dur(r.netCPU) }))
	line("ctl CPU idle (of one CPU)", cpu(func(r scaleResult) string { return pct(r.idleCtl) }))
	line("  of which main loop + watch", cpu(func(r scaleResult) string { return pct(r.idleLoop) }))
	line("ctl CPU during cycles", cpu(func(r scaleResult) string { return pct(r.activeCtl) }))
	line("process CPU, no controller", func(r scaleResult) string { return pct(r.baseProc) })
	line("process CPU, controller idle", func(r scaleResult) string { return pct(r.idleProc) })
	line("process CPU, during cycles", func(r scaleResult) string { return pct(r.activeProc) })
	line("spares given two hosts", func(r scaleResult) string { return fmt.Sprint(len(r.sharedTargets)) })
	line("other controller warnings", func(r scaleResult) string { return fmt.Sprint(r.unexpectedLogsCnt) })
	_ = w.Flush()
	b.WriteString("ctl CPU: CPU profile samples of the controller's goroutines and of its own etcd client (gRPC, TLS), by pprof label;\n" +
		"  it excludes the etcd server, the simulated hosts and the runtime's background GC. \"cycle goroutines\" are the\n" +
		"  cycles' runners; \"above idle rate\" is all controller CPU during the rounds minus its idle rate. Sampled at\n" +
		"  100 Hz: one sample is 10 ms. n/a: the profiler was taken (go test -cpuprofile).\n" +
		"process CPU: getrusage of the whole test process (embedded etcd, simulated hosts, controller, GC).\n")
	for _, r := range rows {
		if len(r.sharedTargets) > 0 {
			fmt.Fprintf(&b, "hosts=%d: spares that received the workloads of two hosts: %s\n", r.hosts, strings.Join(r.sharedTargets, "; "))
		}
		for _, l := range r.unexpectedLogs {
			fmt.Fprintf(&b, "hosts=%d: controller: %s", r.hosts, l)
		}
	}
	return b.String()
}

// The measured windows.

// scaleMark is the counters at one moment.
type scaleMark struct {
	at             time.Time
	proc           time.Duration
	txns           int64
	gets, keysRead int64
	published      int64
	scaleCounts
}

type scaleWindowResult struct {
	start, end scaleMark
	profiled   bool
	cpu        scaleCPU
}

func (w scaleWindowResult) d() time.Duration { return w.end.at.Sub(w.start.at) }

func (w scaleWindowResult) procCPUs() float64 {
	return (w.end.proc - w.start.proc).Seconds() / w.d().Seconds()
}

// scaleWindow measures a window: d long, or as long as run takes.
func scaleWindow(tb testing.TB, d time.Duration, run func(), ctl *controller.Controller, f *scaleCluster, led *scaleLedger, kv *scaleKV) scaleWindowResult {
	mark := func() scaleMark {
		m := scaleMark{at: time.Now(), proc: scaleProcessCPU(), published: f.published.Load(), scaleCounts: led.counts()}
		if ctl != nil {
			m.txns = ctl.Writes()
		}
		if kv != nil {
			m.gets, m.keysRead = kv.gets.Load(), kv.keys.Load()
		}
		return m
	}
	var buf bytes.Buffer
	profiling := ctl != nil && pprof.StartCPUProfile(&buf) == nil // fails under go test -cpuprofile
	w := scaleWindowResult{start: mark()}
	run()
	time.Sleep(d)
	w.end = mark()
	if profiling {
		pprof.StopCPUProfile()
		cpu, err := scaleSplitProfile(buf.Bytes())
		if err != nil {
			tb.Fatalf("reading our own CPU profile: %v", err)
		}
		w.profiled, w.cpu = true, cpu
	}
	return w
}

func scaleProcessCPU() time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// The controller, labelled and counted.

// scaleKV counts the controller's range reads and the keys they return.
type scaleKV struct {
	clientv3.KV
	gets, keys atomic.Int64
}

func (k *scaleKV) Get(ctx context.Context, key string, opts ...clientv3.OpOption) (*clientv3.GetResponse, error) {
	resp, err := k.KV.Get(ctx, key, opts...)
	k.gets.Add(1)
	if err == nil {
		k.keys.Add(int64(len(resp.Kvs)))
	}
	return resp, err
}

// startScaleController runs a controller on its own etcd connection until the
// test ends. The connection is opened under the controller's pprof label, so its
// gRPC goroutines carry the label as the controller's own goroutines do.
func startScaleController(tb testing.TB, e *testutil.Etcd, agents controller.Agents, p controller.Policy, logs *scaleLog) (*controller.Controller, *scaleKV) {
	tb.Helper()
	var (
		c   *controller.Controller
		kv  *scaleKV
		err error
	)
	pprof.Do(context.Background(), pprof.Labels(scaleLabel, scaleCtl), func(context.Context) {
		store := e.Connect(tb)
		cli := store.Client()
		kv = &scaleKV{KV: cli.KV}
		cli.KV = kv
		l := logrus.New()
		l.SetLevel(logrus.WarnLevel)
		l.SetOutput(logs)
		c, err = controller.New(controller.Config{Name: "ctl", Store: store, Agents: agents, Policy: p, Log: logrus.NewEntry(l)})
		if err != nil {
			return
		}
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan struct{})
		go func() {
			defer close(done)
			_ = c.Run(ctx)
		}()
		tb.Cleanup(func() { cancel(); <-done })
	})
	if err != nil {
		tb.Fatal(err)
	}
	return c, kv
}

// scaleLog keeps the controller's last log lines and the unexpected ones.
type scaleLog struct {
	mu    sync.Mutex
	lines []string
	odd   []string
	nOdd  int
}

// The warnings a cycle logs as it progresses.
var scaleRoutine = []string{"cycle started", "target selected", "host rejuvenated and back as a spare"}

func (l *scaleLog) Write(b []byte) (int, error) {
	s := string(b)
	l.mu.Lock()
	defer l.mu.Unlock()
	l.lines = append(l.lines, s)
	if len(l.lines) > 100 {
		l.lines = slices.Clone(l.lines[len(l.lines)-50:])
	}
	if !slices.ContainsFunc(scaleRoutine, func(r string) bool { return strings.Contains(s, r) }) {
		l.nOdd++
		if len(l.odd) < 5 {
			l.odd = append(l.odd, s)
		}
	}
	return len(b), nil
}

func (l *scaleLog) last() []string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return slices.Clone(l.lines)
}

func (l *scaleLog) unexpected() ([]string, int) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return slices.Clone(l.odd), l.nOdd
}

// The simulated hosts.

// scaleCluster is a leaner fakeCluster for many hosts: every host's leased keys
// share one lease (one keep-alive instead of one per host), monitors republish
// the reports in the background, and agents answer at once. What the hosts do
// (publish, go down, come back and ask to rejoin) runs on the cluster's own
// goroutines, never on the controller's, so it is not counted as the
// controller's CPU.
type scaleCluster struct {
	tb        testing.TB
	store     *cluster.Store
	lease     clientv3.LeaseID
	ctx       context.Context
	names     []string
	hosts     map[string]*scaleHost // fixed after setup
	urgent    chan string           // hosts to republish now (after a migration)
	reboots   chan scaleReboot
	published atomic.Int64

	mu        sync.Mutex
	verdict   map[string]time.Time // host -> when it was judged unstable
	firstMove map[string]time.Time // host -> when its first migration was asked for
	target    map[string]string    // host -> where its first migration went
}

type scaleHost struct {
	name string
	pub  sync.Mutex // one publisher at a time, like a host's monitor

	// Guarded by scaleCluster.mu.
	wls      map[string]string // workload -> state
	unstable time.Time
	booted   time.Time
	down     bool
}

type scaleReboot struct{ host, cycle string }

func newScaleCluster(tb testing.TB, e *testutil.Etcd, cfg scaleConfig) *scaleCluster {
	tb.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	f := &scaleCluster{tb: tb, store: e.Connect(tb), ctx: ctx, hosts: map[string]*scaleHost{},
		urgent: make(chan string, 1024), reboots: make(chan scaleReboot, cfg.hosts),
		verdict: map[string]time.Time{}, firstMove: map[string]time.Time{}, target: map[string]string{}}
	var wg sync.WaitGroup
	tb.Cleanup(func() {
		cancel()
		wg.Wait()
		rctx, rc := context.WithTimeout(context.Background(), 2*time.Second)
		defer rc()
		_, _ = f.store.Client().Revoke(rctx, f.lease)
	})
	cli := f.store.Client()
	g, err := cli.Grant(ctx, 30)
	if err != nil {
		tb.Fatal(err)
	}
	f.lease = g.ID
	ka, err := cli.KeepAlive(ctx, f.lease)
	if err != nil {
		tb.Fatal(err)
	}
	wg.Add(1)
	go func() {
		defer wg.Done()
		for range ka {
		}
	}()

	now := time.Now()
	roles := map[string]cluster.Role{}
	for i := range cfg.hosts {
		name := fmt.Sprintf("h%04d", i)
		h := &scaleHost{name: name, wls: map[string]string{}, booted: now.Add(-24 * time.Hour)}
		roles[name] = cluster.RoleSpare
		if i%10 != 9 {
			roles[name] = cluster.RolePrimary
			for w := range 2 + i%2 {
				h.wls[fmt.Sprintf("%s-w%d", name, w)] = "running"
			}
		}
		f.names = append(f.names, name)
		f.hosts[name] = h
	}
	// Join every host: registration, member record, available list, report; 25
	// hosts per transaction (etcd allows 128 operations).
	for i := 0; i < len(f.names); i += 25 {
		var ops []clientv3.Op
		for _, name := range f.names[i:min(i+25, len(f.names))] {
			hb, _ := json.Marshal(cluster.Host{Name: name, Agent: "fake:" + name, Started: now})
			mb, _ := json.Marshal(cluster.Member{Name: name, Role: roles[name], Since: now})
			rb, _ := json.Marshal(f.reportOf(f.hosts[name]))
			ops = append(ops, clientv3.OpPut(cluster.HostsPrefix+name, string(hb), clientv3.WithLease(f.lease)),
				clientv3.OpPut(cluster.MembersPrefix+name, string(mb)),
				clientv3.OpPut(cluster.AvailablePrefix+name, string(roles[name])),
				clientv3.OpPut(cluster.ReportsPrefix+name, string(rb), clientv3.WithLease(f.lease)))
		}
		if _, err := cli.Txn(ctx).Then(ops...).Commit(); err != nil {
			tb.Fatalf("join hosts: %v", err)
		}
	}

	// The monitors: one host every report/N, round robin, to four publishers.
	due := make(chan string, 64)
	wg.Add(1)
	go func() {
		defer wg.Done()
		tick := time.NewTicker(cfg.report / time.Duration(cfg.hosts))
		defer tick.Stop()
		for i := 0; ; i++ {
			select {
			case <-ctx.Done():
				return
			case <-tick.C:
			}
			select {
			case due <- f.names[i%len(f.names)]:
			default: // publishers behind: this report is skipped, as a slow monitor's would be
			}
		}
	}()
	for range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				var name string
				select {
				case <-ctx.Done():
					return
				case name = <-f.urgent:
				case name = <-due:
				}
				if err := f.publish(f.hosts[name]); err != nil && ctx.Err() == nil {
					tb.Errorf("publish the report of %s: %v", name, err)
				}
			}
		}()
	}
	// Rejuvenations: each on a goroutine of its own.
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			select {
			case <-ctx.Done():
				return
			case r := <-f.reboots:
				wg.Add(1)
				go func() {
					defer wg.Done()
					if err := f.reboot(r); err != nil && ctx.Err() == nil {
						tb.Errorf("rejuvenate %s: %v", r.host, err)
					}
				}()
			}
		}
	}()
	return f
}

func (f *scaleCluster) reportOf(h *scaleHost) cluster.Report {
	n := 0
	for _, st := range h.wls {
		if st == "running" {
			n++
		}
	}
	r := cluster.Report{Host: h.name, Time: time.Now(), MemTotal: 16 << 30, MemAvailable: 12 << 30, Capacity: 8 << 30,
		Used: uint64(n) * wlMemory, CPUs: 4, Load1: 0.5, Workloads: n, Booted: h.booted}
	if !h.unstable.IsZero() {
		r.Unstable, r.UnstableSince, r.Reasons = true, h.unstable, []string{"memory leak (simulated)"}
	}
	return r
}

// publish writes h's report as its monitor does, unless h is down.
func (f *scaleCluster) publish(h *scaleHost) error {
	h.pub.Lock()
	defer h.pub.Unlock()
	f.mu.Lock()
	if h.down {
		f.mu.Unlock()
		return nil
	}
	r := f.reportOf(h)
	f.mu.Unlock()
	f.published.Add(1)
	return f.store.PublishReport(f.ctx, r, f.lease)
}

// setUnstable has name's monitor judge it unstable now and publish the verdict.
func (f *scaleCluster) setUnstable(ctx context.Context, name string) error {
	h := f.hosts[name]
	h.pub.Lock()
	defer h.pub.Unlock()
	f.mu.Lock()
	now := time.Now()
	h.unstable, f.verdict[name] = now, now
	r := f.reportOf(h)
	f.mu.Unlock()
	f.published.Add(1)
	return f.store.PublishReport(ctx, r, f.lease)
}

// reboot takes the host down (its leased keys vanish in one revision, as when its
// lease is revoked), clears it like a reboot, brings it back stable and asks to
// rejoin, as duplexd does after a restart.
func (f *scaleCluster) reboot(r scaleReboot) error {
	h := f.hosts[r.host]
	cli := f.store.Client()
	h.pub.Lock()
	f.mu.Lock()
	h.down = true
	f.mu.Unlock()
	_, err := cli.Txn(f.ctx).Then(clientv3.OpDelete(cluster.HostsPrefix+h.name), clientv3.OpDelete(cluster.ReportsPrefix+h.name)).Commit()
	h.pub.Unlock()
	if err != nil {
		return fmt.Errorf("go down: %w", err)
	}
	select {
	case <-f.ctx.Done():
		return nil
	case <-time.After(scaleDownFor):
	}
	h.pub.Lock()
	f.mu.Lock()
	for w, st := range h.wls {
		if st != "running" {
			delete(h.wls, w)
		}
	}
	h.unstable, h.booted, h.down = time.Time{}, time.Now(), false
	rep := f.reportOf(h)
	f.mu.Unlock()
	hb, _ := json.Marshal(cluster.Host{Name: h.name, Agent: "fake:" + h.name, Started: time.Now()})
	rb, _ := json.Marshal(rep)
	_, err = cli.Txn(f.ctx).Then(clientv3.OpPut(cluster.HostsPrefix+h.name, string(hb), clientv3.WithLease(f.lease)),
		clientv3.OpPut(cluster.ReportsPrefix+h.name, string(rb), clientv3.WithLease(f.lease))).Commit()
	h.pub.Unlock()
	if err != nil {
		return fmt.Errorf("come back: %w", err)
	}
	return f.store.AskRejoin(f.ctx, cluster.Rejoin{Host: h.name, Cycle: r.cycle, Time: time.Now(), Detail: "figures normal (simulated)"}, f.lease)
}

func (f *scaleCluster) running(name string) int {
	f.mu.Lock()
	defer f.mu.Unlock()
	n := 0
	for _, st := range f.hosts[name].wls {
		if st == "running" {
			n++
		}
	}
	return n
}

// latency returns when host was judged unstable and when its first migration was
// asked for.
func (f *scaleCluster) latency(host string) (verdict, moved time.Time, ok bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	verdict, ok1 := f.verdict[host]
	moved, ok2 := f.firstMove[host]
	return verdict, moved, ok1 && ok2
}

// sharedTargets lists the hosts that received the workloads of more than one
// host. In active-standby a target is a spare that becomes a primary, and only
// a rejuvenation makes it a spare again, which no target goes through here.
func (f *scaleCluster) sharedTargets() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	by := map[string][]string{}
	for src, t := range f.target {
		by[t] = append(by[t], src)
	}
	var out []string
	for t, srcs := range by {
		if len(srcs) > 1 {
			sort.Strings(srcs)
			out = append(out, t+" <- "+strings.Join(srcs, ", "))
		}
	}
	sort.Strings(out)
	return out
}

// Agents.

func (f *scaleCluster) Workloads(ctx context.Context, host cluster.Host) ([]controller.Workload, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	h, ok := f.hosts[host.Name]
	if !ok || h.down {
		return nil, fmt.Errorf("host %s is down", host.Name)
	}
	out := make([]controller.Workload, 0, len(h.wls))
	for name, st := range h.wls {
		out = append(out, controller.Workload{Name: name, State: st, Memory: wlMemory})
	}
	return out, nil
}

// Migrate records when the host's first migration was asked for and moves the
// workload at once.
func (f *scaleCluster) Migrate(ctx context.Context, from cluster.Host, w, to, strategy string) (controller.Moved, error) {
	now := time.Now()
	f.mu.Lock()
	src, dst := f.hosts[from.Name], f.hosts[to]
	if src == nil || dst == nil || src.wls[w] != "running" {
		f.mu.Unlock()
		return controller.Moved{}, fmt.Errorf("%s is not running on %s", w, from.Name)
	}
	if _, ok := f.firstMove[from.Name]; !ok {
		f.firstMove[from.Name], f.target[from.Name] = now, to
	}
	src.wls[w] = "migrated"
	dst.wls[w] = "running"
	f.mu.Unlock()
	for _, h := range []string{from.Name, to} {
		select {
		case f.urgent <- h:
		default: // the periodic report will carry it
		}
	}
	return controller.Moved{Strategy: "stopcopy", Frozen: 40 * time.Millisecond, Downtime: 80 * time.Millisecond, Bytes: wlMemory}, nil
}

// Rejuvenate hands the host's restart to the cluster's goroutines and returns, as
// an agent acknowledges the signal before it restarts.
func (f *scaleCluster) Rejuvenate(ctx context.Context, host cluster.Host, cycle string) error {
	f.mu.Lock()
	h := f.hosts[host.Name]
	if h == nil || h.down {
		f.mu.Unlock()
		return errors.New("host down")
	}
	f.mu.Unlock()
	select {
	case f.reboots <- scaleReboot{host: host.Name, cycle: cycle}:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// The ledger: who wrote what, from a watch of the whole cluster state.

// scaleCounts are the ledger's counters.
type scaleCounts struct {
	ctlRevs, ctlKeys int64 // revisions with a controller-owned key, and their keys
	started, ended   int   // cycles created and deleted
}

type scaleLedger struct {
	mu sync.Mutex
	scaleCounts
	starts, ends map[string][]int // host -> indexes in the order of cycles started / ended
}

// Keys only the controller writes: a revision touching one is the controller's.
var scaleControllerKeys = []string{cluster.MembersPrefix, cluster.AvailablePrefix, cluster.CyclesPrefix,
	cluster.HistoryPrefix, cluster.LocksPrefix, "/duplex/controller/"}

func startScaleLedger(tb testing.TB, e *testutil.Etcd) *scaleLedger {
	tb.Helper()
	cli := e.Connect(tb).Client()
	ctx, cancel := context.WithCancel(context.Background())
	g, err := cli.Get(ctx, cluster.Prefix, clientv3.WithCountOnly())
	if err != nil {
		cancel()
		tb.Fatal(err)
	}
	l := &scaleLedger{starts: map[string][]int{}, ends: map[string][]int{}}
	wc := cli.Watch(ctx, cluster.Prefix, clientv3.WithPrefix(), clientv3.WithRev(g.Header.Revision+1))
	done := make(chan struct{})
	go func() {
		defer close(done)
		for resp := range wc {
			if err := resp.Err(); err != nil && ctx.Err() == nil {
				tb.Errorf("ledger watch: %v", err)
				return
			}
			l.fold(resp.Events)
		}
	}()
	tb.Cleanup(func() { cancel(); <-done })
	return l
}

func (l *scaleLedger) fold(evs []*clientv3.Event) {
	l.mu.Lock()
	defer l.mu.Unlock()
	for i := 0; i < len(evs); {
		// The events of one transaction share its revision.
		j, ctl := i, false
		for ; j < len(evs) && evs[j].Kv.ModRevision == evs[i].Kv.ModRevision; j++ {
			k := string(evs[j].Kv.Key)
			ctl = ctl || slices.ContainsFunc(scaleControllerKeys, func(p string) bool { return strings.HasPrefix(k, p) })
			if host, ok := strings.CutPrefix(k, cluster.CyclesPrefix); ok {
				switch {
				case evs[j].Type == mvccpb.DELETE:
					l.ends[host] = append(l.ends[host], l.ended)
					l.ended++
				case evs[j].IsCreate():
					l.starts[host] = append(l.starts[host], l.started)
					l.started++
				}
			}
		}
		if ctl {
			l.ctlRevs++
			l.ctlKeys += int64(j - i)
		}
		i = j
	}
}

func (l *scaleLedger) counts() scaleCounts {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.scaleCounts
}

// cyclesOf counts the hosts whose cycle started, and ended, since before.
func (l *scaleLedger) cyclesOf(hosts []string, before scaleCounts) (started, ended int) {
	l.mu.Lock()
	defer l.mu.Unlock()
	for _, h := range hosts {
		if slices.ContainsFunc(l.starts[h], func(i int) bool { return i >= before.started }) {
			started++
		}
		if slices.ContainsFunc(l.ends[h], func(i int) bool { return i >= before.ended }) {
			ended++
		}
	}
	return started, ended
}

// The CPU profile, split by part of the controller.

// scaleCPU is CPU time from a profile: all of it, the controller's (by label),
// and the controller's split by goroutine.
type scaleCPU struct {
	total, ctl time.Duration
	// The cycles' runners, the main loop, the view's watch; the rest is its etcd
	// client's goroutines, its session and the election.
	cycles, loop, watch time.Duration
}

// scaleSplitProfile reads a gzipped pprof CPU profile (runtime/pprof's format)
// with protowire, so the test needs no profile library.
func scaleSplitProfile(gz []byte) (scaleCPU, error) {
	zr, err := gzip.NewReader(bytes.NewReader(gz))
	if err != nil {
		return scaleCPU{}, fmt.Errorf("profile: %w", err)
	}
	raw, err := io.ReadAll(zr)
	if err != nil {
		return scaleCPU{}, fmt.Errorf("profile: %w", err)
	}
	type sample struct {
		locs   []uint64
		vals   []uint64
		labels [][2]uint64 // key, str (string table indexes)
	}
	var (
		strs     []string
		units    []uint64 // the unit of each sample value
		samples  []sample
		locFuncs = map[uint64][]uint64{}
		funcName = map[uint64]uint64{}
	)
	err = scalePB(raw, func(num protowire.Number, typ protowire.Type, v []byte, x uint64) error {
		switch num {
		case 1: // sample_type
			return scalePB(v, func(n protowire.Number, _ protowire.Type, _ []byte, x uint64) error {
				if n == 2 {
					units = append(units, x)
				}
				return nil
			})
		case 2: // sample
			var s sample
			err := scalePB(v, func(n protowire.Number, t protowire.Type, v []byte, x uint64) error {
				switch n {
				case 1:
					return scalePBInts(&s.locs, t, v, x)
				case 2:
					return scalePBInts(&s.vals, t, v, x)
				case 3:
					var l [2]uint64
					err := scalePB(v, func(n protowire.Number, _ protowire.Type, _ []byte, x uint64) error {
						if n == 1 || n == 2 {
							l[n-1] = x
						}
						return nil
					})
					s.labels = append(s.labels, l)
					return err
				}
				return nil
			})
			samples = append(samples, s)
			return err
		case 4: // location
			var id uint64
			var fns []uint64
			err := scalePB(v, func(n protowire.Number, _ protowire.Type, v []byte, x uint64) error {
				switch n {
				case 1:
					id = x
				case 4: // line
					return scalePB(v, func(n protowire.Number, _ protowire.Type, _ []byte, x uint64) error {
						if n == 1 {
							fns = append(fns, x)
						}
						return nil
					})
				}
				return nil
			})
			locFuncs[id] = fns
			return err
		case 5: // function
			var id, name uint64
			err := scalePB(v, func(n protowire.Number, _ protowire.Type, _ []byte, x uint64) error {
				switch n {
				case 1:
					id = x
				case 2:
					name = x
				}
				return nil
			})
			funcName[id] = name
			return err
		case 6: // string_table
			strs = append(strs, string(v))
		}
		return nil
	})
	if err != nil {
		return scaleCPU{}, fmt.Errorf("profile: %w", err)
	}
	str := func(i uint64) string {
		if i < uint64(len(strs)) {
			return strs[i]
		}
		return ""
	}
	ns := slices.IndexFunc(units, func(u uint64) bool { return str(u) == "nanoseconds" })
	if ns < 0 {
		return scaleCPU{}, errors.New("profile: no CPU time in nanoseconds")
	}
	var out scaleCPU
	for _, s := range samples {
		if ns >= len(s.vals) {
			continue
		}
		d := time.Duration(s.vals[ns])
		out.total += d
		if !slices.ContainsFunc(s.labels, func(l [2]uint64) bool { return str(l[0]) == scaleLabel && str(l[1]) == scaleCtl }) {
			continue
		}
		out.ctl += d
		has := func(fn string) bool {
			for _, loc := range s.locs {
				for _, f := range locFuncs[loc] {
					if strings.Contains(str(funcName[f]), fn) {
						return true
					}
				}
			}
			return false
		}
		switch {
		case has("controller.(*view).watch"):
			out.watch += d
		case has("controller.(*leader).run") || has("controller.(*leader).duplex"):
			out.cycles += d
		case has("controller.(*leader).lead") || has("controller.(*leader).reconcile"):
			out.loop += d
		}
	}
	return out, nil
}

// scalePB calls f for every field of a protobuf message: x for varints, v for
// length-delimited fields; others are skipped.
func scalePB(b []byte, f func(num protowire.Number, typ protowire.Type, v []byte, x uint64) error) error {
	for len(b) > 0 {
		num, typ, n := protowire.ConsumeTag(b)
		if n < 0 {
			return protowire.ParseError(n)
		}
		b = b[n:]
		var (
			v []byte
			x uint64
		)
		switch typ {
		case protowire.VarintType:
			x, n = protowire.ConsumeVarint(b)
		case protowire.BytesType:
			v, n = protowire.ConsumeBytes(b)
		default:
			n = protowire.ConsumeFieldValue(num, typ, b)
		}
		if n < 0 {
			return protowire.ParseError(n)
		}
		b = b[n:]
		if typ == protowire.VarintType || typ == protowire.BytesType {
			if err := f(num, typ, v, x); err != nil {
				return err
			}
		}
	}
	return nil
}

// scalePBInts appends a repeated varint field, packed or not.
func scalePBInts(dst *[]uint64, typ protowire.Type, v []byte, x uint64) error {
	if typ == protowire.VarintType {
		*dst = append(*dst, x)
		return nil
	}
	for len(v) > 0 {
		x, n := protowire.ConsumeVarint(v)
		if n < 0 {
			return protowire.ParseError(n)
		}
		*dst = append(*dst, x)
		v = v[n:]
	}
	return nil
}
