package rejuv

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"
)

// ErrUnsafeScratch is returned by clear-state for a scratch directory it must not
// empty: a symlink, not a directory, resolving to a protected path, or holding a mount
// point. Nothing in that directory was removed.
var ErrUnsafeScratch = errors.New("unsafe scratch directory")

// clearState is the clear-state rung: it empties each scratch directory, keeping the
// directory itself (and the tmpfs mounted on it, if any).
type clearState struct {
	dirs []string
	proc string
}

func (clearState) Name() string { return ActionClearState }

func (a clearState) Run(ctx context.Context) error {
	_, err := a.RunDetail(ctx)
	return err
}

func (a clearState) RunDetail(ctx context.Context) (string, error) {
	if len(a.dirs) == 0 {
		return "no scratch directories declared", nil
	}
	var done []string
	detail := func() string { return strings.Join(done, "; ") }
	for _, dir := range a.dirs {
		if err := ctx.Err(); err != nil {
			return detail(), err
		}
		real, err := resolveScratch(dir)
		if errors.Is(err, fs.ErrNotExist) {
			done = append(done, dir+" missing, nothing to clear")
			continue
		}
		if err != nil {
			return detail(), err
		}
		if err := checkNoMounts(a.proc, real); err != nil {
			return detail(), err
		}
		entries, bytes, err := emptyDir(ctx, real)
		where := dir
		if real != dir {
			where = fmt.Sprintf("%s (%s)", dir, real)
		}
		done = append(done, fmt.Sprintf("removed %d entries (%s) from %s", entries, formatBytes(bytes), where))
		if err != nil {
			return detail(), err
		}
	}
	return detail(), nil
}

// resolveScratch checks dir on the machine and returns the path to empty: dir itself,
// or dir with its parents' symlinks resolved when that path is still a valid scratch
// directory. A missing dir gives an error matching fs.ErrNotExist.
func resolveScratch(dir string) (string, error) {
	fi, err := os.Lstat(dir)
	if err != nil {
		return "", err
	}
	if fi.Mode()&fs.ModeSymlink != 0 {
		return "", fmt.Errorf("scratch %s is a symlink: %w", dir, ErrUnsafeScratch)
	}
	if !fi.IsDir() {
		return "", fmt.Errorf("scratch %s is not a directory: %w", dir, ErrUnsafeScratch)
	}
	real, err := filepath.EvalSymlinks(dir)
	if err != nil {
		return "", fmt.Errorf("resolve scratch %s: %w", dir, err)
	}
	if reason := checkScratch(real); reason != "" {
		return "", fmt.Errorf("scratch %s resolves to %s, %s: %w", dir, real, reason, ErrUnsafeScratch)
	}
	return real, nil
}

// checkNoMounts refuses dir when a filesystem is mounted anywhere inside it (on dir
// itself is fine): removing the entries would empty that filesystem too.
func checkNoMounts(proc, dir string) error {
	mounts, err := mountPoints(filepath.Join(proc, "self/mountinfo"))
	if err != nil {
		return err
	}
	for _, m := range mounts {
		if strings.HasPrefix(m, dir+"/") {
			return fmt.Errorf("scratch %s has a mount point inside, %s: %w", dir, m, ErrUnsafeScratch)
		}
	}
	return nil
}

// mountPoints returns the mount points mountinfo lists (proc(5)), unescaped.
func mountPoints(mountinfo string) ([]string, error) {
	f, err := os.Open(mountinfo)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var mounts []string
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 0, 64<<10), 1<<20)
	for sc.Scan() {
		// "36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw"
		fields := strings.Fields(sc.Text())
		if len(fields) < 5 {
			return nil, fmt.Errorf("parse %s: short line %q", mountinfo, sc.Text())
		}
		mounts = append(mounts, unescapeOctal(fields[4]))
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("read %s: %w", mountinfo, err)
	}
	return mounts, nil
}

// unescapeOctal undoes the kernel's \ooo escapes of space, tab, newline and backslash
// in mountinfo paths.
func unescapeOctal(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+4 <= len(s) {
			if n, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(n))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// emptyDir removes every entry of dir, not dir itself, and returns how many entries it
// removed and the bytes their regular files held. os.RemoveAll does not follow
// symlinks: a link to elsewhere goes, its target stays.
func emptyDir(ctx context.Context, dir string) (entries int, bytes uint64, err error) {
	list, err := os.ReadDir(dir)
	if err != nil {
		return 0, 0, err
	}
	for _, e := range list {
		if err := ctx.Err(); err != nil {
			return entries, bytes, err
		}
		p := filepath.Join(dir, e.Name())
		size := treeSize(p)
		if err := os.RemoveAll(p); err != nil {
			return entries, bytes, err
		}
		entries++
		bytes += size
	}
	return entries, bytes, nil
}

// treeSize is the size of the regular files in the tree at p, which it walks without
// following symlinks. Unreadable parts count as nothing: it is only for the report.
func treeSize(p string) uint64 {
	var n uint64
	_ = filepath.WalkDir(p, func(_ string, d fs.DirEntry, err error) error {
		if err != nil {
			return nil
		}
		if d.Type().IsRegular() {
			if fi, err := d.Info(); err == nil {
				n += uint64(fi.Size())
			}
		}
		return nil
	})
	return n
}
