package cgroupmon

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"
)

var (
	// ErrNoCgroup means the workload's cgroup does not exist (the workload exited,
	// moved away, or the path is wrong).
	ErrNoCgroup = errors.New("cgroup does not exist")
	// ErrNoMemoryController means a cgroup2 group has no memory controller enabled
	// (its parent's cgroup.subtree_control lacks +memory).
	ErrNoMemoryController = errors.New("memory controller not enabled")
)

// Mode is the cgroup layout of a host.
type Mode int

// Layouts: v1 controllers only, v1 controllers plus a cgroup2 tree at
// <root>/unified, or cgroup2 only.
const (
	Unavailable Mode = iota
	Legacy
	Hybrid
	Unified
)

func (m Mode) String() string {
	switch m {
	case Legacy:
		return "legacy"
	case Hybrid:
		return "hybrid"
	case Unified:
		return "unified"
	}
	return "unavailable"
}

// WorkloadSample holds the memory figures of one workload's cgroup.
type WorkloadSample struct {
	Name   string `json:"name"`
	Cgroup string `json:"cgroup"`
	// Bytes: total memory charged, anonymous/RSS, page cache, kernel (slab, stacks,
	// page tables), socket buffers. Sock is 0 on v1 until accounting is switched on
	// (see EnableSockAccounting). On v1 Usage does not include Sock (socket memory
	// has its own counter there); on v2 it does.
	Usage  uint64
	Anon   uint64
	Cache  uint64
	Kernel uint64
	Sock   uint64
	// Memory pressure stall information, avg10 in percent; 0 when unavailable.
	PressureSome10 float64
	PressureFull10 float64
	OOMKills       uint64
	// Error is set (and the figures are zero) when the workload could not be
	// sampled during Host; Workload returns it as an error instead.
	Error string `json:"error,omitempty"`
}

// HostSample holds the host's figures at one instant and its workloads' samples.
type HostSample struct {
	Time                 time.Time
	Load1, Load5, Load15 float64
	CPUs                 int
	Uptime               time.Duration
	// Bytes, from /proc/meminfo except SockMem, which is the TCP and UDP memory of
	// /proc/net/sockstat (pages) times the page size.
	MemTotal     uint64
	MemAvailable uint64
	Buffers      uint64
	Cached       uint64
	Slab         uint64
	SockMem      uint64
	// PressureSome10 is /proc/pressure/memory "some" avg10 in percent (0 without PSI).
	PressureSome10 float64
	Workloads      []WorkloadSample
}

// Options says where to read from. Zero values take the defaults.
type Options struct {
	Proc       string // default /proc
	CgroupRoot string // default /sys/fs/cgroup
	// SockAccountParent, on v1 and hybrid hosts, names the cgroup parent (e.g.
	// "/duplex") under whose children the collector switches on socket-memory
	// accounting the first time it samples them: v1 charges socket buffers to a
	// cgroup (memory.kmem.tcp.usage_in_bytes) only after memory.kmem.tcp.limit_in_bytes
	// has been written. Empty: never write.
	SockAccountParent string
}

// Collector samples a host. It is safe for concurrent use.
type Collector struct {
	proc, root string
	mode       Mode
	pageSize   uint64
	sockParent string

	mu       sync.Mutex
	sockDone map[string]bool // v1 cgroup dirs whose socket accounting was handled
}

// New returns a collector; the cgroup layout is detected once, here.
func New(o Options) *Collector {
	if o.Proc == "" {
		o.Proc = "/proc"
	}
	if o.CgroupRoot == "" {
		o.CgroupRoot = "/sys/fs/cgroup"
	}
	c := &Collector{proc: o.Proc, root: o.CgroupRoot, pageSize: uint64(os.Getpagesize()), sockDone: map[string]bool{}}
	if o.SockAccountParent != "" {
		c.sockParent = "/" + strings.Trim(filepath.Clean("/"+o.SockAccountParent), "/")
	}
	c.mode = detectMode(o.CgroupRoot)
	return c
}

func detectMode(root string) Mode {
	exists := func(p string) bool { _, err := os.Stat(p); return err == nil }
	switch {
	case exists(filepath.Join(root, "cgroup.controllers")):
		return Unified
	case exists(filepath.Join(root, "memory")) && exists(filepath.Join(root, "unified", "cgroup.controllers")):
		return Hybrid
	case exists(filepath.Join(root, "memory")):
		return Legacy
	}
	return Unavailable
}

// Mode returns the cgroup layout detected by New.
func (c *Collector) Mode() Mode { return c.mode }

