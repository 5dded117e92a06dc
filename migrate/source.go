package migrate

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/duplex-ha/duplex/checkpoint"
	"github.com/duplex-ha/duplex/internal/workload"
)

// LocalWorkloads is what the source needs of the host's workload manager.
type LocalWorkloads interface {
	Get(name string) (workload.Record, error)
	Checkpoint(ctx context.Context, name string, o workload.CheckpointOptions) (*checkpoint.DumpStats, error)
	Resume(name string) (workload.Record, error)
	Discard(name, to string) (workload.Record, error)
}

// Source is the sending end of migrations on this host.
type Source struct {
	Host      string
	WorkDir   string // where the dump's non-memory images go before they are sent (tmpfs is best)
	Workloads LocalWorkloads
	VIPs      workload.VIPController
	Caps      func(ctx context.Context) (Capabilities, error)
	// Precopy is pre-copy's stop rule; the zero value means DefaultPrecopyRule.
	Precopy PrecopyRule
	Log     *logrus.Entry
}

// PreDumper is what pre-copy needs of the host's workload manager besides
// LocalWorkloads.
type PreDumper interface {
	PreDump(ctx context.Context, name string, o workload.PreDumpOptions) (*checkpoint.DumpStats, error)
}

// Request asks to move one workload.
type Request struct {
	Workload string
	To       string // the destination host's name, for records and messages
	Strategy Strategy
	// NoReplay leaves the packets that arrive while the workload is frozen to
	// their senders' retransmission instead of holding and replaying them.
	NoReplay bool
}

// Phases of a migration, in order, as Progress reports them.
const (
	PhasePreflight = "preflight"
	PhasePrecopy   = "precopy"     // pre-copy: memory moves in rounds while the workload runs
	PhaseFreeze    = "freeze+dump" // frozen; memory streams to the destination's page server
	PhaseImages    = "images"      // the rest of the images travel
	PhaseRestore   = "restore"     // VIP ready, restore, VIP announced on the destination
	PhasePages     = "pages"       // post-copy: the copy runs, memory follows
	PhaseCommit    = "commit"
	PhaseRollback  = "rollback"
	PhaseDone      = "done"
)

// Progress is reported as a migration advances.
type Progress struct {
	Workload string        `json:"workload"`
	Phase    string        `json:"phase"`
	Elapsed  time.Duration `json:"elapsed"`
	Bytes    int64         `json:"bytes"` // moved so far
	Message  string        `json:"message,omitempty"`
}

// Result summarises a migration.
type Result struct {
	ID       string   `json:"id"`
	Workload string   `json:"workload"`
	From     string   `json:"from"`
	To       string   `json:"to"`
	Strategy Strategy `json:"strategy"`
	// FrozenMS is CRIU's frozen time on the source (dump).
	FrozenMS float64 `json:"frozen_ms"`
	// DowntimeMS runs from the freeze to the restored copy running on the
	// destination with its service addresses announced.
	DowntimeMS float64 `json:"downtime_ms"`
	TotalMS    float64 `json:"total_ms"`
	// PageBytes went through the page server, ImageBytes through the image stream.
	PageBytes  int64 `json:"page_bytes"`
	ImageBytes int64 `json:"image_bytes"`
	// Destination figures.
	RestoreMS float64 `json:"restore_ms"`
	VIPAddMS  float64 `json:"vip_add_ms"`
	// AnnounceMS runs from the restore's end to the first announcement of the
	// service addresses on the destination (they answer from then on).
	AnnounceMS float64 `json:"announce_ms"`
	// LazyRestore means the copy ran on the destination while its memory was still
	// being filled in there (the downtime then does not include moving it in).
	LazyRestore bool `json:"lazy_restore,omitempty"`
	// Rounds are pre-copy's pre-dump rounds, before the freeze.
	Rounds []Round `json:"rounds,omitempty"`
	// Held counts the packets for the service addresses that arrived at the source
	// between the freeze and the handover; Replayed those the destination's stack
	// took afterwards (see PacketHolder).
	Held     int `json:"held,omitempty"`
	Replayed int `json:"replayed,omitempty"`
	// Downtime splits DowntimeMS into its steps, in order (see Part).
	Downtime []Part `json:"downtime,omitempty"`
	// Phases holds each phase's duration in milliseconds.
	Phases map[string]float64 `json:"phases"`
	Pid    int                `json:"pid"` // the workload's root on the destination
}

