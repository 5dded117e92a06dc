package migrate

import (
	"errors"
	"fmt"
	"slices"
	"strings"

	"github.com/duplex-ha/duplex/checkpoint"
)

// Strategy is how memory moves.
type Strategy string

const (
	// Auto picks the best strategy both ends support.
	Auto Strategy = "auto"
	// PreCopy copies memory in rounds while the workload runs (dirty-memory
	// tracking), then freezes it for a small final dump.
	PreCopy Strategy = "precopy"
	// PostCopy restores the workload at once and serves its memory afterwards
	// (lazy pages over userfaultfd).
	PostCopy Strategy = "postcopy"
	// StopCopy freezes the workload and streams all of it to the destination.
	StopCopy Strategy = "stopcopy"
)

// ParseStrategy reads a strategy name.
func ParseStrategy(s string) (Strategy, error) {
	switch st := Strategy(s); st {
	case Auto, PreCopy, PostCopy, StopCopy:
		return st, nil
	case "":
		return Auto, nil
	}
	return "", fmt.Errorf("unknown strategy %q: use auto, precopy, postcopy or stopcopy", s)
}

var (
	// ErrStrategyUnavailable means a forced strategy is not supported by one end.
	ErrStrategyUnavailable = errors.New("strategy unavailable")
	// ErrPreflight means a pre-flight check failed; nothing was frozen.
	ErrPreflight = errors.New("pre-flight check failed")
)

// Capabilities is what one end can do.
type Capabilities struct {
	Host         string          `json:"host"`
	CRIU         string          `json:"criu"`
	Features     map[string]bool `json:"features"`
	CPUFlags     []string        `json:"cpu_flags,omitempty"`
	MemAvailable uint64          `json:"mem_available"`
	// Implemented lists the strategies this duplex build can run.
	Implemented []Strategy `json:"implemented"`
}

// implemented are the strategies this build can drive end to end.
var implemented = []Strategy{PreCopy, StopCopy, PostCopy}

// needs lists the CRIU features each strategy needs on both ends.
var needs = map[Strategy][]string{
	PreCopy:  {checkpoint.FeatureMemDirtyTrack},
	PostCopy: {checkpoint.FeatureUFFDNonCoop},
	StopCopy: nil,
}

// PostCopyAbove is the resident size from which auto prefers post-copy over
// stop-and-copy: below it a stop-and-copy freeze is short, and it never risks the
// workload on the network (a post-copy transfer that breaks loses the pages not yet
// moved).
const PostCopyAbove = 512 << 20

// Choose picks the strategy for a migration from src to dst of a workload with the
// given resident memory. A forced strategy one end cannot run is refused with
// ErrStrategyUnavailable and the reason. Auto prefers pre-copy (short freeze, no
// risk), then stop-and-copy for small workloads, then post-copy (downtime that does
// not grow with memory), then stop-and-copy.
func Choose(want Strategy, src, dst Capabilities, memory uint64) (Strategy, error) {
	usable := func(s Strategy) error {
		for _, c := range []Capabilities{src, dst} {
			if !slices.Contains(c.Implemented, s) {
				return fmt.Errorf("%w: %s: not implemented by duplex on %s yet", ErrStrategyUnavailable, s, c.Host)
			}
			var missing []string
			for _, f := range needs[s] {
				if !c.Features[f] {
					missing = append(missing, f)
				}
			}
			if len(missing) > 0 {
				return fmt.Errorf("%w: %s needs %s, which %s lacks (see 'duplexctl doctor')", ErrStrategyUnavailable, s, strings.Join(missing, ", "), c.Host)
			}
		}
		return nil
	}
	if want != Auto && want != "" {
		if err := usable(want); err != nil {
			return "", err
		}
		return want, nil
	}
	order := []Strategy{PreCopy, StopCopy}
	if memory >= PostCopyAbove {
		order = []Strategy{PreCopy, PostCopy, StopCopy}
	}
	for _, s := range order {
		if usable(s) == nil {
			return s, nil
		}
	}
	return "", fmt.Errorf("%w: no strategy both hosts support", ErrStrategyUnavailable)
}

// PrecopyRule decides when pre-copy stops iterating and does its final dump.
type PrecopyRule struct {
	MaxRounds int // never more pre-dumps than this
	// TargetPages: stop once a round wrote no more pages than this (the final dump
	// will be about as small).
	TargetPages uint64
	// MinShrink: stop when a round wrote more than MinShrink times the pages of the
	// round before (the workload dirties memory as fast as it is copied).
	MinShrink float64
}

// DefaultPrecopyRule is the stop rule used unless configured otherwise.
var DefaultPrecopyRule = PrecopyRule{MaxRounds: 8, TargetPages: 2560 /* 10 MiB */, MinShrink: 0.8}

// Continue reports whether another pre-dump round is worth it, given the pages each
// round so far wrote, oldest first.
func (r PrecopyRule) Continue(rounds []uint64) bool {
	n := len(rounds)
	if n == 0 {
		return true
	}
	if n >= r.MaxRounds {
		return false
	}
	last := rounds[n-1]
	if last <= r.TargetPages {
		return false
	}
	if n >= 2 && float64(last) > r.MinShrink*float64(rounds[n-2]) {
		return false // not converging
	}
	return true
}
