package checkpoint

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"time"

	criu "github.com/checkpoint-restore/go-criu/v7"
	"github.com/checkpoint-restore/go-criu/v7/rpc"
	"github.com/checkpoint-restore/go-criu/v7/stats"
	"golang.org/x/sys/unix"
	"google.golang.org/protobuf/proto"

	"github.com/duplex-ha/duplex/ebpf"
)

// Log file names CRIU writes into the images directory.
const (
	DumpLog    = "dump.log"
	PreDumpLog = "pre-dump.log"
	RestoreLog = "restore.log"
)

// NetworkLock selects how CRIU keeps peers from seeing a half-dumped TCP stack.
type NetworkLock int

const (
	// LockDefault leaves the choice to CRIU (iptables, which hosts often lack).
	LockDefault NetworkLock = iota
	// LockNFTables uses an nftables table; needs CRIU built with libnftables.
	LockNFTables
	// LockIPTables uses iptables rules.
	LockIPTables
	// LockSkip takes no network lock: the caller guarantees no traffic reaches the tree.
	// A restore with LockSkip rewrites the method the images recorded (CRIU honours
	// only that one on restore).
	LockSkip
)

func (l NetworkLock) rpc() *rpc.CriuNetworkLockMethod {
	switch l {
	case LockNFTables:
		return rpc.CriuNetworkLockMethod_NFTABLES.Enum()
	case LockIPTables:
		return rpc.CriuNetworkLockMethod_IPTABLES.Enum()
	case LockSkip:
		return rpc.CriuNetworkLockMethod_SKIP.Enum()
	}
	return nil
}

// Notify receives CRIU's hooks during an operation. Embed NoNotify for the ones you
// do not need. A hook that returns an error aborts the operation.
type Notify = criu.Notify

// NoNotify implements every Notify hook as a no-op.
type NoNotify = criu.NoNotify

// Address is a TCP endpoint of a CRIU page server.
type Address struct {
	Host string
	Port int
}

// TLS names the PEM files CRIU uses to encrypt and authenticate page-server traffic.
type TLS struct {
	CACert string
	Cert   string
	Key    string
	// NoCNVerify skips matching the server certificate's common name against the
	// address dialled (the chain is still verified against CACert).
	NoCNVerify bool
}

// Engine runs CRIU operations. Its zero value uses FindCRIU's binary.
type Engine struct {
	// CRIUPath is the CRIU binary; empty means FindCRIU().
	CRIUPath string
	// HardwareBreakpoints lets CRIU stop a tree leaving its parasite or restorer
	// code with a hardware breakpoint, CRIU's default. Off (the zero value), CRIU
	// steps there syscall by syscall instead (its CRIU_FAULT=130 mode). In a VM a
	// debug-register breakpoint traps to the hypervisor: on the development VM it
	// cost 13-23 ms of every dump's frozen time, against about 1 ms for stepping.
	HardwareBreakpoints bool
	// NoSmapsCopy turns off the smaps copy (see smapsCopy), which a CRIU with
	// FeatureSmapsCopy on a kernel that runs the VMA iterator otherwise uses for
	// every dump over a page channel (migrations).
	NoSmapsCopy bool

	features featureCache
	vmaOnce  sync.Once
	vmaIter  *ebpf.VMAIter
}

// New returns an Engine using the CRIU binary at path ("" means FindCRIU()).
func New(path string) *Engine {
	return &Engine{CRIUPath: path}
}

// env is the environment CRIU runs with.
func (e *Engine) env() []string {
	env := os.Environ()
	if !e.HardwareBreakpoints {
		env = append(env, "CRIU_FAULT=130") // FI_NO_BREAKPOINTS
	}
	return env
}

// Path returns the CRIU binary this engine runs.
func (e *Engine) Path() string {
	if e.CRIUPath == "" {
		return FindCRIU()
	}
	return e.CRIUPath
}