// Part is one step of a migration's downtime. The steps are, in order: "dump"
// (CRIU on the source, from seizing the tree until its memory is sent or, for
// post-copy, ready to be served), "release" (service addresses removed from the
// source), "images" (the rest of the image stream: most files went while CRIU
// wrote them), then on the destination "lazy-pages" (its lazy-pages daemon
// started), "addresses" (service addresses added), "restore" (the CRIU restore
// call), "announce" (first announcement sent), "bookkeeping" (the rest of the
// destination's restore) and "agent" (the stream's end reaching the destination
// and the answer coming back).
type Part struct {
	Name string  `json:"name"`
	MS   float64 `json:"ms"`
}

// Round is one pre-dump round of a pre-copy migration.
type Round struct {
	Pages uint64  `json:"pages"` // pages the round sent (changed since the round before)
	Bytes int64   `json:"bytes"` // bytes through the page channel
	MS    float64 `json:"ms"`    // the round's wall time
	// FrozenMS is how long the round stopped the workload to collect its pages.
	FrozenMS float64 `json:"frozen_ms"`
}

func newID(name string) string {
	b := make([]byte, 4)
	_, _ = rand.Read(b)
	return name + "-" + time.Now().UTC().Format("20060102T150405") + "-" + hex.EncodeToString(b)
}

func (s *Source) log() *logrus.Entry {
	if s.Log == nil {
		l := logrus.New()
		l.SetOutput(io.Discard)
		return logrus.NewEntry(l)
	}
	return s.Log
}

