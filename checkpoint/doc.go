// Package checkpoint wraps CRIU (through go-criu's swrk RPC mode) for the rest of
// duplex: stop-and-copy dumps, pre-dumps, lazy (post-copy) dumps with the lazy-pages
// daemon, page-server dumps, restores, and feature detection that asks CRIU itself.
//
// A failed CRIU call returns a *CRIUError that carries the lines of CRIU's log that
// explain the failure; a restore that needs a file missing on this host also matches
// ErrMissingFile. A feature the kernel or CRIU lacks is reported as ErrNotSupported.
package checkpoint
