package detect

import (
	"math/rand"
	"strings"
	"testing"
	"time"

	"github.com/duplex-ha/duplex/cgroupmon"
)

const (
	mib = 1 << 20
	gib = 1 << 30
)

var t0 = time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)

// host builds a 16 GiB, 4-CPU host sample at t0+sec whose used memory is 4 GiB
// plus its workloads' usage.
func host(sec int, workloads map[string]float64) cgroupmon.HostSample {
	s := cgroupmon.HostSample{Time: t0.Add(time.Duration(sec) * time.Second), CPUs: 4, Load1: 1,
		Uptime: time.Hour + time.Duration(sec)*time.Second, MemTotal: 16 * gib, Buffers: 100 * mib, Cached: 2 * gib}
	used := float64(4 * gib)
	for _, name := range []string{"db", "leaky", "noisy", "web"} {
		u, ok := workloads[name]
		if !ok {
			continue
		}
		used += u
		s.Workloads = append(s.Workloads, cgroupmon.WorkloadSample{Name: name, Cgroup: "/duplex/" + name, Usage: uint64(u)})
	}
	s.MemAvailable = s.MemTotal - uint64(used)
	return s
}

func mustNew(t *testing.T, c Config) *Detector {
	t.Helper()
	d, err := New(c)
	if err != nil {
		t.Fatal(err)
	}
	return d
}

// A workload leaking 20 MiB/s next to a noisy one (±50 MiB) is judged unstable
// within 10 s of the leak's start, and blamed.
func TestLeakDetected(t *testing.T) {
	for seed := int64(1); seed <= 10; seed++ {
		rng := rand.New(rand.NewSource(seed))
		d := mustNew(t, Config{Hold: 5 * time.Second})
		const leakStart = 90
		detected := -1
		var v Verdict
		for sec := 0; sec <= leakStart+30; sec++ {
			leak := 0.0
			if sec > leakStart {
				leak = float64(sec-leakStart) * 20 * mib
			}
			v = d.Observe(host(sec, map[string]float64{
				"db":    1*gib + rng.Float64()*4*mib,
				"leaky": 200*mib + rng.Float64()*2*mib + leak,
				"noisy": 2*gib + (rng.Float64()*2-1)*50*mib,
			}))
			if v.Unstable {
				if sec <= leakStart {
					t.Fatalf("seed %d: unstable at %ds, before the leak: %+v", seed, sec, v.Reasons)
				}
				detected = sec
				break
			}
		}
		if detected < 0 || detected-leakStart > 10 {
			t.Fatalf("seed %d: leak starting at %ds detected at %ds (want within 10 s); last verdict %+v", seed, leakStart, detected, v)
		}
		if len(v.Top) == 0 || v.Top[0].Workload != "leaky" {
			t.Errorf("seed %d: top %+v, want leaky first", seed, v.Top)
		}
		blamed := false
		for _, r := range v.Reasons {
			blamed = blamed || (r.Kind == KindTrend && r.Metric == MetricWorkloadMemory && r.Workload == "leaky")
			if r.Workload != "" && r.Workload != "leaky" {
				t.Errorf("seed %d: %s blamed too: %+v", seed, r.Workload, r)
			}
		}
		if !blamed || v.TimeToExhaustion <= 0 || v.TimeToExhaustion > time.Hour || !v.Since.Equal(v.Time) {
			t.Errorf("seed %d: verdict %+v", seed, v)
		}
		t.Logf("seed %d: unstable %ds after the leak began, top %s at %.1f MiB/s, exhaustion in %s", seed, detected-leakStart,
			v.Top[0].Workload, v.Top[0].BytesPerSecond/mib, v.TimeToExhaustion.Round(time.Second))
	}
}

// A busy but stable host whose memory swings randomly by ±50 MiB is never unstable.
func TestNoisyStableNeverUnstable(t *testing.T) {
	for seed := int64(1); seed <= 20; seed++ {
		rng := rand.New(rand.NewSource(seed))
		d := mustNew(t, Config{Hold: 5 * time.Second})
		for sec := 0; sec < 120; sec++ {
			v := d.Observe(host(sec, map[string]float64{
				"noisy": 3*gib + (rng.Float64()*2-1)*50*mib,
				"web":   500*mib + (rng.Float64()*2-1)*50*mib,
			}))
			if v.Unstable {
				t.Fatalf("seed %d: unstable at %ds: %+v", seed, sec, v.Reasons)
			}
		}
	}
}

// A memory spike shorter than the hold period does not flip the verdict; a longer
// one does, once it has lasted the hold period.
func TestHoldPeriod(t *testing.T) {
	run := func(spike int) (flipped int, v Verdict) {
		d := mustNew(t, Config{Hold: 5 * time.Second})
		flipped = -1
		for sec := 0; sec < 60; sec++ {
			wl := map[string]float64{"db": 1 * gib}
			if sec >= 30 && sec < 30+spike {
				wl["web"] = 10 * gib // 15 of 16 GiB used: 93.75 %
			}
			if v = d.Observe(host(sec, wl)); v.Unstable && flipped < 0 {
				flipped = sec
				return flipped, v
			}
		}
		return flipped, v
	}
	if at, v := run(4); at >= 0 {
		t.Errorf("a 4 s spike flipped the verdict at %ds: %+v", at, v.Reasons)
	}
	at, v := run(8)
	if at != 35 {
		t.Fatalf("an 8 s spike from 30 s flipped the verdict at %ds, want 35 (after the 5 s hold)", at)
	}
	if len(v.Reasons) != 1 || v.Reasons[0].Kind != KindThreshold || v.Reasons[0].Metric != MetricMemory ||
		v.Reasons[0].HeldFor != 5*time.Second || v.Reasons[0].Limit != 90 {
		t.Errorf("reasons %+v", v.Reasons)
	}
}

