package checkpoint

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strconv"

	"github.com/duplex-ha/duplex/ebpf"
)

// smapsCopy is a copy of a tree's /proc/PID/smaps made just before a dump freezes
// it, for CRIU with FeatureSmapsCopy.
//
// CRIU learns each process's memory areas from smaps, and reading smaps walks
// every page table of the process: at 2 GiB of 4 KiB pages that was 20-33 ms of a
// post-copy migration's downtime. The copy moves that walk before the freeze. It
// is safe because it is checked: with each process's smaps goes the list a BPF
// task_vma iterator gave of its VMAs (bounds, flags, offset, inode, name) around
// the read, and CRIU runs the same iterator again once the tree is frozen. Only a
// process whose list is byte for byte the same gets its copy used; any other
// falls back to /proc. Nothing smaps shows of a VMA changes without changing
// that list.
type smapsCopy struct {
	dir    string
	pids   []int
	copied int
	iter   *ebpf.VMAIter
	link   *os.File // the iterator's link, for CRIU
}

// vmaIterator loads the VMA iterator once; nil if the kernel cannot run it.
func (e *Engine) vmaIterator() *ebpf.VMAIter {
	e.vmaOnce.Do(func() {
		if it, err := ebpf.LoadVMAIter(); err == nil {
			e.vmaIter = it
		}
	})
	return e.vmaIter
}

// copySmaps makes the copy for the tree of pid in a new directory beside
// imagesDir. It returns nil when the copy is off or impossible here (the dump
// then reads /proc as usual); errors only reading the tree.
func (e *Engine) copySmaps(ctx context.Context, pid int, imagesDir string) (*smapsCopy, error) {
	if e.NoSmapsCopy {
		return nil, nil
	}
	if ok, _ := e.HasFeature(ctx, FeatureSmapsCopy); !ok {
		return nil, nil
	}
	it := e.vmaIterator()
	if it == nil {
		return nil, nil
	}
	pids, err := TreePids(pid)
	if err != nil {
		return nil, err
	}
	dir, err := os.MkdirTemp(filepath.Dir(filepath.Clean(imagesDir)), ".smaps-")
	if err != nil {
		return nil, fmt.Errorf("smaps copy: %w", err)
	}
	c := &smapsCopy{dir: dir, pids: pids, iter: it}
	if err := it.Watch(pids...); err != nil {
		c.close()
		return nil, err
	}
	fail := func(err error) (*smapsCopy, error) {
		c.close()
		return nil, fmt.Errorf("smaps copy: %w", err)
	}
	before, err := it.Snapshot()
	if err != nil {
		return fail(err)
	}
	texts := make(map[int][]byte, len(pids))
	for _, p := range pids {
		if b, err := os.ReadFile("/proc/" + strconv.Itoa(p) + "/smaps"); err == nil {
			texts[p] = b
		}
	}
	after, err := it.Snapshot()
	if err != nil {
		return fail(err)
	}
	for _, p := range pids {
		// A process whose VMAs moved while its smaps was read gets no copy.
		text, ok := texts[p]
		if !ok || len(after[p]) == 0 || !bytes.Equal(before[p], after[p]) {
			continue
		}
		base := filepath.Join(dir, strconv.Itoa(p))
		if err := os.WriteFile(base+".smaps", text, 0o600); err != nil {
			return fail(err)
		}
		if err := os.WriteFile(base+".vmas", after[p], 0o600); err != nil {
			return fail(err)
		}
		c.copied++
	}
	if c.link, err = it.LinkFile(); err != nil {
		return fail(err)
	}
	return c, nil
}

// apply hands the copy to the CRIU command about to start.
func (c *smapsCopy) apply(env []string, files []*os.File) ([]string, []*os.File) {
	if c == nil {
		return env, files
	}
	fd := 3 + len(files) // ExtraFiles start at 3
	return append(env, "CRIU_SMAPS_CACHE="+c.dir, "CRIU_SMAPS_ITER="+strconv.Itoa(fd)), append(files, c.link)
}

// count is the number of processes that have a copy.
func (c *smapsCopy) count() int {
	if c == nil {
		return 0
	}
	return c.copied
}

// close removes the copy.
func (c *smapsCopy) close() {
	if c == nil {
		return
	}
	c.iter.Unwatch(c.pids...)
	if c.link != nil {
		c.link.Close()
	}
	_ = os.RemoveAll(c.dir)
}
