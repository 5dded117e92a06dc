package controller

import (
	"fmt"
	"sort"
	"strings"
	"time"

	"github.com/duplex-ha/duplex/cluster"
)

// Duration is a time.Duration written as "30s" in JSON and YAML.
type Duration time.Duration

func (d Duration) MarshalText() ([]byte, error) { return []byte(time.Duration(d).String()), nil }

func (d *Duration) UnmarshalText(b []byte) error {
	v, err := time.ParseDuration(string(b))
	if err != nil {
		return fmt.Errorf("duration %q: %w", b, err)
	}
	*d = Duration(v)
	return nil
}

// D returns the time.Duration.
func (d Duration) D() time.Duration { return time.Duration(d) }

// Policy is what the controller may do and when. Zero values take the defaults.
type Policy struct {
	// UnstableFor is how long a host's unstable verdict must hold before a cycle starts.
	UnstableFor Duration `json:"unstable_for,omitempty"`
	// MaxRejuvenating bounds the hosts rejuvenating at once (default 1).
	MaxRejuvenating int `json:"max_rejuvenating,omitempty"`
	// MinSpares: a cycle never takes the spare that would leave fewer spares than this.
	MinSpares int `json:"min_spares,omitempty"`
	// MaxLoadPerCPU: rejuvenation waits while the host's load1/CPUs is above it (0: no bound).
	MaxLoadPerCPU float64 `json:"max_load_per_cpu,omitempty"`
	// MaxWait ends a wait for the load to fall: the host is rejuvenated anyway (0: wait forever).
	MaxWait Duration `json:"max_wait,omitempty"`
	// MinRunning: a host that has run for less than this since its boot or last
	// rejuvenation is not rejuvenated; it goes back to the list as a spare.
	MinRunning Duration `json:"min_running,omitempty"`
	// Window restricts rejuvenation to a daily window "HH:MM-HH:MM" (local time; it
	// may wrap midnight). Empty: any time. Duplexing is never delayed by it.
	Window string `json:"window,omitempty"`
	// Parallel is how many workloads of one host move at once (default 2).
	Parallel int `json:"parallel,omitempty"`
	// Strategy is the migration strategy (default auto).
	Strategy string `json:"strategy,omitempty"`
	// MaxFailures: after this many failed attempts to move one workload the cycle
	// raises an alert and keeps retrying slowly (default 3).
	MaxFailures int `json:"max_failures,omitempty"`
	// Retry is how long a blocked step waits before it is tried again (default 2s).
	Retry Duration `json:"retry,omitempty"`
	// RejoinTimeout raises an alert when a rejuvenated host has not asked to rejoin
	// by then (default 15m). The host stays out of the list.
	RejoinTimeout Duration `json:"rejoin_timeout,omitempty"`
	// LeaseTTL is the controller's session: its leadership and its host locks
	// expire this long after it dies (default 10s).
	LeaseTTL Duration `json:"lease_ttl,omitempty"`
}

// Defaults fills unset fields.
func (p *Policy) Defaults() {
	if p.UnstableFor == 0 {
		p.UnstableFor = Duration(10 * time.Second)
	}
	if p.MaxRejuvenating == 0 {
		p.MaxRejuvenating = 1
	}
	if p.Parallel == 0 {
		p.Parallel = 2
	}
	if p.Strategy == "" {
		p.Strategy = "auto"
	}
	if p.MaxFailures == 0 {
		p.MaxFailures = 3
	}
	if p.Retry == 0 {
		p.Retry = Duration(2 * time.Second)
	}
	if p.RejoinTimeout == 0 {
		p.RejoinTimeout = Duration(15 * time.Minute)
	}
	if p.LeaseTTL == 0 {
		p.LeaseTTL = Duration(10 * time.Second)
	}
}

