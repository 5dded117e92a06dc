package checkpoint

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"sync"

	criu "github.com/checkpoint-restore/go-criu/v7"
	"github.com/checkpoint-restore/go-criu/v7/rpc"
	"golang.org/x/sys/unix"
	"google.golang.org/protobuf/proto"
)

// PageServerLog is the log of a page server, in its images directory.
const PageServerLog = "page-server.log"

// PageServerOptions describes a page server: the receiving end of a page-server dump.
type PageServerOptions struct {
	ImagesDir string
	Address   string // listen address; "" means all
	Port      int    // 0 picks a free port
	TLS       *TLS
	LogLevel  int
	// Conn, when set, is a connected stream socket the page server serves instead
	// of listening on Address:Port (--ps-socket): the caller carries the pages.
	Conn *os.File
	// ParentDir is the previous pre-dump round's images directory, absolute or
	// relative to ImagesDir: an incremental dump sends only the pages changed
	// since, and the page server records the others as in the parent.
	ParentDir string
}

// PageServer is a running CRIU page server. It writes the pages one dump sends to its
// images directory and exits when that dump closes the connection.
type PageServer struct {
	Pid     int
	Port    int // 0 when it serves a connection it was given
	LogPath string
	pidfd   int
	done    chan error // set when it runs as our child command
}

// StartPageServer starts a CRIU page server in the background.
func (e *Engine) StartPageServer(ctx context.Context, o PageServerOptions) (*PageServer, error) {
	e.WarmKerndat()
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	if err := prepareDir(o.ImagesDir); err != nil {
		return nil, err
	}
	if o.Conn != nil {
		return e.pageServerCommand(o)
	}
	opts := &rpc.CriuOpts{
		ImagesDirFd: proto.Int32(-1),
		ImagesDir:   proto.String(o.ImagesDir),
		LogLevel:    proto.Int32(logLevel(o.LogLevel)),
		LogFile:     proto.String(PageServerLog),
		Ps:          &rpc.CriuPageServerInfo{Port: proto.Int32(int32(o.Port))},
	}
	if o.Address != "" {
		opts.Ps.Address = proto.String(o.Address)
	}
	o.TLS.apply(opts)
	c := criu.MakeCriu()
	c.SetCriuPath(e.Path())
	pid, port, err := c.StartPageServerChld(opts)
	logPath := filepath.Join(o.ImagesDir, PageServerLog)
	if err != nil {
		return nil, criuError("page-server", err, logPath)
	}
	fd, err := unix.PidfdOpen(pid, 0)
	if err != nil {
		return nil, fmt.Errorf("page server %d: %w", pid, err)
	}
	return &PageServer{Pid: pid, Port: port, LogPath: logPath, pidfd: fd}, nil
}

// pageServerCommand runs `criu page-server --ps-socket 3` on o.Conn.
func (e *Engine) pageServerCommand(o PageServerOptions) (*PageServer, error) {
	if o.TLS != nil {
		return nil, errors.New("page server on a given connection: the caller's tunnel provides the encryption, not CRIU")
	}
	args := []string{"page-server", "-D", o.ImagesDir, "-o", PageServerLog,
		"-v" + strconv.Itoa(int(logLevel(o.LogLevel))), "--ps-socket", "3"}
	if o.ParentDir != "" {
		parent, err := relParent(o.ImagesDir, o.ParentDir)
		if err != nil {
			return nil, fmt.Errorf("start page server: %w", err)
		}
		args = append(args, "--prev-images-dir", parent)
	}
	cmd := exec.Command(e.Path(), args...)
	cmd.ExtraFiles = []*os.File{o.Conn}
	logPath := filepath.Join(o.ImagesDir, PageServerLog)
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start page server: %w", err)
	}
	p := &PageServer{Pid: cmd.Process.Pid, LogPath: logPath, pidfd: -1, done: make(chan error, 1)}
	go func() {
		err := cmd.Wait()
		if err != nil {
			err = criuError("page-server", err, logPath)
		}
		p.done <- err
	}()
	return p, nil
}

