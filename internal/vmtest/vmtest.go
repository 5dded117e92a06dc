package vmtest

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

// Config says what to put into the guest and what to run there.
type Config struct {
	// Files maps a guest path to a host path (a file, or a directory copied recursively)
	// to put into the guest's root file system (an initramfs, so in guest memory). They
	// are added last and replace anything vmtest puts at the same path.
	Files map[string]string
	// Binaries are host executables put at the same path in the guest together with their
	// ELF interpreter and shared libraries. nft, ip and tc are always included.
	Binaries []string
	// Command runs as root in the guest once it is set up; its exit status is the result.
	// Its stdin is /dev/null, its working directory /root, its output goes to the host
	// over an emulated serial port (about 400 KB/s under TCG: keep it to test logs).
	// Command[0] is looked up in PATH. Note that busybox's sh runs its own applets for
	// bare names (ip, ...): in `sh -c` scripts call /usr/sbin/ip for iproute2's.
	Command []string
	// Env is added to the command's environment (PATH, HOME=/root and TMPDIR=/tmp are set).
	Env []string
	// MemoryMiB is the guest's memory (default 2048). The guest's files live in it.
	MemoryMiB int
	// CPUs is the number of guest CPUs (default 2).
	CPUs int
	// Timeout bounds boot and run together (default 5m).
	Timeout time.Duration
	// Console, if set, receives the guest's console (kernel and init messages) and the
	// command's output as they come, one whole line per Write.
	Console io.Writer
}

// Result is what the command did in the guest.
type Result struct {
	Output   string        // the command's stdout and stderr, interleaved; no kernel messages
	ExitCode int           // the command's exit status
	Accel    string        // "kvm" or "tcg"
	Wall     time.Duration // wall time of Run: building the guest, boot, run, power-off
}

// ErrUnavailable means a guest cannot boot here; the wrapping error says why.
var ErrUnavailable = errors.New("no VM guest available")

// ErrNoExitStatus means the guest stopped without reporting the command's exit status.
var ErrNoExitStatus = errors.New("guest stopped without reporting an exit status")

const (
	defaultLibDir = "/usr/local/lib/duplex"
	// EnvLibDir overrides where `make deps` installed CRIU and the guest kernel.
	EnvLibDir = "DUPLEX_LIB_DIR"
	// EnvAccel forces the accelerator: "kvm" or "tcg". Unset, vmtest uses KVM when it
	// works here and TCG otherwise.
	EnvAccel = "DUPLEX_VMTEST_ACCEL"

	qemuBinary = "qemu-system-x86_64"
	// processName is QEMU's process name (comm), for scripts/clean-leftovers.sh.
	processName = "duplex-vmtest"
	// kvmProbe is how long a KVM guest may take to reach /init before vmtest gives up on
	// KVM for this process and boots with TCG instead. A working KVM needs about a second.
	kvmProbe = 20 * time.Second
	// guestPath is the command's PATH, the same as a Debian root's.
	guestPath = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
)

// defaultBinaries go into every guest when the host has them: the tools duplex's tests and
// CRIU's helpers call.
var defaultBinaries = []string{"/usr/sbin/nft", "/usr/sbin/ip", "/usr/sbin/tc"}

func libDir() string {
	if d := os.Getenv(EnvLibDir); d != "" {
		return d
	}
	return defaultLibDir
}

// paths of what `make deps` installed.
type paths struct {
	kernel   string // vmlinux (PVH boot, faster) or vmlinuz
	vmDir    string
	release  string
	busybox  string
	qemu     string
	criu     string // the wrapper or symlink at bin/criu
	criuRoot string // private CRIU prefix, if any
}