// Validate names the first bad field.
func (p Policy) Validate() error {
	switch {
	case p.UnstableFor < 0:
		return fmt.Errorf("unstable_for %s: must not be negative", p.UnstableFor.D())
	case p.MaxRejuvenating < 1:
		return fmt.Errorf("max_rejuvenating %d: at least 1", p.MaxRejuvenating)
	case p.MinSpares < 0:
		return fmt.Errorf("min_spares %d: must not be negative", p.MinSpares)
	case p.MaxLoadPerCPU < 0:
		return fmt.Errorf("max_load_per_cpu %g: must not be negative", p.MaxLoadPerCPU)
	case p.Parallel < 1 || p.Parallel > 64:
		return fmt.Errorf("parallel %d: use 1 to 64", p.Parallel)
	case p.MaxFailures < 1:
		return fmt.Errorf("max_failures %d: at least 1", p.MaxFailures)
	case p.LeaseTTL.D() < 2*time.Second:
		return fmt.Errorf("lease_ttl %s: at least 2s", p.LeaseTTL.D())
	case p.Retry.D() < 10*time.Millisecond:
		return fmt.Errorf("retry %s: at least 10ms", p.Retry.D())
	case p.MaxWait < 0:
		return fmt.Errorf("max_wait %s: must not be negative", p.MaxWait.D())
	case p.MinRunning < 0:
		return fmt.Errorf("min_running %s: must not be negative", p.MinRunning.D())
	case p.RejoinTimeout < 0:
		return fmt.Errorf("rejoin_timeout %s: must not be negative", p.RejoinTimeout.D())
	}
	if _, _, err := parseWindow(p.Window); err != nil {
		return err
	}
	return nil
}

// parseWindow reads "HH:MM-HH:MM" into minutes of the day.
func parseWindow(w string) (from, to int, err error) {
	if w == "" {
		return 0, 0, nil
	}
	var h1, m1, h2, m2 int
	if n, _ := fmt.Sscanf(w, "%d:%d-%d:%d", &h1, &m1, &h2, &m2); n != 4 || fmt.Sprintf("%02d:%02d-%02d:%02d", h1, m1, h2, m2) != w || h1 > 23 || h2 > 23 || m1 > 59 || m2 > 59 || h1 < 0 || h2 < 0 || m1 < 0 || m2 < 0 {
		return 0, 0, fmt.Errorf("window %q: write it as HH:MM-HH:MM, e.g. 02:00-05:00", w)
	}
	return h1*60 + m1, h2*60 + m2, nil
}

// InWindow says whether t falls in the maintenance window.
func (p Policy) InWindow(t time.Time) bool {
	from, to, err := parseWindow(p.Window)
	if err != nil || p.Window == "" || from == to {
		return true
	}
	m := t.Hour()*60 + t.Minute()
	if from < to {
		return m >= from && m < to
	}
	return m >= from || m < to
}

// Snapshot is the cluster as the controller sees it at one moment.
type Snapshot struct {
	Now       time.Time
	Mode      cluster.Mode
	Hosts     map[string]cluster.Host // live registrations
	Members   map[string]cluster.Member
	Available map[string]bool
	Reports   map[string]cluster.Report
	Cycles    map[string]cluster.Cycle
	Requests  map[string]cluster.Request
	Rejoins   map[string]cluster.Rejoin
}

// alive says a host is registered and reporting.
func (s *Snapshot) alive(h string) bool {
	_, ok := s.Hosts[h]
	return ok
}

// Selection is the outcome of target selection.
type Selection struct {
	Target string `json:"target,omitempty"`
	Why    string `json:"why"`
}

// Select picks the target of a cycle by mode (claims 4, 5, 13): in active/standby a
// spare; in active/active the primary whose free capacity fits the host's
// workloads most tightly (a spare only if no primary fits). It never takes a spare
// that would leave fewer than MinSpares. An empty Target means no target; Why says
// why, and is the alert.
func Select(s *Snapshot, p Policy, host string) Selection {
	need := s.Reports[host].Used
	spares := 0
	for name, m := range s.Members {
		if m.Role == cluster.RoleSpare && s.usable(name, host) {
			spares++
		}
	}
	type cand struct {
		name  string
		free  uint64
		spare bool
	}
	var fits []cand
	var tooSmall []string
	for name, m := range s.Members {
		if !s.usable(name, host) {
			continue
		}
		spare := m.Role == cluster.RoleSpare
		if !spare && (m.Role != cluster.RolePrimary || s.Mode != cluster.ActiveActive) {
			continue
		}
		free := s.Reports[name].Free()
		if free < need {
			tooSmall = append(tooSmall, fmt.Sprintf("%s has %s free", name, bytes(free)))
			continue
		}
		fits = append(fits, cand{name, free, spare})
	}
	sort.Slice(fits, func(i, j int) bool {
		a, b := fits[i], fits[j]
		if a.spare != b.spare && s.Mode == cluster.ActiveActive {
			return !a.spare // active/active: primaries first
		}
		if a.free != b.free {
			return a.free < b.free // best fit
		}
		return a.name < b.name
	})
	sort.Strings(tooSmall)
	for _, c := range fits {
		if c.spare && spares-1 < p.MinSpares {
			return Selection{Why: fmt.Sprintf("taking spare %s would leave %d spare(s), below min_spares %d", c.name, spares-1, p.MinSpares)}
		}
		kind := "primary"
		if c.spare {
			kind = "spare"
		}
		return Selection{Target: c.name, Why: fmt.Sprintf("%s %s: %s free for %s of workloads (best fit of %d)", kind, c.name, bytes(c.free), bytes(need), len(fits))}
	}
	want := "no spare host"
	if s.Mode == cluster.ActiveActive {
		want = "no primary or spare with enough free capacity"
	}
	if len(tooSmall) > 0 {
		return Selection{Why: fmt.Sprintf("%s: need %s; %s", want, bytes(need), strings.Join(tooSmall, ", "))}
	}
	return Selection{Why: fmt.Sprintf("%s available (mode %s)", want, s.Mode)}
}

