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
		"--page-server", "--ps-socket", "3"}
	flag := func(on bool, f string) {
		if on {
			args = append(args, f)
		}
	}
	flag(o.LeaveRunning, "--leave-running")
	flag(o.LeaveStopped, "--leave-stopped")
	flag(o.TCPEstablished, "--tcp-established")
	flag(o.ManageCgroups, "--manage-cgroups")
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
		args = append(args, "--prev-images-dir", o.ParentDir)
	}
	cmd := exec.Command(e.Path(), args...)
	cmd.ExtraFiles = []*os.File{o.PageServerConn}
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	start := time.Now()
	// Like every dump, it runs to its end whatever ctx says.
	err := cmd.Run()
	wall := time.Since(start)
	if err != nil {
		if msg := strings.TrimSpace(out.String()); msg != "" {
			err = fmt.Errorf("%w: %s", err, msg)
		}
		return nil, criuError(op, err, filepath.Join(o.ImagesDir, logName))
	}
	return finishDump(o, logName, wall), nil
}