// DumpOptions describes one dump or pre-dump.
type DumpOptions struct {
	Pid       int    // root of the process tree; required
	ImagesDir string // where images and the log go; created if missing
	// ParentDir is a previous pre-dump's images directory; only pages changed since
	// then are written. Absolute or relative to ImagesDir.
	ParentDir string

	LeaveRunning bool // resume the tree after a successful dump
	LeaveStopped bool // keep the tree stopped after a successful dump (for rollback)

	TCPEstablished bool
	NetworkLock    NetworkLock
	ManageCgroups  bool
	TrackMem       bool // needs dirty-memory tracking (ErrNotSupported otherwise)
	FileLocks      bool
	ExtUnixSk      bool
	ShellJob       bool
	GhostLimit     uint32 // bytes of deleted-but-open files to carry; 0 = CRIU default

	// PageServer sends memory pages to a page server instead of ImagesDir.
	PageServer *Address
	// PageServerConn, when set, is a connected stream socket (one end of a socket
	// pair) that CRIU uses as its page-server connection instead of dialling
	// PageServer: the caller carries the pages, e.g. through its own TLS tunnel.
	// CRIU then runs as a command, since go-criu cannot pass it descriptors.
	PageServerConn *os.File
	// LazyConn makes the dump lazy (post-copy): CRIU writes every image but the
	// memory, then serves the pages over PageServerConn to the destination's
	// lazy-pages daemon and returns once all were served. The tree stays frozen
	// until then and is killed after (unless LeaveStopped).
	LazyConn bool
	// Ready, if set, is called once the images are complete (for a lazy dump: when
	// CRIU starts serving pages), so that they can be sent while the dump goes on.
	Ready func()
	// Started, if set, is called with the moment the CRIU process started, which
	// is before it seized the tree (see SeizeStart).
	Started func(time.Time)
	// Lazy leaves memory pages on this host, served from Lazy's address to the
	// destination's lazy-pages daemon. The dump returns once every page was served.
	Lazy *Address
	TLS  *TLS

	LogLevel int // CRIU verbosity, 0 means 4 (debug)
	Notify   Notify
}

// DumpStats is what CRIU recorded about a dump.
type DumpStats struct {
	FreezingTime time.Duration // time spent stopping the tree
	FrozenTime   time.Duration // time the tree stayed frozen
	MemdumpTime  time.Duration
	MemwriteTime time.Duration

	PagesScanned       uint64
	PagesSkippedParent uint64
	PagesWritten       uint64
	PagesLazy          uint64

	Wall time.Duration // wall time of the whole CRIU call

	// SmapsCopied is the number of the tree's processes whose smaps were copied
	// before the freeze (see Engine.NoSmapsCopy); CRIU used each copy whose VMAs
	// had not changed, and says so in its log.
	SmapsCopied int

	// LockTable is the nftables table CRIU locked the network with ("" if none).
	// After a LeaveStopped dump it stays until Rollback or Discard removes it.
	LockTable string
}

// RestoreOptions describes one restore.
type RestoreOptions struct {
	ImagesDir string

	TCPEstablished bool
	NetworkLock    NetworkLock
	ManageCgroups  bool // restore cgroups (soft mode: create missing ones, keep existing)
	FileLocks      bool
	ExtUnixSk      bool
	ShellJob       bool
	// LazyPages restores without memory; a lazy-pages daemon for ImagesDir must run.
	LazyPages bool
	// Place, when set (and ManageCgroups is not), puts the CRIU process that will
	// restore into the cgroups the tree belongs in, before the restore starts: the
	// tree forks from it and stays there, and its memory is charged there from the
	// first page. It is cheaper than CRIU's cgroup management, which mounts every
	// cgroup hierarchy on each restore.
	Place func(criuPid int) error
	// Restorer, when set, is a CRIU process started (and placed) ahead of time by
	// StartRestorer; the restore uses it instead of starting one, and Place is not
	// called. It serves this one restore.
	Restorer *Restorer

	LogLevel int
	Notify   Notify
}

// Restorer is a CRIU process started ahead of a restore, so that neither its
// start nor moving it into the tree's cgroups (on a cgroup v1 memory controller
// a migration waits for an RCU grace period: 10-20 ms here) falls inside a
// migration's downtime.
type Restorer struct {
	s      *session
	placed bool
}

