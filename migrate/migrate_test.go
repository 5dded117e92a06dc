package migrate_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/duplex-ha/duplex/checkpoint"
	"github.com/duplex-ha/duplex/internal/testutil"
	"github.com/duplex-ha/duplex/internal/workload"
	"github.com/duplex-ha/duplex/migrate"
)

func TestMain(m *testing.M) { os.Exit(testutil.Main(m)) }

// vipLog is a VIP controller that records what each host did, in order.
type vipLog struct {
	mu     *sync.Mutex
	host   string
	events *[]string
}

func (v vipLog) rec(op, vip string) error {
	v.mu.Lock()
	defer v.mu.Unlock()
	*v.events = append(*v.events, v.host+" "+op+" "+vip)
	return nil
}
func (v vipLog) Add(_ context.Context, vip string) error      { return v.rec("add", vip) }
func (v vipLog) Announce(_ context.Context, vip string) error { return v.rec("announce", vip) }
func (v vipLog) Remove(_ context.Context, vip string) error   { return v.rec("remove", vip) }
func (v vipLog) Check(vip string) error {
	if !strings.Contains(vip, "@") {
		return fmt.Errorf("bad vip %q", vip)
	}
	return nil
}

// pair is a source host and a destination host on this kernel, in one process.
type pair struct {
	src    *migrate.Source
	dst    *migrate.Target
	a, b   *workload.Manager
	events []string
	prog   string
}

func newPair(t *testing.T) *pair {
	t.Helper()
	eng := testutil.RequiresCRIU(t)
	p := &pair{prog: testutil.Build(t, "./internal/testprog")}
	mu := &sync.Mutex{}
	parent := testutil.CgroupParent(t)
	mk := func(host string) (*workload.Manager, vipLog) {
		v := vipLog{mu: mu, host: host, events: &p.events}
		m, err := workload.New(workload.Config{StateDir: t.TempDir(), CgroupParent: parent, Checkpointer: eng, VIPs: v, Log: testutil.Logger(t).WithField("host", host)})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() {
			for _, r := range m.List() {
				if r.State == workload.Running || r.State == workload.Frozen {
					_, _ = m.Stop(context.Background(), r.Name, 0)
				}
			}
			m.Close()
		})
		return m, v
	}
	var va, vb vipLog
	p.a, va = mk("a")
	p.b, vb = mk("b")
	caps := func(host string) func(context.Context) (migrate.Capabilities, error) {
		return func(ctx context.Context) (migrate.Capabilities, error) {
			return migrate.HostCapabilities(ctx, host, eng)
		}
	}
	p.src = &migrate.Source{Host: "a", WorkDir: t.TempDir(), Workloads: p.a, VIPs: va, Caps: caps("a"), Log: testutil.Logger(t).WithField("host", "a")}
	p.dst = &migrate.Target{Host: "b", Addr: "127.0.0.1", WorkDir: t.TempDir(), Engine: eng, Workloads: p.b, VIPs: vb, Caps: caps("b"), Log: testutil.Logger(t).WithField("host", "b")}
	return p
}

func (p *pair) run(t *testing.T, name string, args ...string) workload.Record {
	t.Helper()
	rec, err := p.a.Run(context.Background(), workload.Spec{Name: name, Args: append([]string{p.prog}, args...),
		Env: []string{"PATH=/usr/bin:/bin", "GODEBUG=multipathtcp=0"}, VIPs: []string{"10.99.0.1/24@eth0"}})
	if err != nil {
		t.Fatal(err)
	}
	return rec
}

func lines(t *testing.T, path string) int {
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return strings.Count(string(b), "\n")
}

func growing(t *testing.T, path, what string) {
	t.Helper()
	n := lines(t, path)
	testutil.Eventually(t, 5*time.Second, what, func() bool { return lines(t, path) > n+3 })
}

func alive(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	return err == nil && !strings.Contains(string(b), ") Z ")
}

