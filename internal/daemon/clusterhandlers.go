package daemon

import (
	"errors"
	"fmt"
	"net/http"
	"sort"
	"strconv"
	"time"

	"github.com/duplex-ha/duplex/cluster"
	"github.com/duplex-ha/duplex/cluster/controller"
	"github.com/duplex-ha/duplex/internal/api"
	"github.com/duplex-ha/duplex/internal/workload"
)

// clusterView gathers every host's registration, role, report and cycle.
func (d *Daemon) clusterView(w http.ResponseWriter, r *http.Request) {
	if d.cluster == nil {
		d.fail(w, r, errNoCluster)
		return
	}
	snap, err := controller.LoadSnapshot(r.Context(), d.cluster.store)
	if err != nil {
		d.fail(w, r, err)
		return
	}
	leader, _ := controller.Leader(r.Context(), d.cluster.store)
	out := api.ClusterView{Mode: snap.Mode, Leader: leader}
	names := map[string]bool{}
	for n := range snap.Members {
		names[n] = true
	}
	for n := range snap.Hosts {
		names[n] = true
	}
	for _, n := range sortedNames(names) {
		hv := api.HostView{Name: n, Role: snap.Members[n].Role, Available: snap.Available[n], Leader: n == leader}
		if h, ok := snap.Hosts[n]; ok {
			hv.Alive, hv.Host = true, &h
		}
		if rep, ok := snap.Reports[n]; ok {
			hv.Report = &rep
		}
		if c, ok := snap.Cycles[n]; ok {
			hv.Cycle = &c
		}
		out.Hosts = append(out.Hosts, hv)
	}
	writeJSON(w, http.StatusOK, out)
}

func (d *Daemon) getMode(w http.ResponseWriter, r *http.Request) {
	if d.cluster == nil {
		d.fail(w, r, errNoCluster)
		return
	}
	m, err := d.cluster.store.Mode(r.Context())
	if err != nil {
		d.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, api.ModeRequest{Mode: string(m)})
}

func (d *Daemon) setMode(w http.ResponseWriter, r *http.Request) {
	var req api.ModeRequest
	if err := decode(r, &req); err != nil {
		d.fail(w, r, err)
		return
	}
	if d.cluster == nil {
		d.fail(w, r, errNoCluster)
		return
	}
	m, err := cluster.ParseMode(req.Mode)
	if err != nil {
		d.fail(w, r, fmt.Errorf("%w: %w", workload.ErrInvalid, err))
		return
	}
	if err := d.cluster.store.SetMode(r.Context(), m, "duplexctl on "+d.cfg.Name); err != nil {
		d.fail(w, r, err)
		return
	}
	d.log.WithField("mode", m).Warn("operation mode set")
	writeJSON(w, http.StatusOK, api.ModeRequest{Mode: string(m)})
}

// ask files an operator's drain or rejuvenate request; the controller runs it.
func (d *Daemon) ask(kind string) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		if d.cluster == nil {
			d.fail(w, r, errNoCluster)
			return
		}
		host := r.PathValue("name")
		err := d.cluster.store.Ask(r.Context(), cluster.Request{Host: host, Kind: kind, Time: time.Now(), By: "duplexctl on " + d.cfg.Name})
		if err != nil {
			d.fail(w, r, err)
			return
		}
		d.log.WithFields(map[string]any{"host": host, "kind": kind}).Warn("cycle requested by hand")
		w.WriteHeader(http.StatusAccepted)
	}
}

// plan answers the controller's dry run with the leader's policy (this host's
// own if no leader published one).
func (d *Daemon) plan(w http.ResponseWriter, r *http.Request) {
	if d.cluster == nil {
		d.fail(w, r, errNoCluster)
		return
	}
	snap, err := controller.LoadSnapshot(r.Context(), d.cluster.store)
	if err != nil {
		d.fail(w, r, err)
		return
	}
	snap.Now = time.Now()
	p, ok, err := controller.PublishedPolicy(r.Context(), d.cluster.store)
	if err != nil || !ok {
		p = d.cfg.Controller
	}
	p.Defaults()
	leader, _ := controller.Leader(r.Context(), d.cluster.store)
	writeJSON(w, http.StatusOK, api.PlanResponse{Mode: snap.Mode, Leader: leader, Policy: p, Steps: controller.Plan(&snap, p)})
}

func (d *Daemon) history(w http.ResponseWriter, r *http.Request) {
	if d.cluster == nil {
		d.fail(w, r, errNoCluster)
		return
	}
	limit := 50
	if s := r.URL.Query().Get("limit"); s != "" {
		n, err := strconv.Atoi(s)
		if err != nil || n < 0 {
			d.fail(w, r, fmt.Errorf("%w: limit %q is not a non-negative number", workload.ErrInvalid, s))
			return
		}
		limit = n
	}
	evs, err := d.cluster.store.History(r.Context(), r.URL.Query().Get("host"), limit)
	if err != nil {
		d.fail(w, r, err)
		return
	}
	if evs == nil {
		evs = []cluster.Event{}
	}
	writeJSON(w, http.StatusOK, evs)
}

// checkLocks refuses a manual migration off or onto a host in a controller cycle.
func (d *Daemon) checkLocks(r *http.Request, hosts ...string) error {
	for _, h := range hosts {
		if err := d.cluster.store.Locked(r.Context(), h); err != nil {
			return err
		}
	}
	return nil
}

func isLocked(err error) bool { return errors.Is(err, cluster.ErrLocked) }

func sortedNames(m map[string]bool) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}

// status is the monitor's snapshot plus this host's place in the cluster.
func (d *Daemon) status(w http.ResponseWriter, r *http.Request) {
	st := d.mon.snapshot()
	if d.cluster != nil {
		if snap, err := controller.LoadSnapshot(r.Context(), d.cluster.store); err == nil {
			sc := &api.StatusCluster{Role: snap.Members[d.cfg.Name].Role, Available: snap.Available[d.cfg.Name], Mode: snap.Mode}
			sc.Leader, _ = controller.Leader(r.Context(), d.cluster.store)
			if c, ok := snap.Cycles[d.cfg.Name]; ok {
				sc.Cycle = &c
			}
			for _, h := range sortedKeysOf(snap.Cycles) {
				if c := snap.Cycles[h]; c.Blocked != "" {
					sc.Alerts = append(sc.Alerts, h+": "+c.Blocked)
				}
			}
			st.Cluster = sc
		}
	}
	writeJSON(w, http.StatusOK, st)
}

func sortedKeysOf[V any](m map[string]V) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}