// StartRestorer starts a CRIU process for a later Restore and, with place set,
// puts it where the restored tree belongs (see RestoreOptions.Place). Close it if
// no restore takes it.
func (e *Engine) StartRestorer(place func(criuPid int) error) (*Restorer, error) {
	e.WarmKerndat()
	s, err := e.session()
	if err != nil {
		return nil, err
	}
	r := &Restorer{s: s}
	if place != nil {
		if err := place(s.pid); err != nil {
			s.close()
			return nil, fmt.Errorf("place CRIU in the workload's cgroups: %w", err)
		}
		r.placed = true
	}
	return r, nil
}

// Close ends a restorer no restore took; it is a no-op after a restore took it.
func (r *Restorer) Close() {
	if r != nil && r.s != nil {
		_ = unix.Kill(r.s.pid, unix.SIGKILL)
		r.s.close()
		r.s = nil
	}
}

// take hands the restorer's process to one restore.
func (r *Restorer) take() (*session, bool, error) {
	if r.s == nil {
		return nil, false, errors.New("the restorer was already used or closed")
	}
	s := r.s
	r.s = nil
	if s.cmd.ProcessState != nil || unix.Kill(s.pid, 0) != nil {
		return nil, false, errors.New("the restorer's CRIU process is gone")
	}
	return s, r.placed, nil
}

// RestoreResult is a successful restore.
type RestoreResult struct {
	Pid int // host PID of the restored root; it is the caller's child
	// Placed tells that RestoreOptions.Place put the tree in its cgroups.
	Placed       bool
	ForkingTime  time.Duration
	RestoreTime  time.Duration
	PagesRestore uint64
	Wall         time.Duration
}

func (o *DumpOptions) rpcOpts(logFile string) (*rpc.CriuOpts, error) {
	if o.Pid <= 0 {
		return nil, errors.New("no pid to dump")
	}
	if o.LeaveRunning && o.LeaveStopped {
		return nil, errors.New("leave-running and leave-stopped exclude each other")
	}
	opts := &rpc.CriuOpts{
		ImagesDirFd:    proto.Int32(-1),
		ImagesDir:      proto.String(o.ImagesDir),
		Pid:            proto.Int32(int32(o.Pid)),
		LogLevel:       proto.Int32(logLevel(o.LogLevel)),
		LogFile:        proto.String(logFile),
		LeaveRunning:   proto.Bool(o.LeaveRunning),
		LeaveStopped:   proto.Bool(o.LeaveStopped),
		TcpEstablished: proto.Bool(o.TCPEstablished),
		ManageCgroups:  proto.Bool(o.ManageCgroups),
		TrackMem:       proto.Bool(o.TrackMem),
		FileLocks:      proto.Bool(o.FileLocks),
		ExtUnixSk:      proto.Bool(o.ExtUnixSk),
		ShellJob:       proto.Bool(o.ShellJob),
		NetworkLock:    o.NetworkLock.rpc(),
	}
	if !o.ManageCgroups {
		opts.ManageCgroupsMode = rpc.CriuCgMode_IGNORE.Enum()
	}
	if o.GhostLimit > 0 {
		opts.GhostLimit = proto.Uint32(o.GhostLimit)
	}
	if o.ParentDir != "" {
		parent, err := relParent(o.ImagesDir, o.ParentDir)
		if err != nil {
			return nil, err
		}
		opts.ParentImg = proto.String(parent)
	}
	if o.PageServer != nil && o.Lazy != nil {
		return nil, errors.New("page-server and lazy dumps exclude each other")
	}
	if o.PageServer != nil {
		opts.Ps = &rpc.CriuPageServerInfo{Address: proto.String(o.PageServer.Host), Port: proto.Int32(int32(o.PageServer.Port))}
	}
	if o.Lazy != nil {
		opts.LazyPages = proto.Bool(true)
		opts.Ps = &rpc.CriuPageServerInfo{Address: proto.String(o.Lazy.Host), Port: proto.Int32(int32(o.Lazy.Port))}
	}
	o.TLS.apply(opts)
	return opts, nil
}