// Migrate moves a running workload to dst. Whatever fails, exactly one live copy
// remains: before the destination's restore succeeded the source is resumed
// (rollback); after it, the source is discarded (commit). When the destination's
// answer is lost and it cannot be reached to cancel, the source stays frozen and the
// error matches ErrOutcomeUnknown.
func (s *Source) Migrate(ctx context.Context, dst Destination, req Request, progress func(Progress)) (*Result, error) {
	start := time.Now()
	res := &Result{ID: newID(req.Workload), Workload: req.Workload, From: s.Host, To: req.To, Phases: map[string]float64{}}
	phaseStart := start
	phase := PhasePreflight
	var pmu sync.Mutex // progress is called from the page channel's ticker too
	emit := func(p Progress) {
		pmu.Lock()
		defer pmu.Unlock()
		if progress != nil {
			progress(p)
		}
	}
	var current atomic.Value // the phase, for the page channel's ticker
	current.Store(PhasePreflight)
	report := func(next string, bytes int64, msg string) {
		res.Phases[phase] += ms(time.Since(phaseStart))
		phase, phaseStart = next, time.Now()
		current.Store(next)
		emit(Progress{Workload: req.Workload, Phase: next, Elapsed: time.Since(start), Bytes: bytes, Message: msg})
	}
	emit(Progress{Workload: req.Workload, Phase: PhasePreflight})
	log := s.log().WithFields(logrus.Fields{"workload": req.Workload, "to": req.To, "migration": res.ID})

	// Pre-flight: nothing is frozen until both ends agreed.
	rec, err := s.Workloads.Get(req.Workload)
	if err != nil {
		return nil, err
	}
	if rec.State != workload.Running {
		return nil, fmt.Errorf("migrate %s: %w (it is %s)", rec.Name, workload.ErrNotRunning, rec.State)
	}
	if rec.Pinned {
		return nil, fmt.Errorf("migrate %s: %w: it is pinned to %s", rec.Name, ErrPreflight, s.Host)
	}
	srcCaps, err := s.Caps(ctx)
	if err != nil {
		return nil, fmt.Errorf("migrate %s: capabilities of %s: %w", rec.Name, s.Host, err)
	}
	dstCaps, err := dst.Capabilities(ctx)
	if err != nil {
		return nil, fmt.Errorf("migrate %s: reach %s: %w", rec.Name, req.To, err)
	}
	files, mem := treeFilesAndMemory(rec.Pid)
	strategy, err := Choose(req.Strategy, srcCaps, dstCaps, mem)
	if err != nil {
		return nil, fmt.Errorf("migrate %s: %w", rec.Name, err)
	}
	res.Strategy = strategy
	// The destination sets the workload's memory aside before answering: at 2 GiB
	// that can take seconds, so say what is going on.
	emit(Progress{Workload: req.Workload, Phase: PhasePreflight, Elapsed: time.Since(start),
		Message: fmt.Sprintf("strategy %s; %s prepares for %d MiB", strategy, req.To, mem>>20)})
	prep, err := dst.Prepare(ctx, PrepareRequest{ID: res.ID, Workload: rec, Strategy: strategy, Source: srcCaps, OpenFiles: files, Memory: mem})
	if err != nil {
		return nil, fmt.Errorf("migrate %s to %s: %w", rec.Name, req.To, err)
	}
	log.WithFields(logrus.Fields{"page_server": prep.PageServer, "reserved_mib": prep.Reserved >> 20}).Debug("destination prepared")
	dir := filepath.Join(s.WorkDir, res.ID)
	defer os.RemoveAll(dir)

	// Pre-copy: memory moves in rounds while the workload runs, each round only
	// what changed since the one before, until the stop rule says the rest is small
	// or no longer shrinks. The final dump below then sends only that rest.
	var parent string
	if strategy == PreCopy {
		rounds := filepath.Join(s.WorkDir, res.ID+".pre")
		defer os.RemoveAll(rounds)
		report(PhasePrecopy, 0, fmt.Sprintf("%d MiB resident", mem>>20))
		parent, err = s.precopy(ctx, dst, rec.Name, res, rounds, func(n int64, msg string) {
			emit(Progress{Workload: req.Workload, Phase: PhasePrecopy, Elapsed: time.Since(start), Bytes: n, Message: msg})
		})
		if err != nil {
			// A pre-dump leaves the workload running: nothing to roll back here.
			_ = dst.Abort(context.WithoutCancel(ctx), res.ID)
			return nil, fmt.Errorf("migrate %s (still running on %s): %w", rec.Name, s.Host, err)
		}
	}

	// The images travel as CRIU writes them, through one request that restores on
	// the destination as soon as the last of them arrived: after the dump, only its
	// last files, the manifest and the restore are left inside the downtime.
	if err := os.MkdirAll(dir, 0o700); err != nil {
		_ = dst.Abort(context.WithoutCancel(ctx), res.ID)
		return nil, fmt.Errorf("migrate %s: %w", rec.Name, err)
	}
	imgs, err := startImageStream(dir)
	if err != nil {
		_ = dst.Abort(context.WithoutCancel(ctx), res.ID)
		return nil, fmt.Errorf("migrate %s: %w", rec.Name, err)
	}
	defer imgs.abort(nil) // a no-op once the stream ended

	// The page channel: CRIU speaks the page-server protocol on one end of a socket
	// pair, we carry the other end's bytes to the destination's page server.
	pages, err := dst.Pages(ctx, res.ID)
	if err != nil {
		_ = dst.Abort(context.WithoutCancel(ctx), res.ID)
		return nil, fmt.Errorf("migrate %s: open the page channel to %s: %w", rec.Name, req.To, err)
	}
	criuEnd, tunnel, err := carry(pages)
	if err != nil {
		_ = dst.Abort(context.WithoutCancel(ctx), res.ID)
		return nil, fmt.Errorf("migrate %s: %w", rec.Name, err)
	}
	call := restoreImages(ctx, dst, res.ID, imgs)
	// dropImages ends the stream without a manifest (nothing is restored there) and
	// waits for the request to end, before the destination is told to abort.
	dropImages := func(cause error) {
		imgs.abort(cause)
		call.wait()
	}

	// Freeze and dump. Stop-and-copy streams the memory to the destination while
	// CRIU dumps it; post-copy leaves it here, served to the destination on demand
	// once the copy runs there.
	report(PhaseFreeze, res.PageBytes, fmt.Sprintf("strategy %s, %d MiB resident", strategy, mem>>20))
	held := &holding{done: true}
	if !req.NoReplay {
		held = s.hold(rec, log)
	}
	defer held.drop()
	freeze := time.Now()
	var started atomic.Int64 // when CRIU started, in Unix nanoseconds
	criuStarted := func(t time.Time) { started.Store(t.UnixNano()) }
	seize := checkpoint.WatchSeize(rec.Pid)
	defer seize.Seized()
	moved := res.PageBytes // by pre-copy's rounds
	stopTicker := tunnel.tick(func(n int64) {
		emit(Progress{Workload: req.Workload, Phase: current.Load().(string), Elapsed: time.Since(start), Bytes: moved + n})
	})
	defer stopTicker()
	postCopy := strategy == PostCopy
	var dumpEnd time.Time      // the memory sent, or ready to be served
	var dumped chan dumpResult // post-copy: the lazy dump's end, after the last page
	if postCopy {
		ready := make(chan struct{})
		dumped = make(chan dumpResult, 1)
		go func() {
			// Left stopped, not killed, after the last page: only the destination knows
			// whether every page arrived, and until it says so this is the one
			// complete copy.
			st, err := s.Workloads.Checkpoint(context.WithoutCancel(ctx), rec.Name, workload.CheckpointOptions{
				Dir: dir, LeaveStopped: true, TCPEstablished: true, NetworkLock: checkpoint.LockNFTables,
				PageServerConn: criuEnd, LazyConn: true, Ready: func() { close(ready) }, Started: criuStarted,
			})
			criuEnd.Close()
			dumped <- dumpResult{st, err}
		}()
		select {
		case <-ready:
			dumpEnd = time.Now()
		case r := <-dumped:
			dumped <- r
			_ = tunnel.wait(10 * time.Second)
			dropImages(r.err)
			_ = dst.Abort(context.WithoutCancel(ctx), res.ID)
			s.unlockResumed(rec, dir)
			return nil, fmt.Errorf("migrate %s: %w", rec.Name, r.err)
		}
	} else {
		st, err := s.Workloads.Checkpoint(ctx, rec.Name, workload.CheckpointOptions{
			Dir: dir, LeaveStopped: true, TCPEstablished: true, NetworkLock: checkpoint.LockNFTables,
			PageServerConn: criuEnd, ParentDir: parent, Started: criuStarted,
		})
		criuEnd.Close()
		dumpEnd = time.Now()
		if terr := tunnel.wait(10 * time.Second); err == nil && terr != nil {
			// The dump itself succeeded: the tree is frozen and must resume.
			dropImages(terr)
			_ = dst.Abort(context.WithoutCancel(ctx), res.ID)
			_, _ = s.Workloads.Resume(rec.Name)
			return nil, fmt.Errorf("migrate %s (rolled back, still running on %s): page channel: %w", rec.Name, s.Host, terr)
		}
		if err != nil {
			// CRIU resumed the tree itself; the destination has nothing to undo but its page server.
			dropImages(err)
			_ = dst.Abort(context.WithoutCancel(ctx), res.ID)
			return nil, fmt.Errorf("migrate %s: %w", rec.Name, err)
		}
		res.FrozenMS = ms(st.FrozenTime)
		res.PageBytes += tunnel.bytes()
	}

	// From here on, any failure before the restore succeeded rolls back.
	vipsDown := false
	rollback := func(cause error) (*Result, error) {
		report(PhaseRollback, res.PageBytes+res.ImageBytes, cause.Error())
		rctx := context.WithoutCancel(ctx)
		var errs []error
		resume := func() { // Resume also brings the service addresses back
			if _, err := s.Workloads.Resume(rec.Name); err != nil {
				errs = append(errs, err)
			}
		}
		if !postCopy {
			resume()
		} else {
			// Cancelling the destination ends the lazy dump. Had it served every page,
			// the tree is frozen; had it failed, CRIU resumed the tree but left its
			// connections locked.
			select {
			case r := <-dumped:
				dumped <- r
				if r.err == nil {
					resume()
					break
				}
				if vipsDown {
					for _, v := range rec.VIPs {
						if err := s.VIPs.Add(rctx, v); err != nil {
							errs = append(errs, fmt.Errorf("restore service address %s: %w", v, err))
						}
					}
				}
				s.unlockResumed(rec, dir)
				if vipsDown {
					for _, v := range rec.VIPs {
						_ = s.VIPs.Announce(rctx, v)
					}
				}
			case <-time.After(30 * time.Second):
				errs = append(errs, errors.New("the lazy dump did not end"))
			}
		}
		if n := held.replay(s.VIPs); n > 0 {
			log.WithField("packets", n).Info("replayed the packets held during the freeze to the resumed source")
		}
		log.WithError(cause).Warn("migration rolled back; workload resumed on the source")
		if len(errs) > 0 {
			return nil, fmt.Errorf("migrate %s: %w; rollback: %w", rec.Name, cause, errors.Join(errs...))
		}
		return nil, fmt.Errorf("migrate %s (rolled back, still running on %s): %w", rec.Name, s.Host, cause)
	}

	// The address leaves the source before the destination takes it: never two
	// owners. The destination restores as soon as the image stream ends, so the
	// addresses go first.
	report(PhaseImages, res.PageBytes, "")
	for _, v := range rec.VIPs {
		vipsDown = true
		if err := s.VIPs.Remove(ctx, v); err != nil {
			dropImages(err)
			_ = dst.Abort(context.WithoutCancel(ctx), res.ID)
			return rollback(fmt.Errorf("release service address %s: %w", v, err))
		}
	}
	released := time.Now()
	res.ImageBytes, err = imgs.finish()
	if err != nil {
		call.wait()
		_ = dst.Abort(context.WithoutCancel(ctx), res.ID)
		return rollback(fmt.Errorf("send images: %w", err))
	}
	imagesEnd := time.Now()
	report(PhaseRestore, res.PageBytes+res.ImageBytes, "")
	rr, err := call.wait()
	if err != nil {
		if errors.Is(err, ErrRestoreFailed) || errors.Is(err, ErrBadImages) {
			_ = dst.Abort(context.WithoutCancel(ctx), res.ID)
			return rollback(err)
		}
		// The answer was lost: the copy may run there. Cancel it before resuming here.
		if aerr := abortWithRetry(context.WithoutCancel(ctx), dst, res.ID); aerr != nil {
			log.WithError(err).Error("migration outcome unknown; workload left frozen on the source")
			return nil, fmt.Errorf("migrate %s: %w: restore on %s: %w; cancel: %w; the workload stays frozen on %s until resolved",
				rec.Name, ErrOutcomeUnknown, req.To, err, aerr, s.Host)
		}
		return rollback(err)
	}
	// The tree stopped when CRIU seized it, after CRIU had started and probed the
	// kernel. Two moments are known to come before: the watch saw the tree last
	// running untraced (late if the watcher was short of CPU), and CRIU's log says
	// when, counted from CRIU's start, it was about to seize. Counting from the
	// later of the two never counts less than the real downtime.
	if before, ok := seize.Seized(); ok && before.After(freeze) {
		freeze = before
	}
	if st := started.Load(); st != 0 {
		if off, ok := checkpoint.SeizeStart(filepath.Join(dir, checkpoint.DumpLog)); ok {
			if t := time.Unix(0, st).Add(off); t.After(freeze) && t.Before(time.Now()) {
				freeze = t
			}
		}
	}
	restored := time.Now()
	res.Held, res.Replayed = held.send(ctx, dst, res.ID, log)
	res.DowntimeMS = ms(restored.Sub(freeze))
	res.Downtime = downtimeParts(freeze, dumpEnd, released, imagesEnd, restored, rr)
	res.RestoreMS = rr.RestoreWallMS
	res.VIPAddMS = rr.VIPAddMS
	res.AnnounceMS = rr.AnnounceMS
	res.Pid = rr.Workload.Pid
	res.LazyRestore = rr.Lazy

	if postCopy {
		// The copy runs on the destination; its memory follows from the frozen source.
		report(PhasePages, tunnel.bytes(), "the workload runs on "+req.To+"; memory follows")
		r := <-dumped
		dumped <- r
		res.PageBytes = tunnel.bytes()
		res.FrozenMS = ms(time.Since(freeze)) // frozen here until the last page left
		if r.err == nil {
			// Every page left; the destination says whether every page arrived.
			report(PhaseCommit, res.PageBytes+res.ImageBytes, "")
			if err := dst.Commit(context.WithoutCancel(ctx), res.ID); err != nil {
				// The tree is frozen here; the copy there may run.
				return s.cancelOrHold(ctx, dst, rec, req, res.ID, rollback,
					fmt.Errorf("post-copy: the destination did not confirm every page (its copy is stopped; its clients' connections may have been reset): %w", err))
			}
		}
		if r.err != nil {
			// The copy there lacks pages: the destination stops it, ours resumes.
			_ = abortWithRetry(context.WithoutCancel(ctx), dst, res.ID)
			return rollback(fmt.Errorf("post-copy transfer failed after the copy started on %s (stopped there; its clients' connections may have been reset): %w", req.To, r.err))
		}
		if _, err := s.Workloads.Discard(rec.Name, req.To); err != nil {
			log.WithError(err).Warn("discarding the migrated source")
		}
		res.TotalMS = ms(time.Since(start))
		report(PhaseDone, res.PageBytes+res.ImageBytes, "")
		log.WithFields(logrus.Fields{"downtime_ms": res.DowntimeMS, "bytes": res.PageBytes + res.ImageBytes}).Info("workload migrated (post-copy)")
		return res, nil
	} else if rr.Lazy {
		// The copy runs; the destination fills its memory in from the images it
		// holds. Until every page is in place the frozen source stays the complete copy.
		report(PhasePages, res.PageBytes+res.ImageBytes, "the workload runs on "+req.To+"; its memory fills in there")
		if err := dst.Commit(context.WithoutCancel(ctx), res.ID); err != nil {
			return s.cancelOrHold(ctx, dst, rec, req, res.ID, rollback,
				fmt.Errorf("filling in the memory failed after the copy started on %s (stopped there; its clients' connections may have been reset): %w", req.To, err))
		}
		report(PhaseCommit, res.PageBytes+res.ImageBytes, "")
		if _, err := s.Workloads.Discard(rec.Name, req.To); err != nil {
			log.WithError(err).Warn("discarding the migrated source")
		}
		res.TotalMS = ms(time.Since(start))
		report(PhaseDone, res.PageBytes+res.ImageBytes, "")
		log.WithFields(logrus.Fields{"downtime_ms": res.DowntimeMS, "frozen_ms": res.FrozenMS, "bytes": res.PageBytes + res.ImageBytes}).Info("workload migrated")
		return res, nil
	} else {
		// Commit: the destination runs the workload; the frozen source goes.
		report(PhaseCommit, res.PageBytes+res.ImageBytes, "")
		if _, err := s.Workloads.Discard(rec.Name, req.To); err != nil {
			log.WithError(err).Warn("discarding the migrated source")
		}
	}
	if err := dst.Commit(context.WithoutCancel(ctx), res.ID); err != nil {
		log.WithError(err).Warn("destination did not acknowledge the commit")
	}
	res.TotalMS = ms(time.Since(start))
	report(PhaseDone, res.PageBytes+res.ImageBytes, "")
	log.WithFields(logrus.Fields{"downtime_ms": res.DowntimeMS, "frozen_ms": res.FrozenMS, "bytes": res.PageBytes + res.ImageBytes}).Info("workload migrated")
	return res, nil
}

