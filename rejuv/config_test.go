package rejuv_test

import (
	"encoding/json"
	"errors"
	"reflect"
	"strings"
	"testing"

	"github.com/duplex-ha/duplex/rejuv"
)

func TestLadderRejects(t *testing.T) {
	withExit := rejuv.Options{Exit: func() error { return nil }}
	tests := []struct {
		name string
		cfg  rejuv.Config
		opts rejuv.Options
		want []string // each problem's message, in order
	}{
		{"unknown action", rejuv.Config{Actions: []string{"drop-caches", "drop-cache"}}, withExit,
			[]string{`rejuv: actions[1] "drop-cache": unknown action (want one of drop-caches, compact-memory, clear-state, restart-services, reboot)`}},
		{"repeated action", rejuv.Config{Actions: []string{"clear-state", "drop-caches", "clear-state"}}, withExit,
			[]string{`rejuv: actions[2] "clear-state": repeats actions[0]`}},
		{"reboot not last", rejuv.Config{Actions: []string{"reboot", "drop-caches"}}, withExit,
			[]string{`rejuv: actions[0] "reboot": reboot must be the last action`}},
		{"relative scratch", rejuv.Config{Scratch: []string{"var/tmp/app"}}, withExit,
			[]string{`rejuv: scratch[0] "var/tmp/app": not an absolute path`}},
		{"unclean scratch", rejuv.Config{Scratch: []string{"/var/tmp/../lib"}}, withExit,
			[]string{`rejuv: scratch[0] "/var/tmp/../lib": not a clean path (want "/var/lib")`}},
		{"trailing slash", rejuv.Config{Scratch: []string{"/var/tmp/app/"}}, withExit,
			[]string{`rejuv: scratch[0] "/var/tmp/app/": not a clean path (want "/var/tmp/app")`}},
		{"empty scratch", rejuv.Config{Scratch: []string{""}}, withExit,
			[]string{`rejuv: scratch[0] "": empty path`}},
		{"system directories", rejuv.Config{Scratch: []string{"/", "/proc", "/sys", "/dev", "/usr", "/etc", "/boot", "/var/lib", "/home", "/var", "/root", "/run"}}, withExit,
			[]string{
				`rejuv: scratch[0] "/": a system directory, never cleared`,
				`rejuv: scratch[1] "/proc": a system directory, never cleared`,
				`rejuv: scratch[2] "/sys": a system directory, never cleared`,
				`rejuv: scratch[3] "/dev": a system directory, never cleared`,
				`rejuv: scratch[4] "/usr": a system directory, never cleared`,
				`rejuv: scratch[5] "/etc": a system directory, never cleared`,
				`rejuv: scratch[6] "/boot": a system directory, never cleared`,
				`rejuv: scratch[7] "/var/lib": a system directory, never cleared`,
				`rejuv: scratch[8] "/home": a system directory, never cleared`,
				`rejuv: scratch[9] "/var": a system directory, never cleared`,
				`rejuv: scratch[10] "/root": a system directory, never cleared`,
				`rejuv: scratch[11] "/run": a system directory, never cleared`,
			}},
		{"inside system trees", rejuv.Config{Scratch: []string{"/proc/sys/vm", "/sys/fs/cgroup", "/dev/pts", "/etc/app", "/usr/local/tmp"}}, withExit,
			[]string{
				`rejuv: scratch[0] "/proc/sys/vm": inside the system directory /proc, which holds no scratch state`,
				`rejuv: scratch[1] "/sys/fs/cgroup": inside the system directory /sys, which holds no scratch state`,
				`rejuv: scratch[2] "/dev/pts": inside the system directory /dev, which holds no scratch state`,
				`rejuv: scratch[3] "/etc/app": inside the system directory /etc, which holds no scratch state`,
				`rejuv: scratch[4] "/usr/local/tmp": inside the system directory /usr, which holds no scratch state`,
			}},
		{"repeated scratch", rejuv.Config{Scratch: []string{"/var/tmp/app", "/var/tmp/app"}}, withExit,
			[]string{`rejuv: scratch[1] "/var/tmp/app": repeats scratch[0]`}},
		{"option as unit", rejuv.Config{Services: []string{"app.service", "--force"}}, withExit,
			[]string{`rejuv: services[1] "--force": starts with '-' (systemctl would read it as an option)`}},
		{"bad unit names", rejuv.Config{Services: []string{"", "a b.service", "../x.service"}}, withExit,
			[]string{
				`rejuv: services[0] "": empty unit name`,
				`rejuv: services[1] "a b.service": contains a space, control character or '/'`,
				`rejuv: services[2] "../x.service": contains a space, control character or '/'`,
			}},
		{"unknown reboot method", rejuv.Config{Reboot: "halt"}, withExit,
			[]string{`rejuv: reboot "halt": unknown reboot method (want one of reboot, systemd, kexec, exit, none)`}},
		{"exit without Options.Exit", rejuv.Config{Reboot: "exit"}, rejuv.Options{},
			[]string{`rejuv: reboot "exit": needs Options.Exit`}},
		{"every problem at once", rejuv.Config{Actions: []string{"reboot", "nap"}, Scratch: []string{"tmp"}, Services: []string{"-x"}, Reboot: "off"}, withExit,
			[]string{
				`rejuv: actions[0] "reboot": reboot must be the last action`,
				`rejuv: actions[1] "nap": unknown action (want one of drop-caches, compact-memory, clear-state, restart-services, reboot)`,
				`rejuv: scratch[0] "tmp": not an absolute path`,
				`rejuv: services[0] "-x": starts with '-' (systemctl would read it as an option)`,
				`rejuv: reboot "off": unknown reboot method (want one of reboot, systemd, kexec, exit, none)`,
			}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ladder, err := tt.cfg.Ladder(tt.opts)
			if err == nil {
				t.Fatalf("Ladder accepted %+v: %d actions", tt.cfg, len(ladder))
			}
			if ladder != nil {
				t.Errorf("Ladder returned actions with an error")
			}
			if got, want := err.Error(), strings.Join(tt.want, "\n"); got != want {
				t.Fatalf("error:\n%s\nwant:\n%s", got, want)
			}
			if !errors.Is(err, rejuv.ErrInvalidConfig) {
				t.Errorf("errors.Is(err, ErrInvalidConfig) = false")
			}
			var ce *rejuv.ConfigError
			if !errors.As(err, &ce) || ce.Field == "" {
				t.Fatalf("errors.As(err, *ConfigError) = false or empty field")
			}
		})
	}
}

