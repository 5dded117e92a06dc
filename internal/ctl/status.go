package ctl

import (
	"fmt"
	"sort"
	"strings"
	"time"

	"github.com/docker/go-units"
	"github.com/spf13/cobra"
)

func (a *app) statusCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "status",
		Short: "This host's health: the aging detector's verdict, its reasons and the figures behind them",
		Long: `Show whether this host counts as unstable: thresholds on memory, buffers, load
and running time that held for the configured period, or an aging trend that
predicts a resource running out within the horizon; the workloads whose memory
grows fastest; whether the eBPF probes run; and, in a cluster, this host's role,
the cycle it is in, and the cluster's alerts (cycles blocked on no target, the
rejuvenation budget, min_spares, load, the maintenance window or failures).`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			st, err := a.client().Status(ctxOf(cmd))
			if err != nil {
				return err
			}
			if a.json() {
				return a.printJSON(st)
			}
			v, s := st.Verdict, st.Sample
			verdict := "STABLE"
			if v.Unstable {
				verdict = fmt.Sprintf("UNSTABLE since %s (%s)", v.Since.Format(time.TimeOnly), age(v.Since))
			}
			fmt.Fprintf(a.stdout, "host      %s\nverdict   %s\n", st.Host, verdict)
			if v.TimeToExhaustion > 0 {
				fmt.Fprintf(a.stdout, "exhausted in about %s at the current trend\n", v.TimeToExhaustion.Round(time.Second))
			}
			used := s.MemTotal - s.MemAvailable
			fmt.Fprintf(a.stdout, "memory    %s of %s used, %s buffers/cache, %s in sockets, pressure %.1f%%\n",
				units.BytesSize(float64(used)), units.BytesSize(float64(s.MemTotal)), units.BytesSize(float64(s.Buffers+s.Cached)),
				units.BytesSize(float64(s.SockMem)), s.PressureSome10)
			fmt.Fprintf(a.stdout, "load      %.2f %.2f %.2f on %d CPUs, up %s\n", s.Load1, s.Load5, s.Load15, s.CPUs, s.Uptime.Round(time.Second))
			fmt.Fprintf(a.stdout, "ebpf      %s\n", st.EBPF)
			if c := st.Cluster; c != nil {
				list := "off the available list"
				if c.Available {
					list = "on the available list"
				}
				fmt.Fprintf(a.stdout, "cluster   %s, %s; mode %s, controller %s\n", orDash(string(c.Role)), list, c.Mode, orDash(c.Leader))
				if cy := c.Cycle; cy != nil {
					fmt.Fprintf(a.stdout, "cycle     %s: %s", cy.ID, cy.Phase)
					if cy.Target != "" {
						fmt.Fprintf(a.stdout, " -> %s", cy.Target)
					}
					fmt.Fprintln(a.stdout)
				}
				for _, al := range c.Alerts {
					fmt.Fprintf(a.stdout, "ALERT     %s\n", al)
				}
			}
			if len(v.Reasons) > 0 {
				fmt.Fprintln(a.stdout, "\nREASONS")
				tw := a.table("KIND", "METRIC", "WORKLOAD", "VALUE", "LIMIT", "HELD", "EXHAUSTED IN")
				for _, r := range v.Reasons {
					held, tte := "-", "-"
					if r.HeldFor > 0 {
						held = r.HeldFor.Round(time.Second).String()
					}
					if r.TimeToExhaustion > 0 {
						tte = r.TimeToExhaustion.Round(time.Second).String()
					}
					wl := r.Workload
					if wl == "" {
						wl = "-"
					}
					fmt.Fprintf(tw, "%s\t%s\t%s\t%.1f\t%.1f\t%s\t%s\n", r.Kind, r.Metric, wl, r.Value, r.Limit, held, tte)
				}
				_ = tw.Flush()
			}
			if len(v.Top) > 0 {
				fmt.Fprintln(a.stdout, "\nTOP WORKLOADS BY MEMORY GROWTH")
				tw := a.table("WORKLOAD", "GROWTH", "USAGE")
				for _, g := range v.Top {
					fmt.Fprintf(tw, "%s\t%s/s\t%s\n", g.Workload, units.BytesSize(g.BytesPerSecond), units.BytesSize(float64(g.Usage)))
				}
				_ = tw.Flush()
			}
			if len(st.Processes) > 0 {
				fmt.Fprintln(a.stdout, "\nPROCESSES (eBPF memory probe)")
				tw := a.table("PID", "WORKLOAD", "ANON", "FILE", "GROWTH")
				for _, p := range st.Processes {
					wl := p.Workload
					if wl == "" {
						wl = "-"
					}
					fmt.Fprintf(tw, "%d\t%s\t%s\t%s\t%s/s\n", p.Pid, wl, units.BytesSize(float64(p.Anon)), units.BytesSize(float64(p.File)), units.BytesSize(p.BytesPerSecond))
				}
				_ = tw.Flush()
			}
			if len(st.Events) > 0 {
				keys := make([]string, 0, len(st.Events))
				for k := range st.Events {
					keys = append(keys, k)
				}
				sort.Strings(keys)
				fmt.Fprintln(a.stdout, "\nEBPF EVENTS")
				for _, k := range keys {
					kind, wl, _ := strings.Cut(k, "/")
					if wl == "" {
						wl = "(no workload)"
					}
					fmt.Fprintf(a.stdout, "  %-24s %-20s %d\n", kind, wl, st.Events[k])
				}
			}
			return nil
		},
	}
}
