package workload

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"sync"
	"time"

	"github.com/sirupsen/logrus"
	"golang.org/x/sys/unix"

	"github.com/duplex-ha/duplex/checkpoint"
)

// RecordFile is the name of a workload's record in its state directory.
const RecordFile = "workload.json"

// Checkpointer is what the manager needs of the checkpoint engine.
type Checkpointer interface {
	Dump(ctx context.Context, o checkpoint.DumpOptions) (*checkpoint.DumpStats, error)
	Restore(ctx context.Context, o checkpoint.RestoreOptions) (*checkpoint.RestoreResult, error)
}

// VIPController brings service addresses up and down on this host.
type VIPController interface {
	// Add puts the address on this host (idempotent); it tells no one.
	Add(ctx context.Context, vip string) error
	// Announce tells the network the address now lives here (gratuitous ARP or
	// unsolicited neighbour advertisements).
	Announce(ctx context.Context, vip string) error
	// Remove takes the address off this host (idempotent).
	Remove(ctx context.Context, vip string) error
	// Check validates an address without touching the host.
	Check(vip string) error
}

// Config configures a Manager.
type Config struct {
	// StateDir holds one directory per workload (record and logs).
	StateDir string
	// CgroupParent is the cgroup directory below which each workload gets its own.
	CgroupParent string
	// Checkpointer dumps and restores; nil disables Checkpoint and Restore.
	Checkpointer Checkpointer
	// VIPs manages service addresses; nil refuses workloads that declare any.
	VIPs VIPController
	Log  *logrus.Entry
}

// Manager runs, tracks and adopts workloads. It is safe for concurrent use.
type Manager struct {
	cfg  Config
	cg   *cgroupDriver
	log  *logrus.Entry
	mu   sync.Mutex
	w    map[string]*entry
	wake [2]int // closing wake[1] releases every watcher
	wg   sync.WaitGroup
	once sync.Once
}

// entry is one workload's live state. Fields are guarded by Manager.mu.
type entry struct {
	rec   Record
	busy  string        // operation in progress ("checkpoint", "restore", "stop"), "" if none
	gone  bool          // the root exited while busy
	code  *int          // its exit code, when known
	done  chan struct{} // closed when the current root exits
	pidfd int
}

// New loads the records in cfg.StateDir and adopts the workloads that still run.
func New(cfg Config) (*Manager, error) {
	if cfg.StateDir == "" {
		return nil, errors.New("workload manager: no state directory")
	}
	if cfg.CgroupParent == "" {
		cfg.CgroupParent = "duplex"
	}
	if cfg.Log == nil {
		l := logrus.New()
		l.SetOutput(discard{})
		cfg.Log = logrus.NewEntry(l)
	}
	if err := os.MkdirAll(cfg.StateDir, 0o700); err != nil {
		return nil, fmt.Errorf("state directory %s: %w", cfg.StateDir, err)
	}
	m := &Manager{cfg: cfg, cg: newCgroupDriver(), log: cfg.Log, w: map[string]*entry{}}
	if err := unix.Pipe2(m.wake[:], unix.O_CLOEXEC); err != nil {
		return nil, fmt.Errorf("workload manager: %w", err)
	}
	if err := m.load(); err != nil {
		m.Close()
		return nil, err
	}
	return m, nil
}

type discard struct{}

func (discard) Write(p []byte) (int, error) { return len(p), nil }

// Close stops watching workloads. The workloads keep running; a new Manager on the
// same state directory adopts them.
func (m *Manager) Close() {
	m.once.Do(func() {
		unix.Close(m.wake[1])
		m.wg.Wait()
		unix.Close(m.wake[0])
		m.mu.Lock()
		for _, e := range m.w {
			if e.pidfd > 0 {
				unix.Close(e.pidfd)
				e.pidfd = 0
			}
		}
		m.mu.Unlock()
	})
}

func (m *Manager) dir(name string) string { return filepath.Join(m.cfg.StateDir, name) }

func (m *Manager) cgroupPath(name string) string {
	return "/" + filepath.Join(m.cfg.CgroupParent, name)
}

