package migrate

import (
	"errors"
	"testing"

	"github.com/duplex-ha/duplex/checkpoint"
)

func caps(host string, features ...string) Capabilities {
	c := Capabilities{Host: host, Features: map[string]bool{}, Implemented: []Strategy{PreCopy, PostCopy, StopCopy}}
	for _, f := range features {
		c.Features[f] = true
	}
	return c
}

func TestChoose(t *testing.T) {
	uffd, dirty := checkpoint.FeatureUFFDNonCoop, checkpoint.FeatureMemDirtyTrack
	for _, tc := range []struct {
		name     string
		want     Strategy
		src, dst Capabilities
		got      Strategy
		err      error
	}{
		{"auto prefers pre-copy", Auto, caps("a", uffd, dirty), caps("b", uffd, dirty), PreCopy, nil},
		{"auto: small workload without dirty tracking", Auto, caps("a", uffd), caps("b", uffd), StopCopy, nil},
		{"auto falls back to stop-and-copy", Auto, caps("a", uffd), caps("b", dirty), StopCopy, nil},
		{"forced stop-and-copy", StopCopy, caps("a"), caps("b"), StopCopy, nil},
		{"forced pre-copy without dirty tracking", PreCopy, caps("a", dirty), caps("b"), "", ErrStrategyUnavailable},
		{"forced post-copy without uffd", PostCopy, caps("a"), caps("b", uffd), "", ErrStrategyUnavailable},
	} {
		got, err := Choose(tc.want, tc.src, tc.dst, 64<<20)
		if got != tc.got || !errors.Is(err, tc.err) {
			t.Errorf("%s: Choose = %q, %v; want %q, %v", tc.name, got, err, tc.got, tc.err)
		}
	}
	// A strategy this build has not implemented is refused with that reason.
	a, b := caps("a", dirty), caps("b", dirty)
	a.Implemented = []Strategy{StopCopy}
	if _, err := Choose(PreCopy, a, b, 0); !errors.Is(err, ErrStrategyUnavailable) {
		t.Errorf("unimplemented pre-copy: %v", err)
	}
	if s, err := Choose(Auto, a, b, 0); s != StopCopy || err != nil {
		t.Errorf("auto with only stop-and-copy implemented: %q, %v", s, err)
	}
	// A large workload without dirty tracking goes post-copy, a small one stop-and-copy.
	big, small := uint64(PostCopyAbove), uint64(PostCopyAbove-1)
	if s, _ := Choose(Auto, caps("a", uffd), caps("b", uffd), big); s != PostCopy {
		t.Errorf("auto for a large workload: %q, want post-copy", s)
	}
	if s, _ := Choose(Auto, caps("a", uffd), caps("b", uffd), small); s != StopCopy {
		t.Errorf("auto for a small workload: %q, want stop-and-copy", s)
	}
}

func TestParseStrategy(t *testing.T) {
	for in, want := range map[string]Strategy{"": Auto, "auto": Auto, "precopy": PreCopy, "postcopy": PostCopy, "stopcopy": StopCopy} {
		if got, err := ParseStrategy(in); got != want || err != nil {
			t.Errorf("ParseStrategy(%q) = %q, %v", in, got, err)
		}
	}
	if _, err := ParseStrategy("teleport"); err == nil {
		t.Error("ParseStrategy accepted an unknown strategy")
	}
}

func TestPrecopyStopRule(t *testing.T) {
	r := PrecopyRule{MaxRounds: 5, TargetPages: 100, MinShrink: 0.8}
	for _, tc := range []struct {
		rounds []uint64
		more   bool
		why    string
	}{
		{nil, true, "no round yet"},
		{[]uint64{100000}, true, "first round is large"},
		{[]uint64{100000, 20000}, true, "shrinking fast"},
		{[]uint64{100000, 20000, 90}, false, "small enough for the final dump"},
		{[]uint64{100000, 90000}, false, "not converging: 90% of the previous round"},
		{[]uint64{100000, 120000}, false, "growing"},
		{[]uint64{100000, 50000, 25000, 12000, 6000}, false, "round limit"},
		{[]uint64{100000, 50000, 25000, 12000}, true, "still converging under the limit"},
	} {
		if got := r.Continue(tc.rounds); got != tc.more {
			t.Errorf("%s: Continue(%v) = %v", tc.why, tc.rounds, got)
		}
	}
}
