package daemon

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/sirupsen/logrus"
	"github.com/spf13/cobra"
	"sigs.k8s.io/yaml"

	"github.com/duplex-ha/duplex/checkpoint"
	"github.com/duplex-ha/duplex/internal/api"
)

// DefaultConfigFile is read when it exists and --config is not given.
const DefaultConfigFile = "/etc/duplex/duplexd.yaml"

// fileConfig is the YAML config file; flags given on the command line win.
type fileConfig struct {
	Config    `json:",inline"`
	LogLevel  string `json:"log_level"`
	LogFormat string `json:"log_format"`
	// SampleEvery and DetectSection shadow the Config fields of the same JSON
	// names, which the file writes as "250ms" rather than nanoseconds.
	SampleEvery   *api.Duration `json:"sample_interval"`
	DetectSection detectFile    `json:"detect"`
}

// NewCommand returns duplexd's command line.
func NewCommand() *cobra.Command {
	var cfgFile string
	var fc fileConfig
	cmd := &cobra.Command{
		Use:   "duplexd",
		Short: "duplex's host daemon: runs managed workloads and checkpoints them with CRIU",
		Long: `duplexd runs on every host of a duplex cluster, as root. It launches workloads in
their own PID namespace and cgroup, adopts those still running when it restarts,
and checkpoints and restores them with CRIU. duplexctl talks to it over a
root-only unix socket. In a cluster (--listen, --certs) it registers in etcd,
publishes its monitor's verdict and capacity, serves migrations to and from
other hosts, runs its rejuvenation ladder when the controller asks, and takes
part in the election of the cluster controller (unless --no-controller).

Exit status 75 means the rejuvenation ladder asked for a simulated host restart
(rejuvenate.reboot: exit): the supervisor clears the host and starts duplexd again.

Settings come from flags, then the config file (YAML, keys as the flags with
'_' for '-'), then defaults. The CRIU binary also honours $` + checkpoint.EnvCRIUPath + `.`,
		Version:       Version,
		SilenceUsage:  true,
		SilenceErrors: true,
		Args:          cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			var file fileConfig
			path, explicit := cfgFile, cfgFile != ""
			if !explicit {
				path = DefaultConfigFile
			}
			if b, err := os.ReadFile(path); err == nil {
				if err := yaml.UnmarshalStrict(b, &file); err != nil {
					return fmt.Errorf("config %s: %w", path, err)
				}
			} else if explicit || !errors.Is(err, os.ErrNotExist) {
				return fmt.Errorf("config: %w", err)
			}
			merge(cmd, &fc, &file)
			log, err := newLogger(fc.LogLevel, fc.LogFormat)
			if err != nil {
				return err
			}
			ctx, stop := signal.NotifyContext(cmd.Context(), os.Interrupt, syscall.SIGTERM)
			defer stop()
			return Run(ctx, fc.Config, log)
		},
	}
	f := cmd.Flags()
	f.StringVar(&cfgFile, "config", "", "config file (default "+DefaultConfigFile+" if present)")
	f.StringVar(&fc.StateDir, "state-dir", "/var/lib/duplex", "directory for workload records, logs and images")
	f.StringVar(&fc.Socket, "socket", api.DefaultSocket, "unix socket duplexctl connects to")
	f.StringVar(&fc.CRIU, "criu", "", "CRIU binary (default $"+checkpoint.EnvCRIUPath+", then "+checkpoint.DefaultCRIUPath+", then PATH)")
	f.BoolVar(&fc.CRIUHardwareBreakpoints, "criu-hardware-breakpoints", false, "let CRIU stop the tree with hardware breakpoints (its default; in a VM each costs 10-20 ms of frozen time, so duplex makes CRIU step instead)")
	f.StringVar(&fc.CgroupParent, "cgroup-parent", "duplex", "cgroup below which each workload gets its own")
	f.StringVar(&fc.RunDir, "run-dir", "/run/duplex", "directory for transient migration images (tmpfs is best)")
	f.StringVar(&fc.Name, "name", "", "this host's name in the cluster (default: the hostname)")
	f.StringVar(&fc.Listen, "listen", "", "agent address for other hosts (mutual TLS), e.g. 10.0.0.1:7440; empty: single host")
	f.StringVar(&fc.Advertise, "advertise", "", "agent address other hosts use (default --listen)")
	f.StringVar(&fc.Certs, "certs", "", "this host's certificate directory ('duplexctl certs issue')")
	f.StringSliceVar(&fc.EtcdEndpoints, "etcd-endpoints", nil, "external etcd cluster (https URLs); empty: run an embedded etcd")
	f.StringVar(&fc.EtcdListen, "etcd-listen", "", "embedded etcd client URL (default https://ADVERTISE-IP:2379)")
	f.StringVar(&fc.EtcdPeer, "etcd-peer", "", "embedded etcd peer URL (default http://127.0.0.1:2380)")
	f.StringVar(&fc.MetricsListen, "metrics-listen", "127.0.0.1:9464", "address for Prometheus metrics at /metrics (\"\" for none)")
	f.DurationVar(&fc.SampleInterval, "sample-interval", time.Second, "how often the monitor samples the host and its workloads")
	f.BoolVar(&fc.NoEBPF, "no-ebpf", false, "do not load the eBPF probes (cgroup probes only)")
	f.BoolVar(&fc.EBPFMemory, "ebpf-memory", false, "also run the per-process memory probe (kmem/rss_stat; costly under allocation storms)")
	f.StringVar(&fc.Role, "role", "primary", "what this host joins the cluster as the first time: primary or spare")
	f.BoolVar(&fc.NoController, "no-controller", false, "stay out of the cluster controller's election")
	f.BoolVar(&fc.NoMemoryReserve, "no-memory-reserve", false, "do not set an incoming migration's memory aside before its source freezes")
	f.StringVar(&fc.Capacity, "capacity", "", "memory workloads may use on this host, e.g. 24GiB (default: all)")
	f.StringVar(&fc.LogLevel, "log-level", "info", "debug, info, warn or error")
	f.StringVar(&fc.LogFormat, "log-format", "text", "text or json")
	return cmd
}

