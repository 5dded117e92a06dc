package cluster

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"sort"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
)

// ErrNoHost means no live host of that name is registered.
var ErrNoHost = errors.New("no such host in the cluster")

const hostsPrefix = "/duplex/hosts/"

// Host is what a duplexd publishes about itself.
type Host struct {
	Name     string    `json:"name"`
	Agent    string    `json:"agent"` // host:port of its mutual-TLS agent API
	Version  string    `json:"version"`
	CRIU     string    `json:"criu"`
	Features []string  `json:"features,omitempty"` // CRIU features it has ("uffd", "mem_dirty_track", ...)
	Started  time.Time `json:"started"`
	// Filled in when read: when the registration was last renewed is not stored;
	// a host is listed only while its lease lives.
}

// Registration keeps a host registered until Close or until its process dies.
type Registration struct {
	cancel context.CancelFunc
	done   chan struct{}
	lease  clientv3.LeaseID
	s      *Store
}

// Register publishes h under a lease of ttl and keeps the lease alive.
func (s *Store) Register(ctx context.Context, h Host, ttl time.Duration) (*Registration, error) {
	if h.Name == "" {
		return nil, errors.New("register: host has no name")
	}
	b, err := json.Marshal(h)
	if err != nil {
		return nil, err
	}
	lease, err := s.c.Grant(ctx, int64(ttl.Seconds()))
	if err != nil {
		return nil, fmt.Errorf("register %s: lease: %w", h.Name, err)
	}
	if _, err := s.c.Put(ctx, hostsPrefix+h.Name, string(b), clientv3.WithLease(lease.ID)); err != nil {
		return nil, fmt.Errorf("register %s: %w", h.Name, err)
	}
	kctx, cancel := context.WithCancel(context.Background())
	ka, err := s.c.KeepAlive(kctx, lease.ID)
	if err != nil {
		cancel()
		return nil, fmt.Errorf("register %s: keep lease alive: %w", h.Name, err)
	}
	r := &Registration{cancel: cancel, done: make(chan struct{}), lease: lease.ID, s: s}
	go func() {
		defer close(r.done)
		for range ka { // drained until the context ends or the lease is lost
		}
	}()
	return r, nil
}

// Lease is the registration's lease: keys written under it vanish with the host.
func (r *Registration) Lease() clientv3.LeaseID { return r.lease }

// Close withdraws the registration at once.
func (r *Registration) Close() error {
	r.cancel()
	<-r.done
	// Best effort: if the store is gone the lease simply expires.
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	_, err := r.s.c.Revoke(ctx, r.lease)
	return err
}

// Hosts lists the live hosts, sorted by name.
func (s *Store) Hosts(ctx context.Context) ([]Host, error) {
	resp, err := s.c.Get(ctx, hostsPrefix, clientv3.WithPrefix())
	if err != nil {
		return nil, fmt.Errorf("list hosts: %w", err)
	}
	out := make([]Host, 0, len(resp.Kvs))
	for _, kv := range resp.Kvs {
		var h Host
		if err := json.Unmarshal(kv.Value, &h); err == nil {
			out = append(out, h)
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out, nil
}

// Host returns one live host.
func (s *Store) Host(ctx context.Context, name string) (Host, error) {
	resp, err := s.c.Get(ctx, hostsPrefix+name)
	if err != nil {
		return Host{}, fmt.Errorf("look up host %s: %w", name, err)
	}
	if len(resp.Kvs) == 0 {
		return Host{}, fmt.Errorf("%w: %s", ErrNoHost, name)
	}
	var h Host
	if err := json.Unmarshal(resp.Kvs[0].Value, &h); err != nil {
		return Host{}, fmt.Errorf("host %s: %w", name, err)
	}
	return h, nil
}