// precopy runs the pre-dump rounds of a pre-copy migration in numbered
// directories under dir, each round's pages through a page channel of its own, and
// returns the last round's directory: the final dump's parent.
func (s *Source) precopy(ctx context.Context, dst Destination, name string, res *Result, dir string, progress func(int64, string)) (string, error) {
	pd, ok := s.Workloads.(PreDumper)
	if !ok {
		return "", fmt.Errorf("%w: precopy: this host's workload manager cannot pre-dump", ErrStrategyUnavailable)
	}
	rule := s.Precopy
	if rule.MaxRounds == 0 {
		rule = DefaultPrecopyRule
	}
	var written []uint64
	var parent string
	for rule.Continue(written) {
		if err := ctx.Err(); err != nil {
			return "", err
		}
		n := len(written) + 1
		roundDir := filepath.Join(dir, strconv.Itoa(n))
		start := time.Now()
		pages, err := dst.Pages(ctx, res.ID)
		if err != nil {
			return "", fmt.Errorf("pre-copy round %d: open the page channel: %w", n, err)
		}
		criuEnd, tunnel, err := carry(pages)
		if err != nil {
			return "", fmt.Errorf("pre-copy round %d: %w", n, err)
		}
		before := res.PageBytes
		progress(before, fmt.Sprintf("round %d", n))
		stop := tunnel.tick(func(b int64) { progress(before+b, "") })
		st, err := pd.PreDump(ctx, name, workload.PreDumpOptions{Dir: roundDir, ParentDir: parent, PageServerConn: criuEnd})
		criuEnd.Close()
		terr := tunnel.wait(10 * time.Second)
		stop()
		if err != nil {
			return "", fmt.Errorf("pre-copy round %d: %w", n, err)
		}
		if terr != nil {
			return "", fmt.Errorf("pre-copy round %d: page channel: %w", n, terr)
		}
		r := Round{Pages: st.PagesWritten, Bytes: tunnel.bytes(), MS: ms(time.Since(start)), FrozenMS: ms(st.FrozenTime)}
		res.Rounds = append(res.Rounds, r)
		res.PageBytes += r.Bytes
		written = append(written, st.PagesWritten)
		parent = roundDir
		progress(res.PageBytes, fmt.Sprintf("round %d: %d pages (%d MiB) in %.0f ms", n, r.Pages, r.Bytes>>20, r.MS))
		s.log().WithFields(logrus.Fields{"workload": name, "round": n, "pages": r.Pages, "bytes": r.Bytes, "ms": r.MS}).Info("pre-copy round")
	}
	return parent, nil
}

