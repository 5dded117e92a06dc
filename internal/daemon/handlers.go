package daemon

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"strconv"
	"sync"
	"time"

	"github.com/sirupsen/logrus"
	"golang.org/x/sys/unix"

	"github.com/duplex-ha/duplex/checkpoint"
	"github.com/duplex-ha/duplex/cluster"
	"github.com/duplex-ha/duplex/internal/api"
	"github.com/duplex-ha/duplex/internal/workload"
	"github.com/duplex-ha/duplex/migrate"
)

// maxBody bounds request bodies.
const maxBody = 1 << 20

func (d *Daemon) routes() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /v1/info", d.info)
	mux.HandleFunc("GET /v1/workloads", d.list)
	mux.HandleFunc("POST /v1/workloads", d.run)
	mux.HandleFunc("GET /v1/workloads/{name}", d.get)
	mux.HandleFunc("DELETE /v1/workloads/{name}", d.remove)
	mux.HandleFunc("POST /v1/workloads/{name}/stop", d.stop)
	mux.HandleFunc("POST /v1/workloads/{name}/checkpoint", d.checkpoint)
	mux.HandleFunc("POST /v1/workloads/{name}/resume", d.resume)
	mux.HandleFunc("GET /v1/workloads/{name}/logs", d.logs)
	mux.HandleFunc("POST /v1/restore", d.restore)
	mux.HandleFunc("GET /v1/hosts", d.hosts)
	mux.HandleFunc("GET /v1/status", d.status)
	mux.HandleFunc("POST /v1/workloads/{name}/migrate", d.migrate)
	mux.HandleFunc("POST /v1/migrate-all", d.migrateAll)
	mux.HandleFunc("GET /v1/cluster", d.clusterView)
	mux.HandleFunc("GET /v1/mode", d.getMode)
	mux.HandleFunc("PUT /v1/mode", d.setMode)
	mux.HandleFunc("POST /v1/hosts/{name}/drain", d.ask(cluster.KindDrain))
	mux.HandleFunc("POST /v1/hosts/{name}/rejuvenate", d.ask(cluster.KindRejuvenate))
	mux.HandleFunc("GET /v1/plan", d.plan)
	mux.HandleFunc("GET /v1/history", d.history)
	return d.rootOnly(mux)
}

// rootOnly refuses any peer that is not root, whatever the socket's permissions.
func (d *Daemon) rootOnly(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		cred, ok := r.Context().Value(peerKey{}).(unix.Ucred)
		if !ok || cred.Uid != 0 {
			uid := "unknown"
			if ok {
				uid = strconv.Itoa(int(cred.Uid))
			}
			d.log.WithFields(logrus.Fields{"uid": uid, "path": r.URL.Path}).Warn("refused non-root client")
			writeError(w, http.StatusForbidden, &api.Error{Code: api.CodeForbidden,
				Message: fmt.Sprintf("permission denied: duplexd serves only root (caller uid %s)", uid)})
			return
		}
		next.ServeHTTP(w, r)
	})
}

func writeJSON(w http.ResponseWriter, code int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	_ = json.NewEncoder(w).Encode(v)
}

func writeError(w http.ResponseWriter, code int, e *api.Error) { writeJSON(w, code, e) }

// fail maps an error to its HTTP status and code.
func (d *Daemon) fail(w http.ResponseWriter, r *http.Request, err error) {
	code, status := api.CodeInternal, http.StatusInternalServerError
	switch {
	case errors.Is(err, workload.ErrNotFound):
		code, status = api.CodeNotFound, http.StatusNotFound
	case errors.Is(err, workload.ErrExists):
		code, status = api.CodeExists, http.StatusConflict
	case errors.Is(err, workload.ErrInvalid):
		code, status = api.CodeInvalid, http.StatusBadRequest
	case errors.Is(err, workload.ErrNotRunning):
		code, status = api.CodeNotRunning, http.StatusConflict
	case errors.Is(err, errNoCluster):
		code, status = api.CodeNoCluster, http.StatusConflict
	case errors.Is(err, cluster.ErrNoHost):
		code, status = api.CodeNotFound, http.StatusNotFound
	case isLocked(err):
		code, status = api.CodeLocked, http.StatusConflict
	case errors.Is(err, migrate.ErrStrategyUnavailable), errors.Is(err, migrate.ErrPreflight):
		code, status = api.CodeRefused, http.StatusConflict
	}
	entry := d.log.WithError(err).WithField("path", r.URL.Path)
	if status == http.StatusInternalServerError {
		entry.Error("request failed")
	} else {
		entry.Info("request refused")
	}
	writeError(w, status, &api.Error{Code: code, Message: err.Error()})
}