// load reads every record and adopts live workloads.
func (m *Manager) load() error {
	ents, err := os.ReadDir(m.cfg.StateDir)
	if err != nil {
		return fmt.Errorf("read state directory: %w", err)
	}
	for _, d := range ents {
		if !d.IsDir() {
			continue
		}
		b, err := os.ReadFile(filepath.Join(m.cfg.StateDir, d.Name(), RecordFile))
		if err != nil {
			continue // not a workload directory
		}
		var rec Record
		if err := json.Unmarshal(b, &rec); err != nil || rec.Name != d.Name() {
			m.log.WithField("workload", d.Name()).Warn("skipping unreadable workload record")
			continue
		}
		e := &entry{rec: rec, done: make(chan struct{})}
		m.w[rec.Name] = e
		if rec.State != Running && rec.State != Frozen {
			close(e.done)
			continue
		}
		if !alive(rec.Pid, rec.StartTick) {
			e.rec.State = Lost
			e.rec.Message = "exited while duplexd was not running"
			e.rec.Pid = 0
			e.rec.Finished = time.Now()
			close(e.done)
			if err := m.cg.remove(rec.Cgroup); err != nil {
				m.log.WithError(err).WithField("workload", rec.Name).Warn("removing cgroup of lost workload")
			}
			_ = m.save(&e.rec)
			m.log.WithField("workload", rec.Name).Warn("workload exited while duplexd was away")
			continue
		}
		fd, err := unix.PidfdOpen(rec.Pid, 0)
		if err != nil {
			return fmt.Errorf("adopt %s (pid %d): %w", rec.Name, rec.Pid, err)
		}
		e.pidfd = fd
		m.watch(e, rec.Pid, fd)
		m.log.WithFields(logrus.Fields{"workload": rec.Name, "pid": rec.Pid}).Info("adopted running workload")
	}
	return nil
}

// save writes a record atomically.
func (m *Manager) save(rec *Record) error {
	dir := m.dir(rec.Name)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("save %s: %w", rec.Name, err)
	}
	b, err := json.MarshalIndent(rec, "", "  ")
	if err != nil {
		return fmt.Errorf("save %s: %w", rec.Name, err)
	}
	tmp := filepath.Join(dir, RecordFile+".tmp")
	if err := os.WriteFile(tmp, b, 0o600); err != nil {
		return fmt.Errorf("save %s: %w", rec.Name, err)
	}
	if err := os.Rename(tmp, filepath.Join(dir, RecordFile)); err != nil {
		return fmt.Errorf("save %s: %w", rec.Name, err)
	}
	return nil
}

// List returns every known workload, sorted by name.
func (m *Manager) List() []Record {
	m.mu.Lock()
	defer m.mu.Unlock()
	out := make([]Record, 0, len(m.w))
	for _, e := range m.w {
		out = append(out, e.rec)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out
}

// Get returns one workload's record.
func (m *Manager) Get(name string) (Record, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	e, ok := m.w[name]
	if !ok {
		return Record{}, fmt.Errorf("%w: %s", ErrNotFound, name)
	}
	return e.rec, nil
}

// Tracked reports whether pid is the root of a workload this manager watches (its
// watcher reaps it, so a zombie sweeper must leave it alone).
func (m *Manager) Tracked(pid int) bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	for _, e := range m.w {
		if e.rec.Pid == pid && e.pidfd > 0 {
			return true
		}
	}
	return false
}

func live(s State) bool { return s == Running || s == Frozen }

