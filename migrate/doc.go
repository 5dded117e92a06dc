// Package migrate moves a running workload from this host to another: pre-flight
// checks on both ends, a strategy chosen from what both kernels and CRIUs support,
// freeze, transfer, service address ready on the destination, restore, address
// moved, then commit (the source is discarded) or rollback (the source resumes).
// Exactly one live copy of the workload exists at every moment.
//
// The two ends are split like go-criu's phaul: Run drives a migration from the
// source through the Destination interface, which Target implements on the other
// host; NewClient and Handler carry it over mutual TLS.
//
// Errors callers act on: ErrStrategyUnavailable, ErrPreflight, ErrOutcomeUnknown.
package migrate
