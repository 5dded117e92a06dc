package ctl

import (
	"fmt"
	"time"

	"github.com/spf13/cobra"

	"github.com/duplex-ha/duplex/cluster"
)

func (a *app) modeCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "mode [active-standby|active-active]",
		Short: "Show or set the cluster's operation mode",
		Long: `Without an argument, print the operation mode. With one, set it:

  active-standby  spares serve nothing; an unstable host's workloads all go to a spare,
                  which becomes a primary
  active-active   every host serves; an unstable host's workloads go to the primary
                  whose free capacity fits them most tightly (a spare if none fits)

The change applies to the next target selection; running cycles keep their target.`,
		Args: cobra.MaximumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			c := a.client()
			if len(args) == 1 {
				if _, err := cluster.ParseMode(args[0]); err != nil {
					return err
				}
				if err := c.SetMode(ctxOf(cmd), args[0]); err != nil {
					return err
				}
			}
			m, err := c.Mode(ctxOf(cmd))
			if err != nil {
				return err
			}
			if a.json() {
				return a.printJSON(map[string]string{"mode": string(m)})
			}
			fmt.Fprintln(a.stdout, m)
			return nil
		},
	}
}

func (a *app) drainCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "drain HOST",
		Short: "Move every workload off HOST, by hand (it then serves as a spare)",
		Long: `Ask the cluster controller to duplex every workload of HOST onto a target chosen
by the operation mode, as it does for an unstable host, without rejuvenating it.
HOST then stays on the available list as a spare. Follow it with
'duplexctl hosts' and 'duplexctl history --host HOST'.`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return a.ask(cmd, args[0], cluster.KindDrain)
		},
	}
}

func (a *app) rejuvenateCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "rejuvenate HOST",
		Short: "Duplex every workload off HOST, then rejuvenate it and take it back as a spare",
		Long: `Ask the cluster controller to run a whole cycle on HOST now: move every workload
to a target, remove HOST from the available list, run its rejuvenation ladder
(drop caches, compact memory, clear scratch state, restart services, reboot) and
register it as a spare when it returns healthy. The load and running-time rules
do not apply to a request by hand; the rejuvenation budget and min_spares do.`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return a.ask(cmd, args[0], cluster.KindRejuvenate)
		},
	}
}

func (a *app) ask(cmd *cobra.Command, host, kind string) error {
	if err := a.client().Ask(ctxOf(cmd), host, kind); err != nil {
		return err
	}
	if a.json() {
		return a.printJSON(map[string]string{"host": host, "request": kind, "status": "accepted"})
	}
	fmt.Fprintf(a.stdout, "%s of %s requested; follow it with 'duplexctl history --host %s'\n", kind, host, host)
	return nil
}

func (a *app) planCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "plan",
		Short: "Dry run: what the controller would do now for every host, and why",
		Long: `Show, for every host, the controller's next step and its reason, computed from
the cluster store with the leader's policy by the same functions the controller
acts on. Nothing is changed. A step marked ALERT is blocked (no target, budget,
min_spares, load, maintenance window, failures).`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			p, err := a.client().Plan(ctxOf(cmd))
			if err != nil {
				return err
			}
			if a.json() {
				return a.printJSON(p)
			}
			fmt.Fprintf(a.stdout, "mode %s, controller %s, unstable_for %s, max_rejuvenating %d, min_spares %d\n\n",
				p.Mode, orDash(p.Leader), p.Policy.UnstableFor.D(), p.Policy.MaxRejuvenating, p.Policy.MinSpares)
			tw := a.table("HOST", "ROLE", "PHASE", "NEXT", "WHY")
			for _, s := range p.Steps {
				next := s.Action
				if s.Blocked {
					next = "ALERT: " + next
				}
				fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\n", s.Host, orDash(string(s.Role)), orDash(s.Phase), next, s.Why)
			}
			return tw.Flush()
		},
	}
}

func (a *app) historyCmd() *cobra.Command {
	var host string
	var limit int
	cmd := &cobra.Command{
		Use:   "history",
		Short: "The cluster's cycles, step by step",
		Long:  `Print the last steps of the controller's cycles (oldest first), as recorded in etcd.`,
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if limit < 0 {
				return fmt.Errorf("--limit %d: must not be negative", limit)
			}
			evs, err := a.client().History(ctxOf(cmd), host, limit)
			if err != nil {
				return err
			}
			if a.json() {
				return a.printJSON(evs)
			}
			tw := a.table("TIME", "HOST", "STEP", "TARGET", "WORKLOAD", "DETAIL", "BY")
			for _, e := range evs {
				fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\n", e.Time.Local().Format(time.StampMilli), e.Host, e.Step, orDash(e.Target), orDash(e.Workload), e.Detail, e.By)
			}
			return tw.Flush()
		},
	}
	cmd.Flags().StringVar(&host, "host", "", "only this host's steps")
	cmd.Flags().IntVar(&limit, "limit", 50, "how many steps (0: all)")
	return cmd
}