// Run starts a new workload.
func (m *Manager) Run(ctx context.Context, spec Spec) (Record, error) {
	if err := spec.Validate(); err != nil {
		return Record{}, err
	}
	if err := ctx.Err(); err != nil {
		return Record{}, err
	}
	if err := m.checkVIPs(spec); err != nil {
		return Record{}, err
	}
	m.mu.Lock()
	if old, ok := m.w[spec.Name]; ok {
		m.mu.Unlock()
		return Record{}, fmt.Errorf("%w: %s is %s (remove it first with 'duplexctl rm %s')", ErrExists, spec.Name, old.rec.State, spec.Name)
	}
	e := &entry{busy: "run", done: make(chan struct{})}
	m.w[spec.Name] = e
	m.mu.Unlock()

	err := m.vipsUp(ctx, spec.VIPs)
	var rec Record
	var fd int
	if err == nil {
		rec, fd, err = m.start(spec)
		if err != nil {
			m.vipsDown(spec.VIPs)
		}
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if err != nil {
		delete(m.w, spec.Name)
		return Record{}, err
	}
	e.rec, e.pidfd, e.busy = rec, fd, ""
	if err := m.save(&e.rec); err != nil {
		m.log.WithError(err).WithField("workload", spec.Name).Error("saving workload record")
	}
	m.watch(e, rec.Pid, fd)
	m.log.WithFields(logrus.Fields{"workload": rec.Name, "pid": rec.Pid}).Info("started workload")
	return e.rec, nil
}

// watch waits in the background for the root pid to exit.
func (m *Manager) watch(e *entry, pid, pidfd int) {
	m.wg.Add(1)
	go func() {
		defer m.wg.Done()
		fds := []unix.PollFd{{Fd: int32(pidfd), Events: unix.POLLIN}, {Fd: int32(m.wake[0]), Events: unix.POLLIN}}
		for {
			_, err := unix.Poll(fds, -1)
			if err != nil && !errors.Is(err, unix.EINTR) {
				m.log.WithError(err).WithField("pid", pid).Error("watching workload")
				return
			}
			if fds[1].Revents != 0 {
				return // manager closing
			}
			if fds[0].Revents != 0 {
				break
			}
		}
		code := reap(pid)
		m.exited(e, pid, code)
	}()
}

// reap collects the exit status of pid if it is our child; nil when it is not.
func reap(pid int) *int {
	var ws unix.WaitStatus
	got, err := unix.Wait4(pid, &ws, unix.WNOHANG, nil)
	if err != nil || got != pid {
		return nil
	}
	var c int
	switch {
	case ws.Exited():
		c = ws.ExitStatus()
	case ws.Signaled():
		c = 128 + int(ws.Signal())
	default:
		return nil
	}
	return &c
}

// exited records that a workload's root ended.
func (m *Manager) exited(e *entry, pid int, code *int) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if e.rec.Pid != pid {
		return // replaced meanwhile
	}
	e.code = code
	closeOnce(e.done)
	if e.busy != "" {
		e.gone = true // the operation in progress settles the state
		return
	}
	m.finish(e, Exited, "")
}

// finish settles a workload whose root is gone. Called with m.mu held.
func (m *Manager) finish(e *entry, st State, msg string) {
	e.rec.State = st
	e.rec.Pid = 0
	e.rec.StartTick = 0
	e.rec.Finished = time.Now()
	e.rec.ExitCode = e.code
	if msg != "" {
		e.rec.Message = msg
	}
	if e.pidfd > 0 {
		unix.Close(e.pidfd)
		e.pidfd = 0
	}
	closeOnce(e.done)
	if e.rec.LockTable != "" {
		if err := checkpoint.Unlock(e.rec.LockTable); err != nil {
			m.log.WithError(err).WithField("workload", e.rec.Name).Warn("removing network lock")
		}
		e.rec.LockTable = ""
	}
	if st != Migrated {
		m.vipsDown(e.rec.VIPs)
	}
	if err := m.cg.remove(e.rec.Cgroup); err != nil {
		m.log.WithError(err).WithField("workload", e.rec.Name).Warn("removing workload cgroup")
	}
	if err := m.save(&e.rec); err != nil {
		m.log.WithError(err).WithField("workload", e.rec.Name).Error("saving workload record")
	}
	fields := logrus.Fields{"workload": e.rec.Name, "state": st}
	if e.code != nil {
		fields["exit_code"] = *e.code
	}
	m.log.WithFields(fields).Info("workload ended")
}

// acquire marks a workload busy with op; it must be in one of the given states.
func (m *Manager) acquire(name, op string, states ...State) (*entry, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	e, ok := m.w[name]
	if !ok {
		return nil, fmt.Errorf("%w: %s", ErrNotFound, name)
	}
	if e.busy != "" {
		return nil, fmt.Errorf("%s %s: busy with %s", op, name, e.busy)
	}
	for _, s := range states {
		if e.rec.State == s {
			e.busy = op
			e.gone = false
			return e, nil
		}
	}
	return nil, fmt.Errorf("%s %s: %w (it is %s)", op, name, ErrNotRunning, e.rec.State)
}

// release ends a busy operation; if the root exited meanwhile and the operation did
// not settle the state, the workload is marked exited. Called with m.mu held.
func (m *Manager) release(e *entry) {
	e.busy = ""
	if e.gone && live(e.rec.State) {
		m.finish(e, Exited, "")
	}
}

