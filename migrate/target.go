package migrate

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/duplex-ha/duplex/checkpoint"
	"github.com/duplex-ha/duplex/internal/workload"
)

// Workloads is what the destination needs of the host's workload manager.
type Workloads interface {
	Get(name string) (workload.Record, error)
	Restore(ctx context.Context, o workload.RestoreOptions) (workload.Record, *checkpoint.RestoreResult, error)
	Abandon(name string) error
}

// Target is the destination end of migrations on this host.
type Target struct {
	Host      string // this host's name
	Addr      string // address the page server listens on (the agent's address)
	WorkDir   string // where incoming images go (tmpfs is best)
	Engine    *checkpoint.Engine
	Workloads Workloads
	VIPs      workload.VIPController
	Limits    Limits
	// Caps returns this host's capabilities.
	Caps func(ctx context.Context) (Capabilities, error)
	Log  *logrus.Entry
	// EagerRestore restores stop-and-copy and pre-copy migrations with all their
	// memory in place before the copy runs. By default, where userfaultfd allows,
	// the copy runs at once and a local lazy-pages daemon fills its memory in from
	// the images that already arrived; the source stays frozen until it is done.
	EagerRestore bool
	// NoReserve skips reserving the incoming memory at Prepare (see memReserve).
	NoReserve bool
	// StaleAfter is how long a migration may stay prepared without being restored
	// before Sweep aborts it (its source died or gave up); 0 means 10 minutes.
	StaleAfter time.Duration

	mu sync.Mutex
	m  map[string]*incoming
}

type incoming struct {
	req     PrepareRequest
	created time.Time
	dir     string
	cur     string // where the current page server writes and the images go
	round   int    // pre-copy: the page server's round, 1 for the first
	ps      *checkpoint.PageServer
	tunnel  *os.File // our end of the page channel; nil once handed out
	lazyEnd *os.File // post-copy: CRIU's end, for the lazy-pages daemon at restore
	lazy    *checkpoint.LazyPages
	// lazyStart is post-copy's lazy-pages daemon, started once the images are in.
	lazyStart chan lazyStarted
	lazyDone  chan error // post-copy: the daemon's outcome, once it ends
	images    bool
	restored  bool
	vips      []string // addresses added here
	busy      bool
	// prepared is the restore made ready at Prepare (its cgroup and CRIU process).
	prepared *workload.PreparedRestore
	// reserve holds memory for the incoming pages until they arrive.
	reserve *memReserve
}

type lazyStarted struct {
	lp  *checkpoint.LazyPages
	err error
}

// restorePreparer is a Workloads that can get a restore ready ahead.
type restorePreparer interface {
	PrepareRestore(rec workload.Record) (*workload.PreparedRestore, error)
}

func (t *Target) log() *logrus.Entry {
	if t.Log == nil {
		l := logrus.New()
		l.SetOutput(io.Discard)
		return logrus.NewEntry(l)
	}
	return t.Log
}

// Capabilities implements Destination.
func (t *Target) Capabilities(ctx context.Context) (Capabilities, error) { return t.Caps(ctx) }

func (t *Target) get(id string) (*incoming, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	in, ok := t.m[id]
	if !ok {
		return nil, fmt.Errorf("%w: %s", ErrNoMigration, id)
	}
	if in.busy {
		return nil, fmt.Errorf("migration %s: another request is in progress", id)
	}
	in.busy = true
	return in, nil
}

func (t *Target) put(in *incoming) {
	t.mu.Lock()
	in.busy = false
	t.mu.Unlock()
}

