package doctor

import (
	"os"
	"path/filepath"
	"strings"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/link"
	"github.com/cilium/ebpf/rlimit"
)

// Tracepoint the probe attaches to; duplex's memory probes use it.
const (
	tpGroup = "kmem"
	tpName  = "rss_stat"
)

// checkEBPF loads a do-nothing tracepoint program and attaches it to kmem/rss_stat
// when tracefs is mounted (cilium/ebpf reads the tracepoint's id there). Without
// tracefs it still tests a raw tracepoint, which needs none. It also says whether
// kprobes exist. Everything it creates is closed before it returns.
func checkEBPF() (c Check) {
	c = Check{Name: "ebpf-tracepoint"}
	var notes []string
	add := func(s string) { notes = append(notes, s) }
	defer func() { c.Detail = strings.Join(notes, "; ") }()

	if err := rlimit.RemoveMemlock(); err != nil {
		add("cannot lift RLIMIT_MEMLOCK: " + err.Error())
	}
	tracefs, automount := tracefsPath()
	if automount {
		// Touching debugfs's tracing directory would mount tracefs: leave it alone.
		tracefs = ""
	}
	kprobes := kprobesAvailable(tracefs)

	prog, err := loadNop(ebpf.TracePoint)
	if err != nil {
		c.Status = Missing
		add("cannot load a tracepoint program: " + err.Error() + "; probes degrade to cgroup-only monitoring")
		addKprobes(add, kprobes)
		return c
	}
	defer prog.Close()

	if tracefs == "" {
		c.Status = Warn
		if automount {
			add("tracepoint program loads; cannot test attach: tracefs is only reachable through debugfs's automount")
		} else {
			add("tracepoint program loads; cannot test attach: tracefs not mounted")
		}
		add(rawTracepoint())
		addKprobes(add, kprobes)
		return c
	}
	l, err := link.Tracepoint(tpGroup, tpName, prog, nil)
	if err != nil {
		c.Status = Missing
		add("tracepoint program loads but attaching to " + tpGroup + "/" + tpName + " fails: " + err.Error() + "; probes degrade to cgroup-only monitoring")
		addKprobes(add, kprobes)
		return c
	}
	l.Close()
	c.Status = OK
	add("tracepoint program loads and attaches to " + tpGroup + "/" + tpName)
	addKprobes(add, kprobes)
	return c
}

// loadNop loads `mov r0, 0; exit` as a program of type t.
func loadNop(t ebpf.ProgramType) (*ebpf.Program, error) {
	return ebpf.NewProgram(&ebpf.ProgramSpec{
		Name: "duplex_doctor",
		Type: t,
		Instructions: asm.Instructions{
			asm.Mov.Imm(asm.R0, 0),
			asm.Return(),
		},
		License: "GPL",
	})
}

// rawTracepoint says whether a raw tracepoint program attaches to rss_stat, which
// works without tracefs.
func rawTracepoint() string {
	prog, err := loadNop(ebpf.RawTracepoint)
	if err != nil {
		return "raw tracepoint program does not load: " + err.Error()
	}
	defer prog.Close()
	l, err := link.AttachRawTracepoint(link.RawTracepointOptions{Name: tpName, Program: prog})
	if err != nil {
		return "raw tracepoint " + tpName + " does not attach: " + err.Error()
	}
	l.Close()
	return "raw tracepoint " + tpName + " attaches (needs no tracefs)"
}

// kprobesAvailable looks for kprobe_events in tracefs, or, when tracefs is not
// mounted, for the kprobe perf event source in sysfs.
func kprobesAvailable(tracefs string) bool {
	p := "/sys/bus/event_source/devices/kprobe"
	if tracefs != "" {
		p = filepath.Join(tracefs, "kprobe_events")
	}
	_, err := os.Stat(p)
	return err == nil
}

func addKprobes(add func(string), ok bool) {
	if !ok {
		add("kprobes unavailable: duplex uses tracepoints")
	}
}
