//go:build linux

package ebpf

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"sync"
	"time"

	cebpf "github.com/cilium/ebpf"
	"github.com/cilium/ebpf/btf"
	"github.com/cilium/ebpf/link"
	"github.com/cilium/ebpf/ringbuf"
	"github.com/cilium/ebpf/rlimit"
	"golang.org/x/sys/unix"
)

// ErrUnavailable is wrapped by Load's error when the kernel cannot run a probe:
// no BPF, no BTF, a missing tracepoint, or a program the kernel refuses.
var ErrUnavailable = errors.New("eBPF probes unavailable")

// Event kinds.
const (
	KindSockExceedBufLimit = "sock_exceed_buf_limit"
	KindSockRcvqueueFull   = "sock_rcvqueue_full"
	KindOOMKill            = "oom_kill"
)

// Attach methods, as reported by Probes.Attached.
const (
	MethodTPBTF      = "tp_btf"
	MethodRawTP      = "raw_tracepoint"
	MethodTracepoint = "tracepoint"
)

// DefaultRingBufferSize is the ring buffer's size when Options leaves it zero.
const DefaultRingBufferSize = 256 << 10

// Options configures Load.
type Options struct {
	// RingBufferSize is the event ring buffer's size in bytes: a power of two
	// and a multiple of the page size. Zero means DefaultRingBufferSize.
	RingBufferSize int
	// EnableStats turns on the kernel's BPF run-time statistics
	// (BPF_STATS_RUN_TIME) while the probes are loaded, for Stats. It costs two
	// clock reads per program run.
	EnableStats bool
	// Methods restricts the attach methods tried, in order. Nil means
	// tp_btf, raw_tracepoint, tracepoint (the last needs tracefs mounted).
	Methods []string
	// NoMemory leaves out the per-process memory probe (kmem/rss_stat, which runs
	// on every page a process gains or loses: about 100 ns each, several percent of
	// a core under an allocation storm) and its exit cleanup; Memory then reports
	// nothing. The socket and OOM probes fire rarely and cost next to nothing.
	NoMemory bool
}

// ProcMemory is one process's resident memory as last reported by kmem/rss_stat.
// The figures are the kernel's approximate per-mm counters (percpu_counter),
// off by at most a few hundred KiB.
type ProcMemory struct {
	Pid      int
	Anon     uint64 // bytes
	File     uint64 // bytes
	Shmem    uint64 // bytes
	Swap     uint64 // bytes
	Updates  uint64 // rss_stat events seen
	CgroupID uint64 // cgroup2 inode of the process (see CgroupID); 1 is the root
}

// Event is a socket-pressure or OOM-kill record from the ring buffer. Socket
// events are rate-limited in the kernel to one per cgroup and kind per 100 ms;
// Count carries how many occurred in that cgroup so far.
type Event struct {
	Kind     string // KindSockExceedBufLimit, KindSockRcvqueueFull or KindOOMKill
	Pid      int    // current task (socket events, may be unrelated in softirq) or the OOM victim
	CgroupID uint64 // socket's cgroup (where it was created) or the victim's cgroup
	Count    uint64 // socket events: events of this kind in this cgroup so far
	Time     time.Time
}

// SockCount is the number of socket-pressure events of one kind in one cgroup.
type SockCount struct {
	CgroupID uint64
	Kind     string
	Count    uint64
}

// ProgStats is a program's kernel run-time statistics (needs Options.EnableStats
// or sysctl kernel.bpf_stats_enabled=1).
type ProgStats struct {
	Method   string
	RunCount uint64
	RunTime  time.Duration
}

// Probes holds duplex's loaded and attached BPF programs.
type Probes struct {
	maps     probesMaps
	progs    map[string]*cebpf.Program // by probe name
	methods  map[string]string
	links    []link.Link
	stats    io.Closer
	rd       *ringbuf.Reader
	monoBase time.Time // wall time at CLOCK_MONOTONIC zero

	mu     sync.Mutex
	subs   map[chan Event]struct{}
	closed bool
	done   chan struct{}
	reader sync.WaitGroup
}