// liveCopies counts the running (not frozen, not dead) copies of a workload across both hosts.
func (p *pair) liveCopies(name string) int {
	n := 0
	for _, m := range []*workload.Manager{p.a, p.b} {
		if r, err := m.Get(name); err == nil && r.State == workload.Running && alive(r.Pid) {
			n++
		}
	}
	return n
}

func TestMigrateStopAndCopy(t *testing.T) {
	p := newPair(t)
	rec := p.run(t, "counter", "counter")
	growing(t, rec.Stdout, "counting on a")
	var phases []string
	res, err := p.src.Migrate(context.Background(), p.dst, migrate.Request{Workload: "counter", To: "b", Strategy: migrate.StopCopy},
		func(pr migrate.Progress) {
			// Progress repeats a phase as its bytes move; keep the sequence of phases.
			if len(phases) == 0 || phases[len(phases)-1] != pr.Phase {
				phases = append(phases, pr.Phase)
			}
		})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("result: %+v", res)
	if res.Strategy != migrate.StopCopy || res.FrozenMS <= 0 || res.DowntimeMS < res.FrozenMS || res.PageBytes == 0 || res.ImageBytes == 0 {
		t.Errorf("implausible result %+v", res)
	}
	want := []string{migrate.PhasePreflight, migrate.PhaseFreeze, migrate.PhaseImages, migrate.PhaseRestore, migrate.PhaseCommit, migrate.PhaseDone}
	if res.LazyRestore { // the copy ran while its memory was filled in on b
		want = slices.Insert(want, 4, migrate.PhasePages)
	}
	if strings.Join(phases, ",") != strings.Join(want, ",") {
		t.Errorf("phases %v, want %v", phases, want)
	}
	a, _ := p.a.Get("counter")
	b, err := p.b.Get("counter")
	if err != nil || a.State != workload.Migrated || b.State != workload.Running || alive(rec.Pid) {
		t.Fatalf("after migration: a %s (pid %d alive %v), b %s %v", a.State, rec.Pid, alive(rec.Pid), b.State, err)
	}
	growing(t, rec.Stdout, "counting on b")
	// The address left a before b took it, and b announced it only after the restore.
	ev := strings.Join(p.events, "; ")
	if !strings.Contains(ev, "a remove 10.99.0.1/24@eth0; b add 10.99.0.1/24@eth0; b announce 10.99.0.1/24@eth0") {
		t.Errorf("VIP order: %s", ev)
	}
	if p.liveCopies("counter") != 1 {
		t.Errorf("%d live copies", p.liveCopies("counter"))
	}
}

// faulty wraps a Destination and injects failures.
type faulty struct {
	migrate.Destination
	beforeRestore func()
	failImages    bool
	loseAnswer    bool // restore happens, its answer is "lost"
	failAbort     bool
	failCommit    bool // the commit's answer is lost
}

func (f *faulty) Commit(ctx context.Context, id string) error {
	if f.failCommit {
		return errors.New("read: connection reset by peer")
	}
	return f.Destination.Commit(ctx, id)
}

func (f *faulty) RestoreImages(ctx context.Context, id string, r io.Reader) (migrate.RestoreResponse, error) {
	if f.failImages {
		// Read a little, then "die" mid-transfer.
		_, _ = io.CopyN(io.Discard, r, 512)
		return migrate.RestoreResponse{}, errors.New("connection reset by peer")
	}
	if f.beforeRestore == nil && !f.loseAnswer {
		return f.Destination.RestoreImages(ctx, id, r)
	}
	// The hook runs between the images and the restore: the destination's own two
	// halves of RestoreImages.
	t := f.Destination.(*migrate.Target)
	if _, err := t.SendImages(ctx, id, r); err != nil {
		return migrate.RestoreResponse{}, fmt.Errorf("%w: %w", migrate.ErrRestoreFailed, err)
	}
	if f.beforeRestore != nil {
		f.beforeRestore()
	}
	rr, err := t.Restore(ctx, id)
	if err == nil && f.loseAnswer {
		return migrate.RestoreResponse{}, errors.New("read: connection timed out")
	}
	return rr, err
}

