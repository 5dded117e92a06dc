// Package workload runs and tracks duplexd's managed workloads: named process trees
// whose root is PID 1 of its own PID namespace (session leader inside it), placed in
// their own cgroups, with stdio in log files and their record kept on disk so that a
// restarted daemon adopts them again. Only duplexd uses it.
//
// Errors callers act on: ErrNotFound, ErrExists, ErrInvalid, ErrNotRunning.
package workload