// Prepare implements Destination.
func (t *Target) Prepare(ctx context.Context, req PrepareRequest) (PrepareResponse, error) {
	if !idRe.MatchString(req.ID) {
		return PrepareResponse{}, fmt.Errorf("%w: migration id %q", ErrPreflight, req.ID)
	}
	if err := t.preflight(ctx, req); err != nil {
		return PrepareResponse{}, err
	}
	t.mu.Lock()
	if t.m == nil {
		t.m = map[string]*incoming{}
	}
	if _, dup := t.m[req.ID]; dup {
		t.mu.Unlock()
		return PrepareResponse{}, fmt.Errorf("%w: migration %s already exists", ErrPreflight, req.ID)
	}
	in := &incoming{req: req, dir: filepath.Join(t.WorkDir, req.ID), busy: true, created: time.Now()}
	in.cur = in.dir
	if req.Strategy == PreCopy {
		// Each pre-dump round gets a directory of its own whose parent link names
		// the round before; the restore follows the links for unchanged pages.
		in.round = 1
		in.cur = filepath.Join(in.dir, "1")
	}
	t.m[req.ID] = in
	t.mu.Unlock()

	fail := func(err error) (PrepareResponse, error) {
		t.drop(in)
		return PrepareResponse{}, err
	}
	if err := os.MkdirAll(in.cur, 0o700); err != nil {
		return fail(fmt.Errorf("prepare %s: %w", req.ID, err))
	}
	if rp, ok := t.Workloads.(restorePreparer); ok {
		// The workload's cgroup and the CRIU process that will restore it, made
		// now while the source runs rather than inside the downtime.
		p, err := rp.PrepareRestore(req.Workload)
		if err != nil {
			return fail(fmt.Errorf("%w: %w", ErrPreflight, err))
		}
		in.prepared = p
	}
	if !t.NoReserve {
		r, err := reserveMemory(int64(req.Memory))
		if err != nil {
			return fail(fmt.Errorf("%w: %s cannot hold the workload's memory: %w", ErrPreflight, t.Host, err))
		}
		in.reserve = r
	}
	// The page server listens on nothing: it serves one end of a socket pair whose
	// other end the source reaches through Pages.
	criuEnd, ours, err := bigSocketPair()
	if err != nil {
		return fail(fmt.Errorf("prepare %s: %w", req.ID, err))
	}
	if req.Strategy == PostCopy {
		// The source serves the pages; our lazy-pages daemon fetches them at restore.
		in.lazyEnd, in.tunnel = criuEnd, ours
		in.reserve.pause() // until the restored copy runs
		if early, _ := t.Engine.HasFeature(ctx, checkpoint.FeatureLazyPagesBeforeImages); early {
			// A CRIU whose daemon reads the images only when the restore connects
			// starts now, outside the downtime, instead of once the images land.
			t.startLazyPages(in)
		}
		t.put(in)
		t.log().WithFields(logrus.Fields{"migration": req.ID, "workload": req.Workload.Name, "reserved_mib": in.reserve.size() >> 20}).Info("prepared incoming post-copy migration")
		return PrepareResponse{PageServer: t.Host + " lazy-pages", Reserved: in.reserve.size()}, nil
	}
	if err := t.startPageServer(ctx, in, criuEnd, ours, ""); err != nil {
		return fail(fmt.Errorf("prepare %s: %w", req.ID, err))
	}
	ps := in.ps
	t.put(in)
	t.log().WithFields(logrus.Fields{"migration": req.ID, "workload": req.Workload.Name, "page_server": ps.Pid, "reserved_mib": in.reserve.size() >> 20}).Info("prepared incoming migration")
	return PrepareResponse{PageServer: fmt.Sprintf("%s pid %d", t.Host, ps.Pid), Reserved: in.reserve.size()}, nil
}

// Pages implements Destination: it hands out the page server's connection, once.
func (t *Target) Pages(ctx context.Context, id string) (io.ReadWriteCloser, error) {
	in, err := t.get(id)
	if err != nil {
		return nil, err
	}
	defer t.put(in)
	if in.tunnel == nil && in.req.Strategy == PreCopy && !in.images {
		if err := t.nextRound(ctx, in); err != nil {
			return nil, fmt.Errorf("migration %s: %w", id, err)
		}
	}
	if in.tunnel == nil {
		return nil, fmt.Errorf("migration %s: page channel already open", id)
	}
	c, err := net.FileConn(in.tunnel)
	in.tunnel.Close()
	in.tunnel = nil
	if err != nil {
		return nil, fmt.Errorf("migration %s: page channel: %w", id, err)
	}
	if in.reserve != nil {
		return &reservingConn{ReadWriteCloser: c, r: in.reserve}, nil
	}
	return c, nil
}

// startPageServer runs a page server writing to in.cur on criuEnd and keeps ours
// for Pages to hand out. It closes criuEnd, and ours on failure.
func (t *Target) startPageServer(ctx context.Context, in *incoming, criuEnd, ours *os.File, parent string) error {
	ps, err := t.Engine.StartPageServer(ctx, checkpoint.PageServerOptions{ImagesDir: in.cur, Conn: criuEnd, ParentDir: parent})
	criuEnd.Close() // the page server holds its own copy
	if err != nil {
		ours.Close()
		return err
	}
	in.ps, in.tunnel = ps, ours
	return nil
}

