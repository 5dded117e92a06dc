// Package ctl is duplexctl's command tree: it parses the command line, talks to the
// local duplexd and prints results (tables for people, JSON with -o json). Only
// cmd/duplexctl uses it.
package ctl

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/duplex-ha/duplex/internal/api"
)

// ExitError carries a specific exit code (for example doctor's "something required
// is missing") without an extra message.
type ExitError struct{ Code int }

func (e *ExitError) Error() string { return fmt.Sprintf("exit status %d", e.Code) }

type app struct {
	socket string
	output string
	stdout io.Writer
	stderr io.Writer
}

// New returns duplexctl's root command.
func New(stdout, stderr io.Writer) *cobra.Command {
	a := &app{stdout: stdout, stderr: stderr}
	root := &cobra.Command{
		Use:   "duplexctl",
		Short: "Control duplexd: run, checkpoint, restore and inspect managed workloads",
		Long: `duplexctl talks to the local duplexd over its root-only unix socket.

duplexd runs each workload as a process tree in its own PID namespace and cgroup,
so that CRIU can checkpoint it and restore it here or on another host.`,
		SilenceUsage:  true,
		SilenceErrors: true,
		PersistentPreRunE: func(cmd *cobra.Command, _ []string) error {
			switch a.output {
			case "table", "json":
				return nil
			}
			return fmt.Errorf("unknown output format %q: use table or json", a.output)
		},
	}
	root.SetOut(stdout)
	root.SetErr(stderr)
	root.PersistentFlags().StringVar(&a.socket, "socket", "", "duplexd's socket (default $"+api.EnvSocket+" or "+api.DefaultSocket+")")
	root.PersistentFlags().StringVarP(&a.output, "output", "o", "table", "output format: table or json")
	root.AddCommand(
		a.runCmd(), a.psCmd(), a.stopCmd(), a.rmCmd(), a.logsCmd(),
		a.checkpointCmd(), a.restoreCmd(), a.resumeCmd(),
		a.statusCmd(), a.hostsCmd(), a.migrateCmd(), a.certsCmd(),
		a.modeCmd(), a.drainCmd(), a.rejuvenateCmd(), a.planCmd(), a.historyCmd(),
		a.doctorCmd(), a.versionCmd(),
	)
	return root
}

// Main runs duplexctl and returns its exit code.
func Main(args []string) int {
	ctx, cancel := signalContext()
	defer cancel()
	cmd := New(os.Stdout, os.Stderr)
	cmd.SetArgs(args)
	if err := cmd.ExecuteContext(ctx); err != nil {
		var ee *ExitError
		if errors.As(err, &ee) {
			return ee.Code
		}
		fmt.Fprintf(os.Stderr, "duplexctl: %s\n", err)
		return 1
	}
	return 0
}

func (a *app) client() *api.Client { return api.NewClient(api.SocketPath(a.socket)) }

func (a *app) json() bool { return a.output == "json" }

func (a *app) printJSON(v any) error {
	enc := json.NewEncoder(a.stdout)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

func (a *app) table(header ...string) *tabwriter.Writer {
	tw := tabwriter.NewWriter(a.stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, strings.Join(header, "\t"))
	return tw
}

// age renders how long ago t was, like kubectl does.
func age(t time.Time) string {
	if t.IsZero() {
		return "-"
	}
	d := time.Since(t)
	switch {
	case d < time.Minute:
		return fmt.Sprintf("%ds", int(d.Seconds()))
	case d < time.Hour:
		return fmt.Sprintf("%dm", int(d.Minutes()))
	case d < 48*time.Hour:
		return fmt.Sprintf("%dh", int(d.Hours()))
	}
	return fmt.Sprintf("%dd", int(d.Hours()/24))
}

func ctxOf(cmd *cobra.Command) context.Context { return cmd.Context() }
