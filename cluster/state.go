package cluster

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
)

// The cluster's keys. Hosts, reports, rejoin requests and locks live under leases
// (they vanish with their writer); members, the available-server list, cycles,
// requests, the mode and the history are durable.
const (
	Prefix          = "/duplex/"
	MembersPrefix   = "/duplex/members/"   // role of every host that ever joined
	AvailablePrefix = "/duplex/available/" // the available-server list
	ReportsPrefix   = "/duplex/reports/"   // monitor reports (verdict, capacity), leased
	CyclesPrefix    = "/duplex/cycles/"    // one running cycle per host
	HistoryPrefix   = "/duplex/history/"   // every step of every cycle
	RequestsPrefix  = "/duplex/requests/"  // manual drain/rejuvenate requests
	RejoinPrefix    = "/duplex/rejoin/"    // a rejuvenated host asking to rejoin, leased
	LocksPrefix     = "/duplex/locks/"     // host locks held by the controller, leased
	// RejuvenatingPrefix lists the hosts rejuvenating now: the budget reads only these.
	RejuvenatingPrefix = "/duplex/rejuvenating/"
	ElectionPrefix     = "/duplex/controller/election"
	PolicyKey          = "/duplex/controller/policy" // the leader's policy, for plan
	ModeKey            = "/duplex/config/mode"
	HostsPrefix        = hostsPrefix
	defaultHistoryMx   = 10000
)

// Role is a host's part in the cluster.
type Role string

// Roles, as the claims name them.
const (
	RolePrimary      Role = "primary"      // serves workloads
	RoleSpare        Role = "spare"        // serves nothing until a cycle uses it
	RoleDuplexing    Role = "duplexing"    // its workloads are being moved off
	RoleRejuvenating Role = "rejuvenating" // out of the available list, being rejuvenated
)

// ParseRole checks a role name given by a user.
func ParseRole(s string) (Role, error) {
	switch r := Role(s); r {
	case RolePrimary, RoleSpare:
		return r, nil
	}
	return "", fmt.Errorf("role %q: a host joins as primary or spare", s)
}

// Mode is the operation mode of the cluster.
type Mode string

// Modes of claim 3.
const (
	// ActiveStandby: spares serve nothing and receive the workloads of an unstable host.
	ActiveStandby Mode = "active-standby"
	// ActiveActive: every host serves; an unstable host's workloads go to the primary
	// whose spare capacity fits them best.
	ActiveActive Mode = "active-active"
)

// ParseMode checks a mode name.
func ParseMode(s string) (Mode, error) {
	switch m := Mode(s); m {
	case ActiveStandby, ActiveActive:
		return m, nil
	}
	return "", fmt.Errorf("mode %q: use %s or %s", s, ActiveStandby, ActiveActive)
}

// Member is a host's durable record: its role outlives its registration, so that
// a host coming back from a reboot knows it was being rejuvenated.
type Member struct {
	Name  string    `json:"name"`
	Role  Role      `json:"role"`
	Since time.Time `json:"since"`
	Cycle string    `json:"cycle,omitempty"` // the cycle that set the role
	// Rejuvenated is when the host last rejoined after a rejuvenation; its running
	// time counts from the later of this and its boot.
	Rejuvenated time.Time `json:"rejuvenated,omitempty"`
}

// Report is what a host's monitor publishes for the controller: its verdict and
// its capacity. It lives under the host's registration lease.
type Report struct {
	Host          string    `json:"host"`
	Time          time.Time `json:"time"`
	Unstable      bool      `json:"unstable"`
	UnstableSince time.Time `json:"unstable_since,omitempty"`
	Reasons       []string  `json:"reasons,omitempty"`
	// Memory, bytes. Capacity is what workloads may use on this host (configured,
	// else MemTotal); Used is what its workloads use now.
	MemTotal     uint64  `json:"mem_total"`
	MemAvailable uint64  `json:"mem_available"`
	Capacity     uint64  `json:"capacity"`
	Used         uint64  `json:"used"`
	CPUs         int     `json:"cpus"`
	Load1        float64 `json:"load1"`
	Workloads    int     `json:"workloads"`
	// Booted is when the host's kernel started; BootID changes on every boot.
	Booted time.Time `json:"booted"`
	BootID string    `json:"boot_id,omitempty"`
}

// Free is the memory a new workload may take on this host.
func (r Report) Free() uint64 {
	if r.Capacity <= r.Used {
		return 0
	}
	free := r.Capacity - r.Used
	if r.MemAvailable < free {
		free = r.MemAvailable
	}
	return free
}

