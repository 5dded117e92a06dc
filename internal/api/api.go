// Package api defines the JSON messages duplexctl and duplexd exchange over duplexd's
// root-only unix socket, and the client duplexctl uses.
package api

import (
	"time"

	"github.com/duplex-ha/duplex/cgroupmon"
	"github.com/duplex-ha/duplex/checkpoint"
	"github.com/duplex-ha/duplex/cluster"
	"github.com/duplex-ha/duplex/cluster/controller"
	"github.com/duplex-ha/duplex/internal/detect"
	"github.com/duplex-ha/duplex/internal/workload"
	"github.com/duplex-ha/duplex/migrate"
)

// DefaultSocket is where duplexd listens unless told otherwise.
const DefaultSocket = "/run/duplex/duplexd.sock"

// EnvSocket overrides the socket path for duplexctl.
const EnvSocket = "DUPLEX_SOCKET"

// Error codes carried in Error.Code.
const (
	CodeNotFound   = "not_found"
	CodeExists     = "exists"
	CodeInvalid    = "invalid"
	CodeNotRunning = "not_running"
	CodeForbidden  = "forbidden"
	CodeNoCluster  = "no_cluster"
	CodeRefused    = "refused" // a migration's pre-flight or strategy check said no
	CodeLocked     = "locked"  // the host is in a controller cycle
	CodeInternal   = "internal"
)

// Error is the body of every failed request.
type Error struct {
	Message string `json:"error"`
	Code    string `json:"code"`
}

func (e *Error) Error() string { return e.Message }

// Info describes a running daemon.
type Info struct {
	Name         string `json:"name"`
	Version      string `json:"version"`
	Pid          int    `json:"pid"`
	StateDir     string `json:"state_dir"`
	CRIU         string `json:"criu"`
	CgroupParent string `json:"cgroup_parent"`
	Workloads    int    `json:"workloads"`
}

// Status is what `duplexctl status` shows: the host's latest sample and the aging
// detector's verdict.
type Status struct {
	Host    string               `json:"host"`
	Verdict detect.Verdict       `json:"verdict"`
	Sample  cgroupmon.HostSample `json:"sample"`
	// EBPF says whether the eBPF probes run, and if not, why.
	EBPF string `json:"ebpf"`
	// Events counts the probes' events by "kind/workload".
	Events map[string]int64 `json:"ebpf_events,omitempty"`
	// Processes are the largest processes by anonymous memory, from the eBPF
	// memory probe (--ebpf-memory), with their growth since the previous sample.
	Processes []ProcessMemory `json:"processes,omitempty"`
	// Cluster is this host's place in the cluster (nil on a single host).
	Cluster *StatusCluster `json:"cluster,omitempty"`
}

// StatusCluster is this host's role, its cycle, and the cluster's alerts.
type StatusCluster struct {
	Role      cluster.Role   `json:"role"`
	Available bool           `json:"available"`
	Mode      cluster.Mode   `json:"mode"`
	Leader    string         `json:"leader,omitempty"`
	Cycle     *cluster.Cycle `json:"cycle,omitempty"`
	// Alerts are the blocked cycles of the whole cluster ("HOST: why").
	Alerts []string `json:"alerts,omitempty"`
}

// ProcessMemory is one process as the eBPF memory probe sees it.
type ProcessMemory struct {
	Pid            int     `json:"pid"`
	Workload       string  `json:"workload,omitempty"`
	Anon           uint64  `json:"anon"`
	File           uint64  `json:"file"`
	BytesPerSecond float64 `json:"bytes_per_second"`
}

// StopRequest asks to stop a workload.
type StopRequest struct {
	Timeout Duration `json:"timeout"` // grace between SIGTERM and SIGKILL
}

// CheckpointRequest asks to dump a workload into a directory on the daemon's host.
type CheckpointRequest struct {
	Dir            string `json:"dir"`
	LeaveRunning   bool   `json:"leave_running,omitempty"`
	LeaveStopped   bool   `json:"leave_stopped,omitempty"`
	TCPEstablished bool   `json:"tcp_established,omitempty"`
}

// CheckpointResponse reports a dump.
type CheckpointResponse struct {
	Workload workload.Record `json:"workload"`
	Stats    DumpStats       `json:"stats"`
}

// RestoreRequest asks to restore the checkpoint in Dir, optionally under a new name.
type RestoreRequest struct {
	Dir  string `json:"dir"`
	Name string `json:"name,omitempty"`
}

// RestoreResponse reports a restore.
type RestoreResponse struct {
	Workload workload.Record `json:"workload"`
	Stats    RestoreStats    `json:"stats"`
}

