package migrate

import (
	"context"
	"errors"
	"io"
	"net"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/duplex-ha/duplex/checkpoint"
	"github.com/duplex-ha/duplex/internal/workload"
)

// roundDumper plays the workload manager's pre-dumps: round n writes pages[n]
// pages into the page channel, or fails when fail == n (1-based).
type roundDumper struct {
	LocalWorkloads
	pages   []uint64
	fail    int
	parents []string
	dirs    []string
}

func (d *roundDumper) PreDump(_ context.Context, _ string, o workload.PreDumpOptions) (*checkpoint.DumpStats, error) {
	n := len(d.dirs)
	d.dirs = append(d.dirs, o.Dir)
	d.parents = append(d.parents, o.ParentDir)
	if d.fail == n+1 {
		return nil, errors.New("criu pre-dump failed")
	}
	if _, err := o.PageServerConn.Write(make([]byte, d.pages[n]*4096)); err != nil {
		return nil, err
	}
	return &checkpoint.DumpStats{PagesWritten: d.pages[n]}, nil
}

// pageSink plays the destination's page servers: each page channel is drained
// and its bytes counted.
type pageSink struct {
	Destination
	mu       sync.Mutex
	channels int
	got      []int64
	wg       sync.WaitGroup
}

func (s *pageSink) Pages(context.Context, string) (io.ReadWriteCloser, error) {
	a, b, err := bigSocketPair()
	if err != nil {
		return nil, err
	}
	ours, err := net.FileConn(a)
	a.Close()
	if err != nil {
		return nil, err
	}
	far, err := net.FileConn(b)
	b.Close()
	if err != nil {
		return nil, err
	}
	s.mu.Lock()
	s.channels++
	i := len(s.got)
	s.got = append(s.got, 0)
	s.mu.Unlock()
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		n, _ := io.Copy(io.Discard, far)
		far.Close()
		s.mu.Lock()
		s.got[i] = n
		s.mu.Unlock()
	}()
	return ours, nil
}

func TestPrecopyRounds(t *testing.T) {
	rule := PrecopyRule{MaxRounds: 6, TargetPages: 100, MinShrink: 0.8}
	for _, tc := range []struct {
		name   string
		pages  []uint64
		fail   int
		rounds int
		err    string
	}{
		{"converges", []uint64{4000, 1000, 90, 50}, 0, 3, ""},
		{"stops when it no longer shrinks", []uint64{4000, 3900, 3800}, 0, 2, ""},
		{"round limit", []uint64{4000, 2000, 1000, 500, 250, 125, 60}, 0, 6, ""},
		{"a failed round ends it", []uint64{4000, 1000}, 2, 0, "pre-copy round 2: criu pre-dump failed"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			d := &roundDumper{pages: tc.pages, fail: tc.fail}
			sink := &pageSink{}
			s := &Source{Workloads: d, Precopy: rule}
			res := &Result{ID: "m"}
			var reports []string
			parent, err := s.precopy(context.Background(), sink, "w", res, dir, func(_ int64, msg string) { reports = append(reports, msg) })
			sink.wg.Wait()
			if tc.err != "" {
				if err == nil || !strings.Contains(err.Error(), tc.err) {
					t.Fatalf("err %v, want %q", err, tc.err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if len(res.Rounds) != tc.rounds || sink.channels != tc.rounds {
				t.Fatalf("%d rounds over %d page channels, want %d", len(res.Rounds), sink.channels, tc.rounds)
			}
			var total int64
			for i, r := range res.Rounds {
				want := int64(tc.pages[i]) * 4096
				if r.Pages != tc.pages[i] || r.Bytes != want || sink.got[i] != want {
					t.Errorf("round %d: %+v, destination got %d bytes; want %d pages, %d bytes", i+1, r, sink.got[i], tc.pages[i], want)
				}
				// Each round is a directory of its own whose parent is the round before.
				if wantDir := filepath.Join(dir, string(rune('1'+i))); d.dirs[i] != wantDir {
					t.Errorf("round %d in %s, want %s", i+1, d.dirs[i], wantDir)
				}
				if i == 0 && d.parents[i] != "" || i > 0 && d.parents[i] != d.dirs[i-1] {
					t.Errorf("round %d's parent %q", i+1, d.parents[i])
				}
				total += r.Bytes
			}
			if parent != d.dirs[len(d.dirs)-1] {
				t.Errorf("final dump's parent %s, want the last round %s", parent, d.dirs[len(d.dirs)-1])
			}
			if res.PageBytes != total {
				t.Errorf("page bytes %d, rounds sent %d", res.PageBytes, total)
			}
			if len(reports) == 0 || !strings.Contains(reports[len(reports)-1], "pages") {
				t.Errorf("progress %v", reports)
			}
		})
	}
}

// A workload manager that cannot pre-dump refuses pre-copy before any round.
func TestPrecopyNeedsPreDumper(t *testing.T) {
	sink := &pageSink{}
	s := &Source{Workloads: struct{ LocalWorkloads }{}}
	_, err := s.precopy(context.Background(), sink, "w", &Result{}, t.TempDir(), func(int64, string) {})
	if !errors.Is(err, ErrStrategyUnavailable) || sink.channels != 0 {
		t.Fatalf("err %v after %d page channels", err, sink.channels)
	}
}