// Phase is where a cycle stands.
type Phase string

// The steps of a cycle, in order (claims 1, 4-6).
const (
	PhaseSelecting    Phase = "selecting"    // looking for a target
	PhaseDuplexing    Phase = "duplexing"    // moving every workload to the target
	PhaseDeciding     Phase = "deciding"     // rejuvenate now, wait, or skip
	PhaseRejuvenating Phase = "rejuvenating" // out of the list, rejuvenation signalled
)

// Cycle is one host's way through detect → duplex → rejuvenate → rejoin.
type Cycle struct {
	ID      string    `json:"id"`
	Host    string    `json:"host"`
	Kind    string    `json:"kind"` // "unstable", "drain" (stops after duplexing), "rejuvenate" (by hand)
	Reason  string    `json:"reason"`
	Phase   Phase     `json:"phase"`
	Target  string    `json:"target,omitempty"`
	Started time.Time `json:"started"`
	Updated time.Time `json:"updated"`
	// PhaseSince is when the cycle entered its phase.
	PhaseSince time.Time `json:"phase_since"`
	// Moved lists the workloads moved so far; Failures counts failed attempts.
	Moved    []string       `json:"moved,omitempty"`
	Failures map[string]int `json:"failures,omitempty"`
	// Blocked says why the cycle waits (no target, budget, load, window...); it is
	// the alert operators see in status, hosts and plan.
	Blocked      string    `json:"blocked,omitempty"`
	BlockedSince time.Time `json:"blocked_since,omitempty"`
	// Signalled is set once the host acknowledged the rejuvenation signal.
	Signalled bool `json:"signalled,omitempty"`
	// By names the controller that last advanced the cycle.
	By string `json:"by,omitempty"`
}

// Kinds of cycle.
const (
	KindUnstable   = "unstable"
	KindDrain      = "drain"
	KindRejuvenate = "rejuvenate"
)

// Event is one line of the history.
type Event struct {
	Time     time.Time `json:"time"`
	Cycle    string    `json:"cycle"`
	Host     string    `json:"host"`
	Step     string    `json:"step"`
	Target   string    `json:"target,omitempty"`
	Workload string    `json:"workload,omitempty"`
	Detail   string    `json:"detail,omitempty"`
	By       string    `json:"by,omitempty"`   // the controller's host
	Term     string    `json:"term,omitempty"` // its term of leadership (session lease)
}

// Request is an operator's request for a cycle on a host.
type Request struct {
	Host string    `json:"host"`
	Kind string    `json:"kind"` // KindDrain or KindRejuvenate
	Time time.Time `json:"time"`
	By   string    `json:"by,omitempty"`
}

// Rejoin is a rejuvenated host asking to rejoin the available list.
type Rejoin struct {
	Host   string    `json:"host"`
	Cycle  string    `json:"cycle"`
	Time   time.Time `json:"time"`
	BootID string    `json:"boot_id,omitempty"`
	Detail string    `json:"detail,omitempty"` // the figures it checked
}

// Lock is a host lock: who holds it and why. It lives under its holder's lease.
type Lock struct {
	Host   string    `json:"host"`
	Holder string    `json:"holder"`
	Cycle  string    `json:"cycle,omitempty"`
	Why    string    `json:"why"`
	Since  time.Time `json:"since"`
}

// ErrLocked means a host is locked by a running cycle.
var ErrLocked = errors.New("host is locked")

// HistoryKey orders the history by time, then host.
func HistoryKey(t time.Time, host string, seq int) string {
	return fmt.Sprintf("%s%020d-%s-%02d", HistoryPrefix, t.UnixNano(), host, seq)
}

// JoinAs writes h's member record and puts it on the available list unless it
// already has a record (a host that was rejuvenating keeps its role). It returns the
// member record as it stands.
func (s *Store) JoinAs(ctx context.Context, host string, role Role) (Member, error) {
	m := Member{Name: host, Role: role, Since: time.Now()}
	b, _ := json.Marshal(m)
	key := MembersPrefix + host
	resp, err := s.c.Txn(ctx).
		If(clientv3.Compare(clientv3.CreateRevision(key), "=", 0)).
		Then(clientv3.OpPut(key, string(b)), clientv3.OpPut(AvailablePrefix+host, string(role))).
		Else(clientv3.OpGet(key)).Commit()
	if err != nil {
		return Member{}, fmt.Errorf("join %s: %w", host, err)
	}
	if resp.Succeeded {
		return m, nil
	}
	kvs := resp.Responses[0].GetResponseRange().Kvs
	if len(kvs) == 0 {
		return m, nil
	}
	var cur Member
	if err := json.Unmarshal(kvs[0].Value, &cur); err != nil {
		return Member{}, fmt.Errorf("member %s: %w", host, err)
	}
	return cur, nil
}

