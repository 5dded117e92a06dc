package netfail

import (
	"context"
	"fmt"
	"time"
)

// Timing reports how long each step of a Takeover took.
type Timing struct {
	Remove      time.Duration // removing the VIP from the old holder (0 without one)
	Add         time.Duration // adding it on the new holder
	FirstPacket time.Duration // from the start until the first announcement left
	Announce    time.Duration // the whole first burst
	Total       time.Duration
}

// Takeover moves v from `from` (nil when the old holder is gone or unknown) to `to` and
// announces it there with a. It removes before it adds, so that no two hosts answer
// ARP/ND for the VIP at the same time: if the removal fails (including ErrLinkNotFound)
// nothing is added, and the caller decides, e.g. after fencing the old host, to retry
// with from == nil. The same link name is used on both sides; for different names call
// Remove, Add and Announce directly.
//
// The second burst of the announcement runs on `to`'s goroutine until ctx ends.
func Takeover(ctx context.Context, from, to *Manager, v VIP, a Announce) (Timing, error) {
	var tm Timing
	if to == nil {
		return tm, fmt.Errorf("takeover %s: no destination manager", v)
	}
	start := time.Now()
	if from != nil {
		if err := from.Remove(ctx, v); err != nil {
			return tm, fmt.Errorf("takeover %s: %w", v, err)
		}
		tm.Remove = time.Since(start)
	}
	added := time.Now()
	if err := to.Add(ctx, v); err != nil {
		return tm, fmt.Errorf("takeover %s: %w", v, err)
	}
	announced := time.Now()
	tm.Add = announced.Sub(added)
	first, err := to.announce(ctx, v, a, false)
	if !first.IsZero() {
		tm.FirstPacket = first.Sub(start)
	}
	tm.Announce = time.Since(announced)
	tm.Total = time.Since(start)
	if err != nil {
		return tm, fmt.Errorf("takeover %s: %w", v, err)
	}
	return tm, nil
}
