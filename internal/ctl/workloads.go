package ctl

import (
	"context"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/docker/go-units"
	"github.com/spf13/cobra"

	"github.com/duplex-ha/duplex/internal/api"
	"github.com/duplex-ha/duplex/internal/workload"
)

func signalContext() (context.Context, context.CancelFunc) {
	return signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
}

func (a *app) runCmd() *cobra.Command {
	var env, vips []string
	var cwd, memory, sockMemory string
	var inheritEnv, pinned bool
	cmd := &cobra.Command{
		Use:   "run NAME -- COMMAND [ARGS...]",
		Short: "Start a managed workload",
		Long: `Start COMMAND as the workload NAME. Its process tree gets its own PID namespace
(COMMAND is PID 1 there and leads its session) and its own cgroup; its stdout and
stderr go to log files in duplexd's state directory ('duplexctl logs NAME').

With --vip, duplexd puts the service address on the interface before the
workload starts, announces it, and moves it along when the workload migrates.

Without --env or --inherit-env the workload gets a minimal environment
(PATH, HOME=/, LANG=C.UTF-8).

With --pin the workload belongs to this host (a host agent, a local cache): it
is never migrated, and a rejuvenation of the host stops it.`,
		Example: `  duplexctl run web --vip 10.0.0.100/24@eth0 -- python3 -m http.server --bind 10.0.0.100 8080
  duplexctl run counter --memory 256M -- sh -c 'i=0; while :; do i=$((i+1)); echo $i; sleep 1; done'`,
		Args: cobra.MinimumNArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			if cmd.ArgsLenAtDash() != 1 {
				return fmt.Errorf("usage: duplexctl run NAME -- COMMAND [ARGS...]")
			}
			spec := workload.Spec{Name: args[0], Args: args[1:], Cwd: cwd, VIPs: vips, Pinned: pinned}
			if inheritEnv {
				spec.Env = os.Environ()
			}
			spec.Env = append(spec.Env, env...)
			for _, kv := range env {
				if !strings.Contains(kv, "=") {
					return fmt.Errorf("--env %q: want KEY=VALUE", kv)
				}
			}
			if len(spec.Env) > 0 && !hasPath(spec.Env) {
				spec.Env = append(spec.Env, "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
			}
			if spec.Cwd == "" {
				if wd, err := os.Getwd(); err == nil {
					spec.Cwd = wd
				}
			}
			if memory != "" {
				n, err := units.RAMInBytes(memory)
				if err != nil {
					return fmt.Errorf("--memory %q: %w", memory, err)
				}
				spec.MemoryLimit = n
			}
			if sockMemory != "" {
				n, err := units.RAMInBytes(sockMemory)
				if err != nil {
					return fmt.Errorf("--socket-memory %q: %w", sockMemory, err)
				}
				spec.SocketMemoryLimit = n
			}
			rec, err := a.client().Run(ctxOf(cmd), spec)
			if err != nil {
				return err
			}
			if a.json() {
				return a.printJSON(rec)
			}
			fmt.Fprintf(a.stdout, "%s running (pid %d)\n", rec.Name, rec.Pid)
			return nil
		},
	}
	cmd.Flags().StringArrayVarP(&env, "env", "e", nil, "set an environment variable KEY=VALUE (repeatable)")
	cmd.Flags().BoolVar(&inheritEnv, "inherit-env", false, "pass duplexctl's own environment to the workload")
	cmd.Flags().StringVar(&cwd, "cwd", "", "working directory (default: duplexctl's current directory)")
	cmd.Flags().StringVar(&memory, "memory", "", "memory limit, e.g. 512M or 2G")
	cmd.Flags().StringVar(&sockMemory, "socket-memory", "", "limit of the workload's TCP socket buffers, e.g. 4M (cgroup v1)")
	cmd.Flags().BoolVar(&pinned, "pin", false, "bind the workload to this host: never migrated, stopped by a rejuvenation")
	cmd.Flags().StringArrayVar(&vips, "vip", nil, "service address ADDR/PREFIX@LINK that moves with the workload (repeatable)")
	return cmd
}

func hasPath(env []string) bool {
	for _, kv := range env {
		if strings.HasPrefix(kv, "PATH=") {
			return true
		}
	}
	return false
}