// v1Dir and v2Dir map a cgroup path ("/parent/name") to its directories; "" when the
// layout has no such hierarchy.
func (c *Collector) v1Dir(path string) string {
	if c.mode == Legacy || c.mode == Hybrid {
		return filepath.Join(c.root, "memory", filepath.Clean("/"+path))
	}
	return ""
}

func (c *Collector) v2Dir(path string) string {
	switch c.mode {
	case Hybrid:
		return filepath.Join(c.root, "unified", filepath.Clean("/"+path))
	case Unified:
		return filepath.Join(c.root, filepath.Clean("/"+path))
	}
	return ""
}

// Host samples the host and each workload (name -> cgroup path). It fails only when
// the host's own figures cannot be read; a workload that cannot be sampled (it may
// have just exited) stays in the list, sorted by name, with its Error set.
func (c *Collector) Host(ctx context.Context, workloads map[string]string) (HostSample, error) {
	s := HostSample{Time: time.Now()}
	if err := c.readLoad(&s); err != nil {
		return HostSample{}, err
	}
	if err := c.readUptime(&s); err != nil {
		return HostSample{}, err
	}
	if err := c.readMeminfo(&s); err != nil {
		return HostSample{}, err
	}
	if err := c.readSockstat(&s); err != nil {
		return HostSample{}, err
	}
	s.CPUs = c.cpus()
	if some, _, err := readPSI(filepath.Join(c.proc, "pressure", "memory")); err == nil {
		s.PressureSome10 = some
	}
	names := make([]string, 0, len(workloads))
	for n := range workloads {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		if err := ctx.Err(); err != nil {
			return HostSample{}, err
		}
		w, err := c.Workload(n, workloads[n])
		if err != nil {
			w = WorkloadSample{Name: n, Cgroup: workloads[n], Error: err.Error()}
		}
		s.Workloads = append(s.Workloads, w)
	}
	return s, nil
}

// Workload samples one workload's cgroup (a path such as "/duplex/web", relative to
// the hierarchies' roots). On v1 and hybrid hosts the figures come from the v1 memory
// cgroup and, on hybrid hosts, the pressure from the cgroup2 group of the same path if
// it exists; on unified hosts everything comes from the cgroup2 group.
func (c *Collector) Workload(name, cgroupPath string) (WorkloadSample, error) {
	w := WorkloadSample{Name: name, Cgroup: cgroupPath}
	var err error
	switch c.mode {
	case Legacy, Hybrid:
		err = c.workloadV1(&w)
	case Unified:
		err = c.workloadV2(&w)
	default:
		err = fmt.Errorf("no cgroup hierarchy under %s", c.root)
	}
	if err != nil {
		return WorkloadSample{}, fmt.Errorf("sample workload %s: %w", name, err)
	}
	return w, nil
}

func (c *Collector) workloadV1(w *WorkloadSample) error {
	dir := c.v1Dir(w.Cgroup)
	if _, err := os.Stat(dir); err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("memory cgroup %s: %w", dir, ErrNoCgroup)
		}
		return fmt.Errorf("memory cgroup %s: %w", dir, err)
	}
	if c.sockParent != "" && under(w.Cgroup, c.sockParent) {
		// Failing to switch accounting on must not lose the sample: Sock stays 0.
		_ = c.EnableSockAccounting(w.Cgroup)
	}
	st, err := readKV(filepath.Join(dir, "memory.stat"))
	if err != nil {
		return fmt.Errorf("memory cgroup %s: %w", dir, err)
	}
	// total_* include the descendants (hierarchical accounting, always on since 6.x).
	w.Anon = pick(st, "total_rss", "rss")
	w.Cache = pick(st, "total_cache", "cache")
	if w.Usage, err = readUint(filepath.Join(dir, "memory.usage_in_bytes")); err != nil {
		return fmt.Errorf("memory cgroup %s: %w", dir, err)
	}
	// Optional files: absent on kernels built without them.
	w.Kernel, _ = readUint(filepath.Join(dir, "memory.kmem.usage_in_bytes"))
	w.Sock, _ = readUint(filepath.Join(dir, "memory.kmem.tcp.usage_in_bytes"))
	if oc, err := readKV(filepath.Join(dir, "memory.oom_control")); err == nil {
		w.OOMKills = oc["oom_kill"]
	}
	if v2 := c.v2Dir(w.Cgroup); v2 != "" {
		w.PressureSome10, w.PressureFull10, _ = readPSI(filepath.Join(v2, "memory.pressure"))
	}
	return nil
}