// MigrateRequest asks to move a workload to another host.
type MigrateRequest struct {
	To       string `json:"to"`
	Strategy string `json:"strategy,omitempty"` // auto (default), precopy, postcopy, stopcopy
	// NoReplay drops the packets that reach the workload while it is frozen (their
	// senders' TCP resends them) instead of replaying them on the destination.
	NoReplay bool `json:"no_replay,omitempty"`
}

// MigrateAllRequest asks to move every running workload of this host.
type MigrateAllRequest struct {
	To       string `json:"to"`
	Strategy string `json:"strategy,omitempty"`
	Parallel int    `json:"parallel,omitempty"`  // migrations at once; 0 means 2
	NoReplay bool   `json:"no_replay,omitempty"` // see MigrateRequest
}

// MigrateEvent is one line of a migration's progress stream: progress, or at the
// end the result or the error. For several workloads, Workload names the one an
// error is about, and Done ends the stream.
type MigrateEvent struct {
	Progress *migrate.Progress `json:"progress,omitempty"`
	Result   *migrate.Result   `json:"result,omitempty"`
	Error    string            `json:"error,omitempty"`
	Workload string            `json:"workload,omitempty"`
	Done     bool              `json:"done,omitempty"`
}

// DumpStats is checkpoint.DumpStats in JSON-friendly units.
type DumpStats struct {
	FreezingMS   float64 `json:"freezing_ms"`
	FrozenMS     float64 `json:"frozen_ms"`
	MemdumpMS    float64 `json:"memdump_ms"`
	MemwriteMS   float64 `json:"memwrite_ms"`
	PagesWritten uint64  `json:"pages_written"`
	BytesWritten uint64  `json:"bytes_written"`
	WallMS       float64 `json:"wall_ms"`
}

// RestoreStats is checkpoint.RestoreResult in JSON-friendly units.
type RestoreStats struct {
	Pid        int     `json:"pid"`
	RestoreMS  float64 `json:"restore_ms"`
	ForkingMS  float64 `json:"forking_ms"`
	WallMS     float64 `json:"wall_ms"`
	PagesTotal uint64  `json:"pages_restored,omitempty"`
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

// pageSize is the size of the pages CRIU counts.
const pageSize = 4096

// NewDumpStats converts CRIU's dump statistics.
func NewDumpStats(s *checkpoint.DumpStats) DumpStats {
	if s == nil {
		return DumpStats{}
	}
	return DumpStats{
		FreezingMS: ms(s.FreezingTime), FrozenMS: ms(s.FrozenTime),
		MemdumpMS: ms(s.MemdumpTime), MemwriteMS: ms(s.MemwriteTime),
		PagesWritten: s.PagesWritten, BytesWritten: s.PagesWritten * pageSize,
		WallMS: ms(s.Wall),
	}
}

// NewRestoreStats converts CRIU's restore statistics.
func NewRestoreStats(r *checkpoint.RestoreResult) RestoreStats {
	if r == nil {
		return RestoreStats{}
	}
	return RestoreStats{Pid: r.Pid, RestoreMS: ms(r.RestoreTime), ForkingMS: ms(r.ForkingTime), WallMS: ms(r.Wall), PagesTotal: r.PagesRestore}
}

// Duration is a time.Duration that reads and writes JSON as a Go duration string.
type Duration time.Duration

func (d Duration) MarshalText() ([]byte, error) { return []byte(time.Duration(d).String()), nil }

func (d *Duration) UnmarshalText(b []byte) error {
	v, err := time.ParseDuration(string(b))
	*d = Duration(v)
	return err
}

// HostView is one host as `duplexctl hosts` shows it: registration, role, place on
// the available list, verdict, workloads, capacity and any cycle it is in.
type HostView struct {
	Name      string          `json:"name"`
	Alive     bool            `json:"alive"` // registered now (its duplexd runs)
	Role      cluster.Role    `json:"role,omitempty"`
	Available bool            `json:"available"`
	Host      *cluster.Host   `json:"host,omitempty"`
	Report    *cluster.Report `json:"report,omitempty"`
	Cycle     *cluster.Cycle  `json:"cycle,omitempty"`
	Leader    bool            `json:"leader,omitempty"` // runs the elected controller
}

// ClusterView is the whole cluster for `duplexctl hosts`.
type ClusterView struct {
	Mode   cluster.Mode `json:"mode"`
	Leader string       `json:"leader,omitempty"`
	Hosts  []HostView   `json:"hosts"`
}

// ModeRequest sets the operation mode.
type ModeRequest struct {
	Mode string `json:"mode"`
}

// PlanResponse is the controller's dry run.
type PlanResponse struct {
	Mode   cluster.Mode      `json:"mode"`
	Leader string            `json:"leader,omitempty"`
	Policy controller.Policy `json:"policy"`
	Steps  []controller.Step `json:"steps"`
}