func TestThresholds(t *testing.T) {
	d := mustNew(t, Config{Hold: 2 * time.Second, MaxUptime: 30 * time.Minute, Metrics: []string{"load", "uptime", "buffers"}})
	var v Verdict
	for sec := 0; sec <= 2; sec++ {
		s := host(sec, map[string]float64{"web": 11 * gib}) // memory above 90 %, but not enabled
		s.Load1, s.Cached, s.SockMem = 20, 12*gib, 1*gib
		v = d.Observe(s)
	}
	got := map[string]bool{}
	for _, r := range v.Reasons {
		got[r.Metric] = true
	}
	if !v.Unstable || !got["load"] || !got["uptime"] || !got["buffers"] || got["memory"] || len(v.Reasons) != 3 {
		t.Errorf("verdict %+v", v)
	}
	// Back to normal: stable again, Since cleared.
	v = d.Observe(host(3, nil))
	s := host(4, nil)
	s.Uptime = 0
	if v = d.Observe(s); v.Unstable || !v.Since.IsZero() {
		t.Errorf("after recovery %+v", v)
	}
}

// A clock step back starts afresh instead of computing negative durations.
func TestTimeGoesBack(t *testing.T) {
	d := mustNew(t, Config{Hold: 2 * time.Second})
	for sec := 10; sec < 14; sec++ {
		d.Observe(host(sec, map[string]float64{"web": 11 * gib}))
	}
	if v := d.Observe(host(5, map[string]float64{"web": 11 * gib})); v.Unstable {
		t.Errorf("unstable right after a clock step back: %+v", v)
	}
}

func TestValidate(t *testing.T) {
	for _, tc := range []struct {
		field string
		c     Config
	}{
		{"hold", Config{Hold: -time.Second}},
		{"max_uptime", Config{MaxUptime: -1}},
		{"trend_window", Config{TrendWindow: -time.Minute}},
		{"horizon", Config{Horizon: -time.Hour}},
		{"memory_percent", Config{MemoryPercent: 120}},
		{"memory_percent", Config{MemoryPercent: -5}},
		{"buffer_percent", Config{BufferPercent: 100.5}},
		{"load_per_cpu", Config{LoadPerCPU: -1}},
		{"alpha", Config{Alpha: 1.5}},
		{"min_samples", Config{MinSamples: 2}},
		{"trend_confirm", Config{TrendConfirm: -1}},
		{"noise_factor", Config{NoiseFactor: -1}},
		{"metrics", Config{Metrics: []string{"memory", "swap"}}},
	} {
		_, err := New(tc.c)
		if err == nil || !strings.Contains(err.Error(), tc.field+":") {
			t.Errorf("%+v: error %v, want one naming %s", tc.c, err, tc.field)
		}
	}
	c := Config{}
	c.Defaults()
	if err := c.Validate(); err != nil {
		t.Errorf("defaults invalid: %v", err)
	}
	if c.Hold != 30*time.Second || c.MemoryPercent != 90 || c.BufferPercent != 80 || c.LoadPerCPU != 4 ||
		c.TrendWindow != 2*time.Minute || c.Horizon != time.Hour || c.Alpha != 0.01 || c.MinSamples != 20 {
		t.Errorf("defaults %+v", c)
	}
}

// BenchmarkDetectionLatency reports, for leaks of 1, 10 and 100 MiB/s next to a noisy
// workload (±50 MiB) on a 16 GiB host sampled every second, the seconds from the
// leak's start to the unstable verdict (mean over seeds; the default configuration
// with a 5 s hold), and the detector's cost per sample.
func BenchmarkDetectionLatency(b *testing.B) {
	for _, rate := range []float64{1, 10, 100} {
		b.Run(strings.TrimSuffix(strings.Replace(time.Duration(rate).String(), "ns", "", 1), "")+"MiBps", func(b *testing.B) {
			var total, runs, samples float64
			for i := 0; i < b.N; i++ {
				rng := rand.New(rand.NewSource(int64(i + 1)))
				d, err := New(Config{Hold: 5 * time.Second})
				if err != nil {
					b.Fatal(err)
				}
				const leakStart = 120
				for sec := 0; sec <= leakStart+600; sec++ {
					leak := 0.0
					if sec > leakStart {
						leak = float64(sec-leakStart) * rate * mib
					}
					samples++
					v := d.Observe(host(sec, map[string]float64{"noisy": 500*mib + (rng.Float64()*2-1)*50*mib, "leaky": 100*mib + leak}))
					if v.Unstable {
						if sec <= leakStart {
							b.Fatalf("unstable before the leak, at %d s", sec)
						}
						total += float64(sec - leakStart)
						runs++
						break
					}
				}
			}
			if runs > 0 {
				b.ReportMetric(total/runs, "latency-s")
			}
			b.ReportMetric(runs/float64(b.N), "detected-ratio")
			b.ReportMetric(float64(b.Elapsed().Nanoseconds())/samples, "ns/sample")
		})
	}
}
