package detect

import (
	"errors"
	"fmt"
	"math"
	"sort"
	"time"

	"github.com/duplex-ha/duplex/cgroupmon"
)

// Metric names, as used in Config.Metrics and Reason.Metric.
const (
	MetricMemory         = "memory"          // used memory: threshold and trend
	MetricBuffers        = "buffers"         // buffers, page cache and socket memory: threshold
	MetricLoad           = "load"            // one-minute load per CPU: threshold
	MetricUptime         = "uptime"          // continuous running time: threshold
	MetricWorkloadMemory = "workload-memory" // a workload's memory: trend
)

var allMetrics = []string{MetricMemory, MetricBuffers, MetricLoad, MetricUptime, MetricWorkloadMemory}

// Reason kinds.
const (
	KindThreshold = "threshold"
	KindTrend     = "trend"
)

// maxPoints bounds the samples kept per series (the tests are O(n²)): with more in
// TrendWindow, the oldest go first.
const maxPoints = 360

// Config sets the detector's thresholds and trend test. Zero values take the
// defaults (Defaults); Validate names the field of a bad value.
type Config struct {
	// Hold: a threshold must be exceeded continuously this long to count (claim 8).
	// Default 30s.
	Hold time.Duration `json:"hold"`
	// MemoryPercent: used memory, (MemTotal-MemAvailable)/MemTotal*100, above which
	// the memory threshold is exceeded. Default 90.
	MemoryPercent float64 `json:"memory_percent"`
	// BufferPercent: buffer usage, (Buffers+Cached+SockMem)/MemTotal*100 (the kernel's
	// I/O buffers, page cache and socket buffers), above which the buffer threshold is
	// exceeded. Page cache is reclaimable and grows on a healthy file-heavy host:
	// raise this there (100 never trips). Default 80.
	BufferPercent float64 `json:"buffer_percent"`
	// LoadPerCPU: Load1/CPUs above which the load threshold is exceeded. Default 4.
	LoadPerCPU float64 `json:"load_per_cpu"`
	// MaxUptime: running time above which the uptime threshold is exceeded; 0: none.
	MaxUptime time.Duration `json:"max_uptime"`
	// TrendWindow: the sliding window of the trend test. Default 2m.
	TrendWindow time.Duration `json:"trend_window"`
	// Horizon: a predicted exhaustion within it makes the host unstable. Default 1h.
	Horizon time.Duration `json:"horizon"`
	// Alpha: significance level of the Mann-Kendall test, per tested window
	// (Bonferroni-corrected over the windows tested together). Default 0.01.
	Alpha float64 `json:"alpha"`
	// MinSamples: with fewer samples in the window there is no trend verdict; also
	// the shortest window tested. Default 20.
	MinSamples int `json:"min_samples"`
	// TrendConfirm: a trend counts only after this many consecutive evaluations
	// found it. Default 2 (with NoiseFactor 3: no false alarm in 4,500 simulated
	// evaluations of a host swinging ±50 MiB; a 20 MiB/s leak caught in 8 s).
	TrendConfirm int `json:"trend_confirm"`
	// NoiseFactor: a trend counts only if the growth over the tested window (Sen's
	// slope × its span) exceeds this many robust standard deviations of the residuals.
	// Default 3.
	NoiseFactor float64 `json:"noise_factor"`
	// Metrics lists the checks to run (memory, buffers, load, uptime,
	// workload-memory); empty runs all.
	Metrics []string `json:"metrics,omitempty"`
}

// Defaults fills the unset (zero) fields.
func (c *Config) Defaults() {
	if c.Hold == 0 {
		c.Hold = 30 * time.Second
	}
	if c.MemoryPercent == 0 {
		c.MemoryPercent = 90
	}
	if c.BufferPercent == 0 {
		c.BufferPercent = 80
	}
	if c.LoadPerCPU == 0 {
		c.LoadPerCPU = 4
	}
	if c.TrendWindow == 0 {
		c.TrendWindow = 2 * time.Minute
	}
	if c.Horizon == 0 {
		c.Horizon = time.Hour
	}
	if c.Alpha == 0 {
		c.Alpha = 0.01
	}
	if c.MinSamples == 0 {
		c.MinSamples = 20
	}
	if c.TrendConfirm == 0 {
		c.TrendConfirm = 2
	}
	if c.NoiseFactor == 0 {
		c.NoiseFactor = 3
	}
}

