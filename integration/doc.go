// Package integration holds duplex's end-to-end tests: real duplexd and duplexctl
// binaries, real CRIU, real kernel namespaces and cgroups. They need root.
package integration
