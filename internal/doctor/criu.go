package doctor

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"regexp"
	"strings"

	"github.com/duplex-ha/duplex/checkpoint"
	"github.com/duplex-ha/duplex/ebpf"
)

const makeDeps = "run 'make deps'"

// checkCRIU returns the checks that ask CRIU: criu, criu-check, uffd, lazy-dump,
// smaps-copy, dirty-tracking and nftables-lock, in that order.
func checkCRIU(ctx context.Context, o Options) []Check {
	eng := checkpoint.New(o.CRIUPath)
	path := eng.Path()

	crit := Check{Name: "criu", Required: true}
	v, err := eng.Version(ctx)
	if err != nil {
		crit.Status = Missing
		if errors.Is(err, fs.ErrNotExist) {
			crit.Detail = fmt.Sprintf("no CRIU at %s; %s", path, makeDeps)
		} else {
			crit.Detail = fmt.Sprintf("no usable CRIU at %s: %s; %s", path, timeoutOr(ctx, err), makeDeps)
		}
		return append([]Check{crit}, criuUnavailable(path)...)
	}
	crit.Status = OK
	crit.Detail = fmt.Sprintf("%s, version %s", path, v)
	if v.GitID != "" {
		crit.Detail += " (" + v.GitID + ")"
	}
	if splitVDSO() {
		if !v.AtLeast(4, 1) {
			crit.Status = Missing
			crit.Detail = fmt.Sprintf("%s is CRIU %s, but this kernel splits the vDSO data ([vvar_vclock]) and needs CRIU >= 4.1; %s", path, v, makeDeps)
		}
	} else if !v.AtLeast(3, 0) {
		crit.Status = Missing
		crit.Detail = fmt.Sprintf("%s is CRIU %s, duplex needs >= 3.0; %s", path, v, makeDeps)
	}

	checks := []Check{crit}

	cc := Check{Name: "criu-check", Required: true}
	ok, msg, err := eng.Check(ctx)
	cc.Status, cc.Detail = criuVerdict(ctx, ok, msg, err, "'criu check' passes", "'criu check' fails")
	checks = append(checks, cc)

	uffd := Check{Name: "uffd"}
	ok, msg, err = eng.CheckFeature(ctx, checkpoint.FeatureUFFDNonCoop)
	uffd.Status, uffd.Detail = criuVerdict(ctx, ok, msg, err,
		"post-copy (lazy-pages) migration available",
		"post-copy (lazy-pages) migration unavailable; pre-copy and stop-and-copy still work")
	checks = append(checks, uffd)

	lazy := Check{Name: "lazy-dump", Status: OK,
		Detail: "CRIU carries duplex's patches (contrib/criu): post-copy's lazy dump serves pages from the frozen tree instead of copying them while it is frozen"}
	if !v.DuplexPatched() {
		lazy.Status = Warn
		lazy.Detail = "CRIU without duplex's patches: post-copy's lazy dump copies every page while the workload is frozen, so its downtime grows with memory; 'make deps' builds the patched CRIU"
	}
	checks = append(checks, lazy)
	checks = append(checks, checkSmapsCopy(ctx, eng))

	checks = append(checks, checkDirtyTracking(ctx, eng))

	nft := Check{Name: "nftables-lock", Required: true}
	ok, msg, err = eng.CheckFeature(ctx, checkpoint.FeatureNFTablesLock)
	nft.Status, nft.Detail = criuVerdict(ctx, ok, msg, err,
		"CRIU can lock the network with nftables",
		"CRIU cannot lock the network with nftables (duplex dumps TCP with --network-lock nftables); needs a CRIU built with libnftables, "+makeDeps)
	checks = append(checks, nft)
	return checks
}

// checkSmapsCopy reports whether a migration's dump can read smaps before the
// freeze: CRIU with duplex's smaps-copy patch, and a kernel that runs the BPF VMA
// iterator that checks the copy inside the freeze.
func checkSmapsCopy(ctx context.Context, eng *checkpoint.Engine) Check {
	c := Check{Name: "smaps-copy"}
	const cost = "CRIU reads /proc/PID/smaps inside the freeze, a walk of every page table (about 10-15 ms per GiB of 4 KiB pages)"
	ok, msg, err := eng.CheckFeature(ctx, checkpoint.FeatureSmapsCopy)
	if err != nil || !ok {
		c.Status, c.Detail = criuVerdict(ctx, ok, msg, err, "", "CRIU without duplex's smaps-copy patch: "+cost+"; "+makeDeps)
		if c.Status == Missing {
			c.Status = Warn
		}
		return c
	}
	it, err := ebpf.LoadVMAIter()
	if err != nil {
		c.Status = Warn
		c.Detail = fmt.Sprintf("the kernel cannot run the BPF VMA iterator (task_vma, Linux >= 5.12 with BTF): %v; %s", err, cost)
		return c
	}
	it.Close()
	c.Status = OK
	c.Detail = "a dump reads smaps before the freeze; CRIU uses the copy where a BPF VMA iterator shows nothing changed"
	return c
}

