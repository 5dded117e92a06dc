package workload

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/sirupsen/logrus"
	"golang.org/x/sys/unix"

	"github.com/duplex-ha/duplex/checkpoint"
)

// MetaFile is the workload description a checkpoint directory carries beside CRIU's
// images, so that a restore knows what it brings back.
const MetaFile = "duplex-workload.json"

// Meta is the content of MetaFile.
type Meta struct {
	Record         Record    `json:"record"`
	TCPEstablished bool      `json:"tcp_established"`
	NetworkLock    string    `json:"network_lock,omitempty"`
	Dumped         time.Time `json:"dumped"`
}

// CheckpointOptions describes a checkpoint of a workload.
type CheckpointOptions struct {
	Dir            string
	LeaveRunning   bool // keep the workload running after the dump
	LeaveStopped   bool // keep it frozen (state Frozen) so it can be resumed or restored elsewhere
	TCPEstablished bool
	NetworkLock    checkpoint.NetworkLock
	// PageServer sends the memory pages to a page server (a migration's
	// destination) instead of Dir; TLS encrypts them.
	PageServer *checkpoint.Address
	TLS        *checkpoint.TLS
	// PageServerConn carries the pages over a connection the caller provides.
	PageServerConn *os.File
	// LazyConn makes it a post-copy dump serving pages over PageServerConn; it
	// returns once every page was served, and the workload is gone from this host.
	LazyConn bool
	// Ready is called once the images are complete (see checkpoint.DumpOptions).
	Ready func()
	// Started is called with the moment CRIU started (see checkpoint.DumpOptions).
	Started func(time.Time)
	// ParentDir is the last pre-dump's images directory (see PreDump): only the
	// pages written since then are dumped. It needs dirty-memory tracking.
	ParentDir string
}

// PreDumper is the part of the checkpoint engine that pre-copy needs.
type PreDumper interface {
	PreDump(ctx context.Context, o checkpoint.DumpOptions) (*checkpoint.DumpStats, error)
}

// PreDumpOptions describes one pre-dump round of a pre-copy migration.
type PreDumpOptions struct {
	Dir string
	// ParentDir is the previous round's directory ("" for the first round).
	ParentDir string
	// PageServerConn carries the pages to the destination's page server.
	PageServerConn *os.File
}

// PreDump copies the memory of a running workload (only what changed since
// ParentDir's round) while it keeps running: a round of pre-copy. It needs
// dirty-memory tracking in the kernel; without it the error matches
// checkpoint.ErrNotSupported.
func (m *Manager) PreDump(ctx context.Context, name string, opts PreDumpOptions) (*checkpoint.DumpStats, error) {
	pd, ok := m.cfg.Checkpointer.(PreDumper)
	if !ok {
		return nil, fmt.Errorf("pre-dump %s: %w", name, checkpoint.ErrNotSupported)
	}
	if opts.Dir == "" {
		return nil, fmt.Errorf("%w: pre-dump %s: no image directory given", ErrInvalid, name)
	}
	dir, err := filepath.Abs(opts.Dir)
	if err != nil {
		return nil, fmt.Errorf("pre-dump %s: %w", name, err)
	}
	e, err := m.acquire(name, "pre-dump", Running)
	if err != nil {
		return nil, err
	}
	m.mu.Lock()
	pid := e.rec.Pid
	m.mu.Unlock()
	defer func() {
		m.mu.Lock()
		m.release(e)
		m.mu.Unlock()
	}()
	if err := writableDir(dir); err != nil {
		return nil, fmt.Errorf("pre-dump %s: %w", name, err)
	}
	st, err := pd.PreDump(ctx, checkpoint.DumpOptions{
		Pid:            pid,
		ImagesDir:      dir,
		ParentDir:      opts.ParentDir,
		FileLocks:      true,
		PageServerConn: opts.PageServerConn,
	})
	if err != nil {
		return nil, fmt.Errorf("pre-dump %s: %w", name, err)
	}
	return st, nil
}

