package checkpoint

import (
	"bytes"
	"context"
	"fmt"
	"os/exec"
	"regexp"
	"strconv"
	"strings"
	"sync"
)

// Feature names understood by `criu check --feature`.
const (
	FeatureMemDirtyTrack = "mem_dirty_track"       // soft-dirty bits: pre-dumps, pre-copy
	FeatureUFFD          = "uffd"                  // userfaultfd: lazy pages
	FeatureUFFDNonCoop   = "uffd-noncoop"          // userfaultfd for forks: lazy pages of a tree
	FeatureNFTablesLock  = "network_lock_nftables" // nftables network lock
	FeatureTCPHalfClosed = "tcp_half_closed"
	// FeatureLazyPagesBeforeImages: `criu lazy-pages` reads the images only once a
	// restore connects, so it can start before they arrive (duplex's CRIU patches,
	// contrib/criu/lazy-pages-before-images.patch).
	FeatureLazyPagesBeforeImages = "lazy_pages_before_images"
	// FeatureSmapsCopy: a dump takes each process's smaps from a copy made before
	// the freeze when a VMA iterator shows nothing changed (duplex's CRIU patches,
	// contrib/criu/smaps-copy.patch; see Engine.NoSmapsCopy).
	FeatureSmapsCopy = "smaps_copy"
	// FeatureGuardScanFlagged: a dump looks for guard regions only in the VMAs
	// smaps marks as maybe holding them, not across the whole address space
	// (contrib/criu/guard-scan-flagged.patch; needs Linux 6.18's VM_MAYBE_GUARD).
	FeatureGuardScanFlagged = "guard_scan_flagged"
	// FeatureLazyDenseWhole: a lazy dump takes a long anonymous VMA that is nearly
	// all in memory whole, without scanning it for present pages
	// (contrib/criu/lazy-dense-whole.patch).
	FeatureLazyDenseWhole = "lazy_dense_whole"
	// FeatureSwrkEarlyKerndat: `criu swrk` probes the kernel (from the kerndat
	// cache) before its request arrives, so a restore started ahead (StartRestorer)
	// does not in the downtime (contrib/criu/swrk-early-kerndat.patch).
	FeatureSwrkEarlyKerndat = "swrk_early_kerndat"
	// FeatureLazyBackgroundGate: `criu lazy-pages` can hold its background
	// transfer until told (LazyPagesOptions.HoldBackground;
	// contrib/criu/lazy-bg-gate.patch).
	FeatureLazyBackgroundGate = "lazy_bg_gate"
	// FeatureProcFDZombiesOnly: a dump of a tree in its own PID namespace mounts
	// that namespace's /proc only when the tree holds zombies
	// (contrib/criu/proc-fd-zombies-only.patch).
	FeatureProcFDZombiesOnly = "proc_fd_zombies_only"
	// FeatureNFTLockNftnl: a dump adds each connection to its network lock with
	// libnftnl instead of an nft command (contrib/criu/nft-lock-nftnl.patch).
	FeatureNFTLockNftnl = "nft_lock_nftnl"
)

type featureCache struct {
	mu sync.Mutex
	m  map[string]bool
}

// HasFeature asks CRIU whether this host supports a feature (`criu check --feature`).
// go-criu's FeatureCheck only echoes the request, so it is not used. Answers are
// cached for the Engine's lifetime. An error means CRIU itself could not be run.
func (e *Engine) HasFeature(ctx context.Context, name string) (bool, error) {
	e.features.mu.Lock()
	if v, ok := e.features.m[name]; ok {
		e.features.mu.Unlock()
		return v, nil
	}
	e.features.mu.Unlock()

	ok, _, err := e.CheckFeature(ctx, name)
	if err != nil {
		return false, err
	}
	e.features.mu.Lock()
	if e.features.m == nil {
		e.features.m = map[string]bool{}
	}
	e.features.m[name] = ok
	e.features.mu.Unlock()
	return ok, nil
}