// cancelOrHold ends a migration whose copy already ran on the destination but did
// not commit, while the source is frozen: once the destination confirms it stopped
// its copy, the source resumes (rollback); if it cannot be reached, the source
// stays frozen and the error matches ErrOutcomeUnknown: never two live copies.
func (s *Source) cancelOrHold(ctx context.Context, dst Destination, rec workload.Record, req Request, id string,
	rollback func(error) (*Result, error), cause error) (*Result, error) {
	if err := abortWithRetry(context.WithoutCancel(ctx), dst, id); err != nil {
		s.log().WithError(cause).WithField("workload", rec.Name).Error("migration outcome unknown; workload left frozen on the source")
		return nil, fmt.Errorf("migrate %s: %w: %w; cancel on %s: %w; the workload stays frozen on %s until resolved",
			rec.Name, ErrOutcomeUnknown, cause, req.To, err, s.Host)
	}
	return rollback(cause)
}

// restoreCall is the request that carries the images and restores.
type restoreCall struct {
	done chan struct{}
	rr   RestoreResponse
	err  error
}

// restoreImages opens the request that streams imgs to the destination and
// restores there once the stream ended whole.
func restoreImages(ctx context.Context, dst Destination, id string, imgs *imageStream) *restoreCall {
	c := &restoreCall{done: make(chan struct{})}
	go func() {
		defer close(c.done)
		c.rr, c.err = dst.RestoreImages(ctx, id, imgs.r)
		// Had the request ended early, the stream's writes would wait forever.
		imgs.r.CloseWithError(errors.New("the restore request ended"))
	}()
	return c
}

