package rejuv

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// TestMain makes the real machine calls behind Options' defaults refuse to restart this
// host, so a test that forgets a fake fails loudly instead of rebooting the machine.
func TestMain(m *testing.M) {
	rebootSyscall = func() error {
		panic("rejuv test called the real reboot(2): every test must pass a fake Options.Reboot")
	}
	run := runCommand
	runCommand = func(ctx context.Context, name string, args ...string) error {
		switch filepath.Base(name) {
		case "systemctl", "reboot", "kexec", "shutdown", "halt", "poweroff":
			panic(fmt.Sprintf("rejuv test ran the real %s %s: every test must pass a fake Options.Exec", name, strings.Join(args, " ")))
		}
		return run(ctx, name, args...)
	}
	os.Exit(m.Run())
}

// The zero Options reach the real machine calls (here recorders standing in for them).
func TestDefaultOptionsUseMachineCalls(t *testing.T) {
	var calls []string
	saveRun, saveReboot := runCommand, rebootSyscall
	t.Cleanup(func() { runCommand, rebootSyscall = saveRun, saveReboot })
	runCommand = func(_ context.Context, name string, args ...string) error {
		calls = append(calls, strings.Join(append([]string{name}, args...), " "))
		return nil
	}
	rebootSyscall = func() error {
		calls = append(calls, "reboot(2)")
		return nil
	}
	for _, method := range []string{RebootSystemd, RebootSyscall} {
		ladder, err := Config{Actions: []string{ActionRestartServices, ActionReboot}, Services: []string{"a.service"}, Reboot: method}.Ladder(Options{})
		if err != nil {
			t.Fatal(err)
		}
		if _, err := Run(t.Context(), ladder, nil); err != nil {
			t.Fatal(err)
		}
	}
	want := []string{"systemctl restart a.service", "systemctl reboot", "systemctl restart a.service", "reboot(2)"}
	if strings.Join(calls, "|") != strings.Join(want, "|") {
		t.Fatalf("machine calls %q, want %q", calls, want)
	}
}

func TestExecCommandQuotesOutput(t *testing.T) {
	err := execCommand(t.Context(), "sh", "-c", "echo unit not found >&2; exit 3")
	var exitErr *exec.ExitError
	if !errors.As(err, &exitErr) || exitErr.ExitCode() != 3 {
		t.Fatalf("err = %v, want an *exec.ExitError with status 3", err)
	}
	want := "sh -c echo unit not found >&2; exit 3: exit status 3: unit not found"
	if err.Error() != want {
		t.Fatalf("err = %q, want %q", err, want)
	}
	if err := execCommand(t.Context(), "true"); err != nil {
		t.Fatalf("true: %v", err)
	}
}

// A scratch path whose parent is a symlink is checked again where it leads. Only the
// check runs here: nothing is removed.
func TestResolveScratchThroughParentSymlink(t *testing.T) {
	tmp := t.TempDir()
	for link, target := range map[string]string{"root": "/", "proc": "/proc"} {
		if err := os.Symlink(target, filepath.Join(tmp, link)); err != nil {
			t.Fatal(err)
		}
	}
	for _, dir := range []string{filepath.Join(tmp, "root/etc"), filepath.Join(tmp, "proc/sys")} {
		real, err := resolveScratch(dir)
		if !errors.Is(err, ErrUnsafeScratch) {
			t.Fatalf("resolveScratch(%s) = %q, %v; want ErrUnsafeScratch", dir, real, err)
		}
		if !strings.Contains(err.Error(), "resolves to") {
			t.Errorf("error %q does not say where %s leads", err, dir)
		}
	}

	safe := filepath.Join(tmp, "real", "scratch")
	if err := os.MkdirAll(safe, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(filepath.Join(tmp, "real"), filepath.Join(tmp, "via")); err != nil {
		t.Fatal(err)
	}
	real, err := resolveScratch(filepath.Join(tmp, "via", "scratch"))
	if err != nil || real != safe {
		t.Fatalf("resolveScratch(via/scratch) = %q, %v; want %q", real, err, safe)
	}
}

func TestUnescapeOctal(t *testing.T) {
	for in, want := range map[string]string{
		`/mnt/plain`:         "/mnt/plain",
		`/mnt/a\040b`:        "/mnt/a b",
		`/mnt/tab\011x\134y`: "/mnt/tab\tx\\y",
		`/mnt/nl\012`:        "/mnt/nl\n",
		`/mnt/short\04`:      `/mnt/short\04`,
		`/mnt/not\9999octal`: `/mnt/not\9999octal`,
	} {
		if got := unescapeOctal(in); got != want {
			t.Errorf("unescapeOctal(%q) = %q, want %q", in, got, want)
		}
	}
}

func TestFormatBytes(t *testing.T) {
	for n, want := range map[uint64]string{
		0:          "0 B",
		1023:       "1023 B",
		1024:       "1.0 KiB",
		3024:       "3.0 KiB",
		1536 << 20: "1.5 GiB",
		3 << 40:    "3.0 TiB",
	} {
		if got := formatBytes(n); got != want {
			t.Errorf("formatBytes(%d) = %q, want %q", n, got, want)
		}
	}
}

func TestFreeHugeBlocks(t *testing.T) {
	if os.Getpagesize() != 4096 {
		t.Skipf("the fixture assumes 4 KiB pages, this machine has %d-byte pages", os.Getpagesize())
	}
	proc := t.TempDir()
	// orders 0..10: order 9 is 2 MiB, order 10 is 4 MiB
	info := "Node 0, zone      DMA      1      1      0      0      0      0      0      0      1      1      3\n" +
		"Node 0, zone   Normal    500    400    300    200    100     50     25     10      5      2      1\n"
	if err := os.WriteFile(filepath.Join(proc, "buddyinfo"), []byte(info), 0o644); err != nil {
		t.Fatal(err)
	}
	got, err := freeHugeBlocks(proc)
	if err != nil {
		t.Fatal(err)
	}
	want := uint64((1+2)*(2<<20) + (3+1)*(4<<20))
	if got != want {
		t.Fatalf("freeHugeBlocks = %d, want %d", got, want)
	}
}
