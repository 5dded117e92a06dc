package rejuv_test

import (
	"errors"
	"reflect"
	"testing"

	"github.com/duplex-ha/duplex/rejuv"
)

func TestRestartServices(t *testing.T) {
	m := &machine{}
	r, err := runOne(t, rejuv.Config{Actions: []string{"restart-services"}, Services: []string{"app.service", "worker@1.service"}}, m.options(""))
	if err != nil {
		t.Fatal(err)
	}
	if want := []string{"systemctl restart app.service worker@1.service"}; !reflect.DeepEqual(m.Calls(), want) {
		t.Fatalf("calls %q, want %q", m.Calls(), want)
	}
	if want := "restarted app.service, worker@1.service"; r.Detail != want {
		t.Fatalf("detail %q, want %q", r.Detail, want)
	}
}

func TestRestartServicesNone(t *testing.T) {
	m := &machine{}
	r, err := runOne(t, rejuv.Config{Actions: []string{"restart-services"}}, m.options(""))
	if err != nil {
		t.Fatal(err)
	}
	if len(m.Calls()) != 0 {
		t.Fatalf("calls %q with no services declared", m.Calls())
	}
	if r.Detail != "no services declared" {
		t.Fatalf("detail %q", r.Detail)
	}
}

func TestRestartServicesFails(t *testing.T) {
	cause := errors.New("systemctl restart app.service: exit status 5: Unit app.service not found.")
	m := &machine{fail: map[string]error{"systemctl restart app.service": cause}}
	r, err := runOne(t, rejuv.Config{Actions: []string{"restart-services"}, Services: []string{"app.service"}}, m.options(""))
	if !errors.Is(err, cause) {
		t.Fatalf("err = %v, want the Exec error", err)
	}
	if want := "restart-services: " + cause.Error(); err.Error() != want {
		t.Fatalf("err %q, want %q", err, want)
	}
	if r.Error != cause.Error() {
		t.Fatalf("result error %q, want %q", r.Error, cause)
	}
}

func TestRebootMethods(t *testing.T) {
	tests := []struct {
		method string
		calls  []string
		detail string
	}{
		{"", []string{"systemctl reboot"}, "systemctl reboot: the host is shutting down"},
		{"systemd", []string{"systemctl reboot"}, "systemctl reboot: the host is shutting down"},
		{"kexec", []string{"systemctl kexec"}, "systemctl kexec: the host is shutting down"},
		{"reboot", []string{"reboot(2)"}, "reboot(2) returned"},
		{"exit", []string{"exit"}, "daemon exiting: its supervisor restarts the host"},
		{"none", nil, "skipped: reboot method none"},
	}
	for _, tt := range tests {
		t.Run("method="+tt.method, func(t *testing.T) {
			m := &machine{}
			r, err := runOne(t, rejuv.Config{Actions: []string{"reboot"}, Reboot: tt.method}, m.options(""))
			if err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(m.Calls(), tt.calls) {
				t.Fatalf("calls %q, want %q", m.Calls(), tt.calls)
			}
			if r.Detail != tt.detail {
				t.Fatalf("detail %q, want %q", r.Detail, tt.detail)
			}
		})
	}
}

func TestRebootFails(t *testing.T) {
	denied := errors.New("operation not permitted")
	tests := []struct {
		method, call, want string
	}{
		{"systemd", "systemctl reboot", "reboot: operation not permitted"},
		{"kexec", "systemctl kexec", "reboot: operation not permitted"},
		{"reboot", "reboot(2)", "reboot: reboot(2): operation not permitted"},
		{"exit", "exit", "reboot: exit for a simulated restart: operation not permitted"},
	}
	for _, tt := range tests {
		t.Run("method="+tt.method, func(t *testing.T) {
			m := &machine{fail: map[string]error{tt.call: denied}}
			_, err := runOne(t, rejuv.Config{Actions: []string{"reboot"}, Reboot: tt.method}, m.options(""))
			if !errors.Is(err, denied) || err.Error() != tt.want {
				t.Fatalf("err %v, want %q wrapping the cause", err, tt.want)
			}
		})
	}
}
