//go:build linux

package ebpf

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"sync"

	"github.com/cilium/ebpf/link"
	"golang.org/x/sys/unix"
)

// VMARecordSize is the size of one VMA record (struct vma_rec in vmas.c).
const VMARecordSize = 56

// VMA is one record of the VMA iterator, decoded.
type VMA struct {
	PID        int
	Start, End uint64
	Flags      uint64 // the kernel's vm_flags
	Pgoff      uint64
	Inode      uint64
}

// VMAIter lists the VMAs of chosen processes straight from the kernel's VMA tree,
// without the page-table walk that makes /proc/PID/smaps cost tens of milliseconds
// per gigabyte. CRIU with duplex's smaps-copy patch runs the same iterator (its
// link, see LinkFile) to check that a process's VMAs did not change since a copy of
// its smaps was made.
type VMAIter struct {
	mu   sync.Mutex
	objs vmasObjects
	link *link.Iter
	refs map[uint32]int // watched PIDs, counted: concurrent dumps may share one
}

// LoadVMAIter loads and attaches the iterator. Its error wraps ErrUnavailable when
// the kernel cannot run it (no BPF, no BTF, no task_vma iterator: Linux < 5.12).
func LoadVMAIter() (*VMAIter, error) {
	v := &VMAIter{refs: map[uint32]int{}}
	if err := loadVmasObjects(&v.objs, nil); err != nil {
		return nil, fmt.Errorf("%w: VMA iterator: %w", ErrUnavailable, err)
	}
	l, err := link.AttachIter(link.IterOptions{Program: v.objs.Vmas})
	if err != nil {
		v.objs.Close()
		return nil, fmt.Errorf("%w: VMA iterator: %w", ErrUnavailable, err)
	}
	v.link = l
	return v, nil
}

// Close detaches and unloads the iterator.
func (v *VMAIter) Close() error {
	return errors.Join(v.link.Close(), v.objs.Close())
}

// Watch adds processes to those the iterator reports; Unwatch takes them out
// again. Each Watch of a PID needs its own Unwatch.
func (v *VMAIter) Watch(pids ...int) error {
	v.mu.Lock()
	defer v.mu.Unlock()
	for _, p := range pids {
		k := uint32(p)
		if v.refs[k] == 0 {
			if err := v.objs.Want.Put(k, uint8(1)); err != nil {
				return fmt.Errorf("VMA iterator: watch %d: %w", p, err)
			}
		}
		v.refs[k]++
	}
	return nil
}

// Unwatch undoes Watch.
func (v *VMAIter) Unwatch(pids ...int) {
	v.mu.Lock()
	defer v.mu.Unlock()
	for _, p := range pids {
		k := uint32(p)
		if v.refs[k] == 0 {
			continue
		}
		if v.refs[k]--; v.refs[k] == 0 {
			delete(v.refs, k)
			_ = v.objs.Want.Delete(k)
		}
	}
}

// Snapshot runs the iterator once and returns each watched process's records,
// raw and in address order: the bytes CRIU compares.
func (v *VMAIter) Snapshot() (map[int][]byte, error) {
	r, err := v.link.Open()
	if err != nil {
		return nil, fmt.Errorf("VMA iterator: %w", err)
	}
	defer r.Close()
	b, err := io.ReadAll(r)
	if err != nil {
		return nil, fmt.Errorf("VMA iterator: %w", err)
	}
	if len(b)%VMARecordSize != 0 {
		return nil, fmt.Errorf("VMA iterator: %d bytes is not a whole number of records", len(b))
	}
	out := map[int][]byte{}
	for i := 0; i < len(b); i += VMARecordSize {
		pid := int(binary.NativeEndian.Uint32(b[i:]))
		out[pid] = append(out[pid], b[i:i+VMARecordSize]...)
	}
	return out, nil
}

// DecodeVMAs decodes a process's raw records from Snapshot.
func DecodeVMAs(raw []byte) []VMA {
	var out []VMA
	for i := 0; i+VMARecordSize <= len(raw); i += VMARecordSize {
		r := raw[i : i+VMARecordSize]
		u := func(off int) uint64 { return binary.NativeEndian.Uint64(r[off:]) }
		out = append(out, VMA{PID: int(binary.NativeEndian.Uint32(r)), Start: u(8), End: u(16), Flags: u(24), Pgoff: u(32), Inode: u(40)})
	}
	return out
}

// LinkFile returns a duplicate of the iterator link's descriptor, for a process
// that runs the iterator itself (BPF_ITER_CREATE on it). The caller closes it.
func (v *VMAIter) LinkFile() (*os.File, error) {
	fd, err := unix.FcntlInt(uintptr(v.link.FD()), unix.F_DUPFD_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("VMA iterator: %w", err)
	}
	return os.NewFile(uintptr(fd), "vma-iter-link"), nil
}
