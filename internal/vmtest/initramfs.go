package vmtest

import (
	"bufio"
	"debug/elf"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"strings"

	"github.com/cavaliergopher/cpio"
)

// archive writes a newc cpio archive (an initramfs) whose entries are given by guest path.
// Later entries for the same path replace earlier ones when the kernel unpacks it.
type archive struct {
	w    *cpio.Writer
	dirs map[string]bool
	elfs map[string]bool // host executables whose libraries were added
}

func newArchive(w io.Writer) *archive {
	return &archive{w: cpio.NewWriter(w), dirs: map[string]bool{"/": true}, elfs: map[string]bool{}}
}

func (a *archive) close() error { return a.w.Close() }

// name turns an absolute guest path into an archive name ("usr/bin/x").
func name(guest string) string { return strings.TrimPrefix(path.Clean(guest), "/") }

func (a *archive) header(guest string, mode cpio.FileMode, size int64) error {
	if err := a.mkdirAll(path.Dir(path.Clean(guest))); err != nil {
		return err
	}
	if err := a.w.WriteHeader(&cpio.Header{Name: name(guest), Mode: mode, Size: size}); err != nil {
		return fmt.Errorf("initramfs entry %s: %w", guest, err)
	}
	return nil
}

// mkdirAll adds guest directory p and its missing parents (mode 0755).
func (a *archive) mkdirAll(p string) error {
	p = path.Clean(p)
	if a.dirs[p] {
		return nil
	}
	if err := a.mkdirAll(path.Dir(p)); err != nil {
		return err
	}
	a.dirs[p] = true
	if err := a.w.WriteHeader(&cpio.Header{Name: name(p), Mode: cpio.TypeDir | 0o755}); err != nil {
		return fmt.Errorf("initramfs directory %s: %w", p, err)
	}
	return nil
}

func (a *archive) dir(guest string, perm fs.FileMode) error {
	guest = path.Clean(guest)
	if err := a.mkdirAll(path.Dir(guest)); err != nil {
		return err
	}
	a.dirs[guest] = true
	if err := a.w.WriteHeader(&cpio.Header{Name: name(guest), Mode: cpio.TypeDir | cpio.FileMode(perm.Perm())}); err != nil {
		return fmt.Errorf("initramfs directory %s: %w", guest, err)
	}
	return nil
}

func (a *archive) text(guest, content string, perm fs.FileMode) error {
	if err := a.header(guest, cpio.TypeReg|cpio.FileMode(perm.Perm()), int64(len(content))); err != nil {
		return err
	}
	_, err := io.WriteString(a.w, content)
	return err
}

func (a *archive) symlink(guest, target string) error {
	if err := a.header(guest, cpio.TypeSymlink|0o777, int64(len(target))); err != nil {
		return err
	}
	_, err := io.WriteString(a.w, target)
	return err
}

// hostFile adds the regular file at host (following symlinks) as guest.
func (a *archive) hostFile(guest, host string) error {
	f, err := os.Open(host)
	if err != nil {
		return err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return err
	}
	if !st.Mode().IsRegular() {
		return fmt.Errorf("%s is not a regular file", host)
	}
	if err := a.header(guest, cpio.TypeReg|cpio.FileMode(st.Mode().Perm()), st.Size()); err != nil {
		return err
	}
	if n, err := io.Copy(a.w, f); err != nil || n != st.Size() {
		return fmt.Errorf("copy %s into the initramfs (%d of %d bytes): %w", host, n, st.Size(), err)
	}
	return nil
}

