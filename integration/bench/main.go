// Command bench measures live migration between two namespace hosts, side by side
// with the naive baseline, in one run: for each workload size and dirtying rate it
// migrates an echo service (with a memory ballast) that a client streams through,
// once per strategy duplex can run here and once the naive way (criu dump to a
// directory, copy the directory, criu restore on the other host, service address
// moved). It prints a table and writes the figures as JSON. `make bench` runs it.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/checkpoint-restore/go-criu/v7/stats"

	"github.com/duplex-ha/duplex/checkpoint"
	"github.com/duplex-ha/duplex/integration/harness"
	"github.com/duplex-ha/duplex/migrate"
	"github.com/duplex-ha/duplex/netfail"
)

// Row is one measured migration.
type Row struct {
	SizeMiB  int    `json:"size_mib"`
	DirtyMiB int    `json:"dirty_mib_s"`
	Method   string `json:"method"` // "baseline" or a strategy
	// DowntimeMS: frozen until the restored copy runs on the destination with its
	// service address answering.
	DowntimeMS float64 `json:"downtime_ms"`
	// GapMS: the longest pause a streaming client saw.
	GapMS float64 `json:"client_gap_ms"`
	// RequestMS: the longest a client sending one small request at a time waited
	// for an answer (a request lost while frozen waits for TCP's retransmission).
	RequestMS  float64 `json:"request_gap_ms"`
	FrozenMS   float64 `json:"frozen_ms"` // CRIU's dump statistics
	TotalMS    float64 `json:"total_ms"`
	Bytes      int64   `json:"bytes_moved"`
	AnnounceMS float64 `json:"vip_move_ms"` // restore done to the address announced
	// Downtime splits a duplex migration's downtime into its steps.
	Downtime  []migrate.Part `json:"downtime,omitempty"`
	ClientErr string         `json:"client_error,omitempty"`
	Err       string         `json:"error,omitempty"`
	// THP is the system's transparent huge page mode during the run.
	THP string `json:"thp,omitempty"`
}

type bench struct {
	c         *harness.Cluster
	d         *harness.Duplex
	echo      string
	criu      string
	dir       string
	n         int
	rate      int
	nf0, nf1  *netfail.Manager
	settleFor time.Duration
}

func main() {
	duplexd := flag.String("duplexd", "bin/duplexd", "duplexd binary")
	duplexctl := flag.String("duplexctl", "bin/duplexctl", "duplexctl binary")
	echo := flag.String("echoserver", "bin/echoserver", "echo server binary")
	sizes := flag.String("sizes", "64,512,2048", "workload sizes in MiB")
	dirty := flag.String("dirty", "0,20", "dirtying rates in MiB/s")
	methods := flag.String("methods", "baseline,stopcopy,postcopy,postcopy-noreplay,precopy", "what to measure: baseline and duplex strategies (STRATEGY-noreplay: without replaying the packets that reach the frozen workload)")
	out := flag.String("out", "bench.json", "where to write the figures as JSON")
	thp := flag.String("thp", "", "run with transparent huge pages in this mode (always, madvise, never) and put the system's mode back after; default: as the system has it")
	flag.Parse()
	mode, restore, err := setTHP(*thp)
	if err != nil {
		fmt.Fprintf(os.Stderr, "bench: %s\n", err)
		os.Exit(1)
	}
	fmt.Printf("bench: transparent huge pages: %s\n", mode)
	rows, err := run(*duplexd, *duplexctl, *echo, ints(*sizes), ints(*dirty), strings.Split(*methods, ","))
	if rerr := restore(); rerr != nil {
		fmt.Fprintf(os.Stderr, "bench: %s\n", rerr)
	}
	for i := range rows {
		rows[i].THP = mode
	}
	if len(rows) > 0 {
		printTable(rows)
		b, _ := json.MarshalIndent(rows, "", "  ")
		if werr := os.WriteFile(*out, append(b, '\n'), 0o644); werr != nil {
			fmt.Fprintln(os.Stderr, "bench:", werr)
		} else {
			fmt.Printf("\nfigures written to %s\n", *out)
		}
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "bench: %s\n", err)
		os.Exit(1)
	}
}

const thpKnob = "/sys/kernel/mm/transparent_hugepage/enabled"

