package rejuv

import (
	"context"
	"errors"
	"fmt"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"

	"golang.org/x/sys/unix"
)

// The rungs' names, as Config.Actions spells them and Action.Name returns them.
const (
	ActionDropCaches      = "drop-caches"
	ActionCompactMemory   = "compact-memory"
	ActionClearState      = "clear-state"
	ActionRestartServices = "restart-services"
	ActionReboot          = "reboot"
)

// The ways the reboot rung restarts the host (Config.Reboot).
const (
	RebootSyscall = "reboot"  // sync(2), then reboot(2) through Options.Reboot
	RebootSystemd = "systemd" // systemctl reboot: a clean shutdown by systemd
	RebootKexec   = "kexec"   // systemctl kexec: into a fresh kernel without the firmware
	RebootExit    = "exit"    // Options.Exit: the daemon exits, its supervisor restarts the host
	RebootNone    = "none"    // the rung does nothing
)

// DefaultActions returns the ladder's rungs in their default order.
func DefaultActions() []string {
	return []string{ActionDropCaches, ActionCompactMemory, ActionClearState, ActionRestartServices, ActionReboot}
}

var rebootMethods = []string{RebootSyscall, RebootSystemd, RebootKexec, RebootExit, RebootNone}

// Config says which rungs run, in order, and what they act on.
type Config struct {
	// Actions is the order of the rungs; empty means DefaultActions. Each appears at most
	// once and reboot, when present, is last.
	Actions []string `json:"actions,omitempty"`
	// Scratch lists absolute directories whose contents clear-state removes; the
	// directories themselves stay (tmpfs mount points included).
	Scratch []string `json:"scratch,omitempty"`
	// Services lists the systemd units restart-services restarts; with none the rung
	// does nothing and says so.
	Services []string `json:"services,omitempty"`
	// Reboot is how the reboot rung restarts the host: RebootSyscall, RebootSystemd
	// (the default), RebootKexec, RebootExit or RebootNone.
	Reboot string `json:"reboot,omitempty"`
}

// Options are the machine interfaces the rungs use, swappable in tests. Zero fields
// get the real ones.
type Options struct {
	// Proc is where procfs is mounted; default "/proc".
	Proc string
	// Exec runs a command (systemctl); the default runs it and puts its combined
	// output in the error.
	Exec func(ctx context.Context, name string, args ...string) error
	// Reboot restarts the host at once; the default is sync(2) then
	// reboot(2) with LINUX_REBOOT_CMD_RESTART.
	Reboot func() error
	// Exit makes the daemon exit for a simulated host restart; required when
	// Config.Reboot is RebootExit and the reboot rung is in the ladder.
	Exit func() error
}

// The real machine calls behind Options' defaults. They are variables only so that this
// package's tests can make them refuse to run.
var (
	runCommand    = execCommand
	rebootSyscall = syncAndReboot
)

func execCommand(ctx context.Context, name string, args ...string) error {
	out, err := exec.CommandContext(ctx, name, args...).CombinedOutput()
	if err != nil {
		cmd := strings.Join(append([]string{name}, args...), " ")
		if msg := strings.TrimSpace(string(out)); msg != "" {
			return fmt.Errorf("%s: %w: %s", cmd, err, msg)
		}
		return fmt.Errorf("%s: %w", cmd, err)
	}
	return nil
}

func syncAndReboot() error {
	unix.Sync()
	return unix.Reboot(unix.LINUX_REBOOT_CMD_RESTART)
}

func (o Options) withDefaults() Options {
	if o.Proc == "" {
		o.Proc = "/proc"
	}
	if o.Exec == nil {
		o.Exec = func(ctx context.Context, name string, args ...string) error {
			return runCommand(ctx, name, args...)
		}
	}
	if o.Reboot == nil {
		o.Reboot = func() error { return rebootSyscall() }
	}
	return o
}

// ErrInvalidConfig is what every error from Config.Ladder matches.
var ErrInvalidConfig = errors.New("invalid rejuvenation config")

// ConfigError is one problem Config.Ladder found: the field (e.g. "scratch[1]"), its
// value and what is wrong with it. It matches ErrInvalidConfig.
type ConfigError struct {
	Field  string
	Value  string
	Reason string
}

func (e *ConfigError) Error() string {
	return fmt.Sprintf("rejuv: %s %q: %s", e.Field, e.Value, e.Reason)
}

// Is makes errors.Is(err, ErrInvalidConfig) hold.
func (e *ConfigError) Is(target error) bool { return target == ErrInvalidConfig }

// systemTrees hold no scratch state anywhere inside them (the kernel's filesystems, the
// operating system), except allowedInSystemTrees.
var (
	systemTrees = []string{
		"/bin", "/boot", "/dev", "/efi", "/etc", "/lib", "/lib32", "/lib64", "/libx32",
		"/proc", "/sbin", "/sys", "/usr",
	}
	allowedInSystemTrees = []string{"/dev/shm"}
)

