package testutil

import (
	"context"
	"crypto/tls"
	"fmt"
	"net"
	"path/filepath"
	"testing"
	"time"

	"github.com/duplex-ha/duplex/cluster"
	"github.com/duplex-ha/duplex/internal/pki"
)

// Etcd is an embedded single-node etcd with mutual TLS on loopback, for tests.
type Etcd struct {
	Endpoints []string
	Files     pki.Files
	TLS       *tls.Config
}

// StartEtcd runs an embedded etcd that stops when the test ends.
func StartEtcd(t testing.TB) *Etcd {
	t.Helper()
	dir := t.TempDir()
	ca := filepath.Join(dir, "ca")
	if err := pki.InitCA(ca, "test-cluster", time.Hour); err != nil {
		t.Fatal(err)
	}
	if err := pki.Issue(ca, "h0", []string{"127.0.0.1"}, filepath.Join(dir, "h0"), time.Hour); err != nil {
		t.Fatal(err)
	}
	files := pki.HostFiles(filepath.Join(dir, "h0"))
	url := fmt.Sprintf("https://127.0.0.1:%d", FreePort(t))
	e, err := cluster.StartEmbedded(context.Background(), cluster.EmbeddedConfig{
		Name: "h0", Dir: filepath.Join(dir, "etcd"), ClientURL: url,
		PeerURL: fmt.Sprintf("http://127.0.0.1:%d", FreePort(t)), TLS: &files,
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(e.Close)
	conf, err := files.Config()
	if err != nil {
		t.Fatal(err)
	}
	return &Etcd{Endpoints: []string{url}, Files: files, TLS: conf}
}

// Connect opens a store connection that closes when the test ends.
func (e *Etcd) Connect(t testing.TB) *cluster.Store {
	t.Helper()
	s, err := cluster.Connect(context.Background(), e.Endpoints, e.TLS)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

// FreePort returns a TCP port free on loopback now.
func FreePort(t testing.TB) int {
	t.Helper()
	l, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}
