package daemon

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"sort"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/sirupsen/logrus"

	"github.com/duplex-ha/duplex/cgroupmon"
	"github.com/duplex-ha/duplex/cluster"
	"github.com/duplex-ha/duplex/ebpf"
	"github.com/duplex-ha/duplex/internal/api"
	"github.com/duplex-ha/duplex/internal/detect"
	"github.com/duplex-ha/duplex/internal/workload"
)

// monitor samples the host every interval, judges it, and publishes the verdict:
// in memory for `duplexctl status`, as Prometheus metrics, and in the cluster store
// for the controller.
type monitor struct {
	d        *Daemon
	interval time.Duration
	col      *cgroupmon.Collector
	det      *detect.Detector
	cfg      detect.Config
	probes   *ebpf.Probes
	capacity uint64         // configured workload memory (0: all)
	bootID   string         // of this boot
	last     cluster.Report // last report published
	log      *logrus.Entry

	mu       sync.Mutex
	status   api.Status
	lastAnon map[int]uint64 // per-process anonymous memory at the previous sample
	lastAt   time.Time

	reg     *prometheus.Registry
	gauges  map[string]prometheus.Gauge
	wlMem   *prometheus.GaugeVec
	wlGrow  *prometheus.GaugeVec
	events  *prometheus.CounterVec
	metrics *http.Server
}

func newMonitor(d *Daemon, interval time.Duration, cfg detect.Config) (*monitor, error) {
	det, err := detect.New(cfg)
	if err != nil {
		return nil, err
	}
	capacity, err := capacityBytes(d.cfg.Capacity)
	if err != nil {
		return nil, err
	}
	m := &monitor{cfg: cfg, capacity: capacity, bootID: bootID(), d: d, interval: interval, col: cgroupmon.New(cgroupmon.Options{SockAccountParent: "/" + d.cfg.CgroupParent}), det: det, log: d.log.WithField("part", "monitor"),
		reg: prometheus.NewRegistry(), gauges: map[string]prometheus.Gauge{}}
	m.status.Host = d.cfg.Name
	for name, help := range map[string]string{
		"duplex_host_memory_total_bytes":         "Memory of the host.",
		"duplex_host_memory_available_bytes":     "Memory available on the host (MemAvailable).",
		"duplex_host_buffers_bytes":              "Buffers and page cache of the host.",
		"duplex_host_socket_memory_bytes":        "Memory in socket buffers on the host.",
		"duplex_host_load1":                      "One-minute load average.",
		"duplex_host_uptime_seconds":             "Continuous running time of the host.",
		"duplex_host_memory_pressure_some10":     "Memory pressure (PSI some avg10, percent).",
		"duplex_host_unstable":                   "1 when the aging detector judges the host unstable.",
		"duplex_host_time_to_exhaustion_seconds": "Predicted time until a resource runs out (0: none predicted).",
		"duplex_workloads_running":               "Workloads running on this host.",
		"duplex_ebpf_probes_running":             "1 when the eBPF probes are loaded.",
	} {
		g := prometheus.NewGauge(prometheus.GaugeOpts{Name: name, Help: help})
		m.reg.MustRegister(g)
		m.gauges[name] = g
	}
	m.wlMem = prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "duplex_workload_memory_bytes", Help: "Memory of a workload's cgroup."}, []string{"workload", "kind"})
	m.wlGrow = prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "duplex_workload_memory_growth_bytes_per_second", Help: "A workload's memory trend (Sen's slope over the detector's window)."}, []string{"workload"})
	m.events = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "duplex_ebpf_events_total", Help: "Socket-buffer pressure and OOM events seen by the eBPF probes."}, []string{"kind", "workload"})
	m.reg.MustRegister(m.wlMem, m.wlGrow, m.events, prometheus.NewGoCollector(), prometheus.NewProcessCollector(prometheus.ProcessCollectorOpts{}))
	return m, nil
}

