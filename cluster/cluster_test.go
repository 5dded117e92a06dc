package cluster_test

import (
	"context"
	"errors"
	"path/filepath"
	"testing"
	"time"

	"github.com/duplex-ha/duplex/cluster"
	"github.com/duplex-ha/duplex/internal/pki"
	"github.com/duplex-ha/duplex/internal/testutil"
)

// startStore runs an embedded etcd with mutual TLS on loopback and connects to it.
func startStore(t *testing.T) (*cluster.Store, []string, pki.Files) {
	t.Helper()
	e := testutil.StartEtcd(t)
	return e.Connect(t), e.Endpoints, e.Files
}

func TestHostRegistryWithLeases(t *testing.T) {
	s, endpoints, files := startStore(t)
	ctx := context.Background()

	r0, err := s.Register(ctx, cluster.Host{Name: "h0", Agent: "127.0.0.1:7440"}, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer r0.Close()

	// A second daemon registers through its own connection, then dies without
	// withdrawing: its lease runs out and it drops out of the list.
	tlsConf, _ := files.Config()
	s1, err := cluster.Connect(ctx, endpoints, tlsConf)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s1.Register(ctx, cluster.Host{Name: "h1", Agent: "127.0.0.1:7441"}, 2*time.Second); err != nil {
		t.Fatal(err)
	}
	hosts, err := s.Hosts(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(hosts) != 2 || hosts[0].Name != "h0" || hosts[1].Name != "h1" {
		t.Fatalf("hosts: %+v", hosts)
	}
	s1.Close() // the daemon "dies": no more keep-alives
	testutil.Eventually(t, 10*time.Second, "h1's lease to expire", func() bool {
		_, err := s.Host(ctx, "h1")
		return errors.Is(err, cluster.ErrNoHost)
	})
	// h0 kept renewing past its 5 s TTL... only if we wait that long; check it is live now.
	if h, err := s.Host(ctx, "h0"); err != nil || h.Agent != "127.0.0.1:7440" {
		t.Errorf("h0: %+v, %v", h, err)
	}
	if err := r0.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Host(ctx, "h0"); !errors.Is(err, cluster.ErrNoHost) {
		t.Errorf("h0 still listed after withdrawing: %v", err)
	}
}

func TestStoreRejectsClientsWithoutClusterCertificate(t *testing.T) {
	_, endpoints, _ := startStore(t)
	// A certificate from another CA.
	dir := t.TempDir()
	if err := pki.InitCA(filepath.Join(dir, "ca"), "other", time.Hour); err != nil {
		t.Fatal(err)
	}
	if err := pki.Issue(filepath.Join(dir, "ca"), "intruder", []string{"127.0.0.1"}, filepath.Join(dir, "x"), time.Hour); err != nil {
		t.Fatal(err)
	}
	bad, err := pki.HostFiles(filepath.Join(dir, "x")).Config()
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	if s, err := cluster.Connect(ctx, endpoints, bad); err == nil {
		s.Close()
		t.Fatal("etcd accepted a client whose certificate another CA signed")
	}
}