func (a *app) psCmd() *cobra.Command {
	var all, quiet bool
	cmd := &cobra.Command{
		Use:     "ps",
		Aliases: []string{"list", "ls"},
		Short:   "List workloads",
		Long:    "List running and frozen workloads; with -a also those that ended or were checkpointed away.",
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			recs, err := a.client().List(ctxOf(cmd))
			if err != nil {
				return err
			}
			shown := recs[:0]
			for _, r := range recs {
				if all || r.State == workload.Running || r.State == workload.Frozen {
					shown = append(shown, r)
				}
			}
			if a.json() {
				return a.printJSON(shown)
			}
			if quiet {
				for _, r := range shown {
					fmt.Fprintln(a.stdout, r.Name)
				}
				return nil
			}
			tw := a.table("NAME", "STATE", "PID", "AGE", "RESTORES", "COMMAND")
			for _, r := range shown {
				pid := "-"
				if r.Pid > 0 {
					pid = fmt.Sprint(r.Pid)
				}
				state := string(r.State)
				if r.ExitCode != nil && (r.State == workload.Exited || r.State == workload.Stopped) {
					state = fmt.Sprintf("%s (%d)", r.State, *r.ExitCode)
				}
				fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%d\t%s\n", r.Name, state, pid, age(r.Started), r.Restores, shorten(strings.Join(r.Args, " "), 50))
			}
			return tw.Flush()
		},
	}
	cmd.Flags().BoolVarP(&all, "all", "a", false, "include workloads that no longer run")
	cmd.Flags().BoolVarP(&quiet, "quiet", "q", false, "print names only")
	return cmd
}

func shorten(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n-3] + "..."
}

func (a *app) stopCmd() *cobra.Command {
	var timeout time.Duration
	cmd := &cobra.Command{
		Use:   "stop NAME...",
		Short: "Stop workloads (SIGTERM, then SIGKILL after --timeout)",
		Long: `Stop workloads. The root of each gets SIGTERM, then SIGKILL after --timeout.
A PID-namespace init ignores signals it installed no handler for, so a root
that does not handle SIGTERM gets SIGKILL at once.`,
		Args: cobra.MinimumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			var out []workload.Record
			for _, name := range args {
				rec, err := a.client().Stop(ctxOf(cmd), name, api.StopRequest{Timeout: api.Duration(timeout)})
				if err != nil {
					return err
				}
				out = append(out, rec)
				if !a.json() {
					fmt.Fprintf(a.stdout, "%s stopped\n", name)
				}
			}
			if a.json() {
				return a.printJSON(out)
			}
			return nil
		},
	}
	cmd.Flags().DurationVarP(&timeout, "timeout", "t", 10*time.Second, "grace period between SIGTERM and SIGKILL")
	return cmd
}

func (a *app) rmCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "rm NAME...",
		Short: "Forget workloads that no longer run, with their logs",
		Args:  cobra.MinimumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			for _, name := range args {
				if err := a.client().Remove(ctxOf(cmd), name); err != nil {
					return err
				}
				if !a.json() {
					fmt.Fprintf(a.stdout, "%s removed\n", name)
				}
			}
			if a.json() {
				return a.printJSON(map[string]any{"removed": args})
			}
			return nil
		},
	}
}

func (a *app) logsCmd() *cobra.Command {
	var follow bool
	var stream string
	var tail int
	cmd := &cobra.Command{
		Use:   "logs NAME",
		Short: "Print a workload's output",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return a.client().Logs(ctxOf(cmd), args[0], stream, tail, follow, a.stdout)
		},
	}
	cmd.Flags().BoolVarP(&follow, "follow", "f", false, "keep printing new output while the workload runs")
	cmd.Flags().StringVar(&stream, "stream", "both", "stdout, stderr or both")
	cmd.Flags().IntVar(&tail, "tail", -1, "print only the last N lines (-1: all)")
	return cmd
}

