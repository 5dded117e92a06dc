package workload

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/containerd/cgroups/v3"
	"github.com/containerd/cgroups/v3/cgroup1"
	"github.com/containerd/cgroups/v3/cgroup2"
	specs "github.com/opencontainers/runtime-spec/specs-go"

	"github.com/duplex-ha/duplex/cgroupmon"
)

// cgroupDriver places workloads in cgroups on whatever layout the host has: a v1
// memory cgroup on legacy and hybrid hosts, a v2 group on unified and hybrid hosts.
type cgroupDriver struct {
	v1      bool
	v2      bool
	v2Mount string
}

func newCgroupDriver() *cgroupDriver {
	switch cgroups.Mode() {
	case cgroups.Legacy:
		return &cgroupDriver{v1: true}
	case cgroups.Hybrid:
		return &cgroupDriver{v1: true, v2: true, v2Mount: "/sys/fs/cgroup/unified"}
	case cgroups.Unified:
		return &cgroupDriver{v2: true, v2Mount: "/sys/fs/cgroup"}
	}
	return &cgroupDriver{}
}

func v1Memory() cgroup1.InitOpts {
	return cgroup1.WithHierarchy(cgroup1.SingleSubsystem(cgroup1.Default, cgroup1.Memory))
}

// create makes the workload's cgroups and applies its limits.
func (d *cgroupDriver) create(path string, memLimit, sockLimit int64) error {
	if d.v1 {
		res := &specs.LinuxResources{}
		if memLimit > 0 {
			res.Memory = &specs.LinuxMemory{Limit: &memLimit}
		}
		if _, err := cgroup1.New(cgroup1.StaticPath(path), res, v1Memory()); err != nil {
			return fmt.Errorf("create memory cgroup %s: %w", path, err)
		}
		// v1 charges socket buffers only once accounting is on (a limit written), and
		// only for sockets created after: do it before the workload starts.
		if sockLimit > 0 {
			f := filepath.Join("/sys/fs/cgroup/memory", path, "memory.kmem.tcp.limit_in_bytes")
			if err := os.WriteFile(f, []byte(fmt.Sprint(sockLimit)), 0o644); err != nil {
				return fmt.Errorf("socket memory limit for %s: %w", path, err)
			}
		} else if err := cgroupmon.New(cgroupmon.Options{}).EnableSockAccounting(path); err != nil {
			return fmt.Errorf("socket accounting for %s: %w", path, err)
		}
	}
	if d.v2 {
		res := &cgroup2.Resources{}
		if memLimit > 0 && !d.v1 {
			res.Memory = &cgroup2.Memory{Max: &memLimit}
		}
		if _, err := cgroup2.NewManager(d.v2Mount, path, res); err != nil {
			return fmt.Errorf("create cgroup2 group %s: %w", path, err)
		}
	}
	return nil
}

// exists reports whether the workload's cgroup is there already.
func (d *cgroupDriver) exists(path string) bool {
	dir := filepath.Join(d.v2Mount, path)
	if d.v1 {
		dir = filepath.Join("/sys/fs/cgroup/memory", path)
	}
	_, err := os.Stat(dir)
	return err == nil
}

// add moves a process into the workload's cgroups.
func (d *cgroupDriver) add(path string, pid int) error {
	if d.v1 {
		cg, err := cgroup1.Load(cgroup1.StaticPath(path), v1Memory())
		if err != nil {
			return fmt.Errorf("load memory cgroup %s: %w", path, err)
		}
		if err := cg.AddProc(uint64(pid)); err != nil {
			return fmt.Errorf("add %d to memory cgroup %s: %w", pid, path, err)
		}
	}
	if d.v2 {
		m, err := cgroup2.Load(path, cgroup2.WithMountpoint(d.v2Mount))
		if err != nil {
			return fmt.Errorf("load cgroup2 group %s: %w", path, err)
		}
		if err := m.AddProc(uint64(pid)); err != nil {
			return fmt.Errorf("add %d to cgroup2 group %s: %w", pid, path, err)
		}
	}
	return nil
}

// remove deletes the workload's cgroups; missing ones are fine.
func (d *cgroupDriver) remove(path string) error {
	var errs []error
	if d.v1 {
		if _, err := os.Stat(filepath.Join("/sys/fs/cgroup/memory", path)); err == nil {
			if cg, err := cgroup1.Load(cgroup1.StaticPath(path), v1Memory()); err == nil {
				if err := cg.Delete(); err != nil {
					errs = append(errs, fmt.Errorf("delete memory cgroup %s: %w", path, err))
				}
			}
		}
	}
	if d.v2 {
		if _, err := os.Stat(filepath.Join(d.v2Mount, path)); err == nil {
			if m, err := cgroup2.Load(path, cgroup2.WithMountpoint(d.v2Mount)); err == nil {
				if err := m.Delete(); err != nil {
					errs = append(errs, fmt.Errorf("delete cgroup2 group %s: %w", path, err))
				}
			}
		}
	}
	return errors.Join(errs...)
}

// removeParent deletes the parent directory shared by workloads if it is empty.
func (d *cgroupDriver) removeParent(parent string) {
	if d.v1 {
		_ = os.Remove(filepath.Join("/sys/fs/cgroup/memory", parent))
	}
	if d.v2 {
		_ = os.Remove(filepath.Join(d.v2Mount, parent))
	}
}
