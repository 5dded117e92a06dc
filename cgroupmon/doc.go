// Package cgroupmon samples memory, buffer, pressure and load figures of a host and of
// each workload's cgroup, on cgroup v1, v2 and hybrid hosts.
//
// It reads /proc and the cgroup files directly (so that Options can point it at another
// tree) and never writes, except to switch on v1 socket-memory accounting where
// Options.SockAccountParent or EnableSockAccounting asks for it. Errors with fixed
// meanings: ErrNoCgroup (the workload's cgroup does not exist) and
// ErrNoMemoryController (a v2 group without the memory controller). Reuse is welcome.
package cgroupmon
