package checkpoint

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"

	"github.com/google/nftables"
	"golang.org/x/sys/unix"
	"google.golang.org/protobuf/encoding/protowire"
)

// A dump that leaves the tree stopped (DumpOptions.LeaveStopped) with established
// TCP connections leaves two things behind that CRIU only undoes when it restores:
// the network lock (an nftables table dropping the tree's connections) and the
// connections' repair mode. Rollback undoes both and resumes the tree; Discard ends
// the tree and removes the lock once its copy runs elsewhere.

var lockTableRe = regexp.MustCompile(`inet (CRIU-[0-9a-zA-Z-]+)`)

// LockTableOf returns the network-lock table of the dump in imagesDir ("" if none
// is in place), for when the dump's statistics are not at hand (a dump that failed).
func LockTableOf(imagesDir string) string {
	return lockTable(imagesDir, filepath.Join(imagesDir, DumpLog))
}

// lockTable finds the nftables table a dump locked the network with. CRIU names it
// after the dump's run id (truncated), which it records in inventory.img; the log
// names it too when the tree had connections to lock.
func lockTable(imagesDir, logPath string) string {
	if id := runID(filepath.Join(imagesDir, "inventory.img")); id != "" {
		if c, err := nftables.New(); err == nil {
			if tables, err := c.ListTablesOfFamily(nftables.TableFamilyINet); err == nil {
				for _, t := range tables {
					if len(t.Name) > len("CRIU-")+8 && strings.HasPrefix("CRIU-"+id, t.Name) {
						return t.Name
					}
				}
			}
		}
	}
	b, err := os.ReadFile(logPath)
	if err != nil {
		return ""
	}
	if m := lockTableRe.FindSubmatch(b); m != nil {
		return string(m[1])
	}
	return ""
}

// runID reads the dump's run id from inventory.img: a magic, a length, then the
// inventory entry, whose field 13 is the id (newer than go-criu's copy of the schema).
func runID(path string) string {
	b, err := os.ReadFile(path)
	if err != nil || len(b) < 8 {
		return ""
	}
	size := int(binary.LittleEndian.Uint32(b[4:8]))
	if 8+size > len(b) {
		return ""
	}
	msg := b[8 : 8+size]
	for len(msg) > 0 {
		num, typ, n := protowire.ConsumeTag(msg)
		if n < 0 {
			return ""
		}
		msg = msg[n:]
		if num == 13 && typ == protowire.BytesType {
			v, n := protowire.ConsumeBytes(msg)
			if n < 0 {
				return ""
			}
			return string(v)
		}
		n = protowire.ConsumeFieldValue(num, typ, msg)
		if n < 0 {
			return ""
		}
		msg = msg[n:]
	}
	return ""
}

// Rollback resumes a tree that a LeaveStopped dump froze, in the host's current
// network namespace: established TCP connections leave repair mode, the network
// lock (lockTable, from DumpStats.LockTable; "" when none) is removed, and every
// task gets SIGCONT. Its peers see a pause, never a reset.
func Rollback(pid int, lockTable string) error {
	pids, err := TreePids(pid)
	if err != nil {
		return fmt.Errorf("roll back %d: %w", pid, err)
	}
	var errs []error
	for _, p := range pids {
		if err := repairOff(p); err != nil {
			errs = append(errs, err)
		}
	}
	if err := dropLock(lockTable); err != nil {
		errs = append(errs, err)
	}
	if err := Resume(pid); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

// Discard kills a tree a LeaveStopped dump froze (its copy now runs elsewhere) and
// removes its network lock. Connections in repair mode close silently: the peer,
// now talking to the copy, sees no reset.
func Discard(pid int, lockTable string) error {
	var errs []error
	if _, err := os.Stat(fmt.Sprintf("/proc/%d", pid)); err == nil {
		// Killing the namespace init kills the rest of its namespace.
		if err := unix.Kill(pid, unix.SIGKILL); err != nil && !errors.Is(err, unix.ESRCH) {
			errs = append(errs, fmt.Errorf("discard %d: %w", pid, err))
		}
	}
	if err := dropLock(lockTable); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

// Unlock removes a network lock a dump left (DumpStats.LockTable) without touching
// the tree: for a frozen tree that is being killed anyway. A missing table is fine.
func Unlock(table string) error { return dropLock(table) }

// dropLock deletes CRIU's network-lock table; a missing table is fine.
func dropLock(table string) error {
	if table == "" {
		return nil
	}
	c, err := nftables.New()
	if err != nil {
		return fmt.Errorf("network unlock: %w", err)
	}
	tables, err := c.ListTablesOfFamily(nftables.TableFamilyINet)
	if err != nil {
		return fmt.Errorf("network unlock: list nftables tables: %w", err)
	}
	for _, t := range tables {
		if t.Name == table {
			c.DelTable(t)
			if err := c.Flush(); err != nil {
				return fmt.Errorf("network unlock: delete table %s: %w", table, err)
			}
		}
	}
	return nil
}

// repairOff takes every established TCP socket of process pid out of repair mode.
func repairOff(pid int) error {
	fds, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	if err != nil {
		return nil // gone
	}
	pidfd, err := unix.PidfdOpen(pid, 0)
	if err != nil {
		return nil
	}
	defer unix.Close(pidfd)
	var errs []error
	for _, fd := range fds {
		link, err := os.Readlink(filepath.Join(fmt.Sprintf("/proc/%d/fd", pid), fd.Name()))
		if err != nil || len(link) < 8 || link[:8] != "socket:[" {
			continue
		}
		n, err := strconv.Atoi(fd.Name())
		if err != nil {
			continue
		}
		sfd, err := unix.PidfdGetfd(pidfd, n, 0)
		if err != nil {
			errs = append(errs, fmt.Errorf("repair off %d/%d: %w", pid, n, err))
			continue
		}
		if isEstablishedTCP(sfd) {
			if err := unix.SetsockoptInt(sfd, unix.IPPROTO_TCP, unix.TCP_REPAIR, unix.TCP_REPAIR_OFF); err != nil && !errors.Is(err, unix.EPERM) {
				errs = append(errs, fmt.Errorf("repair off %d/%d: %w", pid, n, err))
			}
		}
		unix.Close(sfd)
	}
	return errors.Join(errs...)
}

func isEstablishedTCP(fd int) bool {
	typ, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_TYPE)
	if err != nil || typ != unix.SOCK_STREAM {
		return false
	}
	dom, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_DOMAIN)
	if err != nil || (dom != unix.AF_INET && dom != unix.AF_INET6) {
		return false
	}
	info, err := unix.GetsockoptTCPInfo(fd, unix.IPPROTO_TCP, unix.TCP_INFO)
	return err == nil && info.State == unix.BPF_TCP_ESTABLISHED
}
