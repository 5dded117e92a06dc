package harness

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os/exec"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

const sigKill = unix.SIGKILL

var errExitedZero = errors.New("exit status 0")

// Command returns a command that runs name inside n's network namespace, through
// `nsenter --net=NSPath` (which execs, so the started pid is name's own). Only the
// network namespace changes: the process shares the caller's mount namespace, so
// /sys/class/net still shows the caller's links; use netlink (ip) to look at n's.
// The command is not started.
func (n *Node) Command(ctx context.Context, name string, args ...string) *exec.Cmd {
	return exec.CommandContext(ctx, "nsenter", append([]string{"--net=" + n.NSPath, "--", name}, args...)...)
}

// Start starts a long-running process in node n, captures its stdout and stderr, and
// registers it so Close kills it.
func (c *Cluster) Start(n *Node, name string, args ...string) (*Proc, error) {
	return c.StartCmd(n.Command(context.Background(), name, args...))
}

// StartCmd is Start for a command the caller prepared with Node.Command (to set Env or
// Dir). Output already directed elsewhere is also captured. The process leads its own
// process group, so Stop and Close reach its children too.
func (c *Cluster) StartCmd(cmd *exec.Cmd) (*Proc, error) {
	p := &Proc{Name: strings.Join(cmd.Args, " "), cmd: cmd, out: newOutBuf(), done: make(chan struct{})}
	cmd.Stdout = teeTo(cmd.Stdout, p.out)
	cmd.Stderr = teeTo(cmd.Stderr, p.out)
	if cmd.SysProcAttr == nil {
		cmd.SysProcAttr = &syscall.SysProcAttr{}
	}
	cmd.SysProcAttr.Setpgid = true
	if cmd.WaitDelay == 0 {
		// A grandchild that escaped the process group must not hold Wait on the pipes.
		cmd.WaitDelay = 2 * time.Second
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return nil, fmt.Errorf("start %s: %w", p.Name, ErrClosed)
	}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start %s: %w", p.Name, err)
	}
	c.procs = append(c.procs, p)
	go func() {
		p.err = cmd.Wait()
		close(p.done)
	}()
	return p, nil
}

func teeTo(w io.Writer, buf *outBuf) io.Writer {
	if w == nil {
		return buf
	}
	return io.MultiWriter(w, buf)
}

// Proc is a process started in a node by Cluster.Start.
type Proc struct {
	Name string // command line, for messages

	cmd  *exec.Cmd
	out  *outBuf
	done chan struct{}
	err  error // set before done closes
}

// Pid returns the process id (the command's own: nsenter execs it).
func (p *Proc) Pid() int { return p.cmd.Process.Pid }

// Output returns everything the process wrote to stdout and stderr so far.
func (p *Proc) Output() string { return p.out.String() }

// Done is closed when the process has exited and been reaped.
func (p *Proc) Done() <-chan struct{} { return p.done }

// Wait waits for the process to exit and returns its exit error, as exec.Cmd.Wait.
func (p *Proc) Wait() error {
	<-p.done
	return p.err
}

// Stop sends sig to the process group the process leads (children that did not start
// their own session or group get it too) and waits up to timeout for the process to
// exit, then SIGKILLs the group. It returns nil once the process is gone, whatever
// its exit status (see Wait), and nil if it had already exited. Group members that
// outlive the process are left to Close.
func (p *Proc) Stop(sig syscall.Signal, timeout time.Duration) error {
	select {
	case <-p.done:
		return nil
	default:
	}
	if err := p.signalGroup(sig); err != nil {
		return fmt.Errorf("signal %s (pid %d): %w", p.Name, p.Pid(), err)
	}
	select {
	case <-p.done:
		return nil
	case <-time.After(timeout):
	}
	_ = p.signalGroup(sigKill)
	select {
	case <-p.done:
		return nil
	case <-time.After(5 * time.Second):
		return fmt.Errorf("stop %s (pid %d): still running 5s after SIGKILL", p.Name, p.Pid())
	}
}

// signalGroup signals the process group the process leads, unless it has been reaped.
func (p *Proc) signalGroup(sig syscall.Signal) error {
	select {
	case <-p.done:
		return nil
	default:
	}
	err := unix.Kill(-p.Pid(), sig)
	if errors.Is(err, unix.ESRCH) {
		return nil
	}
	return err
}

// WaitOutput waits until the process's output contains s. It fails if the process
// exits first or ctx ends, quoting the output's tail.
func (p *Proc) WaitOutput(ctx context.Context, s string) error {
	for {
		out, changed := p.out.snapshot()
		if strings.Contains(out, s) {
			return nil
		}
		select {
		case <-changed:
		case <-p.done:
			if out := p.Output(); strings.Contains(out, s) {
				return nil
			}
			err := p.err
			if err == nil {
				err = errExitedZero
			}
			return fmt.Errorf("%s exited before printing %q: %w; output: %s", p.Name, s, err, tail(p.Output()))
		case <-ctx.Done():
			return fmt.Errorf("wait for %q from %s: %w; output: %s", s, p.Name, ctx.Err(), tail(p.Output()))
		}
	}
}

func tail(s string) string {
	const max = 2000
	if len(s) > max {
		return "..." + s[len(s)-max:]
	}
	return s
}

// outBuf collects output and wakes waiters on every write.
type outBuf struct {
	mu      sync.Mutex
	b       bytes.Buffer
	changed chan struct{}
}

func newOutBuf() *outBuf { return &outBuf{changed: make(chan struct{})} }

func (o *outBuf) Write(p []byte) (int, error) {
	o.mu.Lock()
	defer o.mu.Unlock()
	o.b.Write(p)
	close(o.changed)
	o.changed = make(chan struct{})
	return len(p), nil
}

func (o *outBuf) String() string {
	s, _ := o.snapshot()
	return s
}

func (o *outBuf) snapshot() (string, <-chan struct{}) {
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.b.String(), o.changed
}
