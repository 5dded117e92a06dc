package rejuv_test

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/duplex-ha/duplex/rejuv"
)

// machine is a fake host: it records what the ladder asked of it, as "systemctl restart
// a.service", "reboot(2)" or "exit", and fails the calls named in fail.
type machine struct {
	mu    sync.Mutex
	calls []string
	fail  map[string]error
}

func (m *machine) record(call string) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.calls = append(m.calls, call)
	return m.fail[call]
}

func (m *machine) Calls() []string {
	m.mu.Lock()
	defer m.mu.Unlock()
	return append([]string(nil), m.calls...)
}

// options returns Options whose every machine call is m's; proc is Options.Proc.
func (m *machine) options(proc string) rejuv.Options {
	return rejuv.Options{
		Proc: proc,
		Exec: func(_ context.Context, name string, args ...string) error {
			return m.record(strings.Join(append([]string{name}, args...), " "))
		},
		Reboot: func() error { return m.record("reboot(2)") },
		Exit:   func() error { return m.record("exit") },
	}
}

// fakeProc builds a procfs stand-in: the two vm knobs (empty files), meminfo, buddyinfo
// and an empty self/mountinfo.
func fakeProc(t *testing.T) string {
	t.Helper()
	proc := t.TempDir()
	files := map[string]string{
		"sys/vm/drop_caches":    "",
		"sys/vm/compact_memory": "",
		"meminfo": "MemTotal:       16303428 kB\nMemFree:         1048576 kB\n" +
			"MemAvailable:    1258291 kB\nBuffers:          204800 kB\nCached:          2097152 kB\n",
		"buddyinfo":      "Node 0, zone   Normal    500    400    300    200    100     50     25     10      5      2      1\n",
		"self/mountinfo": "",
	}
	for name, content := range files {
		p := filepath.Join(proc, name)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return proc
}

// runOne builds the one-rung ladder cfg describes (cfg.Actions has one action) and runs it.
func runOne(t *testing.T, cfg rejuv.Config, o rejuv.Options) (rejuv.StepResult, error) {
	t.Helper()
	if len(cfg.Actions) != 1 {
		t.Fatalf("runOne wants one action, got %q", cfg.Actions)
	}
	ladder, err := cfg.Ladder(o)
	if err != nil {
		t.Fatalf("Ladder: %v", err)
	}
	results, err := rejuv.Run(t.Context(), ladder, nil)
	if len(results) != 1 {
		t.Fatalf("Run returned %d results, want 1 (err %v)", len(results), err)
	}
	if results[0].Action != cfg.Actions[0] {
		t.Fatalf("result for %q, want %q", results[0].Action, cfg.Actions[0])
	}
	if (err == nil) != (results[0].Error == "") {
		t.Fatalf("Run err %v but result error %q", err, results[0].Error)
	}
	return results[0], err
}

func readFile(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}