// relParent returns a parent images directory relative to the images directory,
// as CRIU wants it.
func relParent(images, parent string) (string, error) {
	if !filepath.IsAbs(parent) {
		return parent, nil
	}
	abs, err := filepath.Abs(images)
	if err != nil {
		return "", fmt.Errorf("images %s: %w", images, err)
	}
	rel, err := filepath.Rel(abs, parent)
	if err != nil {
		return "", fmt.Errorf("parent images %s: %w", parent, err)
	}
	return rel, nil
}

func (t *TLS) apply(opts *rpc.CriuOpts) {
	if t == nil {
		return
	}
	opts.Tls = proto.Bool(true)
	opts.TlsCacert = proto.String(t.CACert)
	opts.TlsCert = proto.String(t.Cert)
	opts.TlsKey = proto.String(t.Key)
	if t.NoCNVerify {
		opts.TlsNoCnVerify = proto.Bool(true)
	}
}

func logLevel(l int) int32 {
	if l == 0 {
		return 4
	}
	return int32(l)
}

// Dump checkpoints the tree rooted at o.Pid into o.ImagesDir. Unless LeaveRunning
// or LeaveStopped is set, CRIU kills the tree after a successful dump. On failure
// CRIU resumes the tree and the error is a *CRIUError.
//
// CRIU runs to completion once started: cancelling ctx afterwards does not abort it,
// because killing CRIU mid-dump could leave the tree neither running nor dumped.
// A Restore, by contrast, is aborted when ctx ends (CRIU and the half-restored tree
// are killed), so give it a deadline.
func (e *Engine) Dump(ctx context.Context, o DumpOptions) (*DumpStats, error) {
	return e.dump(ctx, o, false)
}

// PreDump copies the tree's memory into o.ImagesDir while it keeps running, as the
// first rounds of a pre-copy migration. It needs dirty-memory tracking: without it
// the error matches ErrNotSupported.
func (e *Engine) PreDump(ctx context.Context, o DumpOptions) (*DumpStats, error) {
	ok, err := e.HasFeature(ctx, FeatureMemDirtyTrack)
	if err != nil {
		return nil, err
	}
	if !ok {
		return nil, fmt.Errorf("pre-dump of %d: dirty-memory tracking: %w", o.Pid, ErrNotSupported)
	}
	o.TrackMem = true
	o.LeaveRunning = false
	o.LeaveStopped = false
	return e.dump(ctx, o, true)
}

// dumpMu serialises the freezing part of dumps on this host, across processes.
// CRIU's parasite reaches /proc from inside a dumped task that has a PID namespace
// of its own through a directory of a fixed name, "proc.crtools", made in the
// task's working directory; two trees with the same working directory (/ by
// default) dumped at once collide on it ("pie: Can't create a directory (-17)").
// Several duplexd (the test harness's hosts) or test binaries share one mount
// namespace, so an in-process mutex is not enough: a lock file joins it. A lazy
// dump releases it once it serves pages.
var dumpMu = &hostLock{path: "/run/lock/duplex-criu-dump.lock"}

// hostLock is a mutex held across the processes of a host (flock on path); if
// the lock file cannot be used, it still serialises this process.
type hostLock struct {
	mu   sync.Mutex
	path string
	f    *os.File
}

func (l *hostLock) Lock() {
	l.mu.Lock()
	if err := os.MkdirAll(filepath.Dir(l.path), 0o755); err != nil {
		return
	}
	f, err := os.OpenFile(l.path, os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		return
	}
	for {
		err = unix.Flock(int(f.Fd()), unix.LOCK_EX)
		if err != unix.EINTR {
			break
		}
	}
	if err != nil {
		f.Close()
		return
	}
	l.f = f
}

func (l *hostLock) Unlock() {
	if l.f != nil {
		_ = unix.Flock(int(l.f.Fd()), unix.LOCK_UN)
		l.f.Close()
		l.f = nil
	}
	l.mu.Unlock()
}

