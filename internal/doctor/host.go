package doctor

import (
	"bufio"
	"context"
	"encoding/binary"
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

func checkKernel() Check {
	c := Check{Name: "kernel", Status: OK}
	var u unix.Utsname
	if err := unix.Uname(&u); err != nil {
		c.Status, c.Detail = Warn, "uname: "+err.Error()
		return c
	}
	c.Detail = fmt.Sprintf("Linux %s %s", unix.ByteSliceToString(u.Release[:]), unix.ByteSliceToString(u.Machine[:]))
	return c
}

func checkRoot() Check {
	c := Check{Name: "root", Required: true}
	if euid := os.Geteuid(); euid != 0 {
		c.Status = Missing
		c.Detail = fmt.Sprintf("euid %d: duplex needs root for CRIU, cgroups, namespaces and eBPF", euid)
		return c
	}
	c.Status, c.Detail = OK, "euid 0"
	return c
}

func checkNFT(ctx context.Context) Check {
	c := Check{Name: "nft"}
	p, err := exec.LookPath("nft")
	if err != nil {
		c.Status = Missing
		c.Detail = "nft not in PATH: leftover CRIU lock tables of a crashed migration must be removed another way (CRIU's own nftables lock does not need it)"
		return c
	}
	c.Status, c.Detail = OK, p
	if out, err := exec.CommandContext(ctx, p, "--version").Output(); err == nil {
		c.Detail += ", " + strings.TrimSpace(string(out))
	}
	return c
}

// checkPIDNS runs /bin/true as the init of a new PID namespace: duplex restores
// trees that are the init of their own PID namespace.
func checkPIDNS(ctx context.Context) Check {
	c := Check{Name: "pidns", Required: true}
	if _, err := os.Stat("/proc/self/ns/pid"); err != nil {
		c.Status, c.Detail = Missing, "no PID namespaces: "+err.Error()
		return c
	}
	bin := "/bin/true"
	if _, err := os.Stat(bin); err != nil {
		if bin, err = exec.LookPath("true"); err != nil {
			c.Status, c.Detail = Warn, "cannot test: no 'true' binary to run"
			return c
		}
	}
	cmd := exec.CommandContext(ctx, bin)
	cmd.SysProcAttr = &syscall.SysProcAttr{Cloneflags: syscall.CLONE_NEWPID}
	if err := cmd.Run(); err != nil {
		c.Status, c.Detail = Missing, "cannot start a process in a new PID namespace: "+timeoutOr(ctx, err)
		return c
	}
	c.Status, c.Detail = OK, "a child ran as init of a new PID namespace"
	return c
}

func checkBTF() Check {
	c := Check{Name: "btf"}
	st, err := os.Stat("/sys/kernel/btf/vmlinux")
	if err != nil {
		c.Status = Missing
		c.Detail = "/sys/kernel/btf/vmlinux absent: CO-RE eBPF probes cannot load; monitoring falls back to cgroup files"
		return c
	}
	c.Status = OK
	c.Detail = fmt.Sprintf("/sys/kernel/btf/vmlinux (%d KiB): CO-RE eBPF probes can load", st.Size()>>10)
	return c
}

func checkTracefs() Check {
	c := Check{Name: "tracefs"}
	p, automount := tracefsPath()
	if p == "" {
		c.Status = Warn
		c.Detail = "not mounted; tracepoint probes need it: mount -t tracefs nodev /sys/kernel/tracing (raw tracepoints work without it)"
		return c
	}
	c.Status, c.Detail = OK, "mounted at "+p
	if automount {
		c.Detail = p + " (tracefs automounts there under debugfs on first access)"
	}
	return c
}

// tracefsPath returns where tracefs is reachable, found the way cilium/ebpf finds it
// (a tracefs mount, else debugfs's tracing directory, then automount is true), or
// "" if nowhere. It reads /proc/self/mountinfo only, so it never triggers debugfs's
// tracefs automount.
func tracefsPath() (path string, automount bool) {
	mounts, err := readMounts()
	if err != nil {
		return "", false
	}
	best := ""
	for _, m := range mounts {
		if m.fstype == "tracefs" && m.root == "/" {
			if m.point == "/sys/kernel/tracing" {
				return m.point, false
			}
			if best == "" {
				best = m.point
			}
		}
	}
	if best != "" {
		return best, false
	}
	for _, m := range mounts {
		if m.fstype == "debugfs" && m.root == "/" {
			return m.point + "/tracing", true
		}
	}
	return "", false
}

// mount is one line of /proc/self/mountinfo.
type mount struct {
	root, point, fstype, superOpts string
}

func readMounts() ([]mount, error) {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var ms []mount
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		// id parent maj:min root point opts [optional...] - fstype source superopts
		fields := strings.Fields(sc.Text())
		sep := -1
		for i, f := range fields {
			if f == "-" && i >= 6 {
				sep = i
				break
			}
		}
		if sep < 0 || len(fields) < sep+3 {
			continue
		}
		m := mount{root: unescape(fields[3]), point: unescape(fields[4]), fstype: fields[sep+1]}
		if len(fields) > sep+3 {
			m.superOpts = fields[sep+3]
		}
		ms = append(ms, m)
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("read /proc/self/mountinfo: %w", err)
	}
	return ms, nil
}