func locate() (*paths, error) {
	unavailable := func(format string, args ...any) error {
		return fmt.Errorf("%w: %s (run 'make deps')", ErrUnavailable, fmt.Sprintf(format, args...))
	}
	p := &paths{vmDir: filepath.Join(libDir(), "vm")}
	var err error
	if p.qemu, err = exec.LookPath(qemuBinary); err != nil {
		return nil, unavailable("%s not found", qemuBinary)
	}
	for _, k := range []string{"vmlinux", "vmlinuz"} {
		if fileExists(filepath.Join(p.vmDir, k)) {
			p.kernel = filepath.Join(p.vmDir, k)
			break
		}
	}
	if p.kernel == "" {
		return nil, unavailable("no guest kernel in %s", p.vmDir)
	}
	b, err := os.ReadFile(filepath.Join(p.vmDir, "kernel.release"))
	if err != nil {
		return nil, unavailable("guest kernel release: %v", err)
	}
	p.release = strings.TrimSpace(string(b))
	for _, bb := range []string{"/bin/busybox", "/usr/bin/busybox"} {
		if fileExists(bb) {
			p.busybox = bb
			break
		}
	}
	if p.busybox == "" {
		return nil, unavailable("no static busybox (package busybox-static)")
	}
	p.criu = filepath.Join(libDir(), "bin", "criu")
	if !fileExists(p.criu) {
		return nil, unavailable("no CRIU at %s", p.criu)
	}
	if st, err := os.Stat(filepath.Join(libDir(), "criu-root")); err == nil && st.IsDir() {
		p.criuRoot = filepath.Join(libDir(), "criu-root")
	}
	return p, nil
}

// Available returns nil if a guest can boot here, or an error wrapping ErrUnavailable that
// says what is missing.
func Available() error {
	_, err := locate()
	return err
}