func (e *Engine) dump(ctx context.Context, o DumpOptions, pre bool) (*DumpStats, error) {
	e.WarmKerndat()
	op, logName := "dump", DumpLog
	if pre {
		op, logName = "pre-dump", PreDumpLog
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	if err := prepareDir(o.ImagesDir); err != nil {
		return nil, err
	}
	if o.PageServerConn != nil {
		return e.dumpCommand(ctx, o, op, logName)
	}
	dumpMu.Lock()
	defer dumpMu.Unlock()
	opts, err := o.rpcOpts(logName)
	if err != nil {
		return nil, fmt.Errorf("%s %d: %w", op, o.Pid, err)
	}
	s, err := e.session()
	if err != nil {
		return nil, fmt.Errorf("%s %d: %w", op, o.Pid, err)
	}
	start := time.Now()
	if o.PageServer != nil {
		uctx, stop := context.WithCancel(context.Background())
		defer stop()
		go uncorkPageServer(uctx, s.pid, *o.PageServer)
	}
	// Never abort a dump half-way: CRIU's parasite code may be running inside the tree.
	typ := rpc.CriuReqType_DUMP
	if pre {
		typ = rpc.CriuReqType_PRE_DUMP
	}
	_, err = s.do(context.WithoutCancel(ctx), o.ImagesDir, typ, opts, o.Notify)
	wall := time.Since(start)
	if err != nil {
		return nil, criuError(op, err, filepath.Join(o.ImagesDir, logName))
	}
	return finishDump(o, logName, wall), nil
}

// finishDump collects a successful dump's statistics and network lock.
func finishDump(o DumpOptions, logName string, wall time.Duration) *DumpStats {
	st, err := readDumpStats(o.ImagesDir)
	if err != nil {
		st = &DumpStats{} // stats are best effort
	}
	st.Wall = wall
	if o.TCPEstablished && o.NetworkLock == LockNFTables {
		st.LockTable = lockTable(o.ImagesDir, filepath.Join(o.ImagesDir, logName))
	}
	return st
}

// Restore brings back the tree checkpointed in o.ImagesDir. The restored root
// becomes a child of the calling process (CRIU's restore-sibling mode); its host PID
// is in the result. On failure the error is a *CRIUError; when a file the tree had
// open is missing here it also matches ErrMissingFile.
func (e *Engine) Restore(ctx context.Context, o RestoreOptions) (*RestoreResult, error) {
	e.WarmKerndat()
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	if _, err := os.Stat(filepath.Join(o.ImagesDir, "inventory.img")); err != nil {
		return nil, fmt.Errorf("restore from %s: no checkpoint there: %w", o.ImagesDir, err)
	}
	opts := &rpc.CriuOpts{
		ImagesDirFd:    proto.Int32(-1),
		ImagesDir:      proto.String(o.ImagesDir),
		LogLevel:       proto.Int32(logLevel(o.LogLevel)),
		LogFile:        proto.String(RestoreLog),
		RstSibling:     proto.Bool(true),
		TcpEstablished: proto.Bool(o.TCPEstablished),
		ManageCgroups:  proto.Bool(o.ManageCgroups),
		FileLocks:      proto.Bool(o.FileLocks),
		ExtUnixSk:      proto.Bool(o.ExtUnixSk),
		ShellJob:       proto.Bool(o.ShellJob),
		LazyPages:      proto.Bool(o.LazyPages),
		NetworkLock:    o.NetworkLock.rpc(),
	}
	if o.NetworkLock == LockSkip {
		if err := setInventoryNetworkLock(o.ImagesDir, rpc.CriuNetworkLockMethod_SKIP); err != nil {
			return nil, fmt.Errorf("restore from %s without a network lock: %w", o.ImagesDir, err)
		}
	}
	if o.ManageCgroups {
		opts.ManageCgroupsMode = rpc.CriuCgMode_SOFT.Enum()
	} else {
		opts.ManageCgroupsMode = rpc.CriuCgMode_IGNORE.Enum()
	}
	// CRIU waits for the answer to each notification it sends (six in a
	// restore, 0.1-0.7 ms each inside a migration's downtime), so they are asked
	// for only when the caller wants them; the restored root's PID is also in
	// CRIU's response.
	var n *pidNotify
	var nfy Notify
	if o.Notify != nil {
		n = &pidNotify{Notify: o.Notify}
		nfy = n
	}
	var s *session
	placed := false
	if o.Restorer != nil {
		var err error
		if s, placed, err = o.Restorer.take(); err != nil {
			return nil, fmt.Errorf("restore from %s: %w", o.ImagesDir, err)
		}
	} else {
		var err error
		if s, err = e.session(); err != nil {
			return nil, fmt.Errorf("restore from %s: %w", o.ImagesDir, err)
		}
		if o.Place != nil && !o.ManageCgroups {
			if err := o.Place(s.pid); err != nil {
				s.close()
				return nil, fmt.Errorf("restore from %s: place CRIU in the workload's cgroups: %w", o.ImagesDir, err)
			}
			placed = true
		}
	}
	start := time.Now()
	resp, err := s.do(ctx, o.ImagesDir, rpc.CriuReqType_RESTORE, opts, nfy)
	wall := time.Since(start)
	if ctx.Err() != nil && err != nil {
		return nil, fmt.Errorf("restore from %s: %w", o.ImagesDir, err)
	}
	if err != nil {
		return nil, criuError("restore", err, filepath.Join(o.ImagesDir, RestoreLog))
	}
	pid := int(resp.GetRestore().GetPid())
	if n != nil && n.pid > 0 {
		pid = n.pid
	}
	if pid <= 0 {
		return nil, fmt.Errorf("restore from %s: criu reported no pid", o.ImagesDir)
	}
	res := &RestoreResult{Pid: pid, Wall: wall, Placed: placed}
	if st, err := readRestoreStats(o.ImagesDir); err == nil {
		res.ForkingTime = st.ForkingTime
		res.RestoreTime = st.RestoreTime
		res.PagesRestore = st.PagesRestore
	}
	return res, nil
}

// pidNotify records the restored root's PID from the post-restore hook, which
// comes before CRIU's response.
type pidNotify struct {
	Notify
	pid int
}

func (n *pidNotify) PostRestore(pid int32) error {
	n.pid = int(pid)
	return n.Notify.PostRestore(pid)
}

func prepareDir(dir string) error {
	if dir == "" {
		return errors.New("no images directory")
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("images directory %s: %w", dir, err)
	}
	probe, err := os.CreateTemp(dir, ".duplex-probe-*")
	if err != nil {
		return fmt.Errorf("images directory %s is not writable: %w", dir, err)
	}
	probe.Close()
	os.Remove(probe.Name())
	return nil
}

func us(v uint32) time.Duration { return time.Duration(v) * time.Microsecond }

func readDumpStats(dir string) (*DumpStats, error) {
	d, err := os.Open(dir)
	if err != nil {
		return nil, err
	}
	defer d.Close()
	s, err := stats.CriuGetDumpStats(d)
	if err != nil {
		return nil, err
	}
	return &DumpStats{
		FreezingTime:       us(s.GetFreezingTime()),
		FrozenTime:         us(s.GetFrozenTime()),
		MemdumpTime:        us(s.GetMemdumpTime()),
		MemwriteTime:       us(s.GetMemwriteTime()),
		PagesScanned:       s.GetPagesScanned(),
		PagesSkippedParent: s.GetPagesSkippedParent(),
		PagesWritten:       s.GetPagesWritten(),
		PagesLazy:          s.GetPagesLazy(),
	}, nil
}

func readRestoreStats(dir string) (*RestoreResult, error) {
	d, err := os.Open(dir)
	if err != nil {
		return nil, err
	}
	defer d.Close()
	s, err := stats.CriuGetRestoreStats(d)
	if err != nil {
		return nil, err
	}
	return &RestoreResult{
		ForkingTime:  us(s.GetForkingTime()),
		RestoreTime:  us(s.GetRestoreTime()),
		PagesRestore: s.GetPagesRestored(),
	}, nil
}