// lazyLocal reports whether a restore whose pages all arrived should still be lazy:
// the copy runs at once and a local daemon fills its memory in from the images,
// so the downtime does not grow with the memory.
func (t *Target) lazyLocal(ctx context.Context) bool {
	if t.EagerRestore {
		return false
	}
	caps, err := t.Caps(ctx)
	return err == nil && caps.Features[checkpoint.FeatureUFFDNonCoop]
}

// MaxPrecopyRounds bounds the pre-dump rounds a destination accepts for one
// migration (each round's pages stay until the restore).
const MaxPrecopyRounds = 16

// nextRound opens pre-copy's next round once the page server of the round before
// has stored everything its dump sent.
func (t *Target) nextRound(ctx context.Context, in *incoming) error {
	if in.round >= MaxPrecopyRounds {
		return fmt.Errorf("pre-copy: more than %d rounds", MaxPrecopyRounds)
	}
	if in.ps == nil {
		return fmt.Errorf("pre-copy round %d failed before", in.round)
	}
	wctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	err := in.ps.Wait(wctx)
	cancel()
	if err != nil {
		return fmt.Errorf("pre-copy round %d did not complete: %w", in.round, err)
	}
	next := filepath.Join(in.dir, strconv.Itoa(in.round+1))
	if err := os.Mkdir(next, 0o700); err != nil {
		return fmt.Errorf("pre-copy round %d: %w", in.round+1, err)
	}
	parent := filepath.Join("..", strconv.Itoa(in.round))
	if err := os.Symlink(parent, filepath.Join(next, "parent")); err != nil {
		return fmt.Errorf("pre-copy round %d: %w", in.round+1, err)
	}
	criuEnd, ours, err := bigSocketPair()
	if err != nil {
		return fmt.Errorf("pre-copy round %d: %w", in.round+1, err)
	}
	prev := in.cur
	in.round++
	in.cur = next
	if err := t.startPageServer(ctx, in, criuEnd, ours, parent); err != nil {
		in.ps = nil
		return fmt.Errorf("pre-copy round %d: page server: %w", in.round, err)
	}
	t.log().WithFields(logrus.Fields{"migration": in.req.ID, "round": in.round, "parent": prev}).Debug("pre-copy round opened")
	return nil
}

// preflight checks everything it can before the source freezes anything.
func (t *Target) preflight(ctx context.Context, req PrepareRequest) error {
	var problems []string
	if err := workload.ValidateName(req.Workload.Name); err != nil {
		problems = append(problems, err.Error())
	} else if r, err := t.Workloads.Get(req.Workload.Name); err == nil && (r.State == workload.Running || r.State == workload.Frozen) {
		problems = append(problems, fmt.Sprintf("a workload named %s already runs on %s", r.Name, t.Host))
	}
	caps, err := t.Caps(ctx)
	if err != nil {
		return fmt.Errorf("%w: %s cannot report its capabilities: %w", ErrPreflight, t.Host, err)
	}
	if _, err := Choose(req.Strategy, req.Source, caps, req.Memory); err != nil {
		problems = append(problems, err.Error())
	}
	if need := req.Memory + req.Memory/10; caps.MemAvailable > 0 && need > caps.MemAvailable {
		problems = append(problems, fmt.Sprintf("needs %d MiB of memory, %s has %d MiB available", need>>20, t.Host, caps.MemAvailable>>20))
	}
	var missing []string
	for _, f := range req.OpenFiles {
		if _, err := os.Stat(f); err != nil {
			missing = append(missing, f)
		}
	}
	if len(missing) > 0 {
		problems = append(problems, fmt.Sprintf("files the workload holds open are missing on %s: %s", t.Host, strings.Join(missing, ", ")))
	}
	if lack := missingFlags(req.Source.CPUFlags, caps.CPUFlags); len(lack) > 0 {
		problems = append(problems, fmt.Sprintf("%s's CPU lacks features the workload may use: %s", t.Host, strings.Join(lack, " ")))
	}
	for _, v := range req.Workload.VIPs {
		if t.VIPs == nil {
			problems = append(problems, "service addresses are not supported on "+t.Host)
			break
		}
		if err := t.VIPs.Check(v); err != nil {
			problems = append(problems, err.Error())
		}
	}
	if len(problems) > 0 {
		return fmt.Errorf("%w: %s", ErrPreflight, strings.Join(problems, "; "))
	}
	return nil
}

