package checkpoint_test

import (
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/duplex-ha/duplex/checkpoint"
)

func TestSeizeStart(t *testing.T) {
	dir := t.TempDir()
	log := filepath.Join(dir, "dump.log")
	if _, ok := checkpoint.SeizeStart(log); ok {
		t.Error("an absent log gave an offset")
	}
	if err := os.WriteFile(log, []byte("(00.000012) Version: 4.2.1\n(00.001400) Loaded kdat cache from /run/criu.kdat\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, ok := checkpoint.SeizeStart(log); ok {
		t.Error("a log without a seized task gave an offset")
	}
	f, _ := os.OpenFile(log, os.O_APPEND|os.O_WRONLY, 0)
	f.WriteString("(01.040948) Seized task 10235, state 1\n(01.050000) Seized task 10236, state 1\n")
	f.Close()
	// The last line before the seize: the tree still ran then.
	if d, ok := checkpoint.SeizeStart(log); !ok || d != 1400*time.Microsecond {
		t.Errorf("offset %v %v, want 1.4ms", d, ok)
	}
}