func (f *faulty) Abort(ctx context.Context, id string) error {
	if f.failAbort {
		return errors.New("no route to host")
	}
	return f.Destination.Abort(ctx, id)
}

func TestRollbackWhenRestoreFails(t *testing.T) {
	p := newPair(t)
	held := filepath.Join(t.TempDir(), "held.dat")
	rec := p.run(t, "holder", "openfile", held)
	growing(t, rec.Stdout, "counting on a")
	// The file vanishes after pre-flight and dump: the restore on b cannot succeed.
	d := &faulty{Destination: p.dst, beforeRestore: func() { os.Remove(held) }}
	_, err := p.src.Migrate(context.Background(), d, migrate.Request{Workload: "holder", To: "b"}, nil)
	if !errors.Is(err, migrate.ErrRestoreFailed) || !errors.Is(err, checkpoint.ErrMissingFile) {
		t.Fatalf("migrate: %v, want ErrRestoreFailed naming the missing file", err)
	}
	if !strings.Contains(err.Error(), held) || !strings.Contains(err.Error(), "rolled back") {
		t.Errorf("error does not say what happened: %v", err)
	}
	a, _ := p.a.Get("holder")
	if a.State != workload.Running || a.Pid != rec.Pid {
		t.Fatalf("after rollback: %s pid %d", a.State, a.Pid)
	}
	growing(t, rec.Stdout, "counting on a after rollback")
	if _, err := p.b.Get("holder"); !errors.Is(err, workload.ErrNotFound) {
		t.Errorf("b kept a record of the failed restore: %v", err)
	}
	if ev := strings.Join(p.events, "; "); !strings.HasSuffix(ev, "a add 10.99.0.1/24@eth0; a announce 10.99.0.1/24@eth0") {
		t.Errorf("VIP not back on a: %s", ev)
	}
	if p.liveCopies("holder") != 1 {
		t.Errorf("%d live copies", p.liveCopies("holder"))
	}
}

// With a lazy restore the copy runs on b before b confirms every page: if that
// confirmation never comes, b's copy is cancelled and a resumes; if b cannot be
// reached to cancel it either, a stays frozen. Never two live copies.
func TestLazyRestoreUnconfirmed(t *testing.T) {
	p := newPair(t)
	testutil.RequiresCRIU(t, checkpoint.FeatureUFFDNonCoop)
	rec := p.run(t, "counter", "counter")
	growing(t, rec.Stdout, "counting on a")
	_, err := p.src.Migrate(context.Background(), &faulty{Destination: p.dst, failCommit: true}, migrate.Request{Workload: "counter", To: "b", Strategy: migrate.StopCopy}, nil)
	if err == nil || !strings.Contains(err.Error(), "rolled back") {
		t.Fatalf("migrate: %v, want a rollback", err)
	}
	if a, _ := p.a.Get("counter"); a.State != workload.Running || a.Pid != rec.Pid || p.liveCopies("counter") != 1 {
		t.Fatalf("a is %s (pid %d, was %d), %d live copies", a.State, a.Pid, rec.Pid, p.liveCopies("counter"))
	}
	if b, err := p.b.Get("counter"); err == nil && (b.State == workload.Running || b.State == workload.Frozen) {
		t.Errorf("b kept its copy: %s", b.State)
	}
	growing(t, rec.Stdout, "counting on a after the rollback")

	_, err = p.src.Migrate(context.Background(), &faulty{Destination: p.dst, failCommit: true, failAbort: true}, migrate.Request{Workload: "counter", To: "b", Strategy: migrate.StopCopy}, nil)
	if !errors.Is(err, migrate.ErrOutcomeUnknown) {
		t.Fatalf("migrate: %v, want ErrOutcomeUnknown", err)
	}
	if a, _ := p.a.Get("counter"); a.State != workload.Frozen {
		t.Errorf("source is %s, want frozen", a.State)
	}
	if n := p.liveCopies("counter"); n != 1 {
		t.Errorf("%d live copies, want exactly b's", n)
	}
}

