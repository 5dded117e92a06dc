package checkpoint

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/checkpoint-restore/go-criu/v7/rpc"
	"golang.org/x/sys/unix"
	"google.golang.org/protobuf/proto"
)

// session is one `criu swrk` process serving one request over a SOCK_SEQPACKET
// pair. It is started here rather than through go-criu's Criu.Prepare (whose RPC
// messages it uses) for three things go-criu does not offer: the process's PID, to
// put it in a cgroup before a restore and to kill it when a request's context ends;
// its environment (see Engine.HardwareBreakpoints); and starting it ahead of the
// request (see Engine.Spare).
type session struct {
	cmd *exec.Cmd
	sk  *os.File
	pid int
}

func (e *Engine) session() (*session, error) {
	fds, err := unix.Socketpair(unix.AF_LOCAL, unix.SOCK_SEQPACKET|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("start %s swrk: %w", e.Path(), err)
	}
	cln := os.NewFile(uintptr(fds[0]), "criu-swrk-client")
	srv := os.NewFile(uintptr(fds[1]), "criu-swrk-server")
	defer srv.Close()
	cmd := exec.Command(e.Path(), "swrk", "3")
	cmd.ExtraFiles = []*os.File{srv} // fd 3 in CRIU
	cmd.Env = e.env()
	if err := cmd.Start(); err != nil {
		cln.Close()
		return nil, fmt.Errorf("start %s swrk: %w", e.Path(), err)
	}
	return &session{cmd: cmd, sk: cln, pid: cmd.Process.Pid}, nil
}

// close ends the session: CRIU exits once its socket closes.
func (s *session) close() {
	_ = s.sk.Close()
	_ = s.cmd.Wait()
}

// call sends one request and answers CRIU's notifications with nfy until the
// request's own response arrives.
func (s *session) call(typ rpc.CriuReqType, opts *rpc.CriuOpts, nfy Notify) (*rpc.CriuResp, error) {
	if nfy != nil {
		opts.NotifyScripts = proto.Bool(true)
	}
	req := &rpc.CriuReq{Type: typ.Enum(), Opts: opts}
	buf := make([]byte, 64<<10)
	for {
		b, err := proto.Marshal(req)
		if err != nil {
			return nil, err
		}
		if _, err := s.sk.Write(b); err != nil {
			return nil, fmt.Errorf("criu swrk: send: %w", err)
		}
		n, err := s.sk.Read(buf)
		if err != nil {
			return nil, fmt.Errorf("criu swrk: no answer (did it die?): %w", err)
		}
		resp := &rpc.CriuResp{}
		if err := proto.Unmarshal(buf[:n], resp); err != nil {
			return nil, fmt.Errorf("criu swrk: answer: %w", err)
		}
		if !resp.GetSuccess() {
			return resp, fmt.Errorf("operation failed (msg:%s err:%d)", resp.GetCrErrmsg(), resp.GetCrErrno())
		}
		if resp.GetType() != rpc.CriuReqType_NOTIFY {
			if resp.GetType() != typ {
				return resp, fmt.Errorf("criu swrk: answer of type %s to a %s request", resp.GetType(), typ)
			}
			return resp, nil
		}
		if nfy == nil {
			return resp, errors.New("criu swrk: unexpected notification")
		}
		if err := notify(nfy, resp.GetNotify()); err != nil {
			return resp, err
		}
		req = &rpc.CriuReq{Type: rpc.CriuReqType_NOTIFY.Enum(), NotifySuccess: proto.Bool(true)}
	}
}

func notify(nfy Notify, n *rpc.CriuNotify) error {
	switch n.GetScript() {
	case "pre-dump":
		return nfy.PreDump()
	case "post-dump":
		return nfy.PostDump()
	case "pre-restore":
		return nfy.PreRestore()
	case "post-restore":
		return nfy.PostRestore(n.GetPid())
	case "network-lock":
		return nfy.NetworkLock()
	case "network-unlock":
		return nfy.NetworkUnlock()
	case "setup-namespaces":
		return nfy.SetupNamespaces(n.GetPid())
	case "post-setup-namespaces":
		return nfy.PostSetupNamespaces()
	case "post-resume":
		return nfy.PostResume()
	}
	return nil
}

// do runs one request and ends the session. When ctx ends first, CRIU is killed,
// the processes it was restoring are killed too, and ctx's error is returned. Pass
// a context that never ends for requests that must not be interrupted (dumps).
func (s *session) do(ctx context.Context, workDir string, typ rpc.CriuReqType, opts *rpc.CriuOpts, nfy Notify) (*rpc.CriuResp, error) {
	before := children()
	type answer struct {
		resp *rpc.CriuResp
		err  error
	}
	done := make(chan answer, 1)
	go func() {
		r, err := s.call(typ, opts, nfy)
		done <- answer{r, err}
	}()
	select {
	case a := <-done:
		if a.err == nil && typ == rpc.CriuReqType_RESTORE {
			// The restored tree already runs: CRIU's exit and its reaping need not
			// hold the caller (a migration's downtime) up.
			go s.close()
			return a.resp, nil
		}
		s.close() // CRIU exits non-zero after a failed request: the answer says why
		return a.resp, a.err
	case <-ctx.Done():
	}
	_ = unix.Kill(s.pid, unix.SIGKILL)
	<-done
	s.close()
	killNewNamespaces(before)
	unmountUnder(workDir)
	return nil, fmt.Errorf("criu aborted: %w", ctx.Err())
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
