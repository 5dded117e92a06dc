// Package doctor finds out what this host can do for duplex: kernel, CRIU and its
// features, cgroups, tracefs, BTF, eBPF.
//
// Run probes the host without changing it (no mounts, no files left behind) and
// returns a Report whose checks name what was found and what a missing piece costs.
// The duplexctl doctor command and the tests' guards use it; any package may.
package doctor
