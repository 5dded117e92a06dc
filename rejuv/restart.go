package rejuv

import (
	"context"
	"fmt"
	"strings"
)

type execFunc = func(ctx context.Context, name string, args ...string) error

// restartServices is the restart-services rung: `systemctl restart UNIT...`, one call
// for all units so systemd orders them by their dependencies.
type restartServices struct {
	units []string
	exec  execFunc
}

func (restartServices) Name() string { return ActionRestartServices }

func (a restartServices) Run(ctx context.Context) error {
	_, err := a.RunDetail(ctx)
	return err
}

func (a restartServices) RunDetail(ctx context.Context) (string, error) {
	if len(a.units) == 0 {
		return "no services declared", nil
	}
	if err := a.exec(ctx, "systemctl", append([]string{"restart"}, a.units...)...); err != nil {
		return "", err
	}
	return "restarted " + strings.Join(a.units, ", "), nil
}

// rebootHost is the reboot rung, the last: it restarts the host as Config.Reboot says.
type rebootHost struct {
	method string
	exec   execFunc
	reboot func() error
	exit   func() error
}

func (rebootHost) Name() string { return ActionReboot }

func (a rebootHost) Run(ctx context.Context) error {
	_, err := a.RunDetail(ctx)
	return err
}

func (a rebootHost) RunDetail(ctx context.Context) (string, error) {
	switch a.method {
	case RebootSystemd, RebootKexec:
		verb := "reboot"
		if a.method == RebootKexec {
			verb = "kexec"
		}
		if err := a.exec(ctx, "systemctl", verb); err != nil {
			return "", err
		}
		return "systemctl " + verb + ": the host is shutting down", nil
	case RebootSyscall:
		if err := a.reboot(); err != nil {
			return "", fmt.Errorf("reboot(2): %w", err)
		}
		return "reboot(2) returned", nil // only a fake gets here
	case RebootExit:
		if err := a.exit(); err != nil {
			return "", fmt.Errorf("exit for a simulated restart: %w", err)
		}
		return "daemon exiting: its supervisor restarts the host", nil
	case RebootNone:
		return "skipped: reboot method none", nil
	}
	return "", fmt.Errorf("unknown reboot method %q", a.method) // Ladder never builds one
}
