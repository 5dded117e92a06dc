package checkpoint

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"
)

// dumpCommand runs a dump as a CRIU command with PageServerConn as descriptor 3
// (--ps-socket): the page traffic goes wherever the caller carries that socket.
func (e *Engine) dumpCommand(ctx context.Context, o DumpOptions, op, logName string) (*DumpStats, error) {
	if o.Pid <= 0 {
		return nil, fmt.Errorf("%s: no pid to dump", op)
	}
	if o.LeaveRunning && o.LeaveStopped {
		return nil, errors.New("leave-running and leave-stopped exclude each other")
	}
	if o.Lazy != nil {
		return nil, errors.New("lazy dumps cannot use a page-server connection")
	}
	args := []string{op, "-t", strconv.Itoa(o.Pid), "-D", o.ImagesDir, "-o", logName, "-v" + strconv.Itoa(int(logLevel(o.LogLevel))),
		"--ps-socket", "3"}
	if o.LazyConn {
		// CRIU's page server for lazy pages asks for a 3.2 MiB pipe and ignores the
		// refusal a host without CAP_SYS_RESOURCE gives below fs.pipe-max-size.
		if err := EnsurePipeMaxSize(LazyPipeSize); err != nil {
			return nil, fmt.Errorf("%s: %w", op, err)
		}
		args = append(args, "--lazy-pages", "--status-fd", "4")
	} else {
		args = append(args, "--page-server")
	}
	flag := func(on bool, f string) {
		if on {
			args = append(args, f)
		}
	}
	flag(o.LeaveRunning, "--leave-running")
	flag(o.LeaveStopped, "--leave-stopped")
	flag(o.TCPEstablished, "--tcp-established")
	if o.ManageCgroups {
		args = append(args, "--manage-cgroups")
	} else {
		args = append(args, "--manage-cgroups=ignore") // without the option CRIU dumps them (soft)
	}
	flag(o.TrackMem, "--track-mem")
	flag(o.FileLocks, "--file-locks")
	flag(o.ExtUnixSk, "--ext-unix-sk")
	flag(o.ShellJob, "--shell-job")
	switch o.NetworkLock {
	case LockNFTables:
		args = append(args, "--network-lock", "nftables")
	case LockIPTables:
		args = append(args, "--network-lock", "iptables")
	case LockSkip:
		args = append(args, "--network-lock", "skip")
	}
	if o.GhostLimit > 0 {
		args = append(args, "--ghost-limit", strconv.FormatUint(uint64(o.GhostLimit), 10))
	}
	if o.ParentDir != "" {
		parent, err := relParent(o.ImagesDir, o.ParentDir)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", op, err)
		}
		args = append(args, "--prev-images-dir", parent)
	}
	cmd := exec.Command(e.Path(), args...)
	cmd.Env = e.env()
	cmd.ExtraFiles = []*os.File{o.PageServerConn}
	var statusR *os.File
	if o.LazyConn {
		r, w, err := os.Pipe()
		if err != nil {
			return nil, fmt.Errorf("%s: %w", op, err)
		}
		statusR = r
		defer r.Close()
		cmd.ExtraFiles = append(cmd.ExtraFiles, w)
		defer w.Close()
	}
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	dumpMu.Lock()
	var once sync.Once
	unlock := func() { once.Do(dumpMu.Unlock) }
	defer unlock()
	copied := 0
	if op == "dump" {
		// As late as possible before the freeze: the copy is used only where
		// nothing changed since. Without a copy CRIU reads /proc as usual.
		sc, _ := e.copySmaps(ctx, o.Pid, o.ImagesDir)
		defer sc.close()
		copied = sc.count()
		cmd.Env, cmd.ExtraFiles = sc.apply(cmd.Env, cmd.ExtraFiles)
	}
	start := time.Now()
	// Like every dump, it runs to its end whatever ctx says.
	began := time.Now()
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("%s: start %s: %w", op, e.Path(), err)
	}
	if o.Started != nil {
		o.Started(began)
	}
	if statusR != nil {
		cmd.ExtraFiles[1].Close() // only CRIU writes the status
		go func() {
			b := make([]byte, 1)
			if n, _ := statusR.Read(b); n == 1 {
				unlock() // the tree is dumped; serving its pages can overlap other dumps
				if o.Ready != nil {
					o.Ready()
				}
			}
		}()
	}
	err := cmd.Wait()
	wall := time.Since(start)
	if err == nil && o.Ready != nil && statusR == nil {
		o.Ready()
	}
	if err != nil {
		if msg := strings.TrimSpace(out.String()); msg != "" {
			err = fmt.Errorf("%w: %s", err, msg)
		}
		return nil, criuError(op, err, filepath.Join(o.ImagesDir, logName))
	}
	st := finishDump(o, logName, wall)
	st.SmapsCopied = copied
	return st, nil
}

// LazyPipeSize is the pipe size CRIU's lazy page server asks for, rounded up to
// what the kernel grants (a power of two of pages).
const LazyPipeSize = 4 << 20

const pipeMaxSizePath = "/proc/sys/fs/pipe-max-size"

// EnsurePipeMaxSize raises fs.pipe-max-size to at least n bytes (it never lowers it).
func EnsurePipeMaxSize(n int) error {
	b, err := os.ReadFile(pipeMaxSizePath)
	if err != nil {
		return fmt.Errorf("read %s: %w", pipeMaxSizePath, err)
	}
	cur, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err == nil && cur >= n {
		return nil
	}
	if err := os.WriteFile(pipeMaxSizePath, []byte(strconv.Itoa(n)), 0o644); err != nil {
		return fmt.Errorf("raise %s to %d (lazy pages need it): %w", pipeMaxSizePath, n, err)
	}
	return nil
}
