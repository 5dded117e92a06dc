package ctl

import (
	"fmt"
	"strings"

	"github.com/spf13/cobra"

	"github.com/duplex-ha/duplex/internal/doctor"
)

func (a *app) doctorCmd() *cobra.Command {
	var criuPath string
	cmd := &cobra.Command{
		Use:   "doctor",
		Short: "Report what this host can do: kernel, CRIU, cgroups, eBPF",
		Long: `Check this host for everything duplex uses and print a verdict per feature.
It runs locally (no daemon needed) and must run as root. The exit status is 1
when a required feature is missing; optional ones (for example dirty-memory
tracking, which only pre-copy migration needs) only narrow what duplex can do.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			rep := doctor.Run(ctxOf(cmd), doctor.Options{CRIUPath: criuPath})
			if a.json() {
				if err := a.printJSON(map[string]any{"ok": rep.OK(), "checks": rep.Checks}); err != nil {
					return err
				}
			} else {
				tw := a.table("CHECK", "VERDICT", "REQUIRED", "DETAIL")
				for _, c := range rep.Checks {
					req := "no"
					if c.Required {
						req = "yes"
					}
					fmt.Fprintf(tw, "%s\t%s\t%s\t%s\n", c.Name, strings.ToUpper(string(c.Status)), req, c.Detail)
				}
				if err := tw.Flush(); err != nil {
					return err
				}
				if rep.OK() {
					fmt.Fprintln(a.stdout, "\nverdict: this host can run duplex")
				} else {
					fmt.Fprintln(a.stdout, "\nverdict: required features are missing (see above)")
				}
			}
			if !rep.OK() {
				return &ExitError{Code: 1}
			}
			return nil
		},
	}
	cmd.Flags().StringVar(&criuPath, "criu", "", "CRIU binary to check (default: $DUPLEX_CRIU, then the one 'make deps' installed, then PATH)")
	return cmd
}