func (c *Collector) workloadV2(w *WorkloadSample) error {
	dir := c.v2Dir(w.Cgroup)
	if _, err := os.Stat(dir); err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("cgroup2 group %s: %w", dir, ErrNoCgroup)
		}
		return fmt.Errorf("cgroup2 group %s: %w", dir, err)
	}
	cur, err := readUint(filepath.Join(dir, "memory.current"))
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("cgroup2 group %s: %w", dir, ErrNoMemoryController)
		}
		return fmt.Errorf("cgroup2 group %s: %w", dir, err)
	}
	w.Usage = cur
	st, err := readKV(filepath.Join(dir, "memory.stat"))
	if err != nil {
		return fmt.Errorf("cgroup2 group %s: %w", dir, err)
	}
	w.Anon, w.Cache, w.Sock = st["anon"], st["file"], st["sock"]
	if k, ok := st["kernel"]; ok { // 5.18 and newer
		w.Kernel = k
	} else {
		w.Kernel = st["slab"] + st["kernel_stack"] + st["pagetables"] + st["percpu"]
	}
	if ev, err := readKV(filepath.Join(dir, "memory.events")); err == nil {
		w.OOMKills = ev["oom_kill"]
	}
	w.PressureSome10, w.PressureFull10, _ = readPSI(filepath.Join(dir, "memory.pressure"))
	return nil
}

// unlimitedV1 is what a v1 limit file reads when no limit was set: PAGE_COUNTER_MAX
// pages rounded down, i.e. LLONG_MAX rounded down to the page size.
func (c *Collector) unlimitedV1() uint64 {
	return (1<<63 - 1) / c.pageSize * c.pageSize
}

// EnableSockAccounting switches on socket-memory accounting for a v1 memory cgroup
// (a no-op on unified hosts), once per cgroup and collector. v1 charges socket
// buffers to a cgroup only after memory.kmem.tcp.limit_in_bytes has been written;
// this writes -1 ("unlimited", the value it already has), so no limit changes, and
// only when the file still reads as the unlimited default: a limit someone set is
// left alone. Only sockets created after the write are charged, so call it right
// after creating the cgroup, before the workload starts. The first write also turns
// on the kernel's socket-accounting static key for the whole host (a small cost on
// every socket allocation).
func (c *Collector) EnableSockAccounting(cgroupPath string) error {
	dir := c.v1Dir(cgroupPath)
	if dir == "" {
		return nil
	}
	if filepath.Clean("/"+cgroupPath) == "/" {
		return fmt.Errorf("enable socket accounting: the root cgroup cannot be limited")
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.sockDone[dir] {
		return nil
	}
	f := filepath.Join(dir, "memory.kmem.tcp.limit_in_bytes")
	cur, err := readUint(f)
	if err != nil {
		return fmt.Errorf("enable socket accounting for %s: %w", dir, err)
	}
	if cur < c.unlimitedV1() {
		c.sockDone[dir] = true // a limit was set, so accounting is already on
		return nil
	}
	if err := os.WriteFile(f, []byte("-1"), 0); err != nil {
		return fmt.Errorf("enable socket accounting for %s: %w", dir, err)
	}
	c.sockDone[dir] = true
	return nil
}

// under reports whether path is a descendant of parent (both "/a/b" forms).
func under(path, parent string) bool {
	p := filepath.Clean("/" + path)
	return parent == "/" && p != "/" || strings.HasPrefix(p, parent+"/")
}

func (c *Collector) readLoad(s *HostSample) error {
	b, err := os.ReadFile(filepath.Join(c.proc, "loadavg"))
	if err != nil {
		return fmt.Errorf("read load average: %w", err)
	}
	f := strings.Fields(string(b))
	if len(f) < 3 {
		return fmt.Errorf("read load average: malformed %q", strings.TrimSpace(string(b)))
	}
	for i, dst := range []*float64{&s.Load1, &s.Load5, &s.Load15} {
		if *dst, err = strconv.ParseFloat(f[i], 64); err != nil {
			return fmt.Errorf("read load average: %w", err)
		}
	}
	return nil
}

func (c *Collector) readUptime(s *HostSample) error {
	b, err := os.ReadFile(filepath.Join(c.proc, "uptime"))
	if err != nil {
		return fmt.Errorf("read uptime: %w", err)
	}
	f := strings.Fields(string(b))
	if len(f) < 1 {
		return fmt.Errorf("read uptime: malformed %q", strings.TrimSpace(string(b)))
	}
	sec, err := strconv.ParseFloat(f[0], 64)
	if err != nil {
		return fmt.Errorf("read uptime: %w", err)
	}
	s.Uptime = time.Duration(sec * float64(time.Second))
	return nil
}

func (c *Collector) readMeminfo(s *HostSample) error {
	f, err := os.Open(filepath.Join(c.proc, "meminfo"))
	if err != nil {
		return fmt.Errorf("read meminfo: %w", err)
	}
	defer f.Close()
	fields := map[string]*uint64{"MemTotal": &s.MemTotal, "MemAvailable": &s.MemAvailable,
		"Buffers": &s.Buffers, "Cached": &s.Cached, "Slab": &s.Slab}
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		k, rest, ok := strings.Cut(sc.Text(), ":")
		dst, want := fields[k]
		if !ok || !want {
			continue
		}
		v := strings.Fields(rest)
		if len(v) == 0 {
			continue
		}
		n, err := strconv.ParseUint(v[0], 10, 64)
		if err != nil {
			return fmt.Errorf("read meminfo %s: %w", k, err)
		}
		if len(v) > 1 && v[1] == "kB" {
			n *= 1024
		}
		*dst = n
	}
	if err := sc.Err(); err != nil {
		return fmt.Errorf("read meminfo: %w", err)
	}
	if s.MemTotal == 0 {
		return errors.New("read meminfo: no MemTotal")
	}
	return nil
}