func (c *restoreCall) wait() (RestoreResponse, error) {
	<-c.done
	return c.rr, c.err
}

// downtimeParts splits the downtime at the source's own timestamps and the
// destination's figures.
func downtimeParts(freeze, dumpEnd, released, imagesEnd, restored time.Time, rr RestoreResponse) []Part {
	dst := []Part{
		{"lazy-pages", rr.LazyStartMS},
		{"addresses", rr.VIPAddMS},
		{"restore", rr.RestoreWallMS},
		{"announce", rr.AnnounceMS},
	}
	local := rr.WallMS
	for _, p := range dst {
		local -= p.MS
	}
	dst = append(dst, Part{"bookkeeping", local}, Part{"agent", ms(restored.Sub(imagesEnd)) - rr.WallMS})
	parts := []Part{
		{"dump", ms(dumpEnd.Sub(freeze))},
		{"release", ms(released.Sub(dumpEnd))},
		{"images", ms(imagesEnd.Sub(released))},
	}
	for _, p := range dst {
		if p.MS != 0 || p.Name == "restore" {
			parts = append(parts, p)
		}
	}
	return parts
}

// holding is the capture of packets that arrive for a workload's addresses while
// it is frozen (see PacketHolder); its methods do nothing when there is none.
type holding struct {
	h    HeldPackets
	pkts [][]byte
	done bool
}