// Stop ends a workload: SIGTERM to its root, SIGKILL after grace. A PID-namespace
// init ignores signals it has no handler for, so a root that catches no SIGTERM gets
// SIGKILL at once.
func (m *Manager) Stop(ctx context.Context, name string, grace time.Duration) (Record, error) {
	e, err := m.acquire(name, "stop", Running, Frozen)
	if err != nil {
		return Record{}, err
	}
	m.mu.Lock()
	fd, done := e.pidfd, e.done
	m.mu.Unlock()

	m.mu.Lock()
	pid := e.rec.Pid
	m.mu.Unlock()
	if !catches(pid, unix.SIGTERM) {
		// A namespace init without a SIGTERM handler would ignore it: no point waiting.
		grace = 0
	}
	_ = unix.PidfdSendSignal(fd, unix.SIGTERM, nil, 0)
	_ = unix.PidfdSendSignal(fd, unix.SIGCONT, nil, 0)
	t := time.NewTimer(grace)
	defer t.Stop()
	select {
	case <-done:
	case <-t.C:
	case <-ctx.Done():
	}
	if err := unix.PidfdSendSignal(fd, unix.SIGKILL, nil, 0); err != nil && !errors.Is(err, unix.ESRCH) {
		m.log.WithError(err).WithField("workload", name).Warn("killing workload")
	}
	// Wait for the watcher to see the exit (SIGKILL cannot be ignored).
	kill := time.NewTimer(10 * time.Second)
	defer kill.Stop()
	select {
	case <-done:
	case <-kill.C:
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if e.gone || !live(e.rec.State) {
		e.busy = ""
		m.finish(e, Stopped, "stopped on request")
		return e.rec, nil
	}
	e.busy = ""
	return e.rec, fmt.Errorf("stop %s: pid %d did not exit after SIGKILL", name, e.rec.Pid)
}

func closeOnce(ch chan struct{}) {
	select {
	case <-ch:
	default:
		close(ch)
	}
}

// Remove forgets a workload that no longer runs and deletes its state directory,
// logs included.
func (m *Manager) Remove(name string) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	e, ok := m.w[name]
	if !ok {
		return fmt.Errorf("%w: %s", ErrNotFound, name)
	}
	if e.busy != "" || live(e.rec.State) {
		return fmt.Errorf("remove %s: it is %s; stop it first", name, e.rec.State)
	}
	if err := os.RemoveAll(m.dir(name)); err != nil {
		return fmt.Errorf("remove %s: %w", name, err)
	}
	delete(m.w, name)
	return nil
}

// CgroupDir returns the cgroup2 directory of a workload ("" on a host without
// cgroup2): the group eBPF programs see as bpf_get_current_cgroup_id.
func (m *Manager) CgroupDir(name string) string {
	if !m.cg.v2 {
		return ""
	}
	return filepath.Join(m.cg.v2Mount, m.cgroupPath(name))
}

// Cleanup removes the shared cgroup parent once no workload is left in it.
func (m *Manager) Cleanup() { m.cg.removeParent(m.cfg.CgroupParent) }

// checkVIPs validates a spec's service addresses.
func (m *Manager) checkVIPs(spec Spec) error {
	if len(spec.VIPs) == 0 {
		return nil
	}
	if m.cfg.VIPs == nil {
		return fmt.Errorf("%w: %s: service addresses are not supported by this daemon", ErrInvalid, spec.Name)
	}
	for _, v := range spec.VIPs {
		if err := m.cfg.VIPs.Check(v); err != nil {
			return fmt.Errorf("%w: %s: %w", ErrInvalid, spec.Name, err)
		}
	}
	return nil
}

// vipsUp adds and announces every address; on failure it removes those it added.
func (m *Manager) vipsUp(ctx context.Context, vips []string) error {
	if len(vips) == 0 {
		return nil
	}
	if m.cfg.VIPs == nil {
		return errors.New("service addresses are not supported by this daemon")
	}
	for i, v := range vips {
		if err := m.cfg.VIPs.Add(ctx, v); err != nil {
			m.vipsDown(vips[:i])
			return fmt.Errorf("service address %s: %w", v, err)
		}
	}
	for _, v := range vips {
		if err := m.cfg.VIPs.Announce(ctx, v); err != nil {
			m.log.WithError(err).WithField("vip", v).Warn("announcing service address")
		}
	}
	return nil
}

func (m *Manager) vipsDown(vips []string) {
	if m.cfg.VIPs == nil {
		return
	}
	for _, v := range vips {
		if err := m.cfg.VIPs.Remove(context.Background(), v); err != nil {
			m.log.WithError(err).WithField("vip", v).Warn("removing service address")
		}
	}
}