// usable says name can receive the workloads of host now: alive, on the available
// list, stable, and not the source of a cycle itself.
func (s *Snapshot) usable(name, host string) bool {
	if name == host || !s.alive(name) || !s.Available[name] {
		return false
	}
	if r, ok := s.Reports[name]; !ok || r.Unstable {
		return false
	}
	_, busy := s.Cycles[name]
	return !busy
}

// Decision is what to do with a duplexed host (claim 6).
type Decision string

// Decisions.
const (
	DecideNow  Decision = "rejuvenate" // remove from the list and rejuvenate
	DecideWait Decision = "wait"       // try again later
	DecideSkip Decision = "skip"       // back to the list as a spare, not rejuvenated
	DecideDone Decision = "finish"     // a drain: back to the list as a spare
)

// Decide judges whether a duplexed host is rejuvenated now, from its load and
// continuous running time, within the budget and the maintenance window.
func Decide(s *Snapshot, p Policy, c cluster.Cycle) (Decision, string) {
	if c.Kind == cluster.KindDrain {
		return DecideDone, "drained by request: back to the list as a spare"
	}
	r, ok := s.Reports[c.Host]
	if !ok {
		return DecideWait, "no report from the host (is its duplexd running?)"
	}
	since := r.Booted
	if m, ok := s.Members[c.Host]; ok && m.Rejuvenated.After(r.Booted) {
		since = m.Rejuvenated
	}
	reason := fmt.Sprintf("load %.2f per CPU, running for %s", r.Load1/float64(max(r.CPUs, 1)), s.Now.Sub(since).Round(time.Second))
	if c.Kind != cluster.KindRejuvenate {
		running := s.Now.Sub(since)
		if p.MinRunning > 0 && running < p.MinRunning.D() {
			return DecideSkip, fmt.Sprintf("running for %s, below min_running %s", running.Round(time.Second), p.MinRunning.D())
		}
		if p.MaxLoadPerCPU > 0 && r.CPUs > 0 {
			load := r.Load1 / float64(r.CPUs)
			if load > p.MaxLoadPerCPU {
				waited := s.Now.Sub(c.PhaseSince)
				if p.MaxWait == 0 || waited < p.MaxWait.D() {
					return DecideWait, fmt.Sprintf("load %.2f per CPU above max_load_per_cpu %.2f", load, p.MaxLoadPerCPU)
				}
				// max_wait ends the wait for the load only: window and budget still hold.
				reason = fmt.Sprintf("load %.2f per CPU still above %.2f after max_wait %s", load, p.MaxLoadPerCPU, p.MaxWait.D())
			}
		}
		if !p.InWindow(s.Now) {
			return DecideWait, fmt.Sprintf("outside the maintenance window %s", p.Window)
		}
	}
	var busy []string
	for name, m := range s.Members {
		if name != c.Host && m.Role == cluster.RoleRejuvenating {
			busy = append(busy, name)
		}
	}
	if len(busy) >= p.MaxRejuvenating {
		sort.Strings(busy)
		return DecideWait, fmt.Sprintf("budget: %s already rejuvenating (max_rejuvenating %d)", strings.Join(busy, ", "), p.MaxRejuvenating)
	}
	if c.Kind == cluster.KindRejuvenate {
		return DecideNow, "rejuvenation requested by hand"
	}
	return DecideNow, reason
}