func TestRollbackWhenTransferBreaks(t *testing.T) {
	p := newPair(t)
	rec := p.run(t, "counter", "counter")
	growing(t, rec.Stdout, "counting on a")
	_, err := p.src.Migrate(context.Background(), &faulty{Destination: p.dst, failImages: true}, migrate.Request{Workload: "counter", To: "b"}, nil)
	if err == nil || !strings.Contains(err.Error(), "rolled back") {
		t.Fatalf("migrate: %v, want a rolled-back failure", err)
	}
	growing(t, rec.Stdout, "counting on a after rollback")
	if p.liveCopies("counter") != 1 {
		t.Errorf("%d live copies", p.liveCopies("counter"))
	}
	if ents, _ := os.ReadDir(p.dst.WorkDir); len(ents) != 0 {
		t.Errorf("destination kept %d incoming directories", len(ents))
	}
}

func TestLostRestoreAnswer(t *testing.T) {
	p := newPair(t)
	rec := p.run(t, "counter", "counter")
	growing(t, rec.Stdout, "counting on a")
	// The answer is lost but the destination can still be reached: it cancels its
	// copy and the source resumes.
	_, err := p.src.Migrate(context.Background(), &faulty{Destination: p.dst, loseAnswer: true}, migrate.Request{Workload: "counter", To: "b"}, nil)
	if err == nil || !strings.Contains(err.Error(), "rolled back") {
		t.Fatalf("migrate: %v", err)
	}
	if a, _ := p.a.Get("counter"); a.State != workload.Running || p.liveCopies("counter") != 1 {
		t.Fatalf("a is %s, %d live copies", a.State, p.liveCopies("counter"))
	}
	growing(t, rec.Stdout, "counting on a")

	// Lost answer and no way to cancel: the source must stay frozen, never resume.
	_, err = p.src.Migrate(context.Background(), &faulty{Destination: p.dst, loseAnswer: true, failAbort: true}, migrate.Request{Workload: "counter", To: "b"}, nil)
	if !errors.Is(err, migrate.ErrOutcomeUnknown) {
		t.Fatalf("migrate: %v, want ErrOutcomeUnknown", err)
	}
	if a, _ := p.a.Get("counter"); a.State != workload.Frozen {
		t.Errorf("source is %s, want frozen", a.State)
	}
	if n := p.liveCopies("counter"); n != 1 {
		t.Errorf("%d live copies, want exactly the destination's", n)
	}
}

func TestPreflightRefusals(t *testing.T) {
	p := newPair(t)
	rec := p.run(t, "counter", "counter")
	// A forced strategy this host cannot run: refused before anything is frozen.
	if dirty, _ := checkpoint.New("").HasFeature(context.Background(), checkpoint.FeatureMemDirtyTrack); !dirty {
		_, err := p.src.Migrate(context.Background(), p.dst, migrate.Request{Workload: "counter", To: "b", Strategy: migrate.PreCopy}, nil)
		if !errors.Is(err, migrate.ErrStrategyUnavailable) || !strings.Contains(err.Error(), "mem_dirty_track") {
			t.Errorf("forced pre-copy without dirty tracking: %v", err)
		}
	}
	// A name already running on the destination.
	if _, err := p.b.Run(context.Background(), workload.Spec{Name: "counter", Args: []string{"sleep", "100"}}); err != nil {
		t.Fatal(err)
	}
	_, err := p.src.Migrate(context.Background(), p.dst, migrate.Request{Workload: "counter", To: "b"}, nil)
	if !errors.Is(err, migrate.ErrPreflight) || !strings.Contains(err.Error(), "already runs on b") {
		t.Errorf("name clash: %v", err)
	}
	if _, err := p.src.Migrate(context.Background(), p.dst, migrate.Request{Workload: "ghost", To: "b"}, nil); !errors.Is(err, workload.ErrNotFound) {
		t.Errorf("unknown workload: %v", err)
	}
	if a, _ := p.a.Get("counter"); a.State != workload.Running || a.Pid != rec.Pid {
		t.Errorf("source after refusals: %s", a.State)
	}
}

