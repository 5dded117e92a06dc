package integration

import (
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"testing"
	"time"

	"github.com/duplex-ha/duplex/internal/testutil"
)

// BenchmarkMonitorOverhead runs, side by side in one run, a workload that allocates
// and frees memory as fast as it can under duplexd sampling every second with the
// eBPF probes off, with the default probes (socket and OOM), and with the memory
// probe too (--ebpf-memory). For each it reports the workload's throughput, duplexd's
// own CPU time, and the BPF programs' run time from the kernel's BPF statistics, as
// percentages of one core.
//
//	go test -run '^$' -bench MonitorOverhead -benchtime 1x ./integration/
func BenchmarkMonitorOverhead(b *testing.B) {
	testutil.RequiresRoot(b)
	load := testutil.Build(b, "./cmd/duplex-load")
	// Kernel BPF run-time statistics, for the duration of the benchmark.
	old, err := os.ReadFile("/proc/sys/kernel/bpf_stats_enabled")
	if err != nil {
		b.Fatal(err)
	}
	if err := os.WriteFile("/proc/sys/kernel/bpf_stats_enabled", []byte("1"), 0o644); err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { _ = os.WriteFile("/proc/sys/kernel/bpf_stats_enabled", old, 0o644) })

	for _, mode := range []struct {
		name  string
		flags []string
	}{
		{"probes=off", []string{"--no-ebpf"}},
		{"probes=default", nil},
		{"probes=memory", []string{"--ebpf-memory"}},
	} {
		b.Run(mode.name, func(b *testing.B) {
			for i := 0; i < b.N; i++ {
				h := newHost(b, append([]string{"--sample-interval", "1s"}, mode.flags...)...)
				bin := filepath.Join(h.dir, "duplex-load")
				copyFile(b, load, bin)
				h.must("run", "churn", "--", bin, "churn")
				time.Sleep(2 * time.Second) // warm up
				cpu0, bpf0, start := daemonCPU(b, h), bpfRunTime(b), time.Now()
				time.Sleep(10 * time.Second)
				elapsed := time.Since(start).Seconds()
				daemon := (daemonCPU(b, h) - cpu0).Seconds()
				bpf := (bpfRunTime(b) - bpf0).Seconds()
				ops := lastRate(h.must("logs", "--stream", "stdout", "--tail", "8", "churn"))
				h.must("stop", "--timeout", "0s", "churn")
				b.ReportMetric(ops, "workload-ops/s")
				b.ReportMetric(100*daemon/elapsed, "duplexd-%core")
				b.ReportMetric(100*bpf/elapsed, "bpf-%core")
			}
		})
	}
}

var rateRe = regexp.MustCompile(`churn: (\d+) ops/s`)

// lastRate averages the churn rates the workload printed.
func lastRate(out string) float64 {
	var sum, n float64
	for _, m := range rateRe.FindAllStringSubmatch(out, -1) {
		v, _ := strconv.ParseFloat(m[1], 64)
		sum += v
		n++
	}
	if n == 0 {
		return 0
	}
	return sum / n
}

// bpfRunTime sums the run time of every loaded BPF program (kernel statistics).
func bpfRunTime(b testing.TB) time.Duration {
	out, err := exec.Command("bpftool", "prog", "show", "-j").Output()
	if err != nil {
		b.Fatalf("bpftool prog show: %v", err)
	}
	var progs []struct {
		RunTimeNs int64 `json:"run_time_ns"`
	}
	if err := json.Unmarshal(out, &progs); err != nil {
		b.Fatal(err)
	}
	var total int64
	for _, p := range progs {
		total += p.RunTimeNs
	}
	return time.Duration(total)
}
