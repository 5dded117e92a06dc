package harness

import (
	"fmt"
	"os"
	"path/filepath"
)

// CycleConfig returns a host's duplexd.yaml for running the whole cycle on
// namespace hosts: 250 ms samples and a fast detector that judges workload memory
// only (the hosts share one kernel, so host-wide memory would make them all
// unstable together), a controller that starts a cycle after 2 s (extra adds lines
// to its section, e.g. "  parallel: 1"), and a ladder that ends in the simulated
// restart (reboot: exit) with dir/HOST/scratch as the scratch directory.
func CycleConfig(dir, extra string) func(host string) string {
	return func(host string) string {
		scratch := filepath.Join(dir, host, "scratch")
		_ = os.MkdirAll(scratch, 0o755)
		return fmt.Sprintf(`sample_interval: 250ms
detect:
  hold: 5s
  trend_window: 10s
  min_samples: 12
  metrics: [workload-memory]
controller:
  unstable_for: 2s
  retry: 500ms
  lease_ttl: 3s
%s
rejuvenate:
  actions: [drop-caches, compact-memory, clear-state, reboot]
  scratch: [%s]
  reboot: exit
`, extra, scratch)
	}
}