// Member reads one host's member record.
func (s *Store) Member(ctx context.Context, host string) (Member, bool, error) {
	var m Member
	ok, err := s.getJSON(ctx, MembersPrefix+host, &m)
	return m, ok, err
}

// Members lists every member record, by name.
func (s *Store) Members(ctx context.Context) (map[string]Member, error) {
	out := map[string]Member{}
	err := s.list(ctx, MembersPrefix, func(k string, v []byte) {
		var m Member
		if json.Unmarshal(v, &m) == nil {
			out[m.Name] = m
		}
	})
	return out, err
}

// Available lists the available-server list.
func (s *Store) Available(ctx context.Context) (map[string]bool, error) {
	out := map[string]bool{}
	err := s.list(ctx, AvailablePrefix, func(k string, _ []byte) { out[strings.TrimPrefix(k, AvailablePrefix)] = true })
	return out, err
}

// Reports lists the live hosts' latest reports.
func (s *Store) Reports(ctx context.Context) (map[string]Report, error) {
	out := map[string]Report{}
	err := s.list(ctx, ReportsPrefix, func(k string, v []byte) {
		var r Report
		if json.Unmarshal(v, &r) == nil {
			out[r.Host] = r
		}
	})
	return out, err
}

// PublishReport writes a host's report under its lease.
func (s *Store) PublishReport(ctx context.Context, r Report, lease clientv3.LeaseID) error {
	b, err := json.Marshal(r)
	if err != nil {
		return err
	}
	_, err = s.c.Put(ctx, ReportsPrefix+r.Host, string(b), clientv3.WithLease(lease))
	return err
}

// Cycles lists the running cycles, by host.
func (s *Store) Cycles(ctx context.Context) (map[string]Cycle, error) {
	out := map[string]Cycle{}
	err := s.list(ctx, CyclesPrefix, func(k string, v []byte) {
		var c Cycle
		if json.Unmarshal(v, &c) == nil {
			out[c.Host] = c
		}
	})
	return out, err
}

// Locks lists the held host locks, by host.
func (s *Store) Locks(ctx context.Context) (map[string]Lock, error) {
	out := map[string]Lock{}
	err := s.list(ctx, LocksPrefix, func(k string, v []byte) {
		var l Lock
		if json.Unmarshal(v, &l) == nil {
			out[l.Host] = l
		}
	})
	return out, err
}

// Locked returns ErrLocked (with the holder and why) if host is locked.
func (s *Store) Locked(ctx context.Context, host string) error {
	var l Lock
	ok, err := s.getJSON(ctx, LocksPrefix+host, &l)
	if err != nil || !ok {
		return err
	}
	return fmt.Errorf("%w: %s is held by %s (%s, cycle %s)", ErrLocked, host, l.Holder, l.Why, l.Cycle)
}

// Mode reads the operation mode (active-standby when never set).
func (s *Store) Mode(ctx context.Context) (Mode, error) {
	resp, err := s.c.Get(ctx, ModeKey)
	if err != nil {
		return "", fmt.Errorf("read mode: %w", err)
	}
	if len(resp.Kvs) == 0 {
		return ActiveStandby, nil
	}
	return ParseMode(string(resp.Kvs[0].Value))
}

// SetMode sets the operation mode and records it in the history.
func (s *Store) SetMode(ctx context.Context, m Mode, by string) error {
	if _, err := ParseMode(string(m)); err != nil {
		return err
	}
	now := time.Now()
	ev, _ := json.Marshal(Event{Time: now, Host: "-", Step: "mode", Detail: "operation mode set to " + string(m), By: by})
	_, err := s.c.Txn(ctx).Then(clientv3.OpPut(ModeKey, string(m)), clientv3.OpPut(HistoryKey(now, "-", 0), string(ev))).Commit()
	if err != nil {
		return fmt.Errorf("set mode: %w", err)
	}
	return nil
}