func decode(r *http.Request, v any) error {
	dec := json.NewDecoder(io.LimitReader(r.Body, maxBody))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return fmt.Errorf("%w: request body: %w", workload.ErrInvalid, err)
	}
	return nil
}

func (d *Daemon) info(w http.ResponseWriter, r *http.Request) {
	writeJSON(w, http.StatusOK, api.Info{
		Name: d.cfg.Name, Version: Version, Pid: os.Getpid(), StateDir: d.cfg.StateDir, CRIU: d.eng.Path(),
		CgroupParent: d.cfg.CgroupParent, Workloads: len(d.wl.List()),
	})
}

func (d *Daemon) list(w http.ResponseWriter, r *http.Request) {
	writeJSON(w, http.StatusOK, d.wl.List())
}

func (d *Daemon) get(w http.ResponseWriter, r *http.Request) {
	rec, err := d.wl.Get(r.PathValue("name"))
	if err != nil {
		d.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, rec)
}

func (d *Daemon) run(w http.ResponseWriter, r *http.Request) {
	var spec workload.Spec
	if err := decode(r, &spec); err != nil {
		d.fail(w, r, err)
		return
	}
	rec, err := d.wl.Run(r.Context(), spec)
	if err != nil {
		d.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusCreated, rec)
}

func (d *Daemon) stop(w http.ResponseWriter, r *http.Request) {
	req := api.StopRequest{Timeout: api.Duration(10 * time.Second)}
	if r.ContentLength != 0 {
		if err := decode(r, &req); err != nil {
			d.fail(w, r, err)
			return
		}
	}
	// Stopping must finish even if the client goes away.
	rec, err := d.wl.Stop(context.WithoutCancel(r.Context()), r.PathValue("name"), time.Duration(req.Timeout))
	if err != nil {
		d.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, rec)
}

func (d *Daemon) remove(w http.ResponseWriter, r *http.Request) {
	if err := d.wl.Remove(r.PathValue("name")); err != nil {
		d.fail(w, r, err)
		return
	}
	w.WriteHeader(http.StatusNoContent)
}

func (d *Daemon) checkpoint(w http.ResponseWriter, r *http.Request) {
	var req api.CheckpointRequest
	if err := decode(r, &req); err != nil {
		d.fail(w, r, err)
		return
	}
	name := r.PathValue("name")
	opts := workload.CheckpointOptions{
		Dir: req.Dir, LeaveRunning: req.LeaveRunning, LeaveStopped: req.LeaveStopped,
		TCPEstablished: req.TCPEstablished,
	}
	if req.TCPEstablished {
		opts.NetworkLock = checkpoint.LockNFTables
	}
	// A dump must run to its end: a half-finished one could leave the tree frozen.
	st, err := d.wl.Checkpoint(context.WithoutCancel(r.Context()), name, opts)
	if err != nil {
		d.fail(w, r, err)
		return
	}
	rec, _ := d.wl.Get(name)
	writeJSON(w, http.StatusOK, api.CheckpointResponse{Workload: rec, Stats: api.NewDumpStats(st)})
}

func (d *Daemon) resume(w http.ResponseWriter, r *http.Request) {
	rec, err := d.wl.Resume(r.PathValue("name"))
	if err != nil {
		d.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, rec)
}

func (d *Daemon) restore(w http.ResponseWriter, r *http.Request) {
	var req api.RestoreRequest
	if err := decode(r, &req); err != nil {
		d.fail(w, r, err)
		return
	}
	if req.Dir == "" {
		d.fail(w, r, fmt.Errorf("%w: restore: no image directory given", workload.ErrInvalid))
		return
	}
	ctx := context.WithoutCancel(r.Context())
	rec, res, err := d.wl.Restore(ctx, workload.RestoreOptions{Dir: req.Dir, Name: req.Name, BeforeRestore: func(rec workload.Record) error {
		for _, v := range rec.VIPs { // sockets bound to them need them before CRIU runs
			if err := d.vips.Add(ctx, v); err != nil {
				return fmt.Errorf("service address %s: %w", v, err)
			}
		}
		return nil
	}})
	if err != nil {
		d.fail(w, r, err)
		return
	}
	for _, v := range rec.VIPs {
		if err := d.vips.Announce(ctx, v); err != nil {
			d.log.WithError(err).WithField("vip", v).Warn("announcing service address")
		}
	}
	writeJSON(w, http.StatusOK, api.RestoreResponse{Workload: rec, Stats: api.NewRestoreStats(res)})
}

