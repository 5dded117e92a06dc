package checkpoint

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"

	criu "github.com/checkpoint-restore/go-criu/v7"
	"golang.org/x/sys/unix"
)

// session is one `criu swrk` process serving one request. go-criu offers no way to
// abort a request, so the session remembers the swrk PID to kill it when a
// cancellable request's context ends.
type session struct {
	c   *criu.Criu
	pid int // 0 when it could not be identified; the request then cannot be aborted
}

// spawnMu serialises swrk start-ups so that the new child can be told apart.
var spawnMu sync.Mutex

func (e *Engine) session() (*session, error) {
	spawnMu.Lock()
	defer spawnMu.Unlock()
	before := children()
	c := criu.MakeCriu()
	c.SetCriuPath(e.Path())
	if err := c.Prepare(); err != nil {
		return nil, fmt.Errorf("start %s swrk: %w", e.Path(), err)
	}
	s := &session{c: c}
	for pid := range children() {
		if before[pid] {
			continue
		}
		if b, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid)); err == nil && strings.Contains(string(b), "swrk") {
			s.pid = pid
			break
		}
	}
	return s, nil
}

// do runs one request. When ctx ends first, CRIU is killed, the processes it was
// restoring are killed too, and ctx's error is returned. Pass a context that never
// ends for requests that must not be interrupted (dumps).
func (s *session) do(ctx context.Context, workDir string, req func(c *criu.Criu) error) error {
	before := children()
	done := make(chan error, 1)
	go func() { done <- req(s.c) }()
	select {
	case err := <-done:
		_ = s.c.Cleanup() // CRIU exits non-zero after a failed request: err says why
		return err
	case <-ctx.Done():
	}
	if s.pid > 0 {
		_ = unix.Kill(s.pid, unix.SIGKILL)
	}
	<-done
	_ = s.c.Cleanup()
	killNewNamespaces(before)
	unmountUnder(workDir)
	return fmt.Errorf("criu aborted: %w", ctx.Err())
}

// children returns the PIDs of this process's children.
func children() map[int]bool {
	out := map[int]bool{}
	paths, _ := filepath.Glob(fmt.Sprintf("/proc/%d/task/*/children", os.Getpid()))
	for _, p := range paths {
		b, err := os.ReadFile(p)
		if err != nil {
			continue
		}
		for _, f := range strings.Fields(string(b)) {
			if pid, err := strconv.Atoi(f); err == nil {
				out[pid] = true
			}
		}
	}
	return out
}

// killNewNamespaces kills children that appeared since before and live in another
// PID namespace: the half-restored trees of an aborted restore (restore-sibling mode
// makes their roots our children). Killing a namespace's init kills all of it.
func killNewNamespaces(before map[int]bool) {
	self, err := os.Readlink("/proc/self/ns/pid")
	if err != nil {
		return
	}
	for pid := range children() {
		if before[pid] {
			continue
		}
		if ns, err := os.Readlink(fmt.Sprintf("/proc/%d/ns/pid", pid)); err == nil && ns != self {
			_ = unix.Kill(pid, unix.SIGKILL)
			var ws unix.WaitStatus
			_, _ = unix.Wait4(pid, &ws, 0, nil)
		}
	}
}

// unmountUnder detaches every mount below dir (deepest first) and removes CRIU's
// cgroup yard directories there: what a killed CRIU leaves behind.
func unmountUnder(dir string) {
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return
	}
	prefix := filepath.Clean(dir) + "/"
	var points []string
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) > 4 && strings.HasPrefix(f[4], prefix) {
			points = append(points, f[4])
		}
	}
	for i := len(points) - 1; i >= 0; i-- {
		_ = unix.Unmount(points[i], unix.MNT_DETACH)
	}
	yards, _ := filepath.Glob(filepath.Join(dir, ".criu.cgyard.*"))
	for _, y := range yards {
		_ = os.RemoveAll(y)
	}
}
