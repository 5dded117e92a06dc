package doctor

import (
	"context"
	"sync"
	"time"
)

// Status is the verdict of one check.
type Status string

const (
	// OK means the host has what the check looks for.
	OK Status = "ok"
	// Missing means the host lacks it; Check.Detail says what that costs.
	Missing Status = "missing"
	// Warn means it could not be fully tested, or works with a caveat.
	Warn Status = "warn"
)

// Check is the verdict on one thing duplex uses.
type Check struct {
	// Name is a short id: "kernel", "root", "criu", "criu-check", "uffd", "lazy-dump",
	// "dirty-tracking", "nftables-lock", "nft", "pidns", "cgroups", "tracefs", "btf",
	// "ebpf-tracepoint", "pipe-max-size", "thp".
	Name     string `json:"name"`
	Status   Status `json:"status"`
	Required bool   `json:"required"` // duplex cannot work without it
	Detail   string `json:"detail"`   // one line: the value found, why missing, what it means
}

// Report holds every check of one Run, in a fixed order.
type Report struct {
	Checks []Check `json:"checks"`
}

// OK reports whether every required check passed.
func (r Report) OK() bool {
	for _, c := range r.Checks {
		if c.Required && c.Status != OK {
			return false
		}
	}
	return true
}

// Get returns the check with the given name.
func (r Report) Get(name string) (Check, bool) {
	for _, c := range r.Checks {
		if c.Name == name {
			return c, true
		}
	}
	return Check{}, false
}

// Options tunes Run.
type Options struct {
	// CRIUPath is the CRIU binary to examine; "" means checkpoint.FindCRIU().
	CRIUPath string
}

// checkTimeout bounds each probe; together they run concurrently.
const checkTimeout = 2 * time.Second

// probe examines one aspect of the host and returns one or more checks.
type probe func(ctx context.Context, o Options) []Check

// probes run concurrently; their checks are reported in this order.
var probes = []probe{
	func(context.Context, Options) []Check { return []Check{checkKernel()} },
	func(context.Context, Options) []Check { return []Check{checkRoot()} },
	checkCRIU, // criu, criu-check, uffd, lazy-dump, smaps-copy, dirty-tracking, nftables-lock
	func(ctx context.Context, _ Options) []Check { return []Check{checkNFT(ctx)} },
	func(ctx context.Context, _ Options) []Check { return []Check{checkPIDNS(ctx)} },
	func(context.Context, Options) []Check { return []Check{checkCgroups()} },
	func(context.Context, Options) []Check { return []Check{checkTracefs()} },
	func(context.Context, Options) []Check { return []Check{checkBTF()} },
	func(context.Context, Options) []Check { return []Check{checkEBPF()} },
	func(context.Context, Options) []Check { return []Check{checkPipeMaxSize()} },
	func(context.Context, Options) []Check { return []Check{checkTHP()} },
}

// Run examines the host and returns one check per aspect. Each probe gets at most
// checkTimeout (less if ctx ends first); the probes run concurrently. Run changes
// nothing on the host.
func Run(ctx context.Context, o Options) Report {
	results := make([][]Check, len(probes))
	var wg sync.WaitGroup
	for i, p := range probes {
		wg.Add(1)
		go func() {
			defer wg.Done()
			pctx, cancel := context.WithTimeout(ctx, checkTimeout)
			defer cancel()
			results[i] = p(pctx, o)
		}()
	}
	wg.Wait()

	var r Report
	for _, cs := range results {
		r.Checks = append(r.Checks, cs...)
	}
	return r
}
