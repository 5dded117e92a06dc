package daemon

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/duplex-ha/duplex/cluster"
	"github.com/duplex-ha/duplex/cluster/controller"
	"github.com/duplex-ha/duplex/internal/workload"
	"github.com/duplex-ha/duplex/migrate"
	"github.com/duplex-ha/duplex/rejuv"
)

// ErrHostRestart is returned by Run when a rejuvenation ends with the simulated
// restart (reboot: exit): the supervisor is expected to clear the host and start
// duplexd again. cmd/duplexd exits with RestartExitCode.
var ErrHostRestart = errors.New("rejuvenation: host restart requested")

// RestartExitCode is duplexd's exit status for ErrHostRestart.
const RestartExitCode = 75

// Paths of the host part of the agent API (the controller calls them).
const (
	agentWorkloadsPath  = "/agent/v1/host/workloads"
	agentMigratePath    = "/agent/v1/host/migrate"
	agentRejuvenatePath = "/agent/v1/host/rejuvenate"
)

// agentMigrateRequest asks a source host to move one of its workloads.
type agentMigrateRequest struct {
	Workload string `json:"workload"`
	To       string `json:"to"`
	Strategy string `json:"strategy"`
}

type agentRejuvenateRequest struct {
	Cycle string `json:"cycle"`
}

type agentError struct {
	Error string `json:"error"`
}

// agentRoutes serves the migration protocol plus the host calls of the controller.
func (d *Daemon) agentRoutes(target http.Handler) http.Handler {
	mux := http.NewServeMux()
	mux.Handle("/", target)
	mux.HandleFunc("GET "+agentWorkloadsPath, func(w http.ResponseWriter, r *http.Request) {
		var out []controller.Workload
		for _, rec := range d.wl.List() {
			out = append(out, controller.Workload{Name: rec.Name, State: string(rec.State), Pinned: rec.Pinned, Memory: uint64(rec.MemoryLimit)})
		}
		writeJSON(w, http.StatusOK, out)
	})
	mux.HandleFunc("POST "+agentMigratePath, d.agentMigrate)
	mux.HandleFunc("POST "+agentRejuvenatePath, d.agentRejuvenate)
	return mux
}

func (d *Daemon) agentMigrate(w http.ResponseWriter, r *http.Request) {
	var req agentMigrateRequest
	if err := decode(r, &req); err != nil {
		writeJSON(w, http.StatusBadRequest, agentError{err.Error()})
		return
	}
	strategy, err := migrate.ParseStrategy(req.Strategy)
	if err != nil {
		writeJSON(w, http.StatusBadRequest, agentError{err.Error()})
		return
	}
	dst, _, err := d.cluster.destination(r.Context(), req.To)
	if err != nil {
		writeJSON(w, http.StatusConflict, agentError{err.Error()})
		return
	}
	defer dst.Close()
	// The migration runs to its end (commit or rollback) even if the controller
	// that asked goes away; the next leader finds the outcome in the workload's state.
	res, err := d.cluster.source.Migrate(context.WithoutCancel(r.Context()), dst, migrate.Request{Workload: req.Workload, To: req.To, Strategy: strategy}, nil)
	if err != nil {
		writeJSON(w, http.StatusConflict, agentError{err.Error()})
		return
	}
	writeJSON(w, http.StatusOK, res)
}

// agentRejuvenate starts the rejuvenation ladder, once the store confirms that the
// controller removed this host from the available list for that cycle: a valid
// certificate alone cannot reboot a host.
func (d *Daemon) agentRejuvenate(w http.ResponseWriter, r *http.Request) {
	var req agentRejuvenateRequest
	if err := decode(r, &req); err != nil {
		writeJSON(w, http.StatusBadRequest, agentError{err.Error()})
		return
	}
	m, ok, err := d.cluster.store.Member(r.Context(), d.cfg.Name)
	if err != nil || !ok || m.Role != cluster.RoleRejuvenating || m.Cycle != req.Cycle {
		writeJSON(w, http.StatusConflict, agentError{fmt.Sprintf("refused: the store does not hold %s rejuvenating for cycle %s", d.cfg.Name, req.Cycle)})
		return
	}
	d.rj.mu.Lock()
	already := d.rj.cycle == req.Cycle
	if !already {
		d.rj.cycle = req.Cycle
	}
	d.rj.mu.Unlock()
	if !already {
		go d.rejuvenate(req.Cycle)
	}
	writeJSON(w, http.StatusAccepted, map[string]string{"cycle": req.Cycle})
}

// rejuvenation is this host's own part of a cycle.
type rejuvenation struct {
	mu      sync.Mutex
	cycle   string
	steps   []rejuv.StepResult
	restart chan struct{} // closed when the ladder asks for a (simulated) restart
	once    sync.Once
}

