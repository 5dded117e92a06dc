package rejuv_test

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"reflect"
	"testing"

	"github.com/duplex-ha/duplex/rejuv"
)

// step is a fake rung: it records that it ran and returns err.
type step struct {
	name string
	err  error
	ran  *[]string
}

func (s step) Name() string { return s.name }

func (s step) Run(context.Context) error {
	*s.ran = append(*s.ran, s.name)
	return s.err
}

// detailedStep also says what it did, even when it fails.
type detailedStep struct{ step }

func (s detailedStep) RunDetail(ctx context.Context) (string, error) {
	return "did " + s.name, s.Run(ctx)
}

func TestRunStopsAtFirstError(t *testing.T) {
	var ran []string
	boom := errors.New("boom")
	ladder := []rejuv.Action{
		detailedStep{step{name: "first", ran: &ran}},
		detailedStep{step{name: "second", err: boom, ran: &ran}},
		step{name: "third", ran: &ran},
	}
	var reported []rejuv.StepResult
	results, err := rejuv.Run(t.Context(), ladder, func(r rejuv.StepResult) { reported = append(reported, r) })
	if !errors.Is(err, boom) || err.Error() != "second: boom" {
		t.Fatalf("err = %v, want \"second: boom\" wrapping the cause", err)
	}
	if want := []string{"first", "second"}; !reflect.DeepEqual(ran, want) {
		t.Fatalf("ran %q, want %q", ran, want)
	}
	if !reflect.DeepEqual(results, reported) {
		t.Fatalf("results %+v differ from progress reports %+v", results, reported)
	}
	if len(results) != 2 {
		t.Fatalf("%d results, want 2", len(results))
	}
	if r := results[0]; r.Action != "first" || r.Detail != "did first" || r.Error != "" {
		t.Errorf("first result %+v", r)
	}
	if r := results[1]; r.Action != "second" || r.Detail != "did second" || r.Error != "boom" {
		t.Errorf("second result %+v", r)
	}
}

func TestRunPlainActionsAndNilProgress(t *testing.T) {
	var ran []string
	results, err := rejuv.Run(t.Context(), []rejuv.Action{step{name: "a", ran: &ran}, step{name: "b", ran: &ran}}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if len(results) != 2 || results[1].Action != "b" || results[1].Detail != "" || len(ran) != 2 {
		t.Fatalf("results %+v, ran %q", results, ran)
	}
}

func TestRunCancelled(t *testing.T) {
	var ran []string
	ctx, cancel := context.WithCancel(t.Context())
	cancelling := []rejuv.Action{
		step{name: "a", ran: &ran},
		cancelStep{cancel},
		step{name: "never", ran: &ran},
	}
	results, err := rejuv.Run(ctx, cancelling, nil)
	if !errors.Is(err, context.Canceled) || err.Error() != "before never: context canceled" {
		t.Fatalf("err = %v, want context.Canceled before \"never\"", err)
	}
	if len(results) != 2 || !reflect.DeepEqual(ran, []string{"a"}) {
		t.Fatalf("results %+v, ran %q", results, ran)
	}
}

type cancelStep struct{ cancel context.CancelFunc }

func (cancelStep) Name() string { return "cancel" }

func (c cancelStep) Run(context.Context) error {
	c.cancel()
	return nil
}

// The whole default ladder against a fake procfs and fake machine calls, with a real
// scratch directory.
func TestRunDefaultLadder(t *testing.T) {
	proc := fakeProc(t)
	scratch := t.TempDir()
	write(t, filepath.Join(scratch, "junk/file"), 100)
	m := &machine{}
	ladder, err := rejuv.Config{
		Scratch:  []string{scratch},
		Services: []string{"app.service"},
		Reboot:   "exit",
	}.Ladder(m.options(proc))
	if err != nil {
		t.Fatal(err)
	}
	var order []string
	results, err := rejuv.Run(t.Context(), ladder, func(r rejuv.StepResult) { order = append(order, r.Action) })
	if err != nil {
		t.Fatal(err)
	}
	if want := rejuv.DefaultActions(); !reflect.DeepEqual(order, want) || len(results) != len(want) {
		t.Fatalf("progress %q, want %q", order, want)
	}
	if want := []string{"systemctl restart app.service", "exit"}; !reflect.DeepEqual(m.Calls(), want) {
		t.Fatalf("calls %q, want %q", m.Calls(), want)
	}
	for file, want := range map[string]string{"sys/vm/drop_caches": "3", "sys/vm/compact_memory": "1"} {
		if got := readFile(t, filepath.Join(proc, file)); got != want {
			t.Errorf("%s holds %q, want %q", file, got, want)
		}
	}
	requireEmptyDir(t, scratch)
	if want := "removed 1 entries (100 B) from " + scratch; results[2].Detail != want {
		t.Errorf("clear-state detail %q, want %q", results[2].Detail, want)
	}
}

// A failing rung keeps the host from rebooting.
func TestRunFailureSkipsReboot(t *testing.T) {
	proc := fakeProc(t)
	if err := os.Remove(filepath.Join(proc, "sys/vm/drop_caches")); err != nil {
		t.Fatal(err)
	}
	m := &machine{}
	ladder, err := rejuv.Config{Actions: []string{"restart-services", "drop-caches", "reboot"}, Services: []string{"a.service"}}.Ladder(m.options(proc))
	if err != nil {
		t.Fatal(err)
	}
	results, err := rejuv.Run(t.Context(), ladder, nil)
	if err == nil || len(results) != 2 || results[1].Action != "drop-caches" || results[1].Error == "" {
		t.Fatalf("results %+v, err %v: want drop-caches failing second", results, err)
	}
	if want := []string{"systemctl restart a.service"}; !reflect.DeepEqual(m.Calls(), want) {
		t.Fatalf("calls %q, want %q (no reboot after a failure)", m.Calls(), want)
	}
}