// setTHP sets the transparent huge page mode (unless mode is empty) and returns the
// mode in force and a function that puts the old one back.
func setTHP(mode string) (string, func() error, error) {
	b, err := os.ReadFile(thpKnob)
	if err != nil {
		if mode != "" {
			return "", nil, fmt.Errorf("--thp %s: %w", mode, err)
		}
		return "unavailable", func() error { return nil }, nil
	}
	old := string(b)
	if i, j := strings.Index(old, "["), strings.Index(old, "]"); i >= 0 && j > i {
		old = old[i+1 : j]
	}
	if mode == "" || mode == old {
		return old, func() error { return nil }, nil
	}
	if err := os.WriteFile(thpKnob, []byte(mode), 0); err != nil {
		return "", nil, fmt.Errorf("--thp %s: %w", mode, err)
	}
	return mode, func() error {
		if err := os.WriteFile(thpKnob, []byte(old), 0); err != nil {
			return fmt.Errorf("putting transparent huge pages back to %s: %w", old, err)
		}
		return nil
	}, nil
}

func ints(s string) []int {
	var out []int
	for _, f := range strings.Split(s, ",") {
		if n, err := strconv.Atoi(strings.TrimSpace(f)); err == nil {
			out = append(out, n)
		}
	}
	return out
}

