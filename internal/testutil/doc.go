// Package testutil holds the helpers duplex's tests share: guards that skip (or, on
// CI and where the machine should have it, fail) a test lacking root, CRIU or a kernel
// feature, and fixtures that clean up after themselves.
package testutil