// rejuvenate stops the host's pinned workloads and runs the ladder. A ladder that
// ends without restarting the host asks to rejoin once the figures are normal.
func (d *Daemon) rejuvenate(cycle string) {
	log := d.log.WithFields(logrus.Fields{"cycle": cycle, "part": "rejuvenation"})
	log.Warn("rejuvenating this host")
	ctx := context.Background()
	for _, rec := range d.wl.List() {
		if rec.State == workload.Running || rec.State == workload.Frozen {
			if !rec.Pinned {
				log.WithField("workload", rec.Name).Error("a workload that is not pinned is still here; stopping it with the host")
			}
			if _, err := d.wl.Stop(ctx, rec.Name, 10*time.Second); err != nil {
				log.WithError(err).WithField("workload", rec.Name).Warn("stopping workload")
			}
		}
		if err := d.wl.Remove(rec.Name); err != nil {
			log.WithError(err).WithField("workload", rec.Name).Debug("removing workload record")
		}
	}
	ladder, err := d.cfg.Rejuvenate.Ladder(d.rejuvOptions())
	if err != nil {
		log.WithError(err).Error("rejuvenation ladder")
		return
	}
	res, err := rejuv.Run(ctx, ladder, func(s rejuv.StepResult) {
		d.rj.mu.Lock()
		d.rj.steps = append(d.rj.steps, s)
		d.rj.mu.Unlock()
		log.WithFields(logrus.Fields{"action": s.Action, "took": s.Took.Round(time.Millisecond), "detail": s.Detail, "error": s.Error}).Warn("rejuvenation step")
	})
	if err != nil {
		log.WithError(err).Error("rejuvenation failed; the host stays out of the available list")
		return
	}
	select {
	case <-d.rj.restart:
		return // the daemon is going down for the host's restart
	default:
	}
	log.WithField("steps", len(res)).Warn("rejuvenated without a restart")
	d.mon.reset()
	go d.awaitRejoin(cycle)
}

func (d *Daemon) rejuvOptions() rejuv.Options {
	return rejuv.Options{Exit: func() error {
		d.rj.once.Do(func() { close(d.rj.restart) })
		return nil
	}}
}

// awaitRejoin asks to rejoin as a spare once the host's verdict has been stable
// for as many samples in a row as the detector needs to judge a trend (at least
// three): the claims' "after it returns healthy".
func (d *Daemon) awaitRejoin(cycle string) {
	log := d.log.WithFields(logrus.Fields{"cycle": cycle, "part": "rejuvenation"})
	log.Info("back from rejuvenation; checking the host's figures")
	var last time.Time
	stable := 0
	for {
		select {
		case <-d.done:
			return
		case <-time.After(d.mon.interval / 2):
		}
		st := d.mon.snapshot()
		if st.Sample.Time.IsZero() || !st.Sample.Time.After(last) {
			continue
		}
		last = st.Sample.Time
		if st.Verdict.Unstable {
			stable = 0
			continue
		}
		if stable++; stable < max(3, d.mon.cfg.MinSamples) {
			continue
		}
		c := d.cluster
		detail := fmt.Sprintf("stable for %d samples; MemAvailable %s of %s, load %.2f", stable,
			human(st.Sample.MemAvailable), human(st.Sample.MemTotal), st.Sample.Load1)
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		err := c.store.AskRejoin(ctx, cluster.Rejoin{Host: d.cfg.Name, Cycle: cycle, Time: time.Now(), BootID: bootID(), Detail: detail}, c.reg.Lease())
		cancel()
		if err != nil {
			log.WithError(err).Warn("asking to rejoin; retrying")
			continue
		}
		log.WithField("figures", detail).Warn("asked to rejoin as a spare")
		return
	}
}

func bootID() string {
	b, _ := os.ReadFile("/proc/sys/kernel/random/boot_id")
	return strings.TrimSpace(string(b))
}

func human(n uint64) string {
	return fmt.Sprintf("%.1f GiB", float64(n)/(1<<30))
}

// agentClient is the controller's way to the hosts: their agents over mutual TLS.
type agentClient struct {
	http *http.Client
}

func newAgentClient(conf *tls.Config) *agentClient {
	return &agentClient{http: &http.Client{Transport: &http.Transport{TLSClientConfig: conf, IdleConnTimeout: time.Minute, ForceAttemptHTTP2: true}}}
}

func (a *agentClient) call(ctx context.Context, method string, h cluster.Host, path string, in, out any) error {
	var body io.Reader
	if in != nil {
		b, err := json.Marshal(in)
		if err != nil {
			return err
		}
		body = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, "https://"+h.Agent+path, body)
	if err != nil {
		return err
	}
	req.Header.Set("Content-Type", "application/json")
	resp, err := a.http.Do(req)
	if err != nil {
		return fmt.Errorf("agent of %s: %w", h.Name, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, 4<<20))
	if err != nil {
		return fmt.Errorf("agent of %s: %w", h.Name, err)
	}
	if resp.StatusCode >= 300 {
		var e agentError
		if json.Unmarshal(b, &e) == nil && e.Error != "" {
			return fmt.Errorf("%s: %s", h.Name, e.Error)
		}
		return fmt.Errorf("agent of %s: %s: %s", h.Name, resp.Status, strings.TrimSpace(string(b)))
	}
	if out != nil {
		if err := json.Unmarshal(b, out); err != nil {
			return fmt.Errorf("agent of %s: answer: %w", h.Name, err)
		}
	}
	return nil
}

func (a *agentClient) Workloads(ctx context.Context, h cluster.Host) ([]controller.Workload, error) {
	var out []controller.Workload
	err := a.call(ctx, http.MethodGet, h, agentWorkloadsPath, nil, &out)
	return out, err
}

func (a *agentClient) Migrate(ctx context.Context, from cluster.Host, w, to, strategy string) (controller.Moved, error) {
	var res migrate.Result
	if err := a.call(ctx, http.MethodPost, from, agentMigratePath, agentMigrateRequest{Workload: w, To: to, Strategy: strategy}, &res); err != nil {
		return controller.Moved{}, err
	}
	return controller.Moved{Strategy: string(res.Strategy), Frozen: ms(res.FrozenMS), Downtime: ms(res.DowntimeMS), Bytes: res.PageBytes + res.ImageBytes}, nil
}

func (a *agentClient) Rejuvenate(ctx context.Context, h cluster.Host, cycle string) error {
	return a.call(ctx, http.MethodPost, h, agentRejuvenatePath, agentRejuvenateRequest{Cycle: cycle}, nil)
}

func ms(f float64) time.Duration { return time.Duration(f * float64(time.Millisecond)) }
