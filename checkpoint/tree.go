package checkpoint

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// TreePids returns the PIDs of the process tree rooted at pid (root first), as this
// host's /proc sees them.
func TreePids(pid int) ([]int, error) {
	if _, err := os.Stat(fmt.Sprintf("/proc/%d", pid)); err != nil {
		return nil, fmt.Errorf("process %d: %w", pid, err)
	}
	var out []int
	seen := map[int]bool{}
	queue := []int{pid}
	for len(queue) > 0 {
		p := queue[0]
		queue = queue[1:]
		if seen[p] {
			continue
		}
		seen[p] = true
		out = append(out, p)
		tasks, _ := filepath.Glob(fmt.Sprintf("/proc/%d/task/*/children", p))
		for _, t := range tasks {
			b, err := os.ReadFile(t)
			if err != nil {
				continue
			}
			for _, f := range strings.Fields(string(b)) {
				if c, err := strconv.Atoi(f); err == nil {
					queue = append(queue, c)
				}
			}
		}
	}
	return out, nil
}

// Resume continues a tree a dump left stopped (DumpOptions.LeaveStopped): the
// rollback of a migration that did not commit.
func Resume(pid int) error {
	pids, err := TreePids(pid)
	if err != nil {
		return fmt.Errorf("resume %d: %w", pid, err)
	}
	var errs []error
	for _, p := range pids {
		if err := unix.Kill(p, unix.SIGCONT); err != nil && !errors.Is(err, unix.ESRCH) {
			errs = append(errs, fmt.Errorf("resume %d: %w", p, err))
		}
	}
	return errors.Join(errs...)
}