func run(duplexd, duplexctl, echo string, sizes, dirty []int, methods []string) ([]Row, error) {
	if os.Geteuid() != 0 {
		return nil, fmt.Errorf("needs root")
	}
	for _, p := range []*string{&duplexd, &duplexctl, &echo} {
		abs, err := filepath.Abs(*p)
		if err != nil {
			return nil, err
		}
		*p = abs
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	c, err := harness.New(ctx, harness.Options{Prefix: "dpxbench", Hosts: 2, Clients: 1})
	if err != nil {
		return nil, err
	}
	defer c.Close()
	dir, err := os.MkdirTemp("/dev/shm", "duplex-bench-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(dir)
	os.Chmod(dir, 0o755)
	cg := filepath.Base(dir)
	defer func() {
		for _, root := range []string{"/sys/fs/cgroup/memory", "/sys/fs/cgroup/unified"} {
			subs, _ := os.ReadDir(filepath.Join(root, cg))
			for _, s := range subs {
				if s.IsDir() {
					os.Remove(filepath.Join(root, cg, s.Name()))
				}
			}
			os.Remove(filepath.Join(root, cg))
		}
	}()
	d, err := harness.StartDuplex(ctx, c, harness.DuplexOptions{Duplexd: duplexd, Duplexctl: duplexctl, Dir: dir, CgroupParent: cg,
		// The run directory is tmpfs, like the baseline's image directories.
		Extra: nil})
	if err != nil {
		return nil, err
	}
	defer d.Stop()
	b := &bench{c: c, d: d, echo: echo, criu: checkpoint.FindCRIU(), dir: dir, rate: 200 << 10, settleFor: time.Second}
	if b.nf0, err = netfail.New(c.Hosts[0].NSPath); err != nil {
		return nil, err
	}
	defer b.nf0.Close()
	if b.nf1, err = netfail.New(c.Hosts[1].NSPath); err != nil {
		return nil, err
	}
	defer b.nf1.Close()

	var rows []Row
	// A strategy this kernel cannot run is reported once, not measured.
	var usable []string
	for _, m := range methods {
		strategy, _ := strings.CutSuffix(m, "-noreplay")
		f := map[string]string{string(migrate.PreCopy): checkpoint.FeatureMemDirtyTrack, string(migrate.PostCopy): checkpoint.FeatureUFFDNonCoop}[strategy]
		if ok, _ := checkpoint.New(b.criu).HasFeature(ctx, f); f != "" && !ok {
			fmt.Fprintf(os.Stderr, "bench: %s unavailable here (CRIU lacks %s); not measured\n", m, f)
			rows = append(rows, Row{Method: m, Err: "unavailable on this kernel: CRIU lacks " + f})
			continue
		}
		usable = append(usable, m)
	}
	methods = usable
	for _, size := range sizes {
		for _, dr := range dirty {
			for _, method := range methods {
				fmt.Fprintf(os.Stderr, "bench: %d MiB, dirtying %d MiB/s, %s ...\n", size, dr, method)
				r := b.one(ctx, size, dr, method)
				if r.Err != "" {
					fmt.Fprintf(os.Stderr, "bench:   failed: %s\n", r.Err)
				}
				rows = append(rows, r)
				if ctx.Err() != nil {
					return rows, ctx.Err()
				}
			}
		}
	}
	return rows, nil
}

// one runs a single measured migration from h0 to h1.
func (b *bench) one(ctx context.Context, size, dirty int, method string) (row Row) {
	row = Row{SizeMiB: size, DirtyMiB: dirty, Method: method}
	b.n++
	name := fmt.Sprintf("svc%d", b.n)
	h0, h1, client := b.d.Hosts[0], b.d.Hosts[1], b.c.Clients[0]
	vip := b.c.VIP(b.n % 50)
	vipSpec := vip.String() + "@eth0"
	addr := netip.AddrPortFrom(vip.Addr(), 9000)
	fail := func(err error) Row {
		row.Err = err.Error()
		return row
	}
	if _, err := h0.Ctl(ctx, "run", name, "--vip", vipSpec, "--env", "GODEBUG=multipathtcp=0", "--",
		b.echo, "-listen", addr.String(), "-ballast", strconv.Itoa(size), "-dirty", strconv.Itoa(dirty)); err != nil {
		return fail(err)
	}
	defer func() {
		_, _ = h0.Ctl(context.Background(), "stop", "--timeout", "0s", name)
		_, _ = h1.Ctl(context.Background(), "stop", "--timeout", "0s", name)
		_, _ = h0.Ctl(context.Background(), "rm", name)
		_, _ = h1.Ctl(context.Background(), "rm", name)
	}()
	deadline := time.Now().Add(2 * time.Minute)
	for {
		out, _ := h0.Ctl(ctx, "logs", name)
		if strings.Contains(out, "LISTENING") {
			break
		}
		if time.Now().After(deadline) {
			return fail(fmt.Errorf("the service did not start: %s", out))
		}
		time.Sleep(100 * time.Millisecond)
	}
	s, err := harness.StartStream(ctx, client, addr, b.rate, 2048)
	if err != nil {
		return fail(err)
	}
	rq, err := harness.StartRequests(ctx, client, addr, 256, 10*time.Millisecond)
	if err != nil {
		s.Stop()
		return fail(err)
	}
	time.Sleep(b.settleFor)
	if st := s.Stats(); st.Err != nil || st.BytesVerified == 0 {
		s.Stop()
		rq.Stop()
		return fail(fmt.Errorf("stream before migration: %+v", st))
	}
	gapBefore := s.Stats().MaxGap
	reqBefore := rq.Stats().MaxLatency

	if method == "baseline" {
		var cleanup func()
		cleanup, err = b.baseline(ctx, name, vip, &row)
		if cleanup != nil {
			defer cleanup()
		}
	} else {
		err = b.duplex(ctx, name, method, &row)
	}
	// After a long freeze the client's TCP retransmissions have backed off: wait
	// until the stream flows again before judging it.
	moved := s.Stats().BytesVerified
	for deadline := time.Now().Add(time.Minute); s.Stats().BytesVerified < moved+32<<10 && time.Now().Before(deadline); {
		time.Sleep(50 * time.Millisecond)
	}
	time.Sleep(b.settleFor)
	st := s.StopWithin(10 * time.Second)
	row.GapMS = ms(st.MaxGap)
	if st.MaxGap < gapBefore {
		row.GapMS = ms(gapBefore)
	}
	rst := rq.StopWithin(10 * time.Second)
	row.RequestMS = ms(max(rst.MaxLatency, reqBefore))
	if st.Err != nil {
		row.ClientErr = st.Err.Error()
	} else if rst.Err != nil {
		row.ClientErr = "requests: " + rst.Err.Error()
	}
	if err != nil {
		return fail(err)
	}
	return row
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

func (b *bench) duplex(ctx context.Context, name, method string, row *Row) error {
	// METHOD-noreplay: the strategy without holding and replaying the packets that
	// reach the frozen workload (the request column shows what that costs).
	strategy, noReplay := strings.CutSuffix(method, "-noreplay")
	args := []string{"migrate", name, "--to", "h1", "--strategy", strategy, "-o", "json"}
	if noReplay {
		args = append(args, "--no-replay")
	}
	out, err := b.d.Hosts[0].Ctl(ctx, args...)
	if err != nil {
		return err
	}
	var r migrate.Result
	if err := json.Unmarshal([]byte(out), &r); err != nil {
		return err
	}
	row.DowntimeMS, row.FrozenMS, row.TotalMS = r.DowntimeMS, r.FrozenMS, r.TotalMS
	row.Bytes = r.PageBytes + r.ImageBytes
	row.AnnounceMS = r.AnnounceMS
	row.Downtime = r.Downtime
	return nil
}

// logErrors returns the error lines of a CRIU log (the baseline runs CRIU by hand,
// and CRIU says why it failed only there), or "".
func logErrors(path string) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return ""
	}
	var errs []string
	for _, l := range strings.Split(string(b), "\n") {
		if strings.Contains(l, "Error (") && !strings.Contains(l, "RLIMIT_NOFILE") {
			errs = append(errs, strings.TrimSpace(l))
		}
	}
	if len(errs) > 5 {
		errs = errs[len(errs)-5:]
	}
	return strings.Join(errs, "; ")
}

// baseline migrates the naive way: criu dump to a directory, copy it, criu restore on
// the other host, then the address moves.
func (b *bench) baseline(ctx context.Context, name string, vip netip.Prefix, row *Row) (cleanup func(), err error) {
	h0, h1 := b.c.Hosts[0], b.c.Hosts[1]
	rec, err := b.d.Hosts[0].Ctl(ctx, "ps", "-o", "json")
	if err != nil {
		return nil, err
	}
	var recs []struct {
		Name string `json:"name"`
		Pid  int    `json:"pid"`
	}
	if err := json.Unmarshal([]byte(rec), &recs); err != nil {
		return nil, err
	}
	pid := 0
	for _, r := range recs {
		if r.Name == name {
			pid = r.Pid
		}
	}
	if pid == 0 {
		return nil, fmt.Errorf("%s not running on h0", name)
	}
	src, dst := filepath.Join(b.dir, name+"-dump"), filepath.Join(b.dir, name+"-copy")
	defer os.RemoveAll(src)
	defer os.RemoveAll(dst)
	if err := os.MkdirAll(src, 0o700); err != nil {
		return nil, err
	}
	v := netfail.VIP{Addr: vip, Link: "eth0"}

	start := time.Now()
	if out, err := h0.Command(ctx, b.criu, "dump", "-t", strconv.Itoa(pid), "-D", src, "-o", "dump.log",
		"--tcp-established", "--network-lock", "nftables", "--manage-cgroups", "--file-locks").CombinedOutput(); err != nil {
		return nil, fmt.Errorf("criu dump: %w: %s%s", err, out, logErrors(filepath.Join(src, "dump.log")))
	}
	if out, err := exec.CommandContext(ctx, "cp", "-a", src, dst).CombinedOutput(); err != nil {
		return nil, fmt.Errorf("copy: %w: %s", err, out)
	}
	if err := b.nf0.Remove(ctx, v); err != nil {
		return nil, err
	}
	if err := b.nf1.Add(ctx, v); err != nil {
		return nil, err
	}
	pidfile := filepath.Join(b.dir, name+".pid")
	if out, err := h1.Command(ctx, b.criu, "restore", "-D", dst, "-o", "restore.log", "-d", "--pidfile", pidfile,
		"--tcp-established", "--network-lock", "nftables", "--manage-cgroups", "--file-locks").CombinedOutput(); err != nil {
		return nil, fmt.Errorf("criu restore: %w: %s%s", err, out, logErrors(filepath.Join(dst, "restore.log")))
	}
	restored := time.Now()
	if err := b.nf1.Announce(ctx, v, netfail.Announce{Count: 1, NoRepeat: true}); err != nil {
		return nil, err
	}
	end := time.Now()
	row.DowntimeMS = ms(end.Sub(start))
	row.TotalMS = row.DowntimeMS
	row.AnnounceMS = ms(end.Sub(restored))
	if d, err := os.Open(src); err == nil {
		if st, err := stats.CriuGetDumpStats(d); err == nil {
			row.FrozenMS = float64(st.GetFrozenTime()) / 1000
		}
		d.Close()
	}
	row.Bytes = dirSize(src)
	// The restored copy is nobody's workload: once measured, end it and take its
	// address back.
	return func() {
		if b, err := os.ReadFile(pidfile); err == nil {
			if p, err := strconv.Atoi(strings.TrimSpace(string(b))); err == nil {
				_ = syscall.Kill(p, syscall.SIGKILL)
			}
		}
		_ = b.nf1.Remove(context.Background(), v)
	}, nil
}

func dirSize(dir string) int64 {
	var n int64
	ents, _ := os.ReadDir(dir)
	for _, e := range ents {
		if i, err := e.Info(); err == nil && i.Mode().IsRegular() {
			n += i.Size()
		}
	}
	return n
}

func printTable(rows []Row) {
	base := map[[2]int]Row{}
	for _, r := range rows {
		if r.Method == "baseline" && r.Err == "" {
			base[[2]int{r.SizeMiB, r.DirtyMiB}] = r
		}
	}
	tw := tabwriter.NewWriter(os.Stdout, 0, 4, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "size\tdirty\tmethod\tdowntime ms\tvs baseline\tclient gap ms\trequest gap ms\tfrozen ms\ttotal ms\tmoved MiB\tVIP move ms\tclient\t")
	for _, r := range rows {
		ratio := "-"
		if bl, ok := base[[2]int{r.SizeMiB, r.DirtyMiB}]; ok && r.Method != "baseline" && r.DowntimeMS > 0 {
			ratio = fmt.Sprintf("%.2fx faster", bl.DowntimeMS/r.DowntimeMS)
		}
		client := "ok"
		if r.ClientErr != "" {
			client = "BROKEN"
		}
		if r.Err != "" && r.SizeMiB == 0 {
			fmt.Fprintf(tw, "all\t-\t%s\t%s\t\t\t\t\t\t\t\t\t\n", r.Method, r.Err)
			continue
		}
		if r.Err != "" {
			fmt.Fprintf(tw, "%d MiB\t%d MiB/s\t%s\tfailed: %s\t\t\t\t\t\t\t\t\t\n", r.SizeMiB, r.DirtyMiB, r.Method, r.Err)
			continue
		}
		fmt.Fprintf(tw, "%d MiB\t%d MiB/s\t%s\t%.0f\t%s\t%.0f\t%.0f\t%.0f\t%.0f\t%.1f\t%.2f\t%s\t\n",
			r.SizeMiB, r.DirtyMiB, r.Method, r.DowntimeMS, ratio, r.GapMS, r.RequestMS, r.FrozenMS, r.TotalMS, float64(r.Bytes)/(1<<20), r.AnnounceMS, client)
	}
	tw.Flush()

	// Where each duplex migration's downtime went.
	fmt.Println("\ndowntime steps (ms):")
	for _, r := range rows {
		if len(r.Downtime) == 0 {
			continue
		}
		parts := make([]string, len(r.Downtime))
		for i, p := range r.Downtime {
			parts[i] = fmt.Sprintf("%s %.1f", p.Name, p.MS)
		}
		fmt.Printf("  %d MiB, %d MiB/s, %s: %s\n", r.SizeMiB, r.DirtyMiB, r.Method, strings.Join(parts, ", "))
	}

	// The targets, judged on this run's figures.
	fmt.Println("\ntargets:")
	var worstPost, worstVIP float64
	for _, r := range rows {
		if r.Err != "" {
			continue
		}
		if r.Method == string(migrate.PostCopy) && r.DowntimeMS > worstPost {
			worstPost = r.DowntimeMS
		}
		if r.Method != "baseline" && r.AnnounceMS > worstVIP {
			worstVIP = r.AnnounceMS
		}
	}
	verdict := func(ok bool) string {
		if ok {
			return "met"
		}
		return "MISSED"
	}
	fmt.Printf("  post-copy downtime <= 50 ms at every size: worst %.0f ms: %s\n", worstPost, verdict(worstPost <= 50))
	for _, r := range rows {
		if r.Method == string(migrate.StopCopy) && r.Err == "" && r.SizeMiB >= 2048 {
			if bl, ok := base[[2]int{r.SizeMiB, r.DirtyMiB}]; ok {
				x := bl.DowntimeMS / r.DowntimeMS
				fmt.Printf("  stop-and-copy >= 2x faster than the baseline at %d MiB, dirtying %d MiB/s: %.2fx: %s\n", r.SizeMiB, r.DirtyMiB, x, verdict(x >= 2))
			}
		}
	}
	fmt.Printf("  VIP move (restore done to announced) <= 5 ms: worst %.2f ms: %s\n", worstVIP, verdict(worstVIP <= 5))
}
