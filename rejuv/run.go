package rejuv

import (
	"context"
	"fmt"
	"time"
)

// Action is one rung of the ladder.
type Action interface {
	// Name is the rung's name: "drop-caches", "compact-memory", "clear-state",
	// "restart-services" or "reboot" for the rungs Config.Ladder builds.
	Name() string
	Run(ctx context.Context) error
}

// Detailed is an Action that also says what it did, e.g. "MemAvailable 1.2 GiB ->
// 3.4 GiB". Run calls RunDetail instead of Run on such actions; every rung Config.Ladder
// builds is one. The detail is kept on failure too (what was done before it).
type Detailed interface {
	Action
	RunDetail(ctx context.Context) (detail string, err error)
}

// StepResult is what one rung did.
type StepResult struct {
	Action string        `json:"action"`
	Took   time.Duration `json:"took"`
	Detail string        `json:"detail,omitempty"`
	Error  string        `json:"error,omitempty"`
}

// Run runs the ladder in order, calls progress (if not nil) after each step, and stops
// at the first error, which it returns wrapped with the action's name after reporting
// the failed step. A cancelled ctx stops it before the next step. The results hold every
// step that ran. The reboot rung is last: on a real host it does not return, or returns
// while the host shuts down.
func Run(ctx context.Context, ladder []Action, progress func(StepResult)) ([]StepResult, error) {
	results := make([]StepResult, 0, len(ladder))
	for _, a := range ladder {
		if err := ctx.Err(); err != nil {
			return results, fmt.Errorf("before %s: %w", a.Name(), err)
		}
		start := time.Now()
		var detail string
		var err error
		if d, ok := a.(Detailed); ok {
			detail, err = d.RunDetail(ctx)
		} else {
			err = a.Run(ctx)
		}
		r := StepResult{Action: a.Name(), Took: time.Since(start), Detail: detail}
		if err != nil {
			r.Error = err.Error()
		}
		results = append(results, r)
		if progress != nil {
			progress(r)
		}
		if err != nil {
			return results, fmt.Errorf("%s: %w", a.Name(), err)
		}
	}
	return results, nil
}