// start loads the eBPF probes (without them the cgroup probes still run), serves
// metrics if an address is given, and runs the sampling loop until ctx ends.
func (m *monitor) start(ctx context.Context, metricsAddr string) (stop func(), err error) {
	var p *ebpf.Probes
	perr := errors.New("turned off with --no-ebpf")
	if !m.d.cfg.NoEBPF {
		p, perr = ebpf.Load(ebpf.Options{NoMemory: !m.d.cfg.EBPFMemory})
	}
	if perr != nil {
		m.status.EBPF = "unavailable: " + perr.Error()
		m.log.WithError(perr).Warn("eBPF probes unavailable; cgroup probes only")
	} else {
		m.probes = p
		m.status.EBPF = "running"
		m.gauges["duplex_ebpf_probes_running"].Set(1)
	}
	if metricsAddr != "" {
		ln, err := net.Listen("tcp", metricsAddr)
		if err != nil {
			if m.probes != nil {
				m.probes.Close()
			}
			return nil, err
		}
		mux := http.NewServeMux()
		mux.Handle("/metrics", promhttp.HandlerFor(m.reg, promhttp.HandlerOpts{}))
		m.metrics = &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
		go func() {
			if err := m.metrics.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
				m.log.WithError(err).Error("metrics server stopped")
			}
		}()
		m.log.WithField("addr", ln.Addr().String()).Info("serving Prometheus metrics")
	}
	lctx, cancel := context.WithCancel(ctx)
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		m.loop(lctx)
	}()
	if m.probes != nil {
		wg.Add(1)
		go func() {
			defer wg.Done()
			m.countEvents(lctx)
		}()
	}
	return func() {
		cancel()
		if m.probes != nil {
			m.probes.Close()
		}
		wg.Wait()
		if m.metrics != nil {
			sctx, c := context.WithTimeout(context.Background(), 2*time.Second)
			_ = m.metrics.Shutdown(sctx)
			c()
		}
	}, nil
}