// probe is one hook with its program variants, by attach method.
type probe struct {
	name     string // tracepoint name
	group    string // tracefs group
	variants map[string]string
}

var probeTable = []probe{
	{"rss_stat", "kmem", map[string]string{
		MethodTPBTF: probesProgRssStatBtf, MethodRawTP: probesProgRssStatRaw, MethodTracepoint: probesProgRssStatTp}},
	{"sock_exceed_buf_limit", "sock", map[string]string{
		MethodTPBTF: probesProgSockExceedBtf, MethodRawTP: probesProgSockExceedRaw, MethodTracepoint: probesProgSockExceedTp}},
	{"sock_rcvqueue_full", "sock", map[string]string{
		MethodTPBTF: probesProgSockRcvqueueBtf, MethodRawTP: probesProgSockRcvqueueRaw, MethodTracepoint: probesProgSockRcvqueueTp}},
	{"mark_victim", "oom", map[string]string{
		MethodTPBTF: probesProgMarkVictimBtf, MethodRawTP: probesProgMarkVictimRaw, MethodTracepoint: probesProgMarkVictimTp}},
	{"sched_process_exit", "sched", map[string]string{
		MethodTPBTF: probesProgProcessExitBtf, MethodRawTP: probesProgProcessExitRaw, MethodTracepoint: probesProgProcessExitTp}},
}

// Load removes the memlock rlimit, loads the programs and attaches each probe with
// the first method that works. Its error names the probe and every method's
// failure, and wraps ErrUnavailable when the kernel cannot run them.
func Load(o Options) (*Probes, error) {
	if o.RingBufferSize == 0 {
		o.RingBufferSize = DefaultRingBufferSize
	}
	ps := os.Getpagesize()
	if o.RingBufferSize < ps || o.RingBufferSize%ps != 0 || o.RingBufferSize&(o.RingBufferSize-1) != 0 {
		return nil, fmt.Errorf("ring buffer size %d: must be a power of two and a multiple of %d", o.RingBufferSize, ps)
	}
	methods := o.Methods
	if methods == nil {
		methods = []string{MethodTPBTF, MethodRawTP, MethodTracepoint}
	}
	if err := rlimit.RemoveMemlock(); err != nil {
		return nil, fmt.Errorf("%w: remove memlock rlimit: %w", ErrUnavailable, err)
	}
	spec, err := loadProbes()
	if err != nil {
		return nil, fmt.Errorf("load probe spec: %w", err)
	}
	spec.Maps[probesMapEvents].MaxEntries = uint32(o.RingBufferSize)

	p := &Probes{
		progs:   map[string]*cebpf.Program{},
		methods: map[string]string{},
		subs:    map[chan Event]struct{}{},
		done:    make(chan struct{}),
	}
	if err := spec.LoadAndAssign(&p.maps, nil); err != nil {
		return nil, fmt.Errorf("%w: create maps: %w", ErrUnavailable, err)
	}
	if o.EnableStats {
		s, err := cebpf.EnableStats(uint32(unix.BPF_STATS_RUN_TIME))
		if err != nil {
			p.closeAll()
			return nil, fmt.Errorf("%w: enable BPF stats: %w", ErrUnavailable, err)
		}
		p.stats = s
	}
	for _, pr := range probeTable {
		if o.NoMemory && (pr.name == "rss_stat" || pr.name == "sched_process_exit") {
			continue
		}
		if err := p.attach(spec, pr, methods); err != nil {
			p.closeAll()
			return nil, err
		}
	}
	rd, err := ringbuf.NewReader(p.maps.Events)
	if err != nil {
		p.closeAll()
		return nil, fmt.Errorf("%w: open ring buffer: %w", ErrUnavailable, err)
	}
	p.rd = rd
	var mono unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_MONOTONIC, &mono); err != nil {
		p.closeAll()
		return nil, fmt.Errorf("read monotonic clock: %w", err)
	}
	p.monoBase = time.Now().Add(-time.Duration(mono.Nano()))
	p.reader.Add(1)
	go p.read()
	return p, nil
}

