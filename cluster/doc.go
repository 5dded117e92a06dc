// Package cluster is duplex's cluster store on etcd: an embedded single-node etcd for
// one machine and tests, or a client of an external etcd cluster (TLS), and the host
// registry in which every duplexd registers with a lease so that a host whose daemon
// dies drops out. No consensus or membership is hand-written here.
//
// Errors callers act on: ErrNoHost.
package cluster
