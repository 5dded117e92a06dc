// Package harness builds a cluster of duplex hosts on one kernel for tests and the demo:
// each host a network namespace with its own address, joined by a bridge, plus client
// namespaces. Its core API takes no testing.TB so the demo can use it; NewT wraps it for
// tests. Errors: ErrInvalidOptions (bad Options), ErrClosed (cluster already closed),
// ErrStreamMismatch and ErrStreamIncomplete (a Stream's echo was wrong or missing).
package harness
