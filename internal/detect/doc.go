// Package detect judges a host stable or unstable from its samples: thresholds that
// must hold for a period, and an aging trend (Mann-Kendall with Sen's slope) that
// predicts exhaustion within a horizon, with the workloads to blame.
//
// It is pure computation over cgroupmon.HostSample values (time comes from the
// samples), so it can be reused offline, e.g. to replay recorded samples.
package detect