// attach loads and attaches one probe, trying methods in order.
func (p *Probes) attach(spec *cebpf.CollectionSpec, pr probe, methods []string) error {
	var errs []error
	for _, m := range methods {
		progName, ok := pr.variants[m]
		if !ok {
			return fmt.Errorf("probe %s: unknown attach method %q", pr.name, m)
		}
		prog, l, err := p.tryAttach(spec, pr, m, progName)
		if err != nil {
			errs = append(errs, fmt.Errorf("%s %s: %w", m, progName, err))
			continue
		}
		p.progs[pr.name] = prog
		p.methods[pr.name] = m
		p.links = append(p.links, l)
		return nil
	}
	return fmt.Errorf("%w: probe %s/%s: %w", ErrUnavailable, pr.group, pr.name, errors.Join(errs...))
}

func (p *Probes) tryAttach(spec *cebpf.CollectionSpec, pr probe, method, progName string) (*cebpf.Program, link.Link, error) {
	var obj struct {
		Prog *cebpf.Program `ebpf:"prog"`
	}
	one := spec.Copy()
	one.Programs = map[string]*cebpf.ProgramSpec{"prog": spec.Programs[progName]}
	err := one.LoadAndAssign(&obj, &cebpf.CollectionOptions{
		MapReplacements: map[string]*cebpf.Map{
			probesMapEvents:    p.maps.Events,
			probesMapMem:       p.maps.Mem,
			probesMapSockStats: p.maps.SockStats,
		},
	})
	if err != nil {
		if errors.Is(err, btf.ErrNotSupported) {
			return nil, nil, fmt.Errorf("load (no kernel BTF): %w", err)
		}
		return nil, nil, fmt.Errorf("load: %w", err)
	}
	var l link.Link
	switch method {
	case MethodTPBTF:
		l, err = link.AttachTracing(link.TracingOptions{Program: obj.Prog})
	case MethodRawTP:
		l, err = link.AttachRawTracepoint(link.RawTracepointOptions{Name: pr.name, Program: obj.Prog})
	case MethodTracepoint:
		l, err = link.Tracepoint(pr.group, pr.name, obj.Prog, nil)
	}
	if err != nil {
		obj.Prog.Close()
		return nil, nil, fmt.Errorf("attach: %w", err)
	}
	return obj.Prog, l, nil
}

// Attached reports how each probe was attached (probe name → method), for
// doctor and logs.
func (p *Probes) Attached() map[string]string {
	out := make(map[string]string, len(p.methods))
	for k, v := range p.methods {
		out[k] = v
	}
	return out
}

// Close detaches and unloads everything, ends the event reader and closes every
// channel Events returned.
func (p *Probes) Close() error {
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		return nil
	}
	p.closed = true
	close(p.done)
	p.mu.Unlock()
	err := p.closeAll()
	p.reader.Wait()
	p.mu.Lock()
	for ch := range p.subs {
		delete(p.subs, ch)
		close(ch)
	}
	p.mu.Unlock()
	return err
}

func (p *Probes) closeAll() error {
	var errs []error
	if p.rd != nil {
		if err := p.rd.Close(); err != nil {
			errs = append(errs, fmt.Errorf("close ring buffer reader: %w", err))
		}
	}
	for _, l := range p.links {
		if err := l.Close(); err != nil {
			errs = append(errs, fmt.Errorf("detach: %w", err))
		}
	}
	for name, prog := range p.progs {
		if err := prog.Close(); err != nil {
			errs = append(errs, fmt.Errorf("close program %s: %w", name, err))
		}
	}
	if err := p.maps.Close(); err != nil {
		errs = append(errs, fmt.Errorf("close maps: %w", err))
	}
	if p.stats != nil {
		if err := p.stats.Close(); err != nil {
			errs = append(errs, fmt.Errorf("disable BPF stats: %w", err))
		}
	}
	return errors.Join(errs...)
}

