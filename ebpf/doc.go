// Package ebpf loads duplex's BPF programs (generated with bpf2go, committed) and
// reports per-process and per-workload memory growth, socket-buffer pressure and OOM
// kills from tracepoints.
//
// Load fails with an error wrapping ErrUnavailable when the kernel lacks BPF, BTF or
// a tracepoint (or refuses a program); the daemon then goes on with cgroup probes only.
package ebpf