// protected hold state of others: never a scratch directory, nor any of their
// parents, though a directory inside one can be.
var protected = []string{
	"/", "/home", "/media", "/mnt", "/opt", "/root", "/run", "/srv", "/var", "/var/cache",
	"/var/lib", "/var/log", "/var/spool",
}

// within reports whether path is dir or inside it; both are clean and absolute.
func within(path, dir string) bool {
	return path == dir || dir == "/" || strings.HasPrefix(path, dir+"/")
}

// checkScratch says why dir cannot be a scratch directory, or "" when it can.
func checkScratch(dir string) string {
	switch {
	case dir == "":
		return "empty path"
	case !filepath.IsAbs(dir):
		return "not an absolute path"
	case filepath.Clean(dir) != dir:
		return fmt.Sprintf("not a clean path (want %q)", filepath.Clean(dir))
	}
	all := slices.Concat(systemTrees, protected)
	if slices.Contains(all, dir) {
		return "a system directory, never cleared"
	}
	for _, p := range all {
		if within(p, dir) {
			return fmt.Sprintf("holds the system directory %s", p)
		}
	}
	for _, p := range systemTrees {
		if within(dir, p) && !slices.ContainsFunc(allowedInSystemTrees, func(a string) bool { return within(dir, a) }) {
			return fmt.Sprintf("inside the system directory %s, which holds no scratch state", p)
		}
	}
	return ""
}

// checkUnit says why name cannot be passed to systemctl as a unit, or "" when it can.
func checkUnit(name string) string {
	switch {
	case name == "":
		return "empty unit name"
	case strings.HasPrefix(name, "-"):
		return "starts with '-' (systemctl would read it as an option)"
	case strings.ContainsFunc(name, func(r rune) bool { return r <= ' ' || r == 0x7f || r == '/' }):
		return "contains a space, control character or '/'"
	}
	return ""
}

// Ladder checks c and returns its rungs in order, ready for Run. Every problem found is
// a *ConfigError; they come back joined, and match ErrInvalidConfig. Ladder touches
// nothing on the machine: clear-state checks the directories again when it runs.
func (c Config) Ladder(o Options) ([]Action, error) {
	var errs []error
	bad := func(field, value, reason string) {
		errs = append(errs, &ConfigError{Field: field, Value: value, Reason: reason})
	}

	names := c.Actions
	if len(names) == 0 {
		names = DefaultActions()
	}
	for i, n := range names {
		field := fmt.Sprintf("actions[%d]", i)
		switch {
		case !slices.Contains(DefaultActions(), n):
			bad(field, n, "unknown action (want one of "+strings.Join(DefaultActions(), ", ")+")")
		case slices.Index(names, n) != i:
			bad(field, n, fmt.Sprintf("repeats actions[%d]", slices.Index(names, n)))
		case n == ActionReboot && i != len(names)-1:
			bad(field, n, "reboot must be the last action")
		}
	}
	for i, d := range c.Scratch {
		field := fmt.Sprintf("scratch[%d]", i)
		if reason := checkScratch(d); reason != "" {
			bad(field, d, reason)
		} else if j := slices.Index(c.Scratch, d); j != i {
			bad(field, d, fmt.Sprintf("repeats scratch[%d]", j))
		}
	}
	for i, u := range c.Services {
		if reason := checkUnit(u); reason != "" {
			bad(fmt.Sprintf("services[%d]", i), u, reason)
		}
	}
	method := c.Reboot
	if method == "" {
		method = RebootSystemd
	}
	if !slices.Contains(rebootMethods, method) {
		bad("reboot", c.Reboot, "unknown reboot method (want one of "+strings.Join(rebootMethods, ", ")+")")
	} else if method == RebootExit && o.Exit == nil && slices.Contains(names, ActionReboot) {
		bad("reboot", c.Reboot, "needs Options.Exit")
	}
	if len(errs) > 0 {
		return nil, errors.Join(errs...)
	}

	o = o.withDefaults()
	ladder := make([]Action, 0, len(names))
	for _, n := range names {
		switch n {
		case ActionDropCaches:
			ladder = append(ladder, dropCaches{proc: o.Proc})
		case ActionCompactMemory:
			ladder = append(ladder, compactMemory{proc: o.Proc})
		case ActionClearState:
			ladder = append(ladder, clearState{dirs: slices.Clone(c.Scratch), proc: o.Proc})
		case ActionRestartServices:
			ladder = append(ladder, restartServices{units: slices.Clone(c.Services), exec: o.Exec})
		case ActionReboot:
			ladder = append(ladder, rebootHost{method: method, exec: o.Exec, reboot: o.Reboot, exit: o.Exit})
		}
	}
	return ladder, nil
}
