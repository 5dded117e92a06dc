package cluster

import (
	"context"
	"crypto/tls"
	"fmt"
	"net/url"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/server/v3/embed"

	"github.com/duplex-ha/duplex/internal/pki"
)

// EmbeddedConfig configures an embedded single-node etcd.
type EmbeddedConfig struct {
	Name      string // member name
	Dir       string // data directory
	ClientURL string // e.g. https://10.0.0.1:2379; https requires TLS
	PeerURL   string // e.g. http://127.0.0.1:2380 (only this member uses it)
	TLS       *pki.Files
}

// Embedded is a running embedded etcd.
type Embedded struct {
	e *embed.Etcd
}

// StartEmbedded starts a single-node etcd and waits until it serves.
func StartEmbedded(ctx context.Context, c EmbeddedConfig) (*Embedded, error) {
	cfg := embed.NewConfig()
	cfg.Name = c.Name
	cfg.Dir = c.Dir
	cfg.LogLevel = "error"
	cu, err := url.Parse(c.ClientURL)
	if err != nil {
		return nil, fmt.Errorf("etcd client URL %q: %w", c.ClientURL, err)
	}
	pu, err := url.Parse(c.PeerURL)
	if err != nil {
		return nil, fmt.Errorf("etcd peer URL %q: %w", c.PeerURL, err)
	}
	cfg.ListenClientUrls = []url.URL{*cu}
	cfg.AdvertiseClientUrls = []url.URL{*cu}
	cfg.ListenPeerUrls = []url.URL{*pu}
	cfg.AdvertisePeerUrls = []url.URL{*pu}
	cfg.InitialCluster = c.Name + "=" + pu.String()
	cfg.ListenMetricsUrls = nil
	if c.TLS != nil {
		cfg.ClientTLSInfo.CertFile = c.TLS.Cert
		cfg.ClientTLSInfo.KeyFile = c.TLS.Key
		cfg.ClientTLSInfo.TrustedCAFile = c.TLS.CA
		cfg.ClientTLSInfo.ClientCertAuth = true
	} else if cu.Scheme == "https" {
		return nil, fmt.Errorf("etcd client URL %s needs TLS certificates", c.ClientURL)
	}
	e, err := embed.StartEtcd(cfg)
	if err != nil {
		return nil, fmt.Errorf("start embedded etcd: %w", err)
	}
	select {
	case <-e.Server.ReadyNotify():
		return &Embedded{e: e}, nil
	case err := <-e.Err():
		e.Close()
		return nil, fmt.Errorf("embedded etcd: %w", err)
	case <-time.After(60 * time.Second):
		e.Close()
		return nil, fmt.Errorf("embedded etcd did not become ready in 60 s")
	case <-ctx.Done():
		e.Close()
		return nil, ctx.Err()
	}
}

// Close stops the embedded etcd.
func (e *Embedded) Close() { e.e.Close() }

// Store is a connection to the cluster store.
type Store struct {
	c *clientv3.Client
}

// Connect opens a client to the etcd endpoints; tlsConf may be nil for plain http.
func Connect(ctx context.Context, endpoints []string, tlsConf *tls.Config) (*Store, error) {
	c, err := clientv3.New(clientv3.Config{
		Endpoints:   endpoints,
		DialTimeout: 5 * time.Second,
		TLS:         tlsConf,
		Context:     ctx,
	})
	if err != nil {
		return nil, fmt.Errorf("connect to etcd %v: %w", endpoints, err)
	}
	sctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	if _, err := c.Get(sctx, "/duplex/ping"); err != nil {
		c.Close()
		return nil, fmt.Errorf("etcd %v does not answer: %w", endpoints, err)
	}
	return &Store{c: c}, nil
}

// Close closes the connection.
func (s *Store) Close() error { return s.c.Close() }

// Client exposes the etcd client for packages that keep their own keys.
func (s *Store) Client() *clientv3.Client { return s.c }