// Checkpoint dumps a running workload into opts.Dir. Unless told to leave it running
// or stopped, the workload is gone from this host afterwards (state Checkpointed).
// A failed dump leaves it running.
func (m *Manager) Checkpoint(ctx context.Context, name string, opts CheckpointOptions) (*checkpoint.DumpStats, error) {
	if m.cfg.Checkpointer == nil {
		return nil, fmt.Errorf("checkpoint %s: %w", name, errNoCheckpointer)
	}
	if opts.Dir == "" {
		return nil, fmt.Errorf("%w: checkpoint %s: no image directory given", ErrInvalid, name)
	}
	if opts.LeaveRunning && opts.LeaveStopped {
		return nil, fmt.Errorf("%w: checkpoint %s: leave-running and leave-stopped exclude each other", ErrInvalid, name)
	}
	dir, err := filepath.Abs(opts.Dir)
	if err != nil {
		return nil, fmt.Errorf("checkpoint %s: %w", name, err)
	}
	e, err := m.acquire(name, "checkpoint", Running)
	if err != nil {
		return nil, err
	}
	m.mu.Lock()
	rec := e.rec
	m.mu.Unlock()

	settle := func(st State) {
		m.mu.Lock()
		defer m.mu.Unlock()
		switch {
		case st == Checkpointed:
			m.finish(e, Checkpointed, "checkpointed to "+dir)
		case st != "":
			e.rec.State = st
			_ = m.save(&e.rec)
		}
		m.release(e)
	}

	if err := writableDir(dir); err != nil {
		settle("")
		return nil, fmt.Errorf("checkpoint %s: %w", name, err)
	}
	meta := Meta{Record: rec, TCPEstablished: opts.TCPEstablished, Dumped: time.Now()}
	if opts.NetworkLock == checkpoint.LockNFTables {
		meta.NetworkLock = "nftables"
	}
	if err := writeJSON(filepath.Join(dir, MetaFile), meta); err != nil {
		settle("")
		return nil, fmt.Errorf("checkpoint %s: %w", name, err)
	}

	st, err := m.cfg.Checkpointer.Dump(ctx, checkpoint.DumpOptions{
		Pid:            rec.Pid,
		ImagesDir:      dir,
		LeaveRunning:   opts.LeaveRunning,
		LeaveStopped:   opts.LeaveStopped,
		TCPEstablished: opts.TCPEstablished,
		NetworkLock:    opts.NetworkLock,
		FileLocks:      true,
		PageServer:     opts.PageServer,
		TLS:            opts.TLS,
		PageServerConn: opts.PageServerConn,
		LazyConn:       opts.LazyConn,
		Ready:          opts.Ready,
		Started:        opts.Started,
		ParentDir:      opts.ParentDir,
		TrackMem:       opts.ParentDir != "",
	})
	if err != nil {
		_ = os.Remove(filepath.Join(dir, MetaFile))
		settle("")
		return nil, fmt.Errorf("checkpoint %s: %w", name, err)
	}
	switch {
	case opts.LeaveRunning:
		settle("")
	case opts.LeaveStopped:
		m.mu.Lock()
		e.rec.LockTable = st.LockTable
		m.mu.Unlock()
		settle(Frozen)
	default:
		// CRIU killed the tree; wait briefly for the watcher to see it go.
		m.mu.Lock()
		done := e.done
		m.mu.Unlock()
		select {
		case <-done:
		case <-time.After(5 * time.Second):
		}
		settle(Checkpointed)
	}
	m.log.WithFields(logrus.Fields{"workload": name, "dir": dir, "frozen": st.FrozenTime, "pages": st.PagesWritten}).Info("checkpointed workload")
	return st, nil
}