func (p *pair) hog(t *testing.T, name, size string) workload.Record {
	t.Helper()
	rec := p.run(t, name, "hog", size)
	testutil.Eventually(t, 60*time.Second, "the hog to fill its memory", func() bool {
		b, _ := os.ReadFile(rec.Stdout)
		return strings.Contains(string(b), "READY")
	})
	return rec
}

func rssKiB(pid int) int {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0
	}
	for _, l := range strings.Split(string(b), "\n") {
		var kb int
		if _, err := fmt.Sscanf(l, "VmRSS: %d kB", &kb); err == nil {
			return kb
		}
	}
	return 0
}

func TestMigratePostCopy(t *testing.T) {
	p := newPair(t)
	testutil.RequiresCRIU(t, checkpoint.FeatureUFFDNonCoop)
	rec := p.hog(t, "hog", "64M")
	var phases []string
	res, err := p.src.Migrate(context.Background(), p.dst, migrate.Request{Workload: "hog", To: "b", Strategy: migrate.PostCopy},
		func(pr migrate.Progress) {
			if len(phases) == 0 || phases[len(phases)-1] != pr.Phase {
				phases = append(phases, pr.Phase)
			}
		})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("post-copy: downtime %.1f ms, frozen (until the last page) %.1f ms, total %.1f ms, pages %d bytes, images %d bytes, restore %.1f ms, phases %v", res.DowntimeMS, res.FrozenMS, res.TotalMS, res.PageBytes, res.ImageBytes, res.RestoreMS, res.Phases)
	if res.Strategy != migrate.PostCopy || res.PageBytes < 60<<20 {
		t.Errorf("result %+v", res)
	}
	if !strings.Contains(strings.Join(phases, ","), migrate.PhasePages) {
		t.Errorf("phases %v lack %s", phases, migrate.PhasePages)
	}
	a, _ := p.a.Get("hog")
	b, _ := p.b.Get("hog")
	if a.State != workload.Migrated || b.State != workload.Running || alive(rec.Pid) {
		t.Fatalf("after post-copy: a %s (source alive %v), b %s", a.State, alive(rec.Pid), b.State)
	}
	if kb := rssKiB(b.Pid); kb < 64*1024 {
		t.Errorf("restored copy holds %d KiB, want all 64 MiB", kb)
	}
	if p.liveCopies("hog") != 1 {
		t.Errorf("%d live copies", p.liveCopies("hog"))
	}
}