func (c *Collector) readSockstat(s *HostSample) error {
	pages, err := sockstatPages(filepath.Join(c.proc, "net", "sockstat"))
	if err != nil {
		return err
	}
	// IPv6 sockets share the TCP and UDP memory counters; sockstat6 has no "mem".
	s.SockMem = pages * c.pageSize
	return nil
}

// sockstatPages sums the "mem" fields (pages) of the TCP and UDP lines.
func sockstatPages(path string) (uint64, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return 0, fmt.Errorf("read sockstat: %w", err)
	}
	var pages uint64
	for _, line := range strings.Split(string(b), "\n") {
		proto, rest, ok := strings.Cut(line, ":")
		if !ok || (proto != "TCP" && proto != "UDP") {
			continue
		}
		f := strings.Fields(rest)
		for i := 0; i+1 < len(f); i += 2 {
			if f[i] == "mem" {
				n, err := strconv.ParseUint(f[i+1], 10, 64)
				if err != nil {
					return 0, fmt.Errorf("read sockstat %s mem: %w", proto, err)
				}
				pages += n
			}
		}
	}
	return pages, nil
}

// cpus counts the "cpuN" lines of /proc/stat (online CPUs), falling back to the
// CPUs this process may run on.
func (c *Collector) cpus() int {
	b, err := os.ReadFile(filepath.Join(c.proc, "stat"))
	n := 0
	if err == nil {
		for _, line := range bytes.Split(b, []byte("\n")) {
			if len(line) > 3 && bytes.HasPrefix(line, []byte("cpu")) && line[3] >= '0' && line[3] <= '9' {
				n++
			}
		}
	}
	if n == 0 {
		n = runtime.NumCPU()
	}
	return n
}

// readPSI returns the "some" and "full" avg10 of a pressure file.
func readPSI(path string) (some, full float64, err error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return 0, 0, err
	}
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) < 2 {
			continue
		}
		for _, kv := range f[1:] {
			k, v, _ := strings.Cut(kv, "=")
			if k != "avg10" {
				continue
			}
			x, perr := strconv.ParseFloat(v, 64)
			if perr != nil {
				return 0, 0, fmt.Errorf("parse %s: %w", path, perr)
			}
			switch f[0] {
			case "some":
				some = x
			case "full":
				full = x
			}
		}
	}
	return some, full, nil
}

// readKV parses a "key value" file such as memory.stat.
func readKV(path string) (map[string]uint64, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	m := map[string]uint64{}
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) != 2 {
			continue
		}
		if n, err := strconv.ParseUint(f[1], 10, 64); err == nil {
			m[f[0]] = n
		}
	}
	return m, nil
}

func readUint(path string) (uint64, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return 0, err
	}
	s := strings.TrimSpace(string(b))
	if s == "max" {
		return 1<<64 - 1, nil
	}
	n, err := strconv.ParseUint(s, 10, 64)
	if err != nil {
		return 0, fmt.Errorf("parse %s: %w", path, err)
	}
	return n, nil
}

func pick(m map[string]uint64, keys ...string) uint64 {
	for _, k := range keys {
		if v, ok := m[k]; ok {
			return v
		}
	}
	return 0
}