// Validate checks a configuration after Defaults; each error names the field by its
// configuration key.
func (c Config) Validate() error {
	var errs []error
	bad := func(field, format string, args ...any) {
		errs = append(errs, fmt.Errorf("detect: %s: "+format, append([]any{field}, args...)...))
	}
	for _, d := range []struct {
		name string
		v    time.Duration
	}{{"hold", c.Hold}, {"max_uptime", c.MaxUptime}, {"trend_window", c.TrendWindow}, {"horizon", c.Horizon}} {
		if d.v < 0 {
			bad(d.name, "negative duration %s", d.v)
		}
	}
	for _, p := range []struct {
		name string
		v    float64
	}{{"memory_percent", c.MemoryPercent}, {"buffer_percent", c.BufferPercent}} {
		if !(p.v > 0 && p.v <= 100) {
			bad(p.name, "%g is outside (0, 100]", p.v)
		}
	}
	if !(c.LoadPerCPU > 0) || math.IsInf(c.LoadPerCPU, 0) {
		bad("load_per_cpu", "%g must be positive", c.LoadPerCPU)
	}
	if !(c.Alpha > 0 && c.Alpha < 1) {
		bad("alpha", "%g is outside (0, 1)", c.Alpha)
	}
	if c.MinSamples < 3 {
		bad("min_samples", "%d is below 3", c.MinSamples)
	}
	if c.TrendConfirm < 1 {
		bad("trend_confirm", "%d is below 1", c.TrendConfirm)
	}
	if !(c.NoiseFactor >= 0) || math.IsInf(c.NoiseFactor, 0) {
		bad("noise_factor", "%g must be zero or positive", c.NoiseFactor)
	}
	for _, m := range c.Metrics {
		known := false
		for _, k := range allMetrics {
			known = known || m == k
		}
		if !known {
			bad("metrics", "unknown metric %q (known: %v)", m, allMetrics)
		}
	}
	return errors.Join(errs...)
}

// Reason is one cause of instability, with the figures behind it. Value and Limit are
// in percent of MemTotal for memory, buffers and workload-memory (for a trend, Limit
// is what the resource can reach: 100, or the workload's usage plus MemAvailable),
// Load1 per CPU for load, and seconds for uptime.
type Reason struct {
	Kind             string        `json:"kind"`   // "threshold" or "trend"
	Metric           string        `json:"metric"` // "memory", "buffers", "load", "uptime", "workload-memory"
	Value            float64       `json:"value"`
	Limit            float64       `json:"limit"`
	HeldFor          time.Duration `json:"held_for,omitempty"`
	TimeToExhaustion time.Duration `json:"time_to_exhaustion,omitempty"`
	Workload         string        `json:"workload,omitempty"`
}

// Growth is a workload's memory trend: Sen's slope over the window (over the
// confirming window for a blamed workload) and its latest usage.
type Growth struct {
	Workload       string  `json:"workload"`
	BytesPerSecond float64 `json:"bytes_per_second"`
	Usage          uint64  `json:"usage"`
}

// Verdict is the detector's judgement after one sample.
type Verdict struct {
	Time     time.Time `json:"time"`
	Unstable bool      `json:"unstable"`
	Since    time.Time `json:"since,omitempty"` // when it became unstable
	Reasons  []Reason  `json:"reasons,omitempty"`
	// TimeToExhaustion is the smallest predicted time until memory runs out among
	// the confirmed trends (whether or not within the horizon); 0 if none.
	TimeToExhaustion time.Duration `json:"time_to_exhaustion,omitempty"`
	// Top lists the workloads by memory growth, largest first; blamed workloads
	// (a confirmed significant rise of their own) come before the rest.
	Top []Growth `json:"top,omitempty"`
}

type point struct{ t, x float64 } // seconds since the detector's origin, value

// series is a sliding window of one quantity with its trend confirmation state.
type series struct {
	pts      []point
	streak   int       // consecutive evaluations that found the trend
	streakAt time.Time // time of the first of them
	usage    uint64
}

func (s *series) add(p point, from float64) {
	s.pts = append(s.pts, p)
	i := 0
	for i < len(s.pts) && s.pts[i].t < from {
		i++
	}
	if n := len(s.pts) - i; n > maxPoints {
		i = len(s.pts) - maxPoints
	}
	s.pts = s.pts[i:]
}