// TestMigratePreCopy moves a workload that keeps rewriting its memory in pre-copy
// rounds and checks, from the workload's own page check, that no page was lost or
// mixed up across the rounds. This kernel may lack soft-dirty tracking; then
// integration's TestPreCopyInGuest runs this test inside a VM guest that has it.
func TestMigratePreCopy(t *testing.T) {
	p := newPair(t)
	eng := checkpoint.New("")
	if ok, _ := eng.HasFeature(context.Background(), checkpoint.FeatureMemDirtyTrack); !ok {
		t.Skip("pre-copy needs soft-dirty memory tracking (CONFIG_MEM_SOFT_DIRTY), which this kernel lacks; TestPreCopyInGuest runs this test in a VM guest")
	}
	size, rate := "64M", "4M"
	if v := os.Getenv("DUPLEX_PRECOPY_SIZE"); v != "" { // smaller in a slow guest
		size = v
	}
	// The workload rewrites a hot eighth of its memory, as real ones do: with
	// transparent huge pages a write marks a whole 2 MiB page dirty, so writes
	// spread over all of it would send everything again in every round.
	hot := "8M"
	if v := os.Getenv("DUPLEX_PRECOPY_HOT"); v != "" {
		hot = v
	}
	rec := p.run(t, "dirty", "dirty", size, rate, hot)
	testutil.Eventually(t, 2*time.Minute, "the workload to fill its memory", func() bool {
		b, _ := os.ReadFile(rec.Stdout)
		return strings.Contains(string(b), "OK")
	})
	// Through the agents' mutual-TLS protocol: every round opens a page channel.
	ca, cb, _ := certs(t)
	dst := migrate.NewClient(serve(t, p, cb), tlsConf(t, ca))
	defer dst.Close()
	var phases, messages []string
	res, err := p.src.Migrate(context.Background(), dst, migrate.Request{Workload: "dirty", To: "b", Strategy: migrate.PreCopy},
		func(pr migrate.Progress) {
			if len(phases) == 0 || phases[len(phases)-1] != pr.Phase {
				phases = append(phases, pr.Phase)
			}
			if pr.Message != "" {
				messages = append(messages, pr.Phase+": "+pr.Message)
			}
		})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("pre-copy: %d rounds %+v, frozen %.1f ms, downtime %.1f ms, total %.1f ms, page bytes %d, images %d", len(res.Rounds), res.Rounds, res.FrozenMS, res.DowntimeMS, res.TotalMS, res.PageBytes, res.ImageBytes)
	t.Logf("progress: %s", strings.Join(messages, "; "))
	want := []string{migrate.PhasePreflight, migrate.PhasePrecopy, migrate.PhaseFreeze, migrate.PhaseImages, migrate.PhaseRestore, migrate.PhaseCommit, migrate.PhaseDone}
	if res.LazyRestore {
		want = slices.Insert(want, 5, migrate.PhasePages)
	}
	if strings.Join(phases, ",") != strings.Join(want, ",") {
		t.Errorf("phases %v, want %v", phases, want)
	}
	if res.Strategy != migrate.PreCopy || len(res.Rounds) == 0 {
		t.Fatalf("result %+v", res)
	}
	var inRounds int64
	for _, r := range res.Rounds {
		inRounds += r.Bytes
	}
	first := res.Rounds[0]
	if full, _ := strconv.ParseInt(strings.TrimSuffix(size, "M"), 10, 64); first.Bytes < full<<20*9/10 {
		t.Errorf("the first round sent %d bytes, want about all %s", first.Bytes, size)
	}
	if final := res.PageBytes - inRounds; final <= 0 || final >= first.Bytes/2 {
		t.Errorf("the final dump sent %d bytes after %d in the first round: not an incremental dump", final, first.Bytes)
	}
	a, _ := p.a.Get("dirty")
	b, err := p.b.Get("dirty")
	if err != nil || a.State != workload.Migrated || b.State != workload.Running || alive(rec.Pid) {
		t.Fatalf("after migration: a %s (source alive %v), b %s %v", a.State, alive(rec.Pid), b.State, err)
	}
	// Two more checks of every page on b, with pages rewritten in between.
	before := strings.Count(readFile(t, rec.Stdout), "OK")
	testutil.Eventually(t, time.Minute, "two page checks on b", func() bool {
		return strings.Count(readFile(t, rec.Stdout), "OK") >= before+2
	})
	if out := readFile(t, rec.Stdout); strings.Contains(out, "CORRUPT") {
		t.Fatalf("the migrated workload found a corrupt page: %s", out[strings.Index(out, "CORRUPT"):])
	}
	if p.liveCopies("dirty") != 1 {
		t.Errorf("%d live copies", p.liveCopies("dirty"))
	}
}