// CheckFeature runs `criu check --feature name` and returns whether it passed with
// CRIU's explanation. The error is non-nil only when CRIU could not be run.
func (e *Engine) CheckFeature(ctx context.Context, name string) (bool, string, error) {
	out, code, err := e.run(ctx, "check", "--feature", name)
	if err != nil {
		return false, "", err
	}
	return code == 0, lastLines(out), nil
}

// Check runs `criu check` and returns whether CRIU can checkpoint and restore on this
// host, with CRIU's explanation (warnings included). The error is non-nil only when
// CRIU could not be run.
func (e *Engine) Check(ctx context.Context) (bool, string, error) {
	out, code, err := e.run(ctx, "check")
	if err != nil {
		return false, "", err
	}
	return code == 0, lastLines(out), nil
}

// Version is a CRIU release.
type Version struct {
	Major, Minor, Sub int
	// GitID is the build's "GitID:" line, empty for a release build. CRIU built by
	// 'make deps' with duplex's patches (contrib/criu) says "duplex-" and the id of
	// the patch series.
	GitID string
}

// DuplexPatched reports whether this CRIU carries duplex's patches, whose lazy dump
// serves pages from the frozen tree instead of copying them while it is frozen.
func (v Version) DuplexPatched() bool { return strings.HasPrefix(v.GitID, duplexGitID) }

const duplexGitID = "duplex-"

func (v Version) String() string {
	if v.Sub == 0 {
		return fmt.Sprintf("%d.%d", v.Major, v.Minor)
	}
	return fmt.Sprintf("%d.%d.%d", v.Major, v.Minor, v.Sub)
}

// AtLeast reports whether v is the same as or newer than major.minor.
func (v Version) AtLeast(major, minor int) bool {
	return v.Major > major || (v.Major == major && v.Minor >= minor)
}

var (
	versionRe = regexp.MustCompile(`Version:\s*(\d+)\.(\d+)(?:\.(\d+))?`)
	gitIDRe   = regexp.MustCompile(`(?m)^GitID:\s*(\S+)`)
)

// Version runs `criu --version`.
func (e *Engine) Version(ctx context.Context) (Version, error) {
	out, code, err := e.run(ctx, "--version")
	if err != nil {
		return Version{}, err
	}
	if code != 0 {
		return Version{}, fmt.Errorf("criu --version: unexpected output %q", strings.TrimSpace(out))
	}
	return parseVersion(out)
}

// parseVersion reads the output of `criu --version`.
func parseVersion(out string) (Version, error) {
	m := versionRe.FindStringSubmatch(out)
	if m == nil {
		return Version{}, fmt.Errorf("criu --version: unexpected output %q", strings.TrimSpace(out))
	}
	var v Version
	v.Major, _ = strconv.Atoi(m[1])
	v.Minor, _ = strconv.Atoi(m[2])
	if m[3] != "" {
		v.Sub, _ = strconv.Atoi(m[3])
	}
	if g := gitIDRe.FindStringSubmatch(out); g != nil {
		v.GitID = g[1]
	}
	return v, nil
}

// run executes CRIU and returns its combined output and exit code; err is set only
// when the binary could not be started.
func (e *Engine) run(ctx context.Context, args ...string) (string, int, error) {
	cmd := exec.CommandContext(ctx, e.Path(), args...)
	var buf bytes.Buffer
	cmd.Stdout = &buf
	cmd.Stderr = &buf
	err := cmd.Run()
	if err != nil {
		if ee, ok := err.(*exec.ExitError); ok {
			return buf.String(), ee.ExitCode(), nil
		}
		return "", -1, fmt.Errorf("run %s: %w", e.Path(), err)
	}
	return buf.String(), 0, nil
}

// lastLines keeps the meaningful tail of CRIU's output, dropping known noise.
func lastLines(out string) string {
	var keep []string
	for _, l := range strings.Split(out, "\n") {
		l = strings.TrimSpace(logPrefix.ReplaceAllString(l, ""))
		if l == "" || isNoise(l) {
			continue
		}
		keep = append(keep, l)
	}
	if len(keep) > 3 {
		keep = keep[len(keep)-3:]
	}
	return strings.Join(keep, "; ")
}
