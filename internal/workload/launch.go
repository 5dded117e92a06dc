package workload

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// defaultPath is the PATH of a workload whose environment sets none.
const defaultPath = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

// gate holds the new PID-namespace init in a shell until its cgroups are set, then
// execs the real command, which becomes PID 1 and session leader of the namespace.
const gate = `read _ <&3 || exit 125; exec 3<&-; exec "$0" "$@"`

// lookPath resolves a command the way the workload's own PATH would.
func lookPath(cmd string, env []string) (string, error) {
	if strings.Contains(cmd, "/") {
		if err := executable(cmd); err != nil {
			return "", err
		}
		return filepath.Abs(cmd)
	}
	path := defaultPath
	for _, kv := range env {
		if v, ok := strings.CutPrefix(kv, "PATH="); ok {
			path = v
		}
	}
	for _, dir := range filepath.SplitList(path) {
		if dir == "" {
			continue
		}
		p := filepath.Join(dir, cmd)
		if executable(p) == nil {
			return p, nil
		}
	}
	return "", fmt.Errorf("%q not found in PATH %s", cmd, path)
}

func executable(p string) error {
	st, err := os.Stat(p)
	if err != nil {
		return err
	}
	if st.IsDir() || st.Mode()&0o111 == 0 {
		return fmt.Errorf("%s is not an executable file", p)
	}
	return nil
}

// start launches a workload's process tree and returns its record and a pidfd.
func (m *Manager) start(spec Spec) (Record, int, error) {
	env := spec.Env
	if len(env) == 0 {
		env = []string{"PATH=" + defaultPath, "HOME=/", "LANG=C.UTF-8"}
	}
	bin, err := lookPath(spec.Args[0], env)
	if err != nil {
		return Record{}, 0, fmt.Errorf("%w: %s: command: %w", ErrInvalid, spec.Name, err)
	}
	cwd := spec.Cwd
	if cwd == "" {
		cwd = "/"
	}
	if st, err := os.Stat(cwd); err != nil || !st.IsDir() {
		return Record{}, 0, fmt.Errorf("%w: %s: working directory %s does not exist", ErrInvalid, spec.Name, cwd)
	}

	dir := m.dir(spec.Name)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return Record{}, 0, fmt.Errorf("run %s: %w", spec.Name, err)
	}
	rec := Record{
		Spec:    spec,
		Cgroup:  m.cgroupPath(spec.Name),
		Stdout:  filepath.Join(dir, "stdout.log"),
		Stderr:  filepath.Join(dir, "stderr.log"),
		Created: time.Now(),
	}
	rec.Env = env
	rec.Cwd = cwd

	fail := func(err error) (Record, int, error) {
		_ = m.cg.remove(rec.Cgroup)
		_ = os.RemoveAll(dir)
		return Record{}, 0, err
	}
	if err := m.cg.create(rec.Cgroup, spec.MemoryLimit, spec.SocketMemoryLimit); err != nil {
		return fail(fmt.Errorf("run %s: %w", spec.Name, err))
	}
	stdout, err := os.OpenFile(rec.Stdout, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o640)
	if err != nil {
		return fail(fmt.Errorf("run %s: %w", spec.Name, err))
	}
	defer stdout.Close()
	stderr, err := os.OpenFile(rec.Stderr, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o640)
	if err != nil {
		return fail(fmt.Errorf("run %s: %w", spec.Name, err))
	}
	defer stderr.Close()
	devnull, err := os.Open(os.DevNull)
	if err != nil {
		return fail(fmt.Errorf("run %s: %w", spec.Name, err))
	}
	defer devnull.Close()
	gr, gw, err := os.Pipe()
	if err != nil {
		return fail(fmt.Errorf("run %s: %w", spec.Name, err))
	}
	defer gr.Close()
	defer gw.Close()

	args := append([]string{"-c", gate, bin}, spec.Args[1:]...)
	cmd := exec.Command("/bin/sh", args...)
	cmd.Env = env
	cmd.Dir = cwd
	cmd.Stdin, cmd.Stdout, cmd.Stderr = devnull, stdout, stderr
	cmd.ExtraFiles = []*os.File{gr}
	cmd.SysProcAttr = &unix.SysProcAttr{
		Cloneflags: unix.CLONE_NEWPID,
		Setsid:     true,
	}
	if err := cmd.Start(); err != nil {
		return fail(fmt.Errorf("run %s: %w", spec.Name, err))
	}
	pid := cmd.Process.Pid
	_ = cmd.Process.Release() // the watcher reaps it through its own pidfd
	gr.Close()

	abort := func(err error) (Record, int, error) {
		gw.Close() // the gate exits 125 without running the command
		_ = unix.Kill(pid, unix.SIGKILL)
		var ws unix.WaitStatus
		_, _ = unix.Wait4(pid, &ws, 0, nil)
		return fail(err)
	}
	fd, err := unix.PidfdOpen(pid, 0)
	if err != nil {
		return abort(fmt.Errorf("run %s: pidfd: %w", spec.Name, err))
	}
	if err := m.cg.add(rec.Cgroup, pid); err != nil {
		unix.Close(fd)
		return abort(fmt.Errorf("run %s: %w", spec.Name, err))
	}
	_, _, tick, err := procStat(pid)
	if err != nil {
		unix.Close(fd)
		return abort(fmt.Errorf("run %s: %w", spec.Name, err))
	}
	if _, err := gw.Write([]byte("go\n")); err != nil {
		unix.Close(fd)
		return abort(fmt.Errorf("run %s: release gate: %w", spec.Name, err))
	}
	rec.State = Running
	rec.Pid = pid
	rec.StartTick = tick
	rec.Started = time.Now()
	return rec, fd, nil
}

var errNoCheckpointer = errors.New("checkpointing is not configured")
