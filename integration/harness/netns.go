package harness

import (
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// inNetNS runs fn on a locked OS thread that has joined the network namespace at path,
// then moves the thread back. Sockets fn creates stay in that namespace. fn must not
// start goroutines that create sockets: they run on other threads.
func inNetNS(path string, fn func() error) error {
	runtime.LockOSThread()
	orig, err := os.Open("/proc/thread-self/ns/net")
	if err != nil {
		runtime.UnlockOSThread()
		return fmt.Errorf("open own netns: %w", err)
	}
	defer orig.Close()
	target, err := os.Open(path)
	if err != nil {
		runtime.UnlockOSThread()
		return fmt.Errorf("open netns %s: %w", path, err)
	}
	defer target.Close()
	if err := unix.Setns(int(target.Fd()), unix.CLONE_NEWNET); err != nil {
		runtime.UnlockOSThread()
		return fmt.Errorf("enter netns %s: %w", path, err)
	}
	fnErr := fn()
	if err := unix.Setns(int(orig.Fd()), unix.CLONE_NEWNET); err != nil {
		// Leave the thread locked: the runtime ends a locked thread when its goroutine
		// exits, so no other goroutine ever runs in the wrong namespace.
		return fmt.Errorf("return from netns %s: %w", path, err)
	}
	runtime.UnlockOSThread()
	return fnErr
}

// writeSysctl sets a sysctl (dotted name) inside the network namespace at path.
func writeSysctl(path, name, value string) error {
	file := filepath.Join("/proc/sys", strings.ReplaceAll(name, ".", "/"))
	return inNetNS(path, func() error {
		if err := os.WriteFile(file, []byte(value), 0o644); err != nil {
			return fmt.Errorf("set sysctl %s=%s: %w", name, value, err)
		}
		return nil
	})
}

// nsID identifies a namespace by the device and inode of its nsfs file.
type nsID struct{ dev, ino uint64 }

func statNS(path string) (nsID, error) {
	var st syscall.Stat_t
	if err := syscall.Stat(path, &st); err != nil {
		return nsID{}, err
	}
	return nsID{dev: st.Dev, ino: st.Ino}, nil
}

// nsRef is a named namespace of the cluster.
type nsRef struct {
	path string // /run/netns/<name>
	id   nsID
}

// holders lists the processes, other than this one, that are in one of the namespaces,
// hold one open, or are about to enter one: an `nsenter --net=PATH` caught before its
// setns would otherwise escape Close and run on in a namespace that has lost its name.
func holders(refs []nsRef) []int {
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return nil
	}
	self := os.Getpid()
	var pids []int
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == self || pid == 1 {
			continue
		}
		if holds(e.Name(), refs) {
			pids = append(pids, pid)
		}
	}
	return pids
}

func holds(pid string, refs []nsRef) bool {
	dir := "/proc/" + pid
	match := func(id nsID) bool {
		for _, r := range refs {
			if r.id == id {
				return true
			}
		}
		return false
	}
	if id, err := statNS(dir + "/ns/net"); err == nil && match(id) {
		return true // a zombie or a vanished process fails the stat
	}
	if cmdline, err := os.ReadFile(dir + "/cmdline"); err == nil {
		for _, arg := range strings.Split(string(cmdline), "\x00") {
			for _, r := range refs {
				if arg == r.path || arg == "--net="+r.path {
					return true
				}
			}
		}
	}
	fds, _ := os.ReadDir(dir + "/fd")
	for _, fd := range fds {
		link, err := os.Readlink(dir + "/fd/" + fd.Name())
		if err != nil || strings.HasPrefix(link, "socket:") || strings.HasPrefix(link, "pipe:") ||
			strings.HasPrefix(link, "anon_inode:") {
			continue
		}
		if id, err := statNS(dir + "/fd/" + fd.Name()); err == nil && match(id) {
			return true
		}
	}
	return false
}

// killHolders SIGKILLs every process holders finds until none is left or timeout
// passes, and returns the pids still there.
func killHolders(refs []nsRef, timeout time.Duration) []int {
	if len(refs) == 0 {
		return nil
	}
	deadline := time.Now().Add(timeout)
	for {
		left := holders(refs)
		if len(left) == 0 || time.Now().After(deadline) {
			return left
		}
		for _, pid := range left {
			_ = unix.Kill(pid, unix.SIGKILL)
		}
		time.Sleep(20 * time.Millisecond)
	}
}
