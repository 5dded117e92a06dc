package doctor

import (
	"os"
	"path/filepath"
	"slices"
	"strings"

	"github.com/containerd/cgroups/v3"
)

// checkCgroups reports the cgroup layout and where memory is accounted: a v1
// memory hierarchy, or the memory controller of cgroup2's root.
func checkCgroups() Check {
	c := Check{Name: "cgroups", Required: true}
	mode := modeName(cgroups.Mode())

	mounts, err := readMounts()
	if err != nil {
		c.Status, c.Detail = Missing, mode+": "+err.Error()
		return c
	}
	var v1mem, v2 string
	for _, m := range mounts {
		switch m.fstype {
		case "cgroup":
			if v1mem == "" && slices.Contains(strings.Split(m.superOpts, ","), "memory") {
				v1mem = m.point
			}
		case "cgroup2":
			if v2 == "" || m.point == "/sys/fs/cgroup" || m.point == "/sys/fs/cgroup/unified" {
				v2 = m.point
			}
		}
	}
	v2mem := false
	if v2 != "" {
		b, err := os.ReadFile(filepath.Join(v2, "cgroup.controllers"))
		v2mem = err == nil && slices.Contains(strings.Fields(string(b)), "memory")
	}

	var parts []string
	if v1mem != "" {
		parts = append(parts, "v1 memory at "+v1mem)
	}
	switch {
	case v2 != "" && v2mem:
		parts = append(parts, "cgroup2 at "+v2+" with memory controller")
	case v2 != "":
		parts = append(parts, "cgroup2 at "+v2+" without memory controller")
	}
	if v1mem == "" && v2 == "" {
		parts = append(parts, "no cgroup mount found")
	}
	c.Detail = mode + ": " + strings.Join(parts, ", ")
	if v1mem == "" && !v2mem {
		c.Status = Missing
		c.Detail += "; no memory controller: duplex cannot account or limit workload memory"
		return c
	}
	c.Status = OK
	return c
}

func modeName(m cgroups.CGMode) string {
	switch m {
	case cgroups.Legacy:
		return "legacy"
	case cgroups.Hybrid:
		return "hybrid"
	case cgroups.Unified:
		return "unified"
	}
	return "unavailable"
}