// unescape undoes mountinfo's octal escapes (\040 for a space).
func unescape(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			var v int
			if _, err := fmt.Sscanf(s[i+1:i+4], "%3o", &v); err == nil {
				b.WriteByte(byte(v))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// pmSoftDirty is the soft-dirty bit of a /proc/PID/pagemap entry.
const pmSoftDirty = 1 << 55

// softDirtyAvailable reports whether the kernel tracks soft-dirty pages
// (CONFIG_MEM_SOFT_DIRTY), the way CRIU's kerndat does: a new anonymous mapping is
// soft-dirty, so a page just written there shows bit 55 in /proc/self/pagemap unless
// the kernel lacks the feature. Writing "4" to clear_refs is no test: kernels
// without soft-dirty accept it and do nothing.
func softDirtyAvailable() (bool, error) {
	page := os.Getpagesize()
	mem, err := unix.Mmap(-1, 0, page, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		return false, fmt.Errorf("mmap a probe page: %w", err)
	}
	defer unix.Munmap(mem)
	mem[0] = 1

	f, err := os.Open("/proc/self/pagemap")
	if err != nil {
		return false, fmt.Errorf("open pagemap: %w", err)
	}
	defer f.Close()
	var entry [8]byte
	addr := uintptr(unsafe.Pointer(&mem[0]))
	if _, err := f.ReadAt(entry[:], int64(addr/uintptr(page))*8); err != nil {
		return false, fmt.Errorf("read pagemap: %w", err)
	}
	return binary.LittleEndian.Uint64(entry[:])&pmSoftDirty != 0, nil
}

// checkPipeMaxSize reports whether CRIU's lazy page server can get the 4 MiB pipe it
// asks for: with CAP_SYS_RESOURCE any size is allowed, else fs.pipe-max-size rules.
func checkPipeMaxSize() Check {
	c := Check{Name: "pipe-max-size"}
	b, err := os.ReadFile("/proc/sys/fs/pipe-max-size")
	if err != nil {
		c.Status, c.Detail = Warn, "cannot read fs.pipe-max-size: "+err.Error()
		return c
	}
	size, _ := strconv.Atoi(strings.TrimSpace(string(b)))
	var hdr unix.CapUserHeader
	var data [2]unix.CapUserData
	hdr.Version = unix.LINUX_CAPABILITY_VERSION_3
	capRes := unix.Capget(&hdr, &data[0]) == nil && data[unix.CAP_SYS_RESOURCE/32].Effective&(1<<(unix.CAP_SYS_RESOURCE%32)) != 0
	switch {
	case capRes:
		c.Status, c.Detail = OK, fmt.Sprintf("%d bytes; CAP_SYS_RESOURCE lifts the limit for CRIU", size)
	case size >= 4<<20:
		c.Status, c.Detail = OK, fmt.Sprintf("%d bytes: CRIU's lazy page server gets its 4 MiB pipe", size)
	default:
		c.Status, c.Detail = Warn, fmt.Sprintf("%d bytes and no CAP_SYS_RESOURCE: post-copy raises it to 4194304 when it runs (CRIU ignores the refusal and fails with 'tee: Operation not permitted')", size)
	}
	return c
}

// thpKnob is the system's transparent huge page mode.
var thpKnob = "/sys/kernel/mm/transparent_hugepage/enabled"

// checkTHP reports the transparent huge page mode, which sets how post-copy's
// downtime grows with memory: CRIU walks the tree's page tables while it is frozen
// (its smaps and PAGEMAP_SCAN reads), one entry per 4 KiB page but one per 2 MiB
// huge page. Measured with duplex's CRIU at 2 GiB: 44-56 ms with "always", 69-74 ms
// with "madvise" (the Go workload's heap not advised).
func checkTHP() Check {
	c := Check{Name: "thp"}
	b, err := os.ReadFile(thpKnob)
	if err != nil {
		c.Status, c.Detail = Warn, "no transparent huge pages ("+err.Error()+"): post-copy's frozen time grows with memory (about 5 ms per GiB with the smaps copy, 15-20 without)"
		return c
	}
	mode := thpMode(string(b))
	if mode == "always" {
		c.Status, c.Detail = OK, "always: post-copy's frozen time hardly grows with memory (CRIU walks one page-table entry per 2 MiB)"
		return c
	}
	c.Status = Warn
	c.Detail = mode + ": post-copy's frozen time grows with the memory not in huge pages (CRIU's page-table scans visit one entry per 4 KiB page: about 5 ms per GiB with the smaps copy, 15-20 without); 'always' makes it flat, at the cost of huge pages everywhere"
	return c
}

// thpMode picks the bracketed mode out of "always [madvise] never".
func thpMode(s string) string {
	i, j := strings.Index(s, "["), strings.Index(s, "]")
	if i < 0 || j < i {
		return strings.TrimSpace(s)
	}
	return s[i+1 : j]
}