// hold starts holding packets for rec's addresses where the host can.
func (s *Source) hold(rec workload.Record, log *logrus.Entry) *holding {
	ph, ok := s.VIPs.(PacketHolder)
	if !ok || len(rec.VIPs) == 0 {
		return &holding{done: true}
	}
	h, err := ph.Hold(rec.VIPs)
	if err != nil {
		log.WithError(err).Warn("cannot hold the packets clients send during the freeze; they will be resent by their TCP")
		return &holding{done: true}
	}
	return &holding{h: h}
}

func (h *holding) stop() [][]byte {
	if !h.done {
		h.done = true
		h.pkts, _, _ = h.h.Stop()
	}
	return h.pkts
}

// send ends the capture and has the destination replay what it held.
func (h *holding) send(ctx context.Context, dst Destination, id string, log *logrus.Entry) (held, replayed int) {
	pkts := h.stop()
	h.pkts = nil // taken: not to be replayed here as well
	if len(pkts) == 0 {
		return 0, 0
	}
	n, err := dst.Replay(ctx, id, pkts)
	if err != nil {
		log.WithError(err).Warn("replaying the packets held during the freeze; their senders will resend them")
	}
	return len(pkts), n
}

// replay ends the capture and hands what it held to this host's stack (rollback).
func (h *holding) replay(vips workload.VIPController) int {
	pkts := h.stop()
	h.pkts = nil
	r, ok := vips.(PacketReplayer)
	if !ok || len(pkts) == 0 {
		return 0
	}
	n, _ := r.Replay(pkts)
	return n
}

