package ctl

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/docker/go-units"
	"github.com/spf13/cobra"
	"golang.org/x/sys/unix"

	"github.com/duplex-ha/duplex/internal/api"
	"github.com/duplex-ha/duplex/internal/pki"
	"github.com/duplex-ha/duplex/migrate"
)

func (a *app) hostsCmd() *cobra.Command {
	var wide bool
	cmd := &cobra.Command{
		Use:   "hosts",
		Short: "List the cluster's hosts: role, verdict, workloads, capacity, cycle",
		Long: `List every host the cluster knows: whether its duplexd is up, its role
(primary, spare, duplexing, rejuvenating), whether it is on the available-server
list, its monitor's verdict, its workloads and free capacity, and the step and
any alert of the cycle it is in. The controller's host is marked with '*'.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			v, err := a.client().Cluster(ctxOf(cmd))
			if err != nil {
				return err
			}
			if a.json() {
				return a.printJSON(v)
			}
			fmt.Fprintf(a.stdout, "mode %s, controller %s\n\n", v.Mode, orDash(v.Leader))
			header := []string{"NAME", "UP", "ROLE", "LIST", "VERDICT", "WORKLOADS", "USED", "FREE", "CYCLE"}
			if wide {
				header = append(header, "AGENT", "CRIU", "STARTED")
			}
			tw := a.table(header...)
			for _, h := range v.Hosts {
				name := h.Name
				if h.Leader {
					name += "*"
				}
				up, list := "no", "-"
				if h.Alive {
					up = "yes"
				}
				if h.Available {
					list = "yes"
				}
				verdict, wls, used, free := "-", "-", "-", "-"
				if r := h.Report; r != nil {
					verdict = "stable"
					if r.Unstable {
						verdict = "UNSTABLE " + age(r.UnstableSince)
					}
					wls = fmt.Sprint(r.Workloads)
					used, free = units.BytesSize(float64(r.Used)), units.BytesSize(float64(r.Free()))
				}
				cycle := "-"
				if c := h.Cycle; c != nil {
					cycle = string(c.Phase)
					if c.Target != "" {
						cycle += " -> " + c.Target
					}
					if c.Blocked != "" {
						cycle += " [ALERT: " + c.Blocked + "]"
					}
				}
				fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s", name, up, orDash(string(h.Role)), list, verdict, wls, used, free, cycle)
				if wide {
					agent, criu, started := "-", "-", "-"
					if h.Host != nil {
						agent, criu, started = h.Host.Agent, h.Host.CRIU, age(h.Host.Started)
					}
					fmt.Fprintf(tw, "\t%s\t%s\t%s", agent, criu, started)
				}
				fmt.Fprintln(tw)
			}
			return tw.Flush()
		},
	}
	cmd.Flags().BoolVar(&wide, "wide", false, "also show each host's agent address, CRIU version and start time")
	return cmd
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

func (a *app) migrateCmd() *cobra.Command {
	var to, strategy, from string
	var all, noReplay bool
	var parallel int
	cmd := &cobra.Command{
		Use:   "migrate (NAME | --all) --to HOST",
		Short: "Move a running workload to another host, live",
		Long: `Move the workload NAME from this host to HOST while it runs. Its service
addresses move with it and its clients keep their TCP connections.

Strategies: auto (the best both hosts support), stopcopy (freeze, stream
everything to HOST), precopy (copy memory while it runs; needs dirty-memory
tracking on both hosts), postcopy (run on HOST at once, memory follows; needs
userfaultfd). A forced strategy a host cannot run is refused before anything is
frozen. On any failure before the copy runs on HOST, the workload resumes here.

Packets that reach the workload while it is frozen are held and replayed on HOST
once the copy runs there, so a client waiting for an answer does not wait for
its TCP retransmission timeout (200 ms or more); --no-replay turns this off.

With --all every running workload of this host moves, --parallel at a time; the
command talks to the local daemon, so --from, if given, must name this host.`,
		Example: "  duplexctl migrate web --to h1\n  duplexctl migrate web --to h1 --strategy stopcopy -o json\n  duplexctl migrate --all --from h0 --to h1",
		Args:    cobra.MaximumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if to == "" {
				return fmt.Errorf("--to is required")
			}
			if _, err := migrate.ParseStrategy(strategy); err != nil {
				return err
			}
			if all {
				if len(args) > 0 {
					return fmt.Errorf("give a workload name or --all, not both")
				}
				return a.migrateAll(cmd, from, to, strategy, parallel, noReplay)
			}
			if len(args) != 1 {
				return fmt.Errorf("usage: duplexctl migrate NAME --to HOST (or --all)")
			}
			bar := newProgressBar(a.stderr, !a.json())
			res, err := a.client().Migrate(ctxOf(cmd), args[0], api.MigrateRequest{To: to, Strategy: strategy, NoReplay: noReplay}, bar.update)
			bar.done()
			if err != nil {
				return err
			}
			if a.json() {
				return a.printJSON(res)
			}
			a.printResult(res)
			return nil
		},
	}
	cmd.Flags().StringVar(&to, "to", "", "destination host (see 'duplexctl hosts')")
	cmd.Flags().StringVar(&strategy, "strategy", "auto", "auto, stopcopy, precopy or postcopy")
	cmd.Flags().BoolVar(&all, "all", false, "move every running workload of this host")
	cmd.Flags().BoolVar(&noReplay, "no-replay", false, "drop the packets that reach the workload while it is frozen (their senders resend them after their TCP timeout) instead of replaying them on HOST")
	cmd.Flags().StringVar(&from, "from", "", "with --all: the source host, which must be this daemon's host")
	cmd.Flags().IntVar(&parallel, "parallel", 2, "with --all: migrations at once")
	return cmd
}

func (a *app) migrateAll(cmd *cobra.Command, from, to, strategy string, parallel int, noReplay bool) error {
	c := a.client()
	info, err := c.Info(ctxOf(cmd))
	if err != nil {
		return err
	}
	if from != "" && from != info.Name {
		return fmt.Errorf("--from %s: this duplexd is %s; run the command on %s (or point --socket at its daemon)", from, info.Name, from)
	}
	last := map[string]string{}
	res, err := c.MigrateAll(ctxOf(cmd), api.MigrateAllRequest{To: to, Strategy: strategy, Parallel: parallel, NoReplay: noReplay}, func(p migrate.Progress) {
		if a.json() || last[p.Workload] == p.Phase {
			return
		}
		last[p.Workload] = p.Phase
		fmt.Fprintf(a.stderr, "%-20s %-12s %6.2fs %9s\n", p.Workload, p.Phase, p.Elapsed.Seconds(), units.BytesSize(float64(p.Bytes)))
	})
	if err != nil {
		return err
	}
	if a.json() {
		if err := a.printJSON(res); err != nil {
			return err
		}
	} else {
		tw := a.table("WORKLOAD", "STRATEGY", "FROZEN", "DOWNTIME", "MOVED", "TOTAL", "RESULT")
		for _, r := range res.Results {
			fmt.Fprintf(tw, "%s\t%s\t%.1f ms\t%.1f ms\t%s\t%.1f ms\tmigrated to %s\n", r.Workload, r.Strategy, r.FrozenMS, r.DowntimeMS,
				units.BytesSize(float64(r.PageBytes+r.ImageBytes)), r.TotalMS, r.To)
		}
		for name, e := range res.Errors {
			fmt.Fprintf(tw, "%s\t-\t-\t-\t-\t-\tFAILED: %s\n", name, e)
		}
		_ = tw.Flush()
		if len(res.Results) == 0 && len(res.Errors) == 0 {
			fmt.Fprintf(a.stdout, "no running workload on %s\n", info.Name)
		}
	}
	if len(res.Errors) > 0 {
		return fmt.Errorf("%d of %d workloads did not move", len(res.Errors), len(res.Errors)+len(res.Results))
	}
	return nil
}

func (a *app) printResult(r *migrate.Result) {
	fmt.Fprintf(a.stdout, "%s migrated %s -> %s (pid %d there)\n", r.Workload, r.From, r.To, r.Pid)
	tw := a.table("STRATEGY", "FROZEN", "DOWNTIME", "MOVED", "TOTAL")
	fmt.Fprintf(tw, "%s\t%.1f ms\t%.1f ms\t%s\t%.1f ms\n", r.Strategy, r.FrozenMS, r.DowntimeMS,
		units.BytesSize(float64(r.PageBytes+r.ImageBytes)), r.TotalMS)
	_ = tw.Flush()
	if r.LazyRestore && r.Strategy != migrate.PostCopy {
		fmt.Fprintf(a.stdout, "  the copy ran on %s while its memory was filled in there from the images that had arrived\n", r.To)
	}
	if r.Held > 0 {
		fmt.Fprintf(a.stdout, "  %d packets sent to it while it was frozen were held and %d replayed on %s\n", r.Held, r.Replayed, r.To)
	}
	if len(r.Downtime) > 0 {
		parts := make([]string, len(r.Downtime))
		for i, p := range r.Downtime {
			parts[i] = fmt.Sprintf("%s %.1f", p.Name, p.MS)
		}
		fmt.Fprintf(a.stdout, "  downtime (ms): %s\n", strings.Join(parts, ", "))
	}
	for i, rd := range r.Rounds {
		fmt.Fprintf(a.stdout, "  pre-copy round %d: %d pages, %s in %.1f ms (workload stopped %.1f ms)\n", i+1, rd.Pages,
			units.BytesSize(float64(rd.Bytes)), rd.MS, rd.FrozenMS)
	}
}

// progressBar draws a migration's progress on stderr: one redrawn line on a
// terminal, one line per phase otherwise.
type progressBar struct {
	w     *os.File
	on    bool
	tty   bool
	start time.Time
	last  string
}

func newProgressBar(w any, on bool) *progressBar {
	f, _ := w.(*os.File)
	tty := false
	if f != nil {
		_, err := unix.IoctlGetTermios(int(f.Fd()), unix.TCGETS)
		tty = err == nil
	}
	return &progressBar{w: f, on: on && f != nil, tty: tty, start: time.Now()}
}

var phaseOrder = []string{migrate.PhasePreflight, migrate.PhaseFreeze, migrate.PhaseImages, migrate.PhaseRestore, migrate.PhasePages, migrate.PhaseCommit, migrate.PhaseDone}

func (p *progressBar) update(pr migrate.Progress) {
	if !p.on {
		return
	}
	step := 0
	for i, ph := range phaseOrder {
		if ph == pr.Phase {
			step = i
		}
	}
	width := 20
	filled := width * step / (len(phaseOrder) - 1)
	bar := strings.Repeat("#", filled) + strings.Repeat(".", width-filled)
	rate := ""
	if s := pr.Elapsed.Seconds(); s > 0 && pr.Bytes > 0 {
		rate = fmt.Sprintf(" %s/s", units.BytesSize(float64(pr.Bytes)/s))
	}
	line := fmt.Sprintf("[%s] %-12s %6.2fs %9s%s", bar, pr.Phase, pr.Elapsed.Seconds(), units.BytesSize(float64(pr.Bytes)), rate)
	if pr.Message != "" {
		line += "  " + pr.Message
	}
	if p.tty {
		fmt.Fprintf(p.w, "\r\033[K%s", line)
	} else if line != p.last {
		fmt.Fprintln(p.w, line)
	}
	p.last = line
}

func (p *progressBar) done() {
	if p.on && p.tty && p.last != "" {
		fmt.Fprintln(p.w)
	}
}

func (a *app) certsCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "certs",
		Short: "Create the cluster CA and host certificates (mutual TLS between agents)",
		Long: `Agents only talk to peers whose certificate the cluster CA signed, and CRIU's
page traffic is encrypted with the same certificates. 'certs init' creates a CA;
'certs issue' signs a host's certificate and writes the directory duplexd's
--certs flag takes. These commands work locally and need no daemon.`,
		Example: `  duplexctl certs init --ca /etc/duplex/ca
  duplexctl certs issue h1 --ca /etc/duplex/ca --ip 10.0.0.11 --out /etc/duplex/certs`,
	}
	var caDir string
	var validity time.Duration
	initCmd := &cobra.Command{
		Use:   "init --ca DIR",
		Short: "Create a cluster CA (refuses to overwrite one)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := pki.InitCA(caDir, "duplex cluster CA", validity); err != nil {
				return err
			}
			fmt.Fprintf(a.stdout, "cluster CA written to %s (keep %s secret)\n", caDir, filepath.Join(caDir, pki.CAKey))
			return nil
		},
	}
	initCmd.Flags().StringVar(&caDir, "ca", "", "directory for the CA")
	initCmd.Flags().DurationVar(&validity, "validity", 10*365*24*time.Hour, "how long the CA is valid")
	_ = initCmd.MarkFlagRequired("ca")

	var out string
	var ips []string
	issueCmd := &cobra.Command{
		Use:   "issue NAME --ca DIR --ip ADDR --out DIR",
		Short: "Sign a host certificate",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if err := pki.Issue(caDir, args[0], ips, out, validity); err != nil {
				return err
			}
			fmt.Fprintf(a.stdout, "certificate for %s written to %s (use duplexd --certs %s)\n", args[0], out, out)
			return nil
		},
	}
	issueCmd.Flags().StringVar(&caDir, "ca", "", "the cluster CA's directory")
	issueCmd.Flags().StringVar(&out, "out", "", "directory for the host's certificate, key and the CA certificate")
	issueCmd.Flags().StringSliceVar(&ips, "ip", nil, "addresses (or DNS names) the host's agent is reached at")
	issueCmd.Flags().DurationVar(&validity, "validity", 365*24*time.Hour, "how long the certificate is valid")
	_ = issueCmd.MarkFlagRequired("ca")
	_ = issueCmd.MarkFlagRequired("out")
	cmd.AddCommand(initCmd, issueCmd)
	return cmd
}