// Wait blocks until the page server exits or ctx ends. For a page server on a
// given connection it returns the server's failure, if any.
func (p *PageServer) Wait(ctx context.Context) error {
	if p.done != nil {
		select {
		case err := <-p.done:
			p.done <- err
			return err
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	return waitPidfd(ctx, p.pidfd)
}

// Stop kills the page server and releases it.
func (p *PageServer) Stop() error {
	if p.done != nil {
		select {
		case err := <-p.done: // already gone: nothing to kill
			p.done <- err
			return nil
		default:
		}
		_ = unix.Kill(p.Pid, unix.SIGKILL)
		err := <-p.done
		p.done <- err
		return nil
	}
	if p.pidfd < 0 {
		return nil
	}
	err := unix.PidfdSendSignal(p.pidfd, unix.SIGKILL, nil, 0)
	if errors.Is(err, unix.ESRCH) {
		err = nil
	}
	// The server is a child of criu swrk, reparented to us if we are a subreaper.
	var info unix.Siginfo
	_ = unix.Waitid(unix.P_PIDFD, p.pidfd, &info, unix.WEXITED|unix.WNOHANG, nil)
	unix.Close(p.pidfd)
	p.pidfd = -1
	return err
}

// waitPidfd waits for the process behind pidfd to exit.
func waitPidfd(ctx context.Context, pidfd int) error {
	for {
		n, err := unix.Poll([]unix.PollFd{{Fd: int32(pidfd), Events: unix.POLLIN}}, 100)
		if err != nil && !errors.Is(err, unix.EINTR) {
			return err
		}
		if n > 0 {
			return nil
		}
		if err := ctx.Err(); err != nil {
			return err
		}
	}
}

// LazyPagesLog is the log of the lazy-pages daemon, in its images directory.
const LazyPagesLog = "lazy-pages.log"

// LazyPagesOptions describes the lazy-pages daemon of a post-copy restore.
type LazyPagesOptions struct {
	ImagesDir string
	// Source is the page server of a lazy dump (DumpOptions.Lazy) to fetch pages
	// from; nil serves them from ImagesDir.
	Source   *Address
	TLS      *TLS
	LogLevel int
	// Conn, when set, is a connected stream socket to the source's lazy page
	// server (--ps-socket): the caller carries the pages.
	Conn *os.File
	// HoldBackground keeps the daemon from fetching the pages nobody asked for
	// until LazyPages.StartBackground or Stop (faults are served all along); a
	// CRIU without FeatureLazyBackgroundGate starts at once, as it always did.
	HoldBackground bool
}

// LazyPages is a running `criu lazy-pages` daemon. A restore with
// RestoreOptions.LazyPages on the same images directory connects to it; it exits
// once every page was delivered.
type LazyPages struct {
	cmd     *exec.Cmd
	done    chan error
	LogPath string
	gate    *os.File // write end of the background gate; closing it opens it
	gateMu  sync.Mutex
}

// StartBackground lets a daemon started with HoldBackground fetch the remaining
// pages; it does nothing otherwise or when called again.
func (l *LazyPages) StartBackground() {
	l.gateMu.Lock()
	defer l.gateMu.Unlock()
	if l.gate != nil {
		l.gate.Close()
		l.gate = nil
	}
}

// StartLazyPages starts the lazy-pages daemon (go-criu has no RPC for it) and waits
// until it accepts the restore's connection.
func (e *Engine) StartLazyPages(ctx context.Context, o LazyPagesOptions) (*LazyPages, error) {
	e.WarmKerndat()
	if err := prepareDir(o.ImagesDir); err != nil {
		return nil, err
	}
	args := []string{"lazy-pages", "-D", o.ImagesDir, "-W", o.ImagesDir,
		"-v" + strconv.Itoa(int(logLevel(o.LogLevel))), "-o", LazyPagesLog}
	switch {
	case o.Conn != nil:
		args = append(args, "--page-server", "--ps-socket", "3")
	case o.Source != nil:
		args = append(args, "--page-server", "--address", o.Source.Host, "--port", strconv.Itoa(o.Source.Port))
	}
	if o.TLS != nil {
		args = append(args, "--tls", "--tls-cacert", o.TLS.CACert, "--tls-cert", o.TLS.Cert, "--tls-key", o.TLS.Key)
	}
	// CRIU writes one byte to its status fd once its socket accepts the restore.
	statusR, statusW, err := os.Pipe()
	if err != nil {
		return nil, fmt.Errorf("start lazy-pages: %w", err)
	}
	defer statusR.Close()
	var files []*os.File
	if o.Conn != nil {
		files = append(files, o.Conn)
	}
	args = append(args, "--status-fd", strconv.Itoa(3+len(files)))
	files = append(files, statusW)
	var gateR, gateW *os.File
	env := e.env()
	if o.HoldBackground { // a CRIU without the gate ignores it
		if gateR, gateW, err = os.Pipe(); err != nil {
			statusW.Close()
			return nil, fmt.Errorf("start lazy-pages: %w", err)
		}
		defer gateR.Close()
		env = append(env, "CRIU_LAZY_BG_GATE_FD="+strconv.Itoa(3+len(files)))
		files = append(files, gateR)
	}
	_ = os.Remove(filepath.Join(o.ImagesDir, "lazy-pages.socket"))
	cmd := exec.Command(e.Path(), args...)
	cmd.ExtraFiles = files
	cmd.Env = env
	logPath := filepath.Join(o.ImagesDir, LazyPagesLog)
	err = cmd.Start()
	statusW.Close() // only CRIU writes the status
	if err != nil {
		if gateW != nil {
			gateW.Close()
		}
		return nil, fmt.Errorf("start lazy-pages: %w", err)
	}
	lp := &LazyPages{cmd: cmd, done: make(chan error, 1), LogPath: logPath, gate: gateW}
	go func() { lp.done <- cmd.Wait() }()
	ready := make(chan bool, 1)
	go func() {
		b := make([]byte, 1)
		n, _ := statusR.Read(b)
		ready <- n == 1
	}()
	select {
	case ok := <-ready:
		if ok {
			return lp, nil
		}
		err := <-lp.done
		lp.done <- err
		if err == nil {
			err = errors.New("exited before serving")
		}
		return nil, criuError("lazy-pages", err, logPath)
	case <-ctx.Done():
		lp.Stop()
		return nil, ctx.Err()
	}
}

// Wait blocks until the daemon has delivered every page and exited, or ctx ends.
func (l *LazyPages) Wait(ctx context.Context) error {
	select {
	case err := <-l.done:
		l.done <- err
		if err != nil {
			return criuError("lazy-pages", err, l.LogPath)
		}
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// Stop kills the daemon if it still runs.
func (l *LazyPages) Stop() {
	_ = l.cmd.Process.Kill() // harmless when it already exited
	err := <-l.done
	l.done <- err
	l.StartBackground() // closes the gate's pipe
}