// Stop-and-copy restores lazily where userfaultfd allows: the copy runs at once and
// its memory fills in from the images already on b. Every page must be right, and
// an eager restore must work as well.
func TestStopCopyRestoreLazyAndEager(t *testing.T) {
	for _, eager := range []bool{false, true} {
		t.Run(fmt.Sprintf("eager=%v", eager), func(t *testing.T) {
			p := newPair(t)
			if !eager {
				testutil.RequiresCRIU(t, checkpoint.FeatureUFFDNonCoop)
			}
			p.dst.EagerRestore = eager
			rec := p.run(t, "dirty", "dirty", "64M", "8M")
			testutil.Eventually(t, time.Minute, "the workload to fill its memory", func() bool {
				return strings.Contains(readFile(t, rec.Stdout), "OK")
			})
			res, err := p.src.Migrate(context.Background(), p.dst, migrate.Request{Workload: "dirty", To: "b", Strategy: migrate.StopCopy}, nil)
			if err != nil {
				t.Fatal(err)
			}
			t.Logf("stop-and-copy (eager %v): lazy %v, frozen %.1f ms, downtime %.1f ms, restore %.1f ms, total %.1f ms", eager, res.LazyRestore, res.FrozenMS, res.DowntimeMS, res.RestoreMS, res.TotalMS)
			if res.LazyRestore == eager {
				t.Errorf("lazy restore %v with EagerRestore %v", res.LazyRestore, eager)
			}
			b, _ := p.b.Get("dirty")
			if b.State != workload.Running || alive(rec.Pid) {
				t.Fatalf("after migration: b %s, source alive %v", b.State, alive(rec.Pid))
			}
			// Once the migration returned, every page is in place on b.
			if kb := rssKiB(b.Pid); kb < 64*1024 {
				t.Errorf("restored copy holds %d KiB, want all 64 MiB", kb)
			}
			before := strings.Count(readFile(t, rec.Stdout), "OK")
			testutil.Eventually(t, 30*time.Second, "two page checks on b", func() bool {
				return strings.Count(readFile(t, rec.Stdout), "OK") >= before+2
			})
			if out := readFile(t, rec.Stdout); strings.Contains(out, "CORRUPT") {
				t.Fatalf("the migrated workload found a corrupt page: %s", out[strings.Index(out, "CORRUPT"):])
			}
			if p.liveCopies("dirty") != 1 {
				t.Errorf("%d live copies", p.liveCopies("dirty"))
			}
		})
	}
}

func readFile(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// breaking cuts the page channel after limit bytes went out.
type breaking struct {
	migrate.Destination
	limit int64
}

func (d breaking) Pages(ctx context.Context, id string) (io.ReadWriteCloser, error) {
	c, err := d.Destination.Pages(ctx, id)
	if err != nil {
		return nil, err
	}
	return &cutter{ReadWriteCloser: c, left: d.limit}, nil
}

type cutter struct {
	io.ReadWriteCloser
	mu   sync.Mutex
	left int64
}

func (c *cutter) Write(b []byte) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.left <= 0 {
		c.ReadWriteCloser.Close()
		return 0, errors.New("link down")
	}
	c.left -= int64(len(b))
	return c.ReadWriteCloser.Write(b)
}

// The page transfer of a post-copy migration breaks after the copy started on the
// destination: the incomplete copy is stopped there and the source resumes.
func TestPostCopyTransferBreaks(t *testing.T) {
	p := newPair(t)
	testutil.RequiresCRIU(t, checkpoint.FeatureUFFDNonCoop)
	rec := p.hog(t, "hog", "64M")
	_, err := p.src.Migrate(context.Background(), breaking{p.dst, 8 << 20}, migrate.Request{Workload: "hog", To: "b", Strategy: migrate.PostCopy}, nil)
	if err == nil {
		t.Fatal("migration succeeded over a broken page channel")
	}
	t.Logf("error: %v", err)
	testutil.Eventually(t, 10*time.Second, "the destination to stop its copy", func() bool {
		r, err := p.b.Get("hog")
		return err != nil || r.State != workload.Running
	})
	a, _ := p.a.Get("hog")
	if a.State != workload.Running || !alive(rec.Pid) {
		t.Fatalf("source after the failed post-copy: %s, alive %v", a.State, alive(rec.Pid))
	}
	if n := p.liveCopies("hog"); n != 1 {
		t.Errorf("%d live copies", n)
	}
}