func missingFlags(src, dst []string) []string {
	var out []string
	for _, f := range src {
		if !slices.Contains(dst, f) {
			out = append(out, f)
		}
	}
	return out
}

// SendImages receives the non-memory images of a migration (see ReadImages).
func (t *Target) SendImages(ctx context.Context, id string, r io.Reader) (Received, error) {
	in, err := t.get(id)
	if err != nil {
		return Received{}, err
	}
	defer t.put(in)
	if in.images {
		return Received{}, fmt.Errorf("%w: images of %s already received", ErrBadImages, id)
	}
	lim := t.Limits
	if lim.MaxFiles == 0 {
		lim = DefaultLimits
	}
	files, n, err := ReadImages(r, in.cur, lim)
	if err != nil {
		return Received{}, fmt.Errorf("images of %s: %w", id, err)
	}
	in.images = true
	if in.req.Strategy == PostCopy && in.lazyEnd != nil {
		// This CRIU's lazy-pages daemon reads the images as it starts: start it
		// now, while the source hands over the service addresses and asks for the
		// restore.
		t.startLazyPages(in)
	}
	return Received{Files: files, Bytes: n}, nil
}

// startLazyPages starts post-copy's lazy-pages daemon on in.cur and the page channel's
// CRIU end; Restore waits for it on in.lazyStart.
func (t *Target) startLazyPages(in *incoming) {
	in.lazyStart = make(chan lazyStarted, 1)
	go func(conn *os.File, ch chan<- lazyStarted) {
		lp, err := t.Engine.StartLazyPages(context.Background(), checkpoint.LazyPagesOptions{ImagesDir: in.cur, Conn: conn, HoldBackground: true})
		conn.Close()
		ch <- lazyStarted{lp, err}
	}(in.lazyEnd, in.lazyStart)
	in.lazyEnd = nil
}

// RestoreImages implements Destination.
func (t *Target) RestoreImages(ctx context.Context, id string, r io.Reader) (RestoreResponse, error) {
	resp, release, err := t.restoreImages(ctx, id, r)
	release()
	return resp, err
}

// restoreImages is RestoreImages, except that after a post-copy restore the
// lazy-pages daemon fetches no page the copy did not ask for until the caller
// calls release (never nil), once it has answered the source: the background
// transfer takes both CPUs, and the answer and the first requests to the
// restored service are still inside the downtime.
func (t *Target) restoreImages(ctx context.Context, id string, r io.Reader) (RestoreResponse, func(), error) {
	if _, err := t.SendImages(ctx, id, r); err != nil {
		if errors.Is(err, ErrBadImages) || errors.Is(err, ErrNoMigration) {
			return RestoreResponse{}, func() {}, err
		}
		return RestoreResponse{}, func() {}, fmt.Errorf("%w: %w", ErrRestoreFailed, err)
	}
	return t.restore(ctx, id)
}

// Restore brings the service addresses up, restores the workload from the images
// SendImages received, and then announces the addresses. A failure it cleaned up
// after is ErrRestoreFailed.
func (t *Target) Restore(ctx context.Context, id string) (RestoreResponse, error) {
	resp, release, err := t.restore(ctx, id)
	release()
	return resp, err
}