// Resume continues a workload that a dump left frozen (the rollback of a migration):
// its connections leave repair mode, its network lock goes, its tasks continue.
func (m *Manager) Resume(name string) (Record, error) {
	e, err := m.acquire(name, "resume", Frozen)
	if err != nil {
		return Record{}, err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	defer m.release(e)
	// Its service addresses may have left with a migration that did not finish.
	if err := m.vipsUp(context.Background(), e.rec.VIPs); err != nil {
		return e.rec, fmt.Errorf("resume %s: %w", name, err)
	}
	if err := checkpoint.Rollback(e.rec.Pid, e.rec.LockTable); err != nil {
		return e.rec, fmt.Errorf("resume %s: %w", name, err)
	}
	e.rec.State = Running
	e.rec.Message = ""
	e.rec.LockTable = ""
	_ = m.save(&e.rec)
	return e.rec, nil
}

// Discard ends a frozen workload whose copy now runs on another host, and records
// where it went. Its service addresses are left alone: the migration moved them.
func (m *Manager) Discard(name, to string) (Record, error) {
	e, err := m.acquire(name, "discard", Frozen)
	if err != nil {
		return Record{}, err
	}
	m.mu.Lock()
	pid, lock, done := e.rec.Pid, e.rec.LockTable, e.done
	m.mu.Unlock()
	derr := checkpoint.Discard(pid, lock)
	select {
	case <-done:
	case <-time.After(5 * time.Second):
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	e.rec.LockTable = ""
	m.finish(e, Migrated, "migrated to "+to)
	e.busy = ""
	if derr != nil {
		return e.rec, fmt.Errorf("discard %s: %w", name, derr)
	}
	return e.rec, nil
}

// Abandon kills a workload and forgets it, as if it never ran here: the undo of a
// restore whose migration did not commit. Its service addresses go down.
func (m *Manager) Abandon(name string) error {
	m.mu.Lock()
	e, ok := m.w[name]
	m.mu.Unlock()
	if !ok {
		return nil
	}
	if _, err := m.Stop(context.Background(), name, 0); err != nil && !errors.Is(err, ErrNotRunning) {
		return fmt.Errorf("abandon %s: %w", name, err)
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.w[name] == e {
		delete(m.w, name)
	}
	return os.RemoveAll(m.dir(name))
}

// RestoreOptions describes a restore of a checkpointed workload.
type RestoreOptions struct {
	Dir  string
	Name string // restore under this name instead of the checkpointed one
	// BeforeRestore runs after the images were read and before CRIU starts: the
	// place to bring the workload's service addresses up so its sockets can bind.
	BeforeRestore func(rec Record) error
	// LazyPages restores without memory; a lazy-pages daemon serves it.
	LazyPages bool
	// DumpedElsewhere says the checkpoint was taken on another host (a migration).
	// Its network lock, an nftables table, stays in the source host's network:
	// CRIU's restore takes no lock of its own in that mode and would only try to
	// delete a table that does not exist here (about 15 ms of nft set-up inside
	// the downtime), so the restore runs without network locking.
	DumpedElsewhere bool
	// Prepared is what PrepareRestore made ready for this restore.
	Prepared *PreparedRestore
}

// PreparedRestore is a restore made ready before its images arrive: the
// workload's cgroup exists with its limits and, where the checkpointer can, a
// CRIU process waits inside it. A migration's destination prepares while the
// source still runs, which takes both out of the downtime. Close it unless a
// restore took it.
type PreparedRestore struct {
	m        *Manager
	name     string
	cgroup   string
	made     bool // the cgroup was made for this restore
	restorer *checkpoint.Restorer
	used     bool
}

// restorerStarter is a Checkpointer that can start its CRIU process ahead.
type restorerStarter interface {
	StartRestorer(place func(criuPid int) error) (*checkpoint.Restorer, error)
}

// PrepareRestore gets this host ready to restore rec (see PreparedRestore).
func (m *Manager) PrepareRestore(rec Record) (*PreparedRestore, error) {
	if err := ValidateName(rec.Name); err != nil {
		return nil, err
	}
	m.mu.Lock()
	old, exists := m.w[rec.Name]
	if exists && (old.busy != "" || live(old.rec.State)) {
		m.mu.Unlock()
		return nil, fmt.Errorf("%w: restore %s: a workload of that name is %s", ErrExists, rec.Name, old.rec.State)
	}
	m.mu.Unlock()
	p := &PreparedRestore{m: m, name: rec.Name, cgroup: m.cgroupPath(rec.Name)}
	p.made = !m.cg.exists(p.cgroup)
	if err := m.cg.create(p.cgroup, rec.MemoryLimit, rec.SocketMemoryLimit); err != nil {
		return nil, fmt.Errorf("prepare to restore %s: %w", rec.Name, err)
	}
	if rs, ok := m.cfg.Checkpointer.(restorerStarter); ok {
		r, err := rs.StartRestorer(func(pid int) error { return m.cg.add(p.cgroup, pid) })
		if err != nil {
			p.Close()
			return nil, fmt.Errorf("prepare to restore %s: %w", rec.Name, err)
		}
		p.restorer = r
	}
	return p, nil
}

// Close undoes a preparation no restore took; after a restore it does nothing.
func (p *PreparedRestore) Close() {
	if p == nil || p.used {
		return
	}
	p.used = true
	p.restorer.Close()
	if p.made {
		_ = p.m.cg.remove(p.cgroup)
	}
}

// Restore brings back the workload checkpointed in opts.Dir and adopts it. A
// workload of the same name may exist only if it no longer runs.
func (m *Manager) Restore(ctx context.Context, opts RestoreOptions) (Record, *checkpoint.RestoreResult, error) {
	if m.cfg.Checkpointer == nil {
		return Record{}, nil, fmt.Errorf("restore: %w", errNoCheckpointer)
	}
	dir, err := filepath.Abs(opts.Dir)
	if err != nil {
		return Record{}, nil, fmt.Errorf("restore: %w", err)
	}
	var meta Meta
	b, err := os.ReadFile(filepath.Join(dir, MetaFile))
	if err != nil {
		return Record{}, nil, fmt.Errorf("%w: restore from %s: not a duplex checkpoint: %w", ErrInvalid, dir, err)
	}
	if err := json.Unmarshal(b, &meta); err != nil {
		return Record{}, nil, fmt.Errorf("%w: restore from %s: %s: %w", ErrInvalid, dir, MetaFile, err)
	}
	rec := meta.Record
	if opts.Name != "" {
		rec.Name = opts.Name
	}
	if err := ValidateName(rec.Name); err != nil {
		return Record{}, nil, err
	}

	m.mu.Lock()
	old, exists := m.w[rec.Name]
	if exists && (old.busy != "" || live(old.rec.State)) {
		m.mu.Unlock()
		return Record{}, nil, fmt.Errorf("%w: restore %s: a workload of that name is %s", ErrExists, rec.Name, old.rec.State)
	}
	e := &entry{busy: "restore", done: make(chan struct{})}
	if exists {
		e.rec = old.rec
	}
	m.w[rec.Name] = e
	m.mu.Unlock()

	undo := func() {
		m.mu.Lock()
		defer m.mu.Unlock()
		if exists {
			m.w[rec.Name] = old
		} else {
			delete(m.w, rec.Name)
		}
	}
	if opts.BeforeRestore != nil {
		if err := opts.BeforeRestore(rec); err != nil {
			undo()
			return Record{}, nil, fmt.Errorf("restore %s: %w", rec.Name, err)
		}
	}
	lock := checkpoint.LockDefault
	switch {
	case meta.NetworkLock == "nftables" && opts.DumpedElsewhere:
		lock = checkpoint.LockSkip
	case meta.NetworkLock == "nftables":
		lock = checkpoint.LockNFTables
	}
	// The tree's cgroups are this host's, made here with the workload's limits;
	// CRIU restores it from inside them (cheaper than CRIU's cgroup management,
	// and the host's cgroup parent may differ from the source's).
	rec.Cgroup = m.cgroupPath(rec.Name)
	var restorer *checkpoint.Restorer
	madeCgroup := false
	if p := opts.Prepared; p != nil && !p.used && p.name == rec.Name && p.cgroup == rec.Cgroup {
		// The cgroup exists already; it is removed on failure only if made for this.
		p.used = true
		restorer, madeCgroup = p.restorer, p.made
		defer restorer.Close() // a no-op once the restore took it
	} else {
		opts.Prepared.Close() // prepared for another name: of no use
		madeCgroup = !m.cg.exists(rec.Cgroup)
		if err := m.cg.create(rec.Cgroup, rec.MemoryLimit, rec.SocketMemoryLimit); err != nil {
			undo()
			return Record{}, nil, fmt.Errorf("restore %s: %w", rec.Name, err)
		}
	}
	res, err := m.cfg.Checkpointer.Restore(ctx, checkpoint.RestoreOptions{
		Restorer:       restorer,
		ImagesDir:      dir,
		TCPEstablished: meta.TCPEstablished,
		NetworkLock:    lock,
		FileLocks:      true,
		LazyPages:      opts.LazyPages,
		Place:          func(pid int) error { return m.cg.add(rec.Cgroup, pid) },
	})
	if err != nil {
		if madeCgroup {
			_ = m.cg.remove(rec.Cgroup)
		}
		undo()
		return Record{}, nil, fmt.Errorf("restore %s: %w", rec.Name, err)
	}
	if !res.Placed {
		// CRIU restored from outside the cgroup: move the tree (its memory so far
		// stays charged where it was).
		pids, err := checkpoint.TreePids(res.Pid)
		if err == nil {
			for _, p := range pids {
				if err = m.cg.add(rec.Cgroup, p); err != nil {
					break
				}
			}
		}
		if err != nil {
			m.log.WithError(err).WithField("workload", rec.Name).Warn("moving the restored tree into its cgroup")
		}
	}
	fd, err := unix.PidfdOpen(res.Pid, 0)
	var tick uint64
	if err == nil {
		_, _, tick, err = procStat(res.Pid)
	}
	if err != nil {
		// It died at once; nothing runs, so there is nothing to undo but the entry.
		undo()
		return Record{}, nil, fmt.Errorf("restore %s: restored pid %d: %w", rec.Name, res.Pid, err)
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	rec.State = Running
	rec.Pid = res.Pid
	rec.StartTick = tick
	rec.Started = time.Now()
	rec.Finished = time.Time{}
	rec.ExitCode = nil
	rec.Message = "restored from " + dir
	rec.Restores++
	e.rec, e.pidfd, e.busy = rec, fd, ""
	if err := m.save(&e.rec); err != nil {
		m.log.WithError(err).WithField("workload", rec.Name).Error("saving workload record")
	}
	m.watch(e, res.Pid, fd)
	m.log.WithFields(logrus.Fields{"workload": rec.Name, "pid": res.Pid, "restore_time": res.RestoreTime}).Info("restored workload")
	return e.rec, res, nil
}

func writableDir(dir string) error {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("image directory %s: %w", dir, err)
	}
	f, err := os.CreateTemp(dir, ".duplex-probe-*")
	if err != nil {
		return fmt.Errorf("image directory %s is not writable: %w", dir, err)
	}
	f.Close()
	return os.Remove(f.Name())
}

func writeJSON(path string, v any) error {
	b, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		return err
	}
	return os.WriteFile(path, b, 0o600)
}