// Ask files an operator's request for a cycle on host. It is refused if one is
// pending or a cycle already runs there.
func (s *Store) Ask(ctx context.Context, r Request) error {
	if r.Kind != KindDrain && r.Kind != KindRejuvenate {
		return fmt.Errorf("request %q: use %s or %s", r.Kind, KindDrain, KindRejuvenate)
	}
	if _, ok, err := s.Member(ctx, r.Host); err != nil {
		return err
	} else if !ok {
		return fmt.Errorf("%w: %s", ErrNoHost, r.Host)
	}
	b, _ := json.Marshal(r)
	rk, ck := RequestsPrefix+r.Host, CyclesPrefix+r.Host
	resp, err := s.c.Txn(ctx).
		If(clientv3.Compare(clientv3.CreateRevision(rk), "=", 0), clientv3.Compare(clientv3.CreateRevision(ck), "=", 0)).
		Then(clientv3.OpPut(rk, string(b))).Commit()
	if err != nil {
		return fmt.Errorf("request %s of %s: %w", r.Kind, r.Host, err)
	}
	if !resp.Succeeded {
		return fmt.Errorf("%w: %s already has a cycle running or a request pending (see 'duplexctl hosts')", ErrLocked, r.Host)
	}
	return nil
}

// Requests lists pending operator requests, by host.
func (s *Store) Requests(ctx context.Context) (map[string]Request, error) {
	out := map[string]Request{}
	err := s.list(ctx, RequestsPrefix, func(k string, v []byte) {
		var r Request
		if json.Unmarshal(v, &r) == nil {
			out[r.Host] = r
		}
	})
	return out, err
}

// AskRejoin publishes a rejuvenated host's request to rejoin, under its lease.
func (s *Store) AskRejoin(ctx context.Context, r Rejoin, lease clientv3.LeaseID) error {
	b, _ := json.Marshal(r)
	if _, err := s.c.Put(ctx, RejoinPrefix+r.Host, string(b), clientv3.WithLease(lease)); err != nil {
		return fmt.Errorf("ask to rejoin: %w", err)
	}
	return nil
}

// History returns the last limit events (all if limit <= 0), oldest first, of one
// host ("" for all).
func (s *Store) History(ctx context.Context, host string, limit int) ([]Event, error) {
	opts := []clientv3.OpOption{clientv3.WithPrefix(), clientv3.WithSort(clientv3.SortByKey, clientv3.SortDescend)}
	if host == "" && limit > 0 {
		opts = append(opts, clientv3.WithLimit(int64(limit)))
	}
	resp, err := s.c.Get(ctx, HistoryPrefix, opts...)
	if err != nil {
		return nil, fmt.Errorf("read history: %w", err)
	}
	var out []Event
	for _, kv := range resp.Kvs {
		var e Event
		if json.Unmarshal(kv.Value, &e) != nil || (host != "" && e.Host != host) {
			continue
		}
		out = append(out, e)
		if limit > 0 && len(out) == limit {
			break
		}
	}
	slices.Reverse(out) // keys sort by time, then host, then order within a transaction
	return out, nil
}

// TrimHistory deletes the oldest events beyond keep.
func (s *Store) TrimHistory(ctx context.Context, keep int) error {
	if keep <= 0 {
		keep = defaultHistoryMx
	}
	resp, err := s.c.Get(ctx, HistoryPrefix, clientv3.WithPrefix(), clientv3.WithKeysOnly(), clientv3.WithSort(clientv3.SortByKey, clientv3.SortDescend))
	if err != nil {
		return err
	}
	if len(resp.Kvs) <= keep {
		return nil
	}
	oldestKept := string(resp.Kvs[keep-1].Key)
	_, err = s.c.Delete(ctx, HistoryPrefix, clientv3.WithRange(oldestKept))
	return err
}

func (s *Store) getJSON(ctx context.Context, key string, v any) (bool, error) {
	resp, err := s.c.Get(ctx, key)
	if err != nil {
		return false, fmt.Errorf("read %s: %w", key, err)
	}
	if len(resp.Kvs) == 0 {
		return false, nil
	}
	if err := json.Unmarshal(resp.Kvs[0].Value, v); err != nil {
		return false, fmt.Errorf("decode %s: %w", key, err)
	}
	return true, nil
}

func (s *Store) list(ctx context.Context, prefix string, f func(key string, value []byte)) error {
	resp, err := s.c.Get(ctx, prefix, clientv3.WithPrefix())
	if err != nil {
		return fmt.Errorf("list %s: %w", prefix, err)
	}
	for _, kv := range resp.Kvs {
		f(string(kv.Key), kv.Value)
	}
	return nil
}