func (m *monitor) loop(ctx context.Context) {
	t := time.NewTicker(m.interval)
	defer t.Stop()
	wasUnstable := false
	for {
		m.sampleOnce(ctx, &wasUnstable)
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

func (m *monitor) running() map[string]string {
	out := map[string]string{}
	for _, r := range m.d.wl.List() {
		if r.State == workload.Running {
			out[r.Name] = r.Cgroup
		}
	}
	return out
}

func (m *monitor) sampleOnce(ctx context.Context, wasUnstable *bool) {
	s, err := m.col.Host(ctx, m.running())
	if err != nil {
		m.log.WithError(err).Warn("sampling the host")
		return
	}
	m.mu.Lock()
	det := m.det
	m.mu.Unlock()
	v := det.Observe(s)
	procs := m.processes(s.Time)
	m.mu.Lock()
	m.status.Sample, m.status.Verdict, m.status.Processes = s, v, procs
	m.mu.Unlock()

	g := m.gauges
	g["duplex_host_memory_total_bytes"].Set(float64(s.MemTotal))
	g["duplex_host_memory_available_bytes"].Set(float64(s.MemAvailable))
	g["duplex_host_buffers_bytes"].Set(float64(s.Buffers + s.Cached))
	g["duplex_host_socket_memory_bytes"].Set(float64(s.SockMem))
	g["duplex_host_load1"].Set(s.Load1)
	g["duplex_host_uptime_seconds"].Set(s.Uptime.Seconds())
	g["duplex_host_memory_pressure_some10"].Set(s.PressureSome10)
	g["duplex_host_time_to_exhaustion_seconds"].Set(v.TimeToExhaustion.Seconds())
	g["duplex_workloads_running"].Set(float64(len(s.Workloads)))
	unstable := 0.0
	if v.Unstable {
		unstable = 1
	}
	g["duplex_host_unstable"].Set(unstable)
	m.wlMem.Reset()
	for _, w := range s.Workloads {
		m.wlMem.WithLabelValues(w.Name, "usage").Set(float64(w.Usage))
		m.wlMem.WithLabelValues(w.Name, "anon").Set(float64(w.Anon))
		m.wlMem.WithLabelValues(w.Name, "cache").Set(float64(w.Cache))
		m.wlMem.WithLabelValues(w.Name, "sock").Set(float64(w.Sock))
	}
	m.wlGrow.Reset()
	for _, gr := range v.Top {
		m.wlGrow.WithLabelValues(gr.Workload).Set(gr.BytesPerSecond)
	}
	if v.Unstable != *wasUnstable {
		*wasUnstable = v.Unstable
		m.log.WithFields(logrus.Fields{"unstable": v.Unstable, "reasons": len(v.Reasons)}).Warn("host verdict changed")
	}
	m.publish(ctx, s, v)
}

// reportEvery is how often the report is refreshed when nothing notable changed.
const reportEvery = 3 * time.Second

// publish writes the host's report (verdict and capacity) where the cluster
// controller reads it, under this host's registration lease so that it goes with
// the host: at once when the verdict or the workloads change, else every few
// seconds, so that a large cluster does not write to etcd on every sample.
func (m *monitor) publish(ctx context.Context, s cgroupmon.HostSample, v detect.Verdict) {
	c := m.d.cluster
	if c == nil || c.store == nil || c.reg == nil {
		return
	}
	r := cluster.Report{Host: m.d.cfg.Name, Time: s.Time, Unstable: v.Unstable, MemTotal: s.MemTotal, MemAvailable: s.MemAvailable,
		Capacity: m.capacity, CPUs: s.CPUs, Load1: s.Load1, Workloads: len(s.Workloads), Booted: s.Time.Add(-s.Uptime).Round(time.Second), BootID: m.bootID}
	if r.Capacity == 0 {
		r.Capacity = s.MemTotal
	}
	if v.Unstable {
		r.UnstableSince = v.Since
	}
	for _, w := range s.Workloads {
		r.Used += w.Usage
	}
	for _, why := range v.Reasons {
		r.Reasons = append(r.Reasons, reasonText(why))
	}
	notable := r.Unstable != m.last.Unstable || r.Workloads != m.last.Workloads || len(r.Reasons) != len(m.last.Reasons)
	if !notable && s.Time.Sub(m.last.Time) < reportEvery {
		return
	}
	pctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	if err := c.store.PublishReport(pctx, r, c.reg.Lease()); err != nil {
		m.log.WithError(err).Debug("publishing the report")
		return
	}
	m.last = r
}

// reasonText is one reason of a verdict for people.
func reasonText(r detect.Reason) string {
	what := r.Metric
	if r.Workload != "" {
		what += " of " + r.Workload
	}
	switch {
	case r.Kind == "trend" && r.TimeToExhaustion > 0:
		return fmt.Sprintf("%s rising, exhausted in %s", what, r.TimeToExhaustion.Round(time.Second))
	case r.Kind == "trend":
		return what + " rising"
	case r.HeldFor > 0:
		return fmt.Sprintf("%s %.1f above %.1f for %s", what, r.Value, r.Limit, r.HeldFor.Round(time.Second))
	}
	return fmt.Sprintf("%s %.1f above %.1f", what, r.Value, r.Limit)
}

// reset starts the detector afresh (after a rejuvenation without a restart).
func (m *monitor) reset() {
	det, err := detect.New(m.cfg)
	if err != nil {
		return
	}
	m.mu.Lock()
	m.det = det
	m.mu.Unlock()
}

// processes returns the ten largest processes by anonymous memory from the eBPF
// memory probe, with their growth since the previous sample (nil without the probe).
func (m *monitor) processes(now time.Time) []api.ProcessMemory {
	if m.probes == nil || !m.d.cfg.EBPFMemory {
		return nil
	}
	mem, err := m.probes.Memory()
	if err != nil {
		return nil
	}
	dt := now.Sub(m.lastAt).Seconds()
	next := make(map[int]uint64, len(mem))
	out := make([]api.ProcessMemory, 0, len(mem))
	for _, p := range mem {
		next[p.Pid] = p.Anon
		pm := api.ProcessMemory{Pid: p.Pid, Anon: p.Anon, File: p.File, Workload: m.workloadOf(p.CgroupID)}
		if prev, ok := m.lastAnon[p.Pid]; ok && dt > 0 {
			pm.BytesPerSecond = (float64(p.Anon) - float64(prev)) / dt
		}
		out = append(out, pm)
	}
	m.lastAnon, m.lastAt = next, now
	sort.Slice(out, func(i, j int) bool { return out[i].Anon > out[j].Anon })
	if len(out) > 10 {
		out = out[:10]
	}
	return out
}

// countEvents turns the probes' events into metrics and status counters, per workload.
func (m *monitor) countEvents(ctx context.Context) {
	for ev := range m.probes.Events(ctx) {
		name := m.workloadOf(ev.CgroupID)
		m.events.WithLabelValues(ev.Kind, name).Inc()
		m.mu.Lock()
		if m.status.Events == nil {
			m.status.Events = map[string]int64{}
		}
		m.status.Events[ev.Kind+"/"+name]++
		m.mu.Unlock()
	}
}

// workloadOf maps a cgroup2 id to the running workload in that group ("" if none).
func (m *monitor) workloadOf(id uint64) string {
	for _, r := range m.d.wl.List() {
		if r.State != workload.Running {
			continue
		}
		if got, err := ebpf.CgroupID(m.d.wl.CgroupDir(r.Name)); err == nil && got == id {
			return r.Name
		}
	}
	return ""
}

func (m *monitor) snapshot() api.Status {
	m.mu.Lock()
	defer m.mu.Unlock()
	s := m.status
	s.Events = map[string]int64{}
	for k, v := range m.status.Events {
		s.Events[k] = v
	}
	return s
}