// A migration whose source vanished after preparing it is swept away: its page
// server and images go; nothing was frozen, nothing else changes.
func TestSweepStalePreparedMigration(t *testing.T) {
	p := newPair(t)
	p.dst.StaleAfter = 100 * time.Millisecond
	rec := p.run(t, "counter", "counter")
	caps, err := p.src.Caps(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if _, err := p.dst.Prepare(context.Background(), migrate.PrepareRequest{ID: "orphan-1", Workload: rec, Strategy: migrate.StopCopy, Source: caps}); err != nil {
		t.Fatal(err)
	}
	if ents, _ := os.ReadDir(p.dst.WorkDir); len(ents) != 1 {
		t.Fatalf("prepared migration has %d directories", len(ents))
	}
	if got := p.dst.Sweep(context.Background()); len(got) != 0 {
		t.Errorf("swept a fresh migration: %v", got)
	}
	time.Sleep(150 * time.Millisecond)
	if got := p.dst.Sweep(context.Background()); len(got) != 1 || got[0] != "orphan-1" {
		t.Fatalf("Sweep = %v, want the orphan", got)
	}
	if ents, _ := os.ReadDir(p.dst.WorkDir); len(ents) != 0 {
		t.Errorf("sweep left %d directories", len(ents))
	}
	if len(p.dst.Pending()) != 0 {
		t.Errorf("still pending: %v", p.dst.Pending())
	}
	if a, _ := p.a.Get("counter"); a.State != workload.Running {
		t.Errorf("source workload: %s", a.State)
	}
}

func TestPrepareReservesMemory(t *testing.T) {
	p := newPair(t)
	rec := p.run(t, "counter", "counter")
	caps, err := p.src.Caps(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	const mem = 96 << 20
	before := rssKiB(os.Getpid())
	resp, err := p.dst.Prepare(context.Background(), migrate.PrepareRequest{ID: "reserve-1", Workload: rec, Strategy: migrate.StopCopy, Source: caps, Memory: mem})
	if err != nil {
		t.Fatal(err)
	}
	if resp.Reserved != mem {
		t.Errorf("reserved %d MiB, want %d", resp.Reserved>>20, mem>>20)
	}
	// The reservation is written, so it is resident in the destination (this process).
	if grew := rssKiB(os.Getpid()) - before; grew < (mem>>10)*9/10 {
		t.Errorf("resident memory grew by %d KiB at Prepare, want about %d", grew, mem>>10)
	}
	held := rssKiB(os.Getpid())
	if err := p.dst.Abort(context.Background(), "reserve-1"); err != nil {
		t.Fatal(err)
	}
	if fell := held - rssKiB(os.Getpid()); fell < (mem>>10)*9/10 {
		t.Errorf("resident memory fell by %d KiB at Abort, want about %d", fell, mem>>10)
	}

	p.dst.NoReserve = true
	resp, err = p.dst.Prepare(context.Background(), migrate.PrepareRequest{ID: "reserve-2", Workload: rec, Strategy: migrate.StopCopy, Source: caps, Memory: mem})
	if err != nil {
		t.Fatal(err)
	}
	defer p.dst.Abort(context.Background(), "reserve-2")
	if resp.Reserved != 0 {
		t.Errorf("NoReserve: reserved %d MiB", resp.Reserved>>20)
	}
}