// drop ends the capture, forgetting whatever it held.
func (h *holding) drop() { h.stop() }

type dumpResult struct {
	st  *checkpoint.DumpStats
	err error
}

// unlockResumed frees a tree that a failed lazy dump resumed with its connections
// still locked (CRIU unlocks only on a failure before the pages are served).
func (s *Source) unlockResumed(rec workload.Record, dir string) {
	if err := checkpoint.Rollback(rec.Pid, checkpoint.LockTableOf(dir)); err != nil {
		s.log().WithError(err).WithField("workload", rec.Name).Warn("unlocking the resumed source")
	}
}

func abortWithRetry(ctx context.Context, dst Destination, id string) error {
	var err error
	for i := 0; i < 5; i++ {
		actx, cancel := context.WithTimeout(ctx, 3*time.Second)
		err = dst.Abort(actx, id)
		cancel()
		if err == nil {
			return nil
		}
		time.Sleep(time.Duration(i+1) * 200 * time.Millisecond)
	}
	return err
}

// treeFilesAndMemory lists the regular files the tree rooted at pid holds open
// (paths that must exist on the destination) and its resident memory.
func treeFilesAndMemory(pid int) ([]string, uint64) {
	pids, err := checkpoint.TreePids(pid)
	if err != nil {
		return nil, 0
	}
	seen := map[string]bool{}
	var files []string
	var rss uint64
	for _, p := range pids {
		fds, _ := os.ReadDir(fmt.Sprintf("/proc/%d/fd", p))
		for _, fd := range fds {
			link, err := os.Readlink(fmt.Sprintf("/proc/%d/fd/%s", p, fd.Name()))
			if err != nil || !strings.HasPrefix(link, "/") || strings.HasSuffix(link, " (deleted)") ||
				strings.HasPrefix(link, "/proc/") || strings.HasPrefix(link, "/dev/") || seen[link] {
				continue
			}
			if st, err := os.Stat(link); err == nil && st.Mode().IsRegular() {
				seen[link] = true
				files = append(files, link)
			}
		}
		if b, err := os.ReadFile(fmt.Sprintf("/proc/%d/statm", p)); err == nil {
			var size, res uint64
			if _, err := fmt.Sscan(string(b), &size, &res); err == nil {
				rss += res * uint64(os.Getpagesize())
			}
		}
	}
	return files, rss
}
