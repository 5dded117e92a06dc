package rejuv

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// dropCaches is the drop-caches rung: sync(2), then the kernel frees the clean page
// cache, dentries and inodes.
type dropCaches struct{ proc string }

func (dropCaches) Name() string { return ActionDropCaches }

func (a dropCaches) Run(ctx context.Context) error {
	_, err := a.RunDetail(ctx)
	return err
}

func (a dropCaches) RunDetail(context.Context) (string, error) {
	before, berr := readMeminfo(a.proc)
	unix.Sync() // dirty pages are not dropped: write them out first
	if err := writeKnob(filepath.Join(a.proc, "sys/vm/drop_caches"), "3"); err != nil {
		return "", err
	}
	after, aerr := readMeminfo(a.proc)
	if err := errors.Join(berr, aerr); err != nil {
		return "caches dropped; " + err.Error(), nil
	}
	return fmt.Sprintf("MemAvailable %s -> %s, Cached %s -> %s",
		formatBytes(before.available), formatBytes(after.available),
		formatBytes(before.cached), formatBytes(after.cached)), nil
}

// compactMemory is the compact-memory rung: the kernel moves pages so that free memory
// forms large contiguous blocks again (huge pages, high-order allocations).
type compactMemory struct{ proc string }

func (compactMemory) Name() string { return ActionCompactMemory }

func (a compactMemory) Run(ctx context.Context) error {
	_, err := a.RunDetail(ctx)
	return err
}

func (a compactMemory) RunDetail(context.Context) (string, error) {
	knob := filepath.Join(a.proc, "sys/vm/compact_memory")
	before, berr := freeHugeBlocks(a.proc)
	err := writeKnob(knob, "1")
	if errors.Is(err, fs.ErrNotExist) {
		return fmt.Sprintf("skipped: no %s, the kernel lacks CONFIG_COMPACTION", knob), nil
	}
	if err != nil {
		return "", err
	}
	after, aerr := freeHugeBlocks(a.proc)
	if berr != nil || aerr != nil {
		return "memory compacted", nil // buddyinfo only measures; the compaction ran
	}
	return fmt.Sprintf("free memory in blocks of %s or more %s -> %s",
		formatBytes(hugeBlock), formatBytes(before), formatBytes(after)), nil
}

// writeKnob writes value to an existing file under /proc/sys, as `echo value > knob`
// does without the newline.
func writeKnob(path, value string) error {
	f, err := os.OpenFile(path, os.O_WRONLY, 0)
	if err != nil {
		return err
	}
	_, werr := f.WriteString(value)
	cerr := f.Close()
	if werr != nil {
		return werr // *PathError: names the file
	}
	if cerr != nil {
		return fmt.Errorf("write %s: %w", path, cerr)
	}
	return nil
}

type meminfo struct{ available, cached uint64 } // bytes

// readMeminfo reads MemAvailable and Cached from <proc>/meminfo.
func readMeminfo(proc string) (meminfo, error) {
	path := filepath.Join(proc, "meminfo")
	b, err := os.ReadFile(path)
	if err != nil {
		return meminfo{}, err
	}
	var m meminfo
	found := 0
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		key, rest, ok := strings.Cut(sc.Text(), ":")
		if !ok {
			continue
		}
		var dst *uint64
		switch key {
		case "MemAvailable":
			dst = &m.available
		case "Cached":
			dst = &m.cached
		default:
			continue
		}
		f := strings.Fields(rest) // "123456 kB"
		if len(f) == 0 {
			return meminfo{}, fmt.Errorf("parse %s: empty %s", path, key)
		}
		kb, err := strconv.ParseUint(f[0], 10, 64)
		if err != nil {
			return meminfo{}, fmt.Errorf("parse %s: %s: %w", path, key, err)
		}
		*dst = kb * 1024
		found++
	}
	if found < 2 {
		return meminfo{}, fmt.Errorf("parse %s: no MemAvailable or Cached line", path)
	}
	return m, nil
}

// hugeBlock is the size of a transparent huge page on x86-64 and arm64 with 4 KiB
// pages: the block size compaction is mostly for.
const hugeBlock = 2 << 20

// freeHugeBlocks sums the free memory that <proc>/buddyinfo lists in blocks of
// hugeBlock bytes or more, over all nodes and zones.
func freeHugeBlocks(proc string) (uint64, error) {
	b, err := os.ReadFile(filepath.Join(proc, "buddyinfo"))
	if err != nil {
		return 0, err
	}
	page := uint64(os.Getpagesize())
	var total uint64
	// "Node 0, zone   Normal   1  2  3 ...": free blocks of order 0, 1, 2, ...
	for line := range strings.Lines(string(b)) {
		f := strings.Fields(line)
		if len(f) < 4 || f[0] != "Node" || f[2] != "zone" {
			continue
		}
		for order, s := range f[4:] {
			n, err := strconv.ParseUint(s, 10, 64)
			if err != nil {
				return 0, fmt.Errorf("parse buddyinfo: %w", err)
			}
			if size := page << order; size >= hugeBlock {
				total += n * size
			}
		}
	}
	return total, nil
}

// formatBytes writes n in binary units with one decimal: "512 B", "1.5 KiB", "3.4 GiB".
func formatBytes(n uint64) string {
	if n < 1024 {
		return fmt.Sprintf("%d B", n)
	}
	v, unit := float64(n)/1024, 0
	for v >= 1024 && unit < 4 {
		v /= 1024
		unit++
	}
	return fmt.Sprintf("%.1f %ciB", v, "KMGTP"[unit])
}
