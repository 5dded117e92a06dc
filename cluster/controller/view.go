package controller

import (
	"context"
	"encoding/json"
	"fmt"
	"maps"
	"strings"
	"sync"

	"go.etcd.io/etcd/api/v3/mvccpb"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/duplex-ha/duplex/cluster"
)

// view is the leader's copy of the cluster state, kept current by one watch, so
// that its decisions cost no reads that grow with the cluster.
type view struct {
	mu      sync.Mutex
	snap    Snapshot
	revs    map[string]int64 // mod revision of every key it holds
	changed chan struct{}    // closed and replaced on every change
}

// load reads the state once and returns the revision to watch from.
func loadView(ctx context.Context, c *clientv3.Client) (*view, int64, error) {
	v := &view{revs: map[string]int64{}, changed: make(chan struct{})}
	v.snap = Snapshot{
		Mode:  cluster.ActiveStandby,
		Hosts: map[string]cluster.Host{}, Members: map[string]cluster.Member{}, Available: map[string]bool{},
		Reports: map[string]cluster.Report{}, Cycles: map[string]cluster.Cycle{}, Requests: map[string]cluster.Request{},
		Rejoins: map[string]cluster.Rejoin{},
	}
	resp, err := c.Get(ctx, cluster.Prefix, clientv3.WithPrefix())
	if err != nil {
		return nil, 0, fmt.Errorf("read the cluster state: %w", err)
	}
	for _, kv := range resp.Kvs {
		v.apply(string(kv.Key), kv.Value, kv.ModRevision, false)
	}
	return v, resp.Header.Revision, nil
}

// watch applies changes until ctx ends or the watch fails.
func (v *view) watch(ctx context.Context, c *clientv3.Client, rev int64) error {
	wc := c.Watch(clientv3.WithRequireLeader(ctx), cluster.Prefix, clientv3.WithPrefix(), clientv3.WithRev(rev+1))
	for resp := range wc {
		if err := resp.Err(); err != nil {
			return fmt.Errorf("watch the cluster state: %w", err)
		}
		v.mu.Lock()
		for _, ev := range resp.Events {
			v.apply(string(ev.Kv.Key), ev.Kv.Value, ev.Kv.ModRevision, ev.Type == mvccpb.DELETE)
		}
		close(v.changed)
		v.changed = make(chan struct{})
		v.mu.Unlock()
	}
	if ctx.Err() != nil {
		return ctx.Err()
	}
	return fmt.Errorf("watch the cluster state: closed")
}

// apply folds one key into the snapshot; the caller holds mu (or owns v).
func (v *view) apply(key string, val []byte, rev int64, deleted bool) {
	if strings.HasPrefix(key, cluster.HistoryPrefix) {
		return
	}
	if deleted {
		delete(v.revs, key)
	} else {
		v.revs[key] = rev
	}
	s := &v.snap
	name := func(prefix string) string { return strings.TrimPrefix(key, prefix) }
	switch {
	case key == cluster.ModeKey:
		s.Mode = cluster.ActiveStandby
		if m, err := cluster.ParseMode(string(val)); err == nil && !deleted {
			s.Mode = m
		}
	case strings.HasPrefix(key, cluster.HostsPrefix):
		put(s.Hosts, name(cluster.HostsPrefix), val, deleted)
	case strings.HasPrefix(key, cluster.MembersPrefix):
		put(s.Members, name(cluster.MembersPrefix), val, deleted)
	case strings.HasPrefix(key, cluster.AvailablePrefix):
		if deleted {
			delete(s.Available, name(cluster.AvailablePrefix))
		} else {
			s.Available[name(cluster.AvailablePrefix)] = true
		}
	case strings.HasPrefix(key, cluster.ReportsPrefix):
		put(s.Reports, name(cluster.ReportsPrefix), val, deleted)
	case strings.HasPrefix(key, cluster.CyclesPrefix):
		put(s.Cycles, name(cluster.CyclesPrefix), val, deleted)
	case strings.HasPrefix(key, cluster.RequestsPrefix):
		put(s.Requests, name(cluster.RequestsPrefix), val, deleted)
	case strings.HasPrefix(key, cluster.RejoinPrefix):
		put(s.Rejoins, name(cluster.RejoinPrefix), val, deleted)
	}
}

func put[T any](m map[string]T, k string, val []byte, deleted bool) {
	if deleted {
		delete(m, k)
		return
	}
	var x T
	if json.Unmarshal(val, &x) == nil {
		m[k] = x
	}
}

// snapshot copies the current state (maps are copied; values are not shared
// mutable state) with the revisions of the given keys.
func (v *view) snapshot() (Snapshot, <-chan struct{}) {
	v.mu.Lock()
	defer v.mu.Unlock()
	s := v.snap
	s.Hosts = maps.Clone(s.Hosts)
	s.Members = maps.Clone(s.Members)
	s.Available = maps.Clone(s.Available)
	s.Reports = maps.Clone(s.Reports)
	s.Cycles = maps.Clone(s.Cycles)
	s.Requests = maps.Clone(s.Requests)
	s.Rejoins = maps.Clone(s.Rejoins)
	return s, v.changed
}

// host returns one live host's registration without copying the view.
func (v *view) host(name string) (cluster.Host, bool) {
	v.mu.Lock()
	defer v.mu.Unlock()
	h, ok := v.snap.Hosts[name]
	return h, ok
}

// rejoin returns a host's pending rejoin request.
func (v *view) rejoin(name string) (cluster.Rejoin, bool) {
	v.mu.Lock()
	defer v.mu.Unlock()
	r, ok := v.snap.Rejoins[name]
	return r, ok
}

// next returns a channel closed at the next change.
func (v *view) next() <-chan struct{} {
	v.mu.Lock()
	defer v.mu.Unlock()
	return v.changed
}

// rev is the mod revision of key as the view knows it (0: absent).
func (v *view) rev(key string) int64 {
	v.mu.Lock()
	defer v.mu.Unlock()
	return v.revs[key]
}

// LoadSnapshot reads the cluster state once, for plan and status.
func LoadSnapshot(ctx context.Context, s *cluster.Store) (Snapshot, error) {
	v, _, err := loadView(ctx, s.Client())
	if err != nil {
		return Snapshot{}, err
	}
	return v.snap, nil
}

// Leader names the elected controller ("" if none).
func Leader(ctx context.Context, s *cluster.Store) (string, error) {
	resp, err := s.Client().Get(ctx, cluster.ElectionPrefix+"/", clientv3.WithPrefix(),
		clientv3.WithSort(clientv3.SortByCreateRevision, clientv3.SortAscend), clientv3.WithLimit(1))
	if err != nil {
		return "", fmt.Errorf("read the controller's election: %w", err)
	}
	if len(resp.Kvs) == 0 {
		return "", nil
	}
	return string(resp.Kvs[0].Value), nil
}

// PublishedPolicy reads the policy the leader published ("ok" false if none).
func PublishedPolicy(ctx context.Context, s *cluster.Store) (Policy, bool, error) {
	var p Policy
	resp, err := s.Client().Get(ctx, cluster.PolicyKey)
	if err != nil || len(resp.Kvs) == 0 {
		return p, false, err
	}
	if err := json.Unmarshal(resp.Kvs[0].Value, &p); err != nil {
		return p, false, fmt.Errorf("leader's policy: %w", err)
	}
	return p, true, nil
}
