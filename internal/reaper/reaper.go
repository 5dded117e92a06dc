// Package reaper makes duplexd a child subreaper and collects the zombies that
// orphaned descendants (CRIU helpers, restored trees whose parent went away) leave
// with it. Only duplexd uses it.
package reaper

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// SetSubreaper makes orphaned descendants of this process its children rather than
// init's (PR_SET_CHILD_SUBREAPER), so restored workloads stay under duplexd.
func SetSubreaper() error {
	if err := unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0); err != nil {
		return fmt.Errorf("become child subreaper: %w", err)
	}
	return nil
}

// Run reaps this process's zombie children every interval until ctx ends. A zombie
// is reaped only when seen in two sweeps in a row, so that code waiting for its own
// child (os/exec) gets there first; skip excludes children someone else reaps.
func Run(ctx context.Context, interval time.Duration, skip func(pid int) bool, reaped func(pid int, ws unix.WaitStatus)) {
	t := time.NewTicker(interval)
	defer t.Stop()
	seen := map[int]bool{}
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		now := map[int]bool{}
		for _, pid := range zombieChildren(os.Getpid()) {
			if skip != nil && skip(pid) {
				continue
			}
			if !seen[pid] {
				now[pid] = true
				continue
			}
			var ws unix.WaitStatus
			if got, err := unix.Wait4(pid, &ws, unix.WNOHANG, nil); err == nil && got == pid && reaped != nil {
				reaped(pid, ws)
			}
		}
		seen = now
	}
}

// zombieChildren lists the zombie children of ppid.
func zombieChildren(ppid int) []int {
	var out []int
	paths, _ := filepath.Glob(fmt.Sprintf("/proc/%d/task/*/children", ppid))
	for _, p := range paths {
		b, err := os.ReadFile(p)
		if err != nil {
			continue
		}
		for _, f := range strings.Fields(string(b)) {
			pid, err := strconv.Atoi(f)
			if err != nil {
				continue
			}
			st, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
			if err != nil {
				continue
			}
			s := string(st)
			if i := strings.LastIndexByte(s, ')'); i > 0 && len(s) > i+2 && s[i+2] == 'Z' {
				out = append(out, pid)
			}
		}
	}
	return out
}