// restore is Restore with the background transfer held (see restoreImages).
func (t *Target) restore(ctx context.Context, id string) (_ RestoreResponse, release func(), _ error) {
	release = func() {}
	in, err := t.get(id)
	if err != nil {
		return RestoreResponse{}, release, err
	}
	defer t.put(in)
	if !in.images {
		return RestoreResponse{}, release, fmt.Errorf("%w: %s: no images received", ErrRestoreFailed, id)
	}
	if in.restored {
		return RestoreResponse{}, release, fmt.Errorf("migration %s: already restored", id)
	}
	began := time.Now()
	var resp RestoreResponse
	postCopy := in.req.Strategy == PostCopy
	lazy := postCopy || t.lazyLocal(ctx)
	if postCopy {
		if in.lazyStart == nil {
			return RestoreResponse{}, release, fmt.Errorf("%w: %s: no lazy-pages daemon", ErrRestoreFailed, id)
		}
		var st lazyStarted
		select {
		case st = <-in.lazyStart:
			in.lazyStart = nil
		case <-ctx.Done():
			return RestoreResponse{}, release, fmt.Errorf("%w: %s: waiting for the lazy-pages daemon: %w", ErrRestoreFailed, id, ctx.Err())
		}
		resp.LazyStartMS = ms(time.Since(began)) // what the wait added
		if st.err != nil {
			return RestoreResponse{}, release, fmt.Errorf("%w: %s: %w", ErrRestoreFailed, id, st.err)
		}
		in.lazy = st.lp
	} else {
		// The page server ends when the dump closes its connection.
		if in.ps == nil {
			return RestoreResponse{}, release, fmt.Errorf("%w: %s: no page server received the memory", ErrRestoreFailed, id)
		}
		wctx, cancel := context.WithTimeout(ctx, 30*time.Second)
		err = in.ps.Wait(wctx)
		cancel()
		if err != nil {
			return RestoreResponse{}, release, fmt.Errorf("%w: %s: page server still waiting for memory: %w", ErrRestoreFailed, id, err)
		}
		if lazy {
			// Every page is here already; the copy starts before they are all in
			// place, and a local lazy-pages daemon fills them in from the images.
			ls := time.Now()
			lp, err := t.Engine.StartLazyPages(ctx, checkpoint.LazyPagesOptions{ImagesDir: in.cur})
			resp.LazyStartMS = ms(time.Since(ls))
			if err != nil {
				return RestoreResponse{}, release, fmt.Errorf("%w: %s: %w", ErrRestoreFailed, id, err)
			}
			in.lazy = lp
		}
	}

	rec, res, err := t.Workloads.Restore(ctx, workload.RestoreOptions{Dir: in.cur, BeforeRestore: func(rec workload.Record) error {
		start := time.Now()
		for _, v := range rec.VIPs {
			if err := t.VIPs.Add(ctx, v); err != nil {
				return fmt.Errorf("service address %s: %w", v, err)
			}
			in.vips = append(in.vips, v)
		}
		resp.VIPAddMS = ms(time.Since(start))
		return nil
	}, LazyPages: lazy, DumpedElsewhere: true, Prepared: in.prepared})
	if err != nil {
		t.removeVIPs(in)
		if in.lazy != nil {
			in.lazy.Stop()
			in.lazy = nil
		}
		return RestoreResponse{}, release, fmt.Errorf("%w: %w", ErrRestoreFailed, err)
	}
	in.restored = true
	resp.Lazy = lazy
	if !postCopy {
		in.reserve.free() // every page is here
	}
	if lazy {
		// The copy runs while its memory arrives. Should the transfer fail, the
		// missing pages would read as zeroes: stop the copy rather than let it run
		// on corrupt memory.
		in.lazyDone = make(chan error, 1)
		go func(lp *checkpoint.LazyPages, name string) {
			err := lp.Wait(context.Background())
			if err != nil {
				t.log().WithError(err).WithField("workload", name).Error("post-copy transfer failed; stopping the incomplete copy")
				_ = t.Workloads.Abandon(name)
			}
			in.lazyDone <- err
		}(in.lazy, rec.Name)
	}
	start := time.Now()
	for _, v := range rec.VIPs {
		if err := t.VIPs.Announce(ctx, v); err != nil {
			t.log().WithError(err).WithField("vip", v).Warn("announcing service address")
		}
	}
	resp.AnnounceMS = ms(time.Since(start))
	if postCopy {
		go in.reserve.resume() // the memory follows now, outside the downtime
	}
	resp.Workload = rec
	resp.RestoreMS = ms(res.RestoreTime)
	resp.RestoreWallMS = ms(res.Wall)
	resp.WallMS = ms(time.Since(began))
	t.log().WithFields(logrus.Fields{"migration": id, "workload": rec.Name, "pid": rec.Pid, "restore_ms": resp.RestoreMS}).Info("restored incoming workload")
	if lp := in.lazy; lp != nil {
		release = lp.StartBackground
	}
	return resp, release, nil
}

func (t *Target) removeVIPs(in *incoming) {
	for _, v := range in.vips {
		if err := t.VIPs.Remove(context.Background(), v); err != nil {
			t.log().WithError(err).WithField("vip", v).Warn("removing service address")
		}
	}
	in.vips = nil
}