// Run boots a guest, runs c.Command in it and returns its output and exit status. On an
// error after the guest started, the Result (if not nil) holds the output so far.
func Run(ctx context.Context, c Config) (*Result, error) {
	start := time.Now()
	if len(c.Command) == 0 {
		return nil, errors.New("vmtest: no command")
	}
	p, err := locate()
	if err != nil {
		return nil, err
	}
	if c.MemoryMiB <= 0 {
		c.MemoryMiB = 2048
	}
	if c.CPUs <= 0 {
		c.CPUs = 2
	}
	if c.Timeout <= 0 {
		c.Timeout = 5 * time.Minute
	}
	ctx, cancel := context.WithTimeout(ctx, c.Timeout)
	defer cancel()

	nonce := make([]byte, 8)
	_, _ = rand.Read(nonce)
	n := hex.EncodeToString(nonce)
	tmp, err := os.MkdirTemp("", "duplex-vmtest-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(tmp)
	initrd := filepath.Join(tmp, "initramfs.cpio")
	if err := writeInitramfs(initrd, func(a *archive) error { return fillGuest(a, p, c, n) }); err != nil {
		return nil, fmt.Errorf("build initramfs: %w", err)
	}

	console := newLineWriter(c.Console)
	accel, why := chooseAccel()
	console.note(fmt.Sprintf("vmtest: booting %s with %s (%s)", filepath.Base(p.kernel), accel, why))
	res, err := boot(ctx, p, c, initrd, accel, n, console)
	if errors.Is(err, errKVMSilent) && os.Getenv(EnvAccel) != "kvm" {
		kvmFailed(err.Error())
		console.note("vmtest: " + err.Error() + "; booting with tcg")
		accel = "tcg"
		res, err = boot(ctx, p, c, initrd, accel, n, console)
	}
	if res != nil {
		res.Wall = time.Since(start)
	}
	return res, err
}

// fillGuest writes the guest's root: busybox and /init, CRIU, tools, modules, c.Files.
func fillGuest(a *archive, p *paths, c Config, nonce string) error {
	if err := a.hostFile("/bin/busybox", p.busybox); err != nil {
		return err
	}
	if err := a.symlink("/bin/sh", "busybox"); err != nil {
		return err
	}
	if err := a.text("/init", guestInit, 0o755); err != nil {
		return err
	}
	etc := map[string]string{
		"/etc/passwd":        "root:x:0:0:root:/root:/bin/sh\n",
		"/etc/group":         "root:x:0:\ntty:x:5:\n",
		"/etc/hosts":         "127.0.0.1 localhost vmtest\n::1 localhost ip6-localhost\n",
		"/etc/nsswitch.conf": "passwd: files\ngroup: files\nhosts: files dns\n",
		"/etc/resolv.conf":   "",
	}
	for g, s := range etc {
		if err := a.text(g, s, 0o644); err != nil {
			return err
		}
	}
	if err := a.dir("/root", 0o700); err != nil {
		return err
	}

	// CRIU where checkpoint.FindCRIU looks for it, the same way the host has it.
	if p.criuRoot != "" {
		if err := a.copyHost(p.criuRoot, p.criuRoot); err != nil {
			return fmt.Errorf("add CRIU: %w", err)
		}
	}
	if err := a.hostExecutable(p.criu); err != nil {
		return fmt.Errorf("add CRIU: %w", err)
	}
	if err := a.symlink("/usr/local/sbin/criu", p.criu); err != nil {
		return err
	}
	for _, b := range defaultBinaries {
		if _, err := os.Stat(b); err != nil {
			continue
		}
		if err := a.hostExecutable(b); err != nil {
			return fmt.Errorf("add %s: %w", b, err)
		}
	}
	for _, b := range c.Binaries {
		if err := a.hostExecutable(b); err != nil {
			return fmt.Errorf("add %s: %w", b, err)
		}
	}

	mods := filepath.Join(p.vmDir, "lib", "modules", p.release)
	if _, err := os.Stat(mods); err == nil {
		if err := a.copyHost("/lib/modules/"+p.release, mods); err != nil {
			return fmt.Errorf("add modules: %w", err)
		}
		if err := a.hostFile("/lib/modules/vmtest.load", filepath.Join(p.vmDir, "modules.load")); err != nil {
			return fmt.Errorf("add modules: %w", err)
		}
	}

	guests := make([]string, 0, len(c.Files))
	for g := range c.Files {
		guests = append(guests, g)
	}
	slices.Sort(guests)
	for _, g := range guests {
		if !filepath.IsAbs(g) {
			return fmt.Errorf("guest path %q is not absolute", g)
		}
		if err := a.copyHost(g, c.Files[g]); err != nil {
			return fmt.Errorf("add %s: %w", g, err)
		}
	}

	env := append([]string{"PATH=" + guestPath, "HOME=/root", "TMPDIR=/tmp", "LANG=C.UTF-8"}, c.Env...)
	return a.text("/vmtest/run", runScript(nonce, env, c.Command), 0o755)
}

var errKVMSilent = errors.New("KVM guest did not reach /init")

// boot runs one QEMU with the given accelerator until the guest powers off.
func boot(ctx context.Context, p *paths, c Config, initrd, accel, nonce string, console *lineWriter) (*Result, error) {
	conR, conW, err := os.Pipe()
	if err != nil {
		return nil, err
	}
	defer conR.Close()
	outR, outW, err := os.Pipe()
	if err != nil {
		conW.Close()
		return nil, err
	}
	defer outR.Close()

	runCtx, stop := context.WithCancel(ctx)
	defer stop()
	cmd := exec.CommandContext(runCtx, p.qemu, qemuArgs(p, c, initrd, accel)...)
	cmd.WaitDelay = 5 * time.Second
	var stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stderr, &stderr
	cmd.ExtraFiles = []*os.File{conW, outW} // fd 3: ttyS0 console, fd 4: ttyS1 output
	// Pdeathsig: QEMU dies with the test process even when that is killed (go test's
	// timeout). It fires when the forking thread ends; the Go runtime ends a thread only
	// when a goroutine exits while locked to it, which a test rarely does mid-run.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	err = cmd.Start()
	conW.Close()
	outW.Close()
	if err != nil {
		return nil, fmt.Errorf("start %s: %w", p.qemu, err)
	}

	res := &Result{Accel: accel, ExitCode: -1}
	marker := []byte(endMarker(nonce) + " ")
	var conTail tail
	ready := make(chan struct{}) // /init runs
	var wg sync.WaitGroup
	var conStatus, outStatus = -1, -1
	var output bytes.Buffer
	wg.Add(2)
	go func() { // console
		defer wg.Done()
		var once sync.Once
		r := bufio.NewReader(conR)
		for {
			line, err := r.ReadBytes('\n')
			if len(line) > 0 {
				s := strings.TrimRight(string(line), "\r\n")
				if strings.HasPrefix(s, "vmtest-init: ") {
					once.Do(func() { close(ready) })
				}
				conTail.add(s)
				console.line(s)
				if i := strings.Index(s, string(marker)); i >= 0 {
					if v, err := strconv.Atoi(s[i+len(marker):]); err == nil {
						conStatus = v
					}
				}
			}
			if err != nil {
				return
			}
		}
	}()
	go func() { // the command's output
		defer wg.Done()
		r := bufio.NewReader(outR)
		for {
			line, err := r.ReadBytes('\n')
			// The marker may follow output that did not end with a newline.
			if i := bytes.Index(line, marker); i >= 0 && err == nil {
				if v, err := strconv.Atoi(strings.TrimSpace(string(line[i+len(marker):]))); err == nil {
					outStatus = v
					output.Write(line[:i])
					if i > 0 {
						console.line(string(line[:i]))
					}
					_, _ = io.Copy(io.Discard, r)
					return
				}
			}
			if len(line) > 0 {
				output.Write(line)
				console.line(strings.TrimRight(string(line), "\n"))
			}
			if err != nil {
				return
			}
		}
	}()

	kvmSilent := false
	if accel == "kvm" {
		select {
		case <-ready:
		case <-runCtx.Done():
		case <-time.After(kvmProbe):
			kvmSilent = true
			stop()
		}
	}
	waitErr := cmd.Wait()
	wg.Wait()
	res.Output = output.String()
	switch {
	case kvmSilent:
		return nil, fmt.Errorf("%w within %s", errKVMSilent, kvmProbe)
	case outStatus >= 0:
		res.ExitCode = outStatus
		return res, nil
	case ctx.Err() != nil:
		return res, fmt.Errorf("guest did not finish within %s: %w\nlast console lines:\n%s", c.Timeout, ctx.Err(), conTail.String())
	case conStatus >= 0:
		// Output may be cut short: the guest stopped before ttyS1 drained.
		res.ExitCode = conStatus
		return res, nil
	}
	if waitErr != nil {
		return res, fmt.Errorf("%w: %s: %w: %s\nlast console lines:\n%s", ErrNoExitStatus, qemuBinary, waitErr,
			strings.TrimSpace(stderr.String()), conTail.String())
	}
	return res, fmt.Errorf("%w\nlast console lines:\n%s", ErrNoExitStatus, conTail.String())
}

func qemuArgs(p *paths, c Config, initrd, accel string) []string {
	cpu := "max"
	if accel == "kvm" {
		cpu = "host"
	}
	append_ := "console=ttyS0 panic=-1 rdinit=/init mitigations=off tsc=reliable no_timer_check" +
		" i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd"
	return []string{
		"-name", "duplex-vmtest,process=" + processName,
		"-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
		"-accel", accel, "-cpu", cpu,
		"-m", strconv.Itoa(c.MemoryMiB), "-smp", strconv.Itoa(c.CPUs),
		"-kernel", p.kernel, "-initrd", initrd, "-append", append_,
		"-chardev", "file,id=con,path=/dev/fd/3", "-serial", "chardev:con",
		"-chardev", "file,id=out,path=/dev/fd/4", "-serial", "chardev:out",
	}
}

// KVM use: decided once per process.
var kvm struct {
	sync.Mutex
	broken string // why KVM does not work here; empty while it may
}

func kvmFailed(why string) {
	kvm.Lock()
	defer kvm.Unlock()
	kvm.broken = why
}

// chooseAccel returns "kvm" or "tcg" and why.
func chooseAccel() (string, string) {
	switch a := os.Getenv(EnvAccel); a {
	case "kvm", "tcg":
		return a, EnvAccel + "=" + a
	}
	kvm.Lock()
	broken := kvm.broken
	kvm.Unlock()
	if broken != "" {
		return "tcg", broken
	}
	f, err := os.OpenFile("/dev/kvm", os.O_RDWR, 0)
	if err != nil {
		return "tcg", "no usable /dev/kvm"
	}
	f.Close()
	// PVM (pagetable-based virtual machine) provides /dev/kvm without VMX/SVM and runs only
	// kernels built as PVM guests; a stock kernel crawls through KVM's instruction
	// emulator and then stops with "KVM internal error. Suberror: 1" (emulation failure).
	if _, err := os.Stat("/sys/module/kvm_pvm"); err == nil {
		return "tcg", "/dev/kvm is PVM (kvm_pvm), which boots only PVM guest kernels"
	}
	return "kvm", "/dev/kvm opens"
}

// lineWriter passes whole lines to an optional io.Writer from several goroutines.
type lineWriter struct {
	mu sync.Mutex
	w  io.Writer
}

func newLineWriter(w io.Writer) *lineWriter { return &lineWriter{w: w} }

func (l *lineWriter) line(s string) {
	if l.w == nil {
		return
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	_, _ = io.WriteString(l.w, s+"\n")
}

func (l *lineWriter) note(s string) { l.line(s) }

// tail keeps the last lines of the console for error messages.
type tail struct {
	mu    sync.Mutex
	lines []string
}

func (t *tail) add(s string) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.lines = append(t.lines, s)
	if len(t.lines) > 40 {
		t.lines = t.lines[len(t.lines)-40:]
	}
}

func (t *tail) String() string {
	t.mu.Lock()
	defer t.mu.Unlock()
	return strings.Join(t.lines, "\n")
}