func (a *app) checkpointCmd() *cobra.Command {
	var req api.CheckpointRequest
	cmd := &cobra.Command{
		Use:   "checkpoint NAME --dir DIR",
		Short: "Checkpoint a workload into a directory with CRIU",
		Long: `Dump the workload NAME with CRIU into DIR on duplexd's host. By default the
workload is gone afterwards ('duplexctl restore --dir DIR' brings it back);
--leave-running keeps it running, --leave-stopped keeps it frozen until
'duplexctl resume NAME' or a restore elsewhere.`,
		Example: "  duplexctl checkpoint web --dir /var/lib/duplex/images/web",
		Args:    cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if req.Dir == "" {
				return fmt.Errorf("--dir is required")
			}
			dir, err := filepath.Abs(req.Dir) // the daemon does not share our working directory
			if err != nil {
				return err
			}
			req.Dir = dir
			if !a.json() {
				fmt.Fprintf(a.stderr, "checkpointing %s into %s ...\n", args[0], req.Dir)
			}
			res, err := a.client().Checkpoint(ctxOf(cmd), args[0], req)
			if err != nil {
				return err
			}
			if a.json() {
				return a.printJSON(res)
			}
			s := res.Stats
			fmt.Fprintf(a.stdout, "%s %s: frozen %.1f ms, %s in %d pages, dump took %.1f ms\n",
				args[0], res.Workload.State, s.FrozenMS, units.BytesSize(float64(s.BytesWritten)), s.PagesWritten, s.WallMS)
			return nil
		},
	}
	cmd.Flags().StringVar(&req.Dir, "dir", "", "image directory (created if missing)")
	cmd.Flags().BoolVar(&req.LeaveRunning, "leave-running", false, "keep the workload running after the dump")
	cmd.Flags().BoolVar(&req.LeaveStopped, "leave-stopped", false, "keep the workload frozen after the dump")
	cmd.Flags().BoolVar(&req.TCPEstablished, "tcp-established", false, "dump established TCP connections (locks the network with nftables)")
	cmd.MarkFlagsMutuallyExclusive("leave-running", "leave-stopped")
	return cmd
}

func (a *app) restoreCmd() *cobra.Command {
	var req api.RestoreRequest
	cmd := &cobra.Command{
		Use:   "restore --dir DIR",
		Short: "Restore a checkpointed workload",
		Long: `Restore the workload checkpointed in DIR and manage it again. Files it had open
must exist at the same paths; the error names any that are missing.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if req.Dir == "" {
				return fmt.Errorf("--dir is required")
			}
			dir, err := filepath.Abs(req.Dir) // the daemon does not share our working directory
			if err != nil {
				return err
			}
			req.Dir = dir
			res, err := a.client().Restore(ctxOf(cmd), req)
			if err != nil {
				return err
			}
			if a.json() {
				return a.printJSON(res)
			}
			fmt.Fprintf(a.stdout, "%s restored (pid %d): restore took %.1f ms (CRIU restore %.1f ms)\n",
				res.Workload.Name, res.Workload.Pid, res.Stats.WallMS, res.Stats.RestoreMS)
			return nil
		},
	}
	cmd.Flags().StringVar(&req.Dir, "dir", "", "image directory written by 'duplexctl checkpoint'")
	cmd.Flags().StringVar(&req.Name, "name", "", "restore under this name instead of the checkpointed one")
	return cmd
}

func (a *app) resumeCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "resume NAME",
		Short: "Resume a workload a checkpoint left frozen",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			rec, err := a.client().Resume(ctxOf(cmd), args[0])
			if err != nil {
				return err
			}
			if a.json() {
				return a.printJSON(rec)
			}
			fmt.Fprintf(a.stdout, "%s running\n", rec.Name)
			return nil
		},
	}
}

func (a *app) versionCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "version",
		Short: "Print duplexctl's and duplexd's versions",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			out := map[string]any{"client": Version}
			info, err := a.client().Info(ctxOf(cmd))
			if err == nil {
				out["daemon"] = info
			} else {
				out["daemon_error"] = err.Error()
			}
			if a.json() {
				return a.printJSON(out)
			}
			fmt.Fprintf(a.stdout, "duplexctl %s\n", Version)
			if err != nil {
				fmt.Fprintf(a.stdout, "duplexd   unreachable: %s\n", err)
				return nil
			}
			fmt.Fprintf(a.stdout, "duplexd   %s (pid %d, state %s, criu %s, %d workloads)\n", info.Version, info.Pid, info.StateDir, info.CRIU, info.Workloads)
			return nil
		},
	}
}

// Version is duplexctl's release, set at build time with -ldflags.
var Version = "dev"