// logs streams a workload's stdout and/or stderr; with follow it goes on while the
// workload lives and the client listens.
func (d *Daemon) logs(w http.ResponseWriter, r *http.Request) {
	name := r.PathValue("name")
	rec, err := d.wl.Get(name)
	if err != nil {
		d.fail(w, r, err)
		return
	}
	var paths []string
	switch s := r.URL.Query().Get("stream"); s {
	case "", "stdout":
		paths = []string{rec.Stdout}
	case "stderr":
		paths = []string{rec.Stderr}
	case "both":
		paths = []string{rec.Stdout, rec.Stderr}
	default:
		d.fail(w, r, fmt.Errorf("%w: stream %q: use stdout, stderr or both", workload.ErrInvalid, s))
		return
	}
	tail := -1
	if t := r.URL.Query().Get("tail"); t != "" {
		if tail, err = strconv.Atoi(t); err != nil || tail < 0 {
			d.fail(w, r, fmt.Errorf("%w: tail %q is not a non-negative number", workload.ErrInvalid, t))
			return
		}
	}
	follow := r.URL.Query().Get("follow") == "true"

	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	w.WriteHeader(http.StatusOK)
	flusher, _ := w.(http.Flusher)
	offsets := make([]int64, len(paths))
	for i, p := range paths {
		offsets[i] = tailOffset(p, tail)
	}
	for {
		wrote := false
		for i, p := range paths {
			n, err := copyFrom(w, p, offsets[i])
			offsets[i] += n
			wrote = wrote || n > 0
			if err != nil {
				return
			}
		}
		if wrote && flusher != nil {
			flusher.Flush()
		}
		if !follow {
			return
		}
		if !wrote {
			if cur, err := d.wl.Get(name); err != nil || (cur.State != workload.Running && cur.State != workload.Frozen) {
				return
			}
		}
		select {
		case <-r.Context().Done():
			return
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// tailOffset returns the offset of the last n lines of a file (-1: whole file).
func tailOffset(path string, n int) int64 {
	if n < 0 {
		return 0
	}
	f, err := os.Open(path)
	if err != nil {
		return 0
	}
	defer f.Close()
	var ends []int64
	var off int64
	br := bufio.NewReader(f)
	for {
		line, err := br.ReadBytes('\n')
		off += int64(len(line))
		if len(line) > 0 && line[len(line)-1] == '\n' {
			ends = append(ends, off)
		}
		if err != nil {
			break
		}
	}
	if n == 0 {
		return off
	}
	if len(ends) <= n {
		return 0
	}
	return ends[len(ends)-n-1]
}

func copyFrom(w io.Writer, path string, off int64) (int64, error) {
	f, err := os.Open(path)
	if err != nil {
		return 0, nil // not created yet
	}
	defer f.Close()
	if _, err := f.Seek(off, io.SeekStart); err != nil {
		return 0, err
	}
	return io.Copy(w, f)
}

var errNoCluster = errors.New("this duplexd is not part of a cluster (start it with --listen and --certs)")

func (d *Daemon) hosts(w http.ResponseWriter, r *http.Request) {
	if d.cluster == nil {
		d.fail(w, r, errNoCluster)
		return
	}
	hosts, err := d.cluster.store.Hosts(r.Context())
	if err != nil {
		d.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, hosts)
}

// migrate moves a workload to another host and streams its progress as JSON lines
// (api.MigrateEvent), the last of which carries the result or the error.
func (d *Daemon) migrate(w http.ResponseWriter, r *http.Request) {
	var req api.MigrateRequest
	if err := decode(r, &req); err != nil {
		d.fail(w, r, err)
		return
	}
	strategy, err := migrate.ParseStrategy(req.Strategy)
	if err != nil {
		d.fail(w, r, fmt.Errorf("%w: %w", workload.ErrInvalid, err))
		return
	}
	if d.cluster == nil {
		d.fail(w, r, errNoCluster)
		return
	}
	name := r.PathValue("name")
	if req.To == d.cfg.Name {
		d.fail(w, r, fmt.Errorf("%w: %s already runs on %s", workload.ErrInvalid, name, req.To))
		return
	}
	if _, err := d.wl.Get(name); err != nil {
		d.fail(w, r, err)
		return
	}
	if err := d.checkLocks(r, d.cfg.Name, req.To); err != nil {
		d.fail(w, r, err)
		return
	}
	dst, _, err := d.cluster.destination(r.Context(), req.To)
	if err != nil {
		d.fail(w, r, err)
		return
	}
	defer dst.Close()

	send := eventStream(w)
	// A migration runs to its end (commit or rollback) even if the client leaves.
	res, err := d.cluster.source.Migrate(context.WithoutCancel(r.Context()), dst, migrate.Request{Workload: name, To: req.To, Strategy: strategy, NoReplay: req.NoReplay},
		func(p migrate.Progress) { send(api.MigrateEvent{Progress: &p}) })
	if err != nil {
		send(api.MigrateEvent{Error: err.Error()})
		return
	}
	send(api.MigrateEvent{Result: res})
}

// migrateAll moves every running workload to another host, a bounded number at a
// time, streaming every workload's progress and outcome (api.MigrateEvent).
func (d *Daemon) migrateAll(w http.ResponseWriter, r *http.Request) {
	var req api.MigrateAllRequest
	if err := decode(r, &req); err != nil {
		d.fail(w, r, err)
		return
	}
	strategy, err := migrate.ParseStrategy(req.Strategy)
	if err != nil {
		d.fail(w, r, fmt.Errorf("%w: %w", workload.ErrInvalid, err))
		return
	}
	if req.Parallel < 0 || req.Parallel > 64 {
		d.fail(w, r, fmt.Errorf("%w: parallel %d: use 1 to 64", workload.ErrInvalid, req.Parallel))
		return
	}
	if req.Parallel == 0 {
		req.Parallel = 2
	}
	if d.cluster == nil {
		d.fail(w, r, errNoCluster)
		return
	}
	if req.To == d.cfg.Name {
		d.fail(w, r, fmt.Errorf("%w: the workloads already run on %s", workload.ErrInvalid, req.To))
		return
	}
	if err := d.checkLocks(r, d.cfg.Name, req.To); err != nil {
		d.fail(w, r, err)
		return
	}
	dst, _, err := d.cluster.destination(r.Context(), req.To)
	if err != nil {
		d.fail(w, r, err)
		return
	}
	defer dst.Close()

	send := eventStream(w)
	ctx := context.WithoutCancel(r.Context())
	sem := make(chan struct{}, req.Parallel)
	var wg sync.WaitGroup
	for _, rec := range d.wl.List() {
		if rec.State != workload.Running || rec.Pinned {
			continue
		}
		wg.Add(1)
		sem <- struct{}{}
		go func(name string) {
			defer wg.Done()
			defer func() { <-sem }()
			res, err := d.cluster.source.Migrate(ctx, dst, migrate.Request{Workload: name, To: req.To, Strategy: strategy, NoReplay: req.NoReplay},
				func(p migrate.Progress) { send(api.MigrateEvent{Progress: &p}) })
			if err != nil {
				send(api.MigrateEvent{Workload: name, Error: err.Error()})
				return
			}
			send(api.MigrateEvent{Workload: name, Result: res})
		}(rec.Name)
	}
	wg.Wait()
	send(api.MigrateEvent{Done: true})
}

// eventStream starts a stream of JSON lines and returns a sender that is safe for
// concurrent use and flushes every event at once.
func eventStream(w http.ResponseWriter) func(api.MigrateEvent) {
	w.Header().Set("Content-Type", "application/x-ndjson")
	w.WriteHeader(http.StatusOK)
	flusher, _ := w.(http.Flusher)
	var mu sync.Mutex
	enc := json.NewEncoder(w)
	return func(ev api.MigrateEvent) {
		mu.Lock()
		defer mu.Unlock()
		_ = enc.Encode(ev)
		if flusher != nil {
			flusher.Flush()
		}
	}
}