// copyHost adds host (a file, symlink or directory tree) as guest. Symlinks stay symlinks;
// a symlink given as host itself is followed.
func (a *archive) copyHost(guest, host string) error {
	st, err := os.Stat(host)
	if err != nil {
		return err
	}
	if !st.IsDir() {
		return a.hostFile(guest, host)
	}
	return filepath.WalkDir(host, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, err := filepath.Rel(host, p)
		if err != nil {
			return err
		}
		g := path.Join(guest, filepath.ToSlash(rel))
		switch {
		case d.IsDir():
			info, err := d.Info()
			if err != nil {
				return err
			}
			return a.dir(g, info.Mode())
		case d.Type()&fs.ModeSymlink != 0:
			target, err := os.Readlink(p)
			if err != nil {
				return err
			}
			return a.symlink(g, target)
		case d.Type().IsRegular():
			return a.hostFile(g, p)
		}
		return nil // sockets, devices, fifos: not wanted in a guest
	})
}

// libDirs are searched for the shared libraries an executable needs (Debian multiarch).
var libDirs = []string{
	"/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu", "/lib64", "/usr/lib64", "/lib", "/usr/lib",
}

// hostExecutable adds the executable at host to the same path in the guest, with every
// symlink on the way, its ELF interpreter and the shared libraries it needs (recursively).
// Scripts are added as they are; their interpreter must exist in the guest.
func (a *archive) hostExecutable(host string) error {
	for range 16 {
		st, err := os.Lstat(host)
		if err != nil {
			return err
		}
		if st.Mode()&fs.ModeSymlink == 0 {
			break
		}
		target, err := os.Readlink(host)
		if err != nil {
			return err
		}
		if err := a.symlink(host, target); err != nil {
			return err
		}
		if !filepath.IsAbs(target) {
			target = filepath.Join(filepath.Dir(host), target)
		}
		host = target
	}
	if err := a.hostFile(host, host); err != nil {
		return err
	}
	return a.sharedLibs(host)
}

// sharedLibs adds the interpreter and libraries of the ELF file at host, if it is one.
func (a *archive) sharedLibs(host string) error {
	if a.elfs[host] {
		return nil
	}
	a.elfs[host] = true
	f, err := elf.Open(host)
	if err != nil {
		var fe *elf.FormatError
		if errors.As(err, &fe) {
			return nil // a script
		}
		return err
	}
	defer f.Close()
	for _, p := range f.Progs {
		if p.Type != elf.PT_INTERP {
			continue
		}
		b, err := io.ReadAll(p.Open())
		if err != nil {
			return fmt.Errorf("interpreter of %s: %w", host, err)
		}
		interp := strings.TrimRight(string(b), "\x00")
		if err := a.hostFile(interp, interp); err != nil {
			return fmt.Errorf("interpreter of %s: %w", host, err)
		}
	}
	libs, err := f.ImportedLibraries()
	if err != nil {
		return fmt.Errorf("libraries of %s: %w", host, err)
	}
	dirs := libDirs
	if rp, err := f.DynString(elf.DT_RUNPATH); err == nil {
		for _, s := range rp {
			for _, d := range strings.Split(s, ":") {
				dirs = append([]string{strings.ReplaceAll(d, "$ORIGIN", filepath.Dir(host))}, dirs...)
			}
		}
	}
	for _, lib := range libs {
		found := ""
		for _, d := range dirs {
			if p := filepath.Join(d, lib); fileExists(p) {
				found = p
				break
			}
		}
		if found == "" {
			return fmt.Errorf("library %s of %s not found in %v", lib, host, dirs)
		}
		if a.elfs[found] {
			continue
		}
		if err := a.hostFile(found, found); err != nil {
			return err
		}
		if err := a.sharedLibs(found); err != nil {
			return err
		}
	}
	return nil
}

func fileExists(p string) bool {
	st, err := os.Stat(p)
	return err == nil && st.Mode().IsRegular()
}

// writeInitramfs writes the whole guest root to file path p.
func writeInitramfs(p string, fill func(*archive) error) (err error) {
	f, err := os.OpenFile(p, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return err
	}
	defer func() {
		if cerr := f.Close(); err == nil {
			err = cerr
		}
	}()
	bw := bufio.NewWriterSize(f, 1<<20)
	a := newArchive(bw)
	if err := fill(a); err != nil {
		return err
	}
	if err := a.close(); err != nil {
		return err
	}
	return bw.Flush()
}