// Memory returns a snapshot of the per-process memory map. Entries disappear when
// a process exits.
func (p *Probes) Memory() ([]ProcMemory, error) {
	var (
		key uint32
		val probesMemVal
		out []ProcMemory
	)
	it := p.maps.Mem.Iterate()
	for it.Next(&key, &val) {
		out = append(out, ProcMemory{
			Pid: int(key), Anon: val.Anon, File: val.File, Shmem: val.Shmem, Swap: val.Swap,
			Updates: val.Updates, CgroupID: val.CgroupId,
		})
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("iterate memory map: %w", err)
	}
	return out, nil
}

// SocketPressure returns the socket-pressure event counts per cgroup and kind.
func (p *Probes) SocketPressure() ([]SockCount, error) {
	var (
		key probesSockKey
		val probesSockVal
		out []SockCount
	)
	it := p.maps.SockStats.Iterate()
	for it.Next(&key, &val) {
		out = append(out, SockCount{CgroupID: key.CgroupId, Kind: kindName(key.Kind), Count: val.Count})
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("iterate socket map: %w", err)
	}
	return out, nil
}

// Stats returns each probe's kernel run count and cumulative run time. Both stay
// zero unless statistics are enabled (Options.EnableStats).
func (p *Probes) Stats() (map[string]ProgStats, error) {
	out := make(map[string]ProgStats, len(p.progs))
	for name, prog := range p.progs {
		s, err := prog.Stats()
		if err != nil {
			return nil, fmt.Errorf("stats of probe %s: %w", name, err)
		}
		out[name] = ProgStats{Method: p.methods[name], RunCount: s.RunCount, RunTime: s.Runtime}
	}
	return out, nil
}

// Events returns a channel of socket-pressure and OOM-kill events. It is closed
// when ctx ends or Probes is closed. A subscriber that does not keep up loses
// events (the channel holds 256).
func (p *Probes) Events(ctx context.Context) <-chan Event {
	ch := make(chan Event, 256)
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		close(ch)
		return ch
	}
	p.subs[ch] = struct{}{}
	p.mu.Unlock()
	go func() {
		select {
		case <-ctx.Done():
		case <-p.done:
		}
		p.mu.Lock()
		defer p.mu.Unlock()
		if _, ok := p.subs[ch]; ok {
			delete(p.subs, ch)
			close(ch)
		}
	}()
	return ch
}

// read is the ring buffer's only reader; it ends when Close closes the reader.
func (p *Probes) read() {
	defer p.reader.Done()
	var rec ringbuf.Record
	for {
		if err := p.rd.ReadInto(&rec); err != nil {
			if errors.Is(err, ringbuf.ErrClosed) {
				return
			}
			continue
		}
		var raw probesEvent
		if err := binary.Read(bytes.NewReader(rec.RawSample), binary.NativeEndian, &raw); err != nil {
			continue
		}
		ev := Event{
			Kind:     kindName(raw.Kind),
			Pid:      int(raw.Pid),
			CgroupID: raw.CgroupId,
			Count:    raw.Count,
			Time:     p.monoBase.Add(time.Duration(raw.TsNs)),
		}
		p.mu.Lock()
		for ch := range p.subs {
			select {
			case ch <- ev:
			default:
			}
		}
		p.mu.Unlock()
	}
}

func kindName(k uint32) string {
	switch k {
	case 1:
		return KindSockExceedBufLimit
	case 2:
		return KindSockRcvqueueFull
	case 3:
		return KindOOMKill
	}
	return fmt.Sprintf("unknown(%d)", k)
}

// CgroupID returns the ID BPF reports for a cgroup2 directory (its inode
// number), to map events and processes to workloads.
func CgroupID(path string) (uint64, error) {
	var fs unix.Statfs_t
	if err := unix.Statfs(path, &fs); err != nil {
		return 0, fmt.Errorf("cgroup id of %s: %w", path, err)
	}
	if fs.Type != unix.CGROUP2_SUPER_MAGIC {
		return 0, fmt.Errorf("cgroup id of %s: not a cgroup2 directory (fs magic %#x)", path, fs.Type)
	}
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		return 0, fmt.Errorf("cgroup id of %s: %w", path, err)
	}
	return st.Ino, nil
}