// merge takes each setting from the file unless its flag was given.
func merge(cmd *cobra.Command, fc, file *fileConfig) {
	set := func(flag string, dst *string, v string) {
		if !cmd.Flags().Changed(flag) && v != "" {
			*dst = v
		}
	}
	set("state-dir", &fc.StateDir, file.StateDir)
	set("socket", &fc.Socket, file.Socket)
	set("criu", &fc.CRIU, file.CRIU)
	set("cgroup-parent", &fc.CgroupParent, file.CgroupParent)
	set("log-level", &fc.LogLevel, file.LogLevel)
	set("log-format", &fc.LogFormat, file.LogFormat)
	set("run-dir", &fc.RunDir, file.RunDir)
	set("name", &fc.Name, file.Name)
	set("listen", &fc.Listen, file.Listen)
	set("advertise", &fc.Advertise, file.Advertise)
	set("certs", &fc.Certs, file.Certs)
	set("etcd-listen", &fc.EtcdListen, file.EtcdListen)
	set("etcd-peer", &fc.EtcdPeer, file.EtcdPeer)
	set("metrics-listen", &fc.MetricsListen, file.MetricsListen)
	set("role", &fc.Role, file.Role)
	set("capacity", &fc.Capacity, file.Capacity)
	if !cmd.Flags().Changed("no-controller") && file.NoController {
		fc.NoController = true
	}
	if !cmd.Flags().Changed("no-memory-reserve") && file.NoMemoryReserve {
		fc.NoMemoryReserve = true
	}
	if !cmd.Flags().Changed("criu-hardware-breakpoints") && file.CRIUHardwareBreakpoints {
		fc.CRIUHardwareBreakpoints = true
	}
	fc.Controller, fc.Rejuvenate = file.Controller, file.Rejuvenate
	if !cmd.Flags().Changed("sample-interval") && file.SampleEvery != nil {
		fc.SampleInterval = time.Duration(*file.SampleEvery)
	}
	fc.Detect = file.DetectSection.config()
	if !cmd.Flags().Changed("no-ebpf") && file.NoEBPF {
		fc.NoEBPF = true
	}
	if !cmd.Flags().Changed("ebpf-memory") && file.EBPFMemory {
		fc.EBPFMemory = true
	}
	if !cmd.Flags().Changed("etcd-endpoints") && len(file.EtcdEndpoints) > 0 {
		fc.EtcdEndpoints = file.EtcdEndpoints
	}
}

func newLogger(level, format string) (*logrus.Entry, error) {
	l := logrus.New()
	l.SetOutput(os.Stderr)
	lv, err := logrus.ParseLevel(level)
	if err != nil {
		return nil, fmt.Errorf("--log-level %q: %w", level, err)
	}
	l.SetLevel(lv)
	switch format {
	case "text":
		l.SetFormatter(&logrus.TextFormatter{FullTimestamp: true})
	case "json":
		l.SetFormatter(&logrus.JSONFormatter{})
	default:
		return nil, fmt.Errorf("--log-format %q: use text or json", format)
	}
	return logrus.NewEntry(l), nil
}

// Main runs duplexd and returns its exit code.
func Main(args []string) int {
	cmd := NewCommand()
	cmd.SetArgs(args)
	if err := cmd.ExecuteContext(context.Background()); err != nil {
		fmt.Fprintf(os.Stderr, "duplexd: %s\n", err)
		if errors.Is(err, ErrHostRestart) {
			return RestartExitCode
		}
		return 1
	}
	return 0
}