// Commit implements Destination.
func (t *Target) Commit(ctx context.Context, id string) error {
	in, err := t.get(id)
	if err != nil {
		return err
	}
	if !in.restored {
		t.put(in)
		return fmt.Errorf("commit %s: nothing was restored", id)
	}
	if in.lazyDone != nil {
		// Post-copy commits once every page arrived.
		select {
		case err := <-in.lazyDone:
			in.lazyDone <- err
			if err != nil {
				t.put(in)
				return fmt.Errorf("commit %s: the post-copy transfer failed: %w", id, err)
			}
		case <-ctx.Done():
			t.put(in)
			return ctx.Err()
		}
	}
	in.vips = nil // they belong to the workload now
	t.drop(in)
	t.log().WithField("migration", id).Info("migration committed")
	return nil
}

// Abort implements Destination.
func (t *Target) Abort(ctx context.Context, id string) error {
	t.mu.Lock()
	in, ok := t.m[id]
	t.mu.Unlock()
	if !ok {
		return nil
	}
	var errs []error
	if in.lazy != nil {
		in.lazy.Stop()
	}
	if in.restored {
		if err := t.Workloads.Abandon(in.req.Workload.Name); err != nil {
			errs = append(errs, err)
		}
		in.vips = nil // Abandon took them down with the workload
	}
	t.removeVIPs(in)
	t.drop(in)
	t.log().WithField("migration", id).Info("migration aborted")
	return errors.Join(errs...)
}

// Sweep aborts the migrations that were prepared longer than StaleAfter ago and
// never restored: their page servers, daemons and images go. It returns their ids.
// A restored migration is never swept: its copy may be the only live one.
func (t *Target) Sweep(ctx context.Context) []string {
	stale := t.StaleAfter
	if stale == 0 {
		stale = 10 * time.Minute
	}
	t.mu.Lock()
	var ids []string
	for id, in := range t.m {
		if !in.restored && !in.busy && time.Since(in.created) > stale {
			ids = append(ids, id)
		}
	}
	t.mu.Unlock()
	for _, id := range ids {
		t.log().WithField("migration", id).Warn("aborting a stale incoming migration")
		_ = t.Abort(ctx, id)
	}
	return ids
}

// Pending lists the migrations this host is receiving.
func (t *Target) Pending() []string {
	t.mu.Lock()
	defer t.mu.Unlock()
	ids := make([]string, 0, len(t.m))
	for id := range t.m {
		ids = append(ids, id)
	}
	return ids
}

// drop forgets a migration and removes its page server and images.
func (t *Target) drop(in *incoming) {
	if in.ps != nil {
		_ = in.ps.Stop()
	}
	if in.tunnel != nil {
		in.tunnel.Close()
	}
	if in.lazyEnd != nil {
		in.lazyEnd.Close()
	}
	if in.lazy != nil && in.lazyDone == nil {
		in.lazy.Stop()
	}
	if in.lazyStart != nil {
		if st := <-in.lazyStart; st.lp != nil {
			st.lp.Stop()
		}
	}
	in.prepared.Close() // a no-op once a restore took it
	in.reserve.free()
	_ = os.RemoveAll(in.dir)
	t.mu.Lock()
	delete(t.m, in.req.ID)
	t.mu.Unlock()
}

// HostCapabilities collects this host's capabilities for Target.Caps and the source.
func HostCapabilities(ctx context.Context, host string, eng *checkpoint.Engine) (Capabilities, error) {
	c := Capabilities{Host: host, Features: map[string]bool{}, Implemented: implemented}
	v, err := eng.Version(ctx)
	if err != nil {
		return c, err
	}
	c.CRIU = v.String()
	for _, f := range []string{checkpoint.FeatureMemDirtyTrack, checkpoint.FeatureUFFDNonCoop, checkpoint.FeatureNFTablesLock} {
		ok, err := eng.HasFeature(ctx, f)
		if err != nil {
			return c, err
		}
		c.Features[f] = ok
	}
	c.CPUFlags = cpuFlags()
	c.MemAvailable = memAvailable()
	return c, nil
}

func cpuFlags() []string {
	f, err := os.Open("/proc/cpuinfo")
	if err != nil {
		return nil
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if k, v, ok := strings.Cut(sc.Text(), ":"); ok && strings.TrimSpace(k) == "flags" {
			return strings.Fields(v)
		}
	}
	return nil
}

func memAvailable() uint64 {
	f, err := os.Open("/proc/meminfo")
	if err != nil {
		return 0
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), "MemAvailable:"); ok {
			kb, _ := strconv.ParseUint(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
			return kb << 10
		}
	}
	return 0
}
