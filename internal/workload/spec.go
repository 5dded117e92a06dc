package workload

import (
	"errors"
	"fmt"
	"regexp"
	"time"
)

var (
	// ErrNotFound means no workload has that name.
	ErrNotFound = errors.New("no such workload")
	// ErrExists means a workload of that name is already known.
	ErrExists = errors.New("workload already exists")
	// ErrInvalid means a spec or request is malformed.
	ErrInvalid = errors.New("invalid workload")
	// ErrNotRunning means the operation needs a running workload.
	ErrNotRunning = errors.New("workload is not running")
)

// Spec is what a user asks to run.
type Spec struct {
	Name string   `json:"name"`
	Args []string `json:"args"`          // argv; Args[0] is looked up in the workload's PATH
	Env  []string `json:"env,omitempty"` // KEY=VALUE; empty means a minimal default
	Cwd  string   `json:"cwd,omitempty"` // empty means /
	// MemoryLimit caps the workload's memory in bytes (cgroup); 0 means no limit.
	MemoryLimit int64 `json:"memory_limit,omitempty"`
	// SocketMemoryLimit caps the workload's TCP socket buffers in bytes (cgroup v1
	// memory.kmem.tcp.limit_in_bytes); 0 means no limit.
	SocketMemoryLimit int64 `json:"socket_memory_limit,omitempty"`
	// VIPs are the service addresses the workload serves on, "ADDR/PREFIX@LINK"
	// (e.g. 10.0.0.100/24@eth0). duplexd brings them up on this host before the
	// workload starts and moves them with it.
	VIPs []string `json:"vips,omitempty"`
	// Pinned binds the workload to this host: it is never migrated, and a
	// rejuvenation of the host stops it (host-local services, agents).
	Pinned bool `json:"pinned,omitempty"`
}

// State is where a workload is in its life.
type State string

const (
	Running      State = "running"
	Frozen       State = "frozen"       // left stopped by a dump, resumable
	Stopped      State = "stopped"      // stopped on request
	Exited       State = "exited"       // its root exited by itself
	Checkpointed State = "checkpointed" // dumped and gone from this host
	Lost         State = "lost"         // gone while the daemon was away
	Migrated     State = "migrated"     // moved to another host
)

// Record is everything duplexd knows about one workload; it is saved as JSON.
type Record struct {
	Spec
	State     State     `json:"state"`
	Pid       int       `json:"pid,omitempty"`        // host PID of the root
	StartTick uint64    `json:"start_tick,omitempty"` // root's start time in clock ticks, guards against PID reuse
	Cgroup    string    `json:"cgroup"`               // cgroup path below each hierarchy's root
	Stdout    string    `json:"stdout"`
	Stderr    string    `json:"stderr"`
	Created   time.Time `json:"created"`
	Started   time.Time `json:"started"`
	Finished  time.Time `json:"finished,omitzero"`
	ExitCode  *int      `json:"exit_code,omitempty"` // nil when unknown
	Restores  int       `json:"restores,omitempty"`  // times restored from a checkpoint
	Message   string    `json:"message,omitempty"`   // why it is in its state, when notable
	// LockTable is the network lock a dump left on a frozen workload ("" if none).
	LockTable string `json:"lock_table,omitempty"`
}

var nameRe = regexp.MustCompile(`^[a-zA-Z0-9][a-zA-Z0-9_.-]{0,62}$`)

// ValidateName checks a workload name: 1 to 63 letters, digits, '.', '_' or '-',
// starting with a letter or digit.
func ValidateName(name string) error {
	if !nameRe.MatchString(name) {
		return fmt.Errorf("%w: name %q: use 1-63 letters, digits, '.', '_' or '-', starting with a letter or digit", ErrInvalid, name)
	}
	return nil
}

// Validate checks a spec before anything is started.
func (s *Spec) Validate() error {
	if err := ValidateName(s.Name); err != nil {
		return err
	}
	if len(s.Args) == 0 || s.Args[0] == "" {
		return fmt.Errorf("%w: %s: no command given", ErrInvalid, s.Name)
	}
	if s.MemoryLimit < 0 {
		return fmt.Errorf("%w: %s: memory limit %d is negative", ErrInvalid, s.Name, s.MemoryLimit)
	}
	if s.SocketMemoryLimit < 0 {
		return fmt.Errorf("%w: %s: socket memory limit %d is negative", ErrInvalid, s.Name, s.SocketMemoryLimit)
	}
	return nil
}
