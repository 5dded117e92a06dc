// Package controller is duplex's cluster controller: one instance at a time leads
// (etcd election) and drives each unstable host through the cycle of the claims:
// select a target by mode, duplex every workload onto it, decide, remove the host
// from the available list, rejuvenate it, register it back as a spare. Every step
// is one etcd transaction guarded by the leadership, so a new leader resumes a
// cycle where the last one stopped. Plan is the same logic as a dry run.
//
// Errors callers act on: ErrNotLeader.
package controller