// Detector judges one host from its successive samples. It is not safe for
// concurrent use.
type Detector struct {
	cfg     Config
	enabled map[string]bool

	origin   time.Time
	last     time.Time
	exceeded map[string]time.Time // metric -> start of the current excursion
	used     series
	wl       map[string]*series
	since    time.Time
}

// New returns a detector for c (defaults filled in) or the validation error.
func New(c Config) (*Detector, error) {
	c.Defaults()
	if err := c.Validate(); err != nil {
		return nil, err
	}
	d := &Detector{cfg: c, enabled: map[string]bool{}}
	ms := c.Metrics
	if len(ms) == 0 {
		ms = allMetrics
	}
	for _, m := range ms {
		d.enabled[m] = true
	}
	d.reset()
	return d, nil
}

func (d *Detector) reset() {
	d.origin, d.last, d.since = time.Time{}, time.Time{}, time.Time{}
	d.exceeded = map[string]time.Time{}
	d.used = series{}
	d.wl = map[string]*series{}
}

// Observe adds a sample and returns the verdict. Samples must come in time order; a
// sample older than the previous one (a clock step back) starts the detector afresh.
func (d *Detector) Observe(s cgroupmon.HostSample) Verdict {
	now := s.Time
	if now.IsZero() {
		now = time.Now()
	}
	if !d.last.IsZero() && now.Before(d.last) {
		d.reset()
	}
	if d.origin.IsZero() {
		d.origin = now
	}
	d.last = now
	v := Verdict{Time: now}
	total := float64(s.MemTotal)

	// Thresholds.
	check := func(metric string, value, limit float64) {
		if !d.enabled[metric] {
			return
		}
		if !(value > limit) {
			delete(d.exceeded, metric)
			return
		}
		start, ok := d.exceeded[metric]
		if !ok {
			start = now
			d.exceeded[metric] = now
		}
		if held := now.Sub(start); held >= d.cfg.Hold {
			v.Reasons = append(v.Reasons, Reason{Kind: KindThreshold, Metric: metric, Value: value, Limit: limit, HeldFor: held})
		}
	}
	if total > 0 {
		check(MetricMemory, float64(s.MemTotal-min(s.MemAvailable, s.MemTotal))/total*100, d.cfg.MemoryPercent)
		check(MetricBuffers, float64(s.Buffers+s.Cached+s.SockMem)/total*100, d.cfg.BufferPercent)
	}
	if s.CPUs > 0 {
		check(MetricLoad, s.Load1/float64(s.CPUs), d.cfg.LoadPerCPU)
	}
	if d.cfg.MaxUptime > 0 {
		check(MetricUptime, s.Uptime.Seconds(), d.cfg.MaxUptime.Seconds())
	}

	// Trends.
	t := now.Sub(d.origin).Seconds()
	from := t - d.cfg.TrendWindow.Seconds()
	avail := float64(min(s.MemAvailable, s.MemTotal))
	if total > 0 && d.enabled[MetricMemory] {
		used := total - avail
		d.used.add(point{t, used}, from)
		if tr, ok := d.confirm(&d.used, now); ok {
			tte := exhaustion(avail, tr.slope)
			v.TimeToExhaustion = minPositive(v.TimeToExhaustion, tte)
			if tte <= d.cfg.Horizon {
				v.Reasons = append(v.Reasons, Reason{Kind: KindTrend, Metric: MetricMemory, Value: used / total * 100,
					Limit: 100, HeldFor: now.Sub(d.used.streakAt), TimeToExhaustion: tte})
			}
		}
	}
	seen := map[string]bool{}
	type blamed struct {
		g      Growth
		reason *Reason
	}
	var growth []blamed
	for _, w := range s.Workloads {
		if w.Error != "" || seen[w.Name] {
			continue
		}
		seen[w.Name] = true
		sr := d.wl[w.Name]
		if sr == nil {
			sr = &series{}
			d.wl[w.Name] = sr
		}
		sr.usage = w.Usage
		sr.add(point{t, float64(w.Usage)}, from)
		b := blamed{g: Growth{Workload: w.Name, Usage: w.Usage}}
		tr, ok := d.confirm(sr, now)
		if ok && d.enabled[MetricWorkloadMemory] {
			b.g.BytesPerSecond = tr.slope
			tte := exhaustion(avail, tr.slope)
			b.reason = &Reason{Kind: KindTrend, Metric: MetricWorkloadMemory, Workload: w.Name, HeldFor: now.Sub(sr.streakAt),
				TimeToExhaustion: tte}
			if total > 0 {
				b.reason.Value = float64(w.Usage) / total * 100
				b.reason.Limit = (float64(w.Usage) + avail) / total * 100
			}
			v.TimeToExhaustion = minPositive(v.TimeToExhaustion, tte)
		} else if len(sr.pts) >= 2 {
			ts, xs := split(sr.pts)
			b.g.BytesPerSecond = SenSlope(ts, xs)
		}
		growth = append(growth, b)
	}
	for name := range d.wl {
		if !seen[name] {
			delete(d.wl, name) // gone (exited, moved away, or failed to sample)
		}
	}
	sort.SliceStable(growth, func(i, j int) bool {
		if (growth[i].reason != nil) != (growth[j].reason != nil) {
			return growth[i].reason != nil
		}
		return growth[i].g.BytesPerSecond > growth[j].g.BytesPerSecond
	})
	unstable := len(v.Reasons) > 0
	for _, b := range growth {
		v.Top = append(v.Top, b.g)
		if b.reason != nil && b.reason.TimeToExhaustion <= d.cfg.Horizon {
			unstable = true
		}
	}
	// Blamed workloads are reasons whenever the host is unstable, whatever tripped it.
	if unstable {
		for _, b := range growth {
			if b.reason != nil {
				v.Reasons = append(v.Reasons, *b.reason)
			}
		}
	}
	v.Unstable = unstable
	if unstable {
		if d.since.IsZero() {
			d.since = now
		}
		v.Since = d.since
	} else {
		d.since = time.Time{}
	}
	return v
}