// checkDirtyTracking asks CRIU for mem_dirty_track and cross-checks the kernel
// directly: a freshly written anonymous page carries the soft-dirty bit in
// /proc/self/pagemap only when the kernel has CONFIG_MEM_SOFT_DIRTY.
func checkDirtyTracking(ctx context.Context, eng *checkpoint.Engine) Check {
	c := Check{Name: "dirty-tracking"}
	ok, msg, err := eng.CheckFeature(ctx, checkpoint.FeatureMemDirtyTrack)
	c.Status, c.Detail = criuVerdict(ctx, ok, msg, err,
		"pre-copy (iterative pre-dump) available",
		"pre-copy (iterative pre-dump) unavailable; post-copy and stop-and-copy still work")
	if err != nil || (!ok && os.Geteuid() != 0) {
		return c
	}
	kernel, kerr := softDirtyAvailable()
	switch {
	case kerr != nil:
		c.Detail += "; kernel probe failed: " + kerr.Error()
	case kernel != ok:
		c.Status = Warn
		c.Detail += fmt.Sprintf("; CRIU and the kernel disagree: CRIU says %s, the kernel's pagemap says soft-dirty is %s",
			availability(ok), availability(kernel))
	case !kernel:
		c.Detail += "; kernel: no soft-dirty bit in /proc/self/pagemap (CONFIG_MEM_SOFT_DIRTY off)"
	}
	return c
}

// criuVerdict turns the answer of a CRIU check into a status and a detail line.
// Without root CRIU refuses every check, so its "no" says nothing about the host.
func criuVerdict(ctx context.Context, ok bool, msg string, err error, yes, no string) (Status, string) {
	switch {
	case err != nil:
		return Missing, "cannot run CRIU: " + timeoutOr(ctx, err)
	case ctx.Err() != nil:
		return Missing, "CRIU did not answer in time: " + ctx.Err().Error()
	case ok:
		return OK, withCRIU(yes, msg)
	case os.Geteuid() != 0:
		return Missing, withCRIU("unknown: CRIU checks need root (see root)", msg)
	default:
		return Missing, withCRIU(no, msg)
	}
}

// criuSource is the "Warn  (criu/cr-check.c:824): " prefix of CRIU's messages.
var criuSource = regexp.MustCompile(`^(?:Warn|Error)\s*\([^)]*\):\s*`)

func withCRIU(s, msg string) string {
	var parts []string
	for _, p := range strings.Split(msg, "; ") {
		if p = criuSource.ReplaceAllString(strings.TrimSpace(p), ""); p != "" {
			parts = append(parts, p)
		}
	}
	if len(parts) == 0 {
		return s
	}
	return s + " (CRIU: " + strings.Join(parts, "; ") + ")"
}

func criuUnavailable(path string) []Check {
	why := fmt.Sprintf("not checked: no usable CRIU at %s (see criu)", path)
	return []Check{
		{Name: "criu-check", Status: Missing, Required: true, Detail: why},
		{Name: "uffd", Status: Missing, Detail: why},
		{Name: "lazy-dump", Status: Missing, Detail: why},
		{Name: "smaps-copy", Status: Missing, Detail: why},
		{Name: "dirty-tracking", Status: Missing, Detail: why},
		{Name: "nftables-lock", Status: Missing, Required: true, Detail: why},
	}
}

// splitVDSO reports whether the kernel maps [vvar_vclock] (6.13 and later), which
// CRIU before 4.1 cannot dump.
func splitVDSO() bool {
	b, err := os.ReadFile("/proc/self/maps")
	return err == nil && strings.Contains(string(b), "[vvar_vclock]")
}

func availability(b bool) string {
	if b {
		return "available"
	}
	return "unavailable"
}

// timeoutOr names a timeout as the cause when ctx ended, else err.
func timeoutOr(ctx context.Context, err error) string {
	if ctx.Err() != nil {
		return "timed out: " + ctx.Err().Error()
	}
	return err.Error()
}