func TestLadderAccepts(t *testing.T) {
	cfg := rejuv.Config{
		Scratch: []string{"/tmp", "/var/tmp", "/var/tmp/app", "/dev/shm", "/dev/shm/app",
			"/var/lib/app/cache", "/home/app/.cache", "/run/app", "/srv/www/tmp"},
		Services: []string{"app.service", "worker@1.service", "db.socket"},
		Reboot:   "kexec",
	}
	if _, err := cfg.Ladder(rejuv.Options{}); err != nil {
		t.Fatal(err)
	}
	// "exit" needs Options.Exit only when the reboot rung runs.
	cfg = rejuv.Config{Actions: []string{"drop-caches", "clear-state"}, Reboot: "exit"}
	if _, err := cfg.Ladder(rejuv.Options{}); err != nil {
		t.Fatalf("exit without the reboot rung: %v", err)
	}
}

func TestLadderDefaultOrder(t *testing.T) {
	ladder, err := rejuv.Config{}.Ladder(rejuv.Options{})
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, a := range ladder {
		names = append(names, a.Name())
	}
	want := []string{"drop-caches", "compact-memory", "clear-state", "restart-services", "reboot"}
	if !reflect.DeepEqual(names, want) || !reflect.DeepEqual(rejuv.DefaultActions(), want) {
		t.Fatalf("default ladder %q, DefaultActions %q; want %q", names, rejuv.DefaultActions(), want)
	}

	ladder, err = rejuv.Config{Actions: []string{"clear-state", "drop-caches"}}.Ladder(rejuv.Options{})
	if err != nil {
		t.Fatal(err)
	}
	if len(ladder) != 2 || ladder[0].Name() != "clear-state" || ladder[1].Name() != "drop-caches" {
		t.Fatalf("ladder does not follow Config.Actions")
	}
}

func TestConfigJSON(t *testing.T) {
	var c rejuv.Config
	in := `{"actions":["clear-state","reboot"],"scratch":["/var/tmp/app"],"services":["app.service"],"reboot":"exit"}`
	if err := json.Unmarshal([]byte(in), &c); err != nil {
		t.Fatal(err)
	}
	want := rejuv.Config{Actions: []string{"clear-state", "reboot"}, Scratch: []string{"/var/tmp/app"}, Services: []string{"app.service"}, Reboot: "exit"}
	if !reflect.DeepEqual(c, want) {
		t.Fatalf("decoded %+v, want %+v", c, want)
	}
	out, err := json.Marshal(rejuv.Config{})
	if err != nil || string(out) != "{}" {
		t.Fatalf("zero Config encodes as %s, %v; want {}", out, err)
	}
}