type trendResult struct {
	slope float64 // bytes per second
	p     float64
	n     int
}

// confirm evaluates the trend of sr and updates its streak; it reports the trend
// once it has been found in TrendConfirm consecutive evaluations.
func (d *Detector) confirm(sr *series, now time.Time) (trendResult, bool) {
	tr, ok := d.trend(sr.pts)
	if !ok {
		sr.streak = 0
		return tr, false
	}
	if sr.streak == 0 {
		sr.streakAt = now
	}
	sr.streak++
	return tr, sr.streak >= d.cfg.TrendConfirm
}

// trend tests the most recent MinSamples, 2×, 4×, ... samples and the whole window
// (short windows catch a leak that just began, the whole window a slow one), each at
// Alpha divided by the number of windows. A window shows a rise when the
// Mann-Kendall test is significant with S > 0, Sen's slope is positive, and the
// growth over the window exceeds NoiseFactor robust standard deviations of the
// residuals. The steepest such window wins.
func (d *Detector) trend(pts []point) (trendResult, bool) {
	n := len(pts)
	if n < d.cfg.MinSamples {
		return trendResult{}, false
	}
	var sizes []int
	for k := d.cfg.MinSamples; k < n; k *= 2 {
		sizes = append(sizes, k)
	}
	sizes = append(sizes, n)
	alpha := d.cfg.Alpha / float64(len(sizes))
	best, found := trendResult{}, false
	ts, xs := split(pts)
	for _, k := range sizes {
		wt, wx := ts[n-k:], xs[n-k:]
		s, _, p := MannKendall(wx)
		if s <= 0 || p >= alpha {
			continue
		}
		b := SenSlope(wt, wx)
		if !(b > 0) {
			continue
		}
		if b*(wt[k-1]-wt[0]) <= d.cfg.NoiseFactor*robustSpread(wt, wx, b) {
			continue
		}
		if !found || b > best.slope {
			best, found = trendResult{slope: b, p: p, n: k}, true
		}
	}
	return best, found
}

func split(pts []point) (ts, xs []float64) {
	ts, xs = make([]float64, len(pts)), make([]float64, len(pts))
	for i, p := range pts {
		ts[i], xs[i] = p.t, p.x
	}
	return ts, xs
}

// exhaustion is the time until headroom bytes are used up at slope bytes/s.
func exhaustion(headroom, slope float64) time.Duration {
	if !(slope > 0) {
		return 0
	}
	sec := headroom / slope
	if sec > float64(math.MaxInt64/int64(time.Second)) {
		return time.Duration(math.MaxInt64)
	}
	return max(time.Duration(sec*float64(time.Second)), time.Nanosecond)
}

func minPositive(a, b time.Duration) time.Duration {
	if a <= 0 || (b > 0 && b < a) {
		return b
	}
	return a
}
