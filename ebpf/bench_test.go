package ebpf_test

import (
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/duplex-ha/duplex/ebpf"
)

// BenchmarkProbeOverhead maps, touches and unmaps 1 MiB as fast as it can (256
// rss_stat events per op) with the probes off and on, and reports throughput
// and, with probes on, the BPF programs' own run time per second of wall time.
//
//	go test -run '^$' -bench ProbeOverhead -benchtime 3s ./ebpf
func BenchmarkProbeOverhead(b *testing.B) {
	b.Run("probes=off", func(b *testing.B) {
		churn(b)
	})
	b.Run("probes=default", func(b *testing.B) {
		// What duplexd loads unless --ebpf-memory: socket and OOM probes only.
		loadProbes(b, ebpf.Options{NoMemory: true})
		churn(b)
	})
	b.Run("probes=on,stats=off", func(b *testing.B) {
		loadProbes(b, ebpf.Options{})
		churn(b)
	})
	b.Run("probes=on", func(b *testing.B) {
		p := loadProbes(b, ebpf.Options{EnableStats: true})
		before, err := p.Stats()
		if err != nil {
			b.Fatal(err)
		}
		elapsed := churn(b)
		after, err := p.Stats()
		if err != nil {
			b.Fatal(err)
		}
		var runs uint64
		var rt time.Duration
		for name, s := range after {
			runs += s.RunCount - before[name].RunCount
			rt += s.RunTime - before[name].RunTime
		}
		b.ReportMetric(float64(rt)/elapsed.Seconds(), "bpf-ns/s")
		b.ReportMetric(100*rt.Seconds()/elapsed.Seconds(), "bpf-%core")
		b.ReportMetric(float64(runs)/float64(b.N), "bpf-runs/op")
		if runs > 0 {
			b.ReportMetric(float64(rt)/float64(runs), "ns/bpf-run")
		}
	})
}

// churn runs b.N map-touch-unmap cycles of 1 MiB and reports ops/s.
func churn(b *testing.B) time.Duration {
	const size = 1 << 20
	b.ResetTimer()
	start := time.Now()
	for i := 0; i < b.N; i++ {
		m, err := unix.Mmap(-1, 0, size, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS|unix.MAP_POPULATE)
		if err != nil {
			b.Fatal(err)
		}
		for j := 0; j < size; j += 4096 {
			m[j] = 1
		}
		if err := unix.Munmap(m); err != nil {
			b.Fatal(err)
		}
	}
	elapsed := time.Since(start)
	b.StopTimer()
	b.ReportMetric(float64(b.N)/elapsed.Seconds(), "ops/s")
	return elapsed
}