// Step is one line of a plan: what the controller would do now for a host, and why.
type Step struct {
	Host    string       `json:"host"`
	Role    cluster.Role `json:"role,omitempty"`
	Cycle   string       `json:"cycle,omitempty"`
	Phase   string       `json:"phase,omitempty"`
	Action  string       `json:"action"`
	Target  string       `json:"target,omitempty"`
	Why     string       `json:"why"`
	Blocked bool         `json:"blocked,omitempty"`
}

// Plan is the controller's dry run: for every host, the next step and its reason.
// The controller acts on the same functions.
func Plan(s *Snapshot, p Policy) []Step {
	names := map[string]bool{}
	for n := range s.Members {
		names[n] = true
	}
	for n := range s.Hosts {
		names[n] = true
	}
	var out []Step
	for _, h := range sortedKeys(names) {
		st := Step{Host: h, Role: s.Members[h].Role}
		c, inCycle := s.Cycles[h]
		switch {
		case inCycle:
			st.Cycle, st.Phase, st.Target = c.ID, string(c.Phase), c.Target
			st.Action, st.Why, st.Blocked = nextOfCycle(s, p, c)
		case !s.alive(h):
			st.Action, st.Why = "none", "not registered (duplexd down or host rebooting)"
		case s.Requests[h].Kind != "":
			st.Action, st.Why = "start "+s.Requests[h].Kind+" cycle", "requested by "+s.Requests[h].By
		default:
			st.Action, st.Why = startOrNot(s, p, h)
		}
		out = append(out, st)
	}
	return out
}

// startOrNot says whether an unstable verdict starts a cycle now.
func startOrNot(s *Snapshot, p Policy, h string) (string, string) {
	r, ok := s.Reports[h]
	switch {
	case !ok:
		return "none", "no report yet"
	case !r.Unstable:
		return "none", "stable"
	case s.Members[h].Role != cluster.RolePrimary && s.Members[h].Role != cluster.RoleSpare:
		return "none", fmt.Sprintf("unstable, but its role is %s", s.Members[h].Role)
	}
	held := s.Now.Sub(r.UnstableSince)
	why := fmt.Sprintf("unstable for %s (%s)", held.Round(100*time.Millisecond), strings.Join(r.Reasons, "; "))
	if held < p.UnstableFor.D() {
		return "wait", why + fmt.Sprintf(", less than unstable_for %s", p.UnstableFor.D())
	}
	return "start cycle", why
}

// nextOfCycle describes a cycle's next step.
func nextOfCycle(s *Snapshot, p Policy, c cluster.Cycle) (action, why string, blocked bool) {
	switch c.Phase {
	case cluster.PhaseSelecting:
		sel := Select(s, p, c.Host)
		if sel.Target == "" {
			return "wait for a target", sel.Why, true
		}
		return "duplex every workload to " + sel.Target, sel.Why, false
	case cluster.PhaseDuplexing:
		why := fmt.Sprintf("%d workload(s) moved so far", len(c.Moved))
		if c.Blocked != "" {
			return "retry duplexing to " + c.Target, c.Blocked, true
		}
		return "go on duplexing to " + c.Target, why, false
	case cluster.PhaseDeciding:
		d, why := Decide(s, p, c)
		return string(d), why, d == DecideWait
	case cluster.PhaseRejuvenating:
		if _, ok := s.Rejoins[c.Host]; ok {
			return "register as spare", "the host asked to rejoin", false
		}
		if !c.Signalled {
			return "signal rejuvenation", "removed from the available list", false
		}
		waited := s.Now.Sub(c.PhaseSince)
		if waited > p.RejoinTimeout.D() {
			return "wait for rejoin", fmt.Sprintf("no rejoin request %s after the signal (rejoin_timeout %s)", waited.Round(time.Second), p.RejoinTimeout.D()), true
		}
		return "wait for rejoin", "rejuvenating", false
	}
	return "none", "unknown phase " + string(c.Phase), true
}

func sortedKeys[V any](m map[string]V) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}

// bytes prints a byte count for people.
func bytes(n uint64) string {
	const (
		kib = 1 << 10
		mib = 1 << 20
		gib = 1 << 30
	)
	switch {
	case n >= gib:
		return fmt.Sprintf("%.1f GiB", float64(n)/gib)
	case n >= mib:
		return fmt.Sprintf("%.0f MiB", float64(n)/mib)
	case n >= kib:
		return fmt.Sprintf("%.0f KiB", float64(n)/kib)
	}
	return fmt.Sprintf("%d B", n)
}
