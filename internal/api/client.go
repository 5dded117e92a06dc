package api

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"syscall"

	"github.com/duplex-ha/duplex/cluster"
	"github.com/duplex-ha/duplex/internal/workload"
	"github.com/duplex-ha/duplex/migrate"
)

// ErrDaemonUnreachable means no duplexd answers on the socket.
var ErrDaemonUnreachable = errors.New("duplexd is not reachable")

// SocketPath returns the socket to use: the flag value if set, else $DUPLEX_SOCKET,
// else DefaultSocket.
func SocketPath(flag string) string {
	if flag != "" {
		return flag
	}
	if s := os.Getenv(EnvSocket); s != "" {
		return s
	}
	return DefaultSocket
}

// Client talks to a local duplexd.
type Client struct {
	socket string
	http   *http.Client
}

// NewClient returns a client for the daemon listening on socket.
func NewClient(socket string) *Client {
	tr := &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", socket)
		},
	}
	return &Client{socket: socket, http: &http.Client{Transport: tr}}
}

func (c *Client) do(ctx context.Context, method, path string, in, out any) error {
	resp, err := c.send(ctx, method, path, in)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if out == nil {
		_, _ = io.Copy(io.Discard, resp.Body)
		return nil
	}
	if err := json.NewDecoder(resp.Body).Decode(out); err != nil {
		return fmt.Errorf("decode %s reply: %w", path, err)
	}
	return nil
}

// send performs a request and returns a response with a 2xx status, or the
// daemon's error.
func (c *Client) send(ctx context.Context, method, path string, in any) (*http.Response, error) {
	var body io.Reader
	if in != nil {
		b, err := json.Marshal(in)
		if err != nil {
			return nil, err
		}
		body = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, "http://duplexd"+path, body)
	if err != nil {
		return nil, err
	}
	if in != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := c.http.Do(req)
	if err != nil {
		return nil, c.dialError(err)
	}
	if resp.StatusCode/100 == 2 {
		return resp, nil
	}
	defer resp.Body.Close()
	var e Error
	if err := json.NewDecoder(resp.Body).Decode(&e); err != nil || e.Message == "" {
		return nil, fmt.Errorf("duplexd: %s %s: %s", method, path, resp.Status)
	}
	return nil, &e
}

func (c *Client) dialError(err error) error {
	switch {
	case errors.Is(err, syscall.EACCES) || errors.Is(err, syscall.EPERM):
		return fmt.Errorf("permission denied on %s: duplexd's socket is root-only; run duplexctl as root", c.socket)
	case errors.Is(err, syscall.ENOENT) || errors.Is(err, syscall.ECONNREFUSED):
		return fmt.Errorf("%w at %s (is duplexd running? start it with 'duplexd' or 'systemctl start duplexd'): %w", ErrDaemonUnreachable, c.socket, err)
	}
	return fmt.Errorf("talk to duplexd at %s: %w", c.socket, err)
}

// IsCode reports whether err is a daemon error with the given code.
func IsCode(err error, code string) bool {
	var e *Error
	return errors.As(err, &e) && e.Code == code
}

// Info returns the daemon's description.
func (c *Client) Info(ctx context.Context) (Info, error) {
	var i Info
	return i, c.do(ctx, http.MethodGet, "/v1/info", nil, &i)
}

// Run starts a workload.
func (c *Client) Run(ctx context.Context, spec workload.Spec) (workload.Record, error) {
	var r workload.Record
	return r, c.do(ctx, http.MethodPost, "/v1/workloads", spec, &r)
}

// List returns every workload.
func (c *Client) List(ctx context.Context) ([]workload.Record, error) {
	var r []workload.Record
	return r, c.do(ctx, http.MethodGet, "/v1/workloads", nil, &r)
}

// Get returns one workload.
func (c *Client) Get(ctx context.Context, name string) (workload.Record, error) {
	var r workload.Record
	return r, c.do(ctx, http.MethodGet, "/v1/workloads/"+url.PathEscape(name), nil, &r)
}

// Stop stops a workload.
func (c *Client) Stop(ctx context.Context, name string, req StopRequest) (workload.Record, error) {
	var r workload.Record
	return r, c.do(ctx, http.MethodPost, "/v1/workloads/"+url.PathEscape(name)+"/stop", req, &r)
}

// Remove forgets a workload that no longer runs.
func (c *Client) Remove(ctx context.Context, name string) error {
	return c.do(ctx, http.MethodDelete, "/v1/workloads/"+url.PathEscape(name), nil, nil)
}

// Checkpoint dumps a workload.
func (c *Client) Checkpoint(ctx context.Context, name string, req CheckpointRequest) (CheckpointResponse, error) {
	var r CheckpointResponse
	return r, c.do(ctx, http.MethodPost, "/v1/workloads/"+url.PathEscape(name)+"/checkpoint", req, &r)
}

// Resume continues a workload a checkpoint left frozen.
func (c *Client) Resume(ctx context.Context, name string) (workload.Record, error) {
	var r workload.Record
	return r, c.do(ctx, http.MethodPost, "/v1/workloads/"+url.PathEscape(name)+"/resume", nil, &r)
}

// Restore brings a checkpoint back.
func (c *Client) Restore(ctx context.Context, req RestoreRequest) (RestoreResponse, error) {
	var r RestoreResponse
	return r, c.do(ctx, http.MethodPost, "/v1/restore", req, &r)
}

// Status returns the host's latest sample and verdict.
func (c *Client) Status(ctx context.Context) (Status, error) {
	var s Status
	return s, c.do(ctx, http.MethodGet, "/v1/status", nil, &s)
}

// Hosts lists the cluster's live hosts.
func (c *Client) Hosts(ctx context.Context) ([]cluster.Host, error) {
	var h []cluster.Host
	return h, c.do(ctx, http.MethodGet, "/v1/hosts", nil, &h)
}

// Migrate moves a workload to another host, calling progress for each step, and
// returns the result.
func (c *Client) Migrate(ctx context.Context, name string, req MigrateRequest, progress func(migrate.Progress)) (*migrate.Result, error) {
	resp, err := c.send(ctx, http.MethodPost, "/v1/workloads/"+url.PathEscape(name)+"/migrate", req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	dec := json.NewDecoder(resp.Body)
	for {
		var ev MigrateEvent
		if err := dec.Decode(&ev); err != nil {
			return nil, fmt.Errorf("migration of %s: progress stream ended early (%w); check 'duplexctl ps -a' on both hosts", name, err)
		}
		switch {
		case ev.Error != "":
			return nil, errors.New(ev.Error)
		case ev.Result != nil:
			return ev.Result, nil
		case ev.Progress != nil && progress != nil:
			progress(*ev.Progress)
		}
	}
}

// MigrateAllResult is the outcome of moving every workload of a host.
type MigrateAllResult struct {
	Results []*migrate.Result `json:"results"`
	Errors  map[string]string `json:"errors,omitempty"` // workload -> why it stayed
}

// MigrateAll moves every running workload of the daemon's host to req.To.
func (c *Client) MigrateAll(ctx context.Context, req MigrateAllRequest, progress func(migrate.Progress)) (*MigrateAllResult, error) {
	resp, err := c.send(ctx, http.MethodPost, "/v1/migrate-all", req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	out := &MigrateAllResult{Errors: map[string]string{}}
	dec := json.NewDecoder(resp.Body)
	for {
		var ev MigrateEvent
		if err := dec.Decode(&ev); err != nil {
			return out, fmt.Errorf("migrating all workloads: progress stream ended early (%w); check 'duplexctl ps -a' on both hosts", err)
		}
		switch {
		case ev.Done:
			if ev.Error != "" {
				return out, errors.New(ev.Error)
			}
			return out, nil
		case ev.Error != "":
			out.Errors[ev.Workload] = ev.Error
		case ev.Result != nil:
			out.Results = append(out.Results, ev.Result)
		case ev.Progress != nil && progress != nil:
			progress(*ev.Progress)
		}
	}
}

// Logs streams a workload's output ("stdout", "stderr" or "both") into w; with
// follow it keeps streaming until ctx ends or the workload stops.
func (c *Client) Logs(ctx context.Context, name, stream string, tail int, follow bool, w io.Writer) error {
	q := url.Values{"stream": {stream}}
	if tail >= 0 {
		q.Set("tail", fmt.Sprint(tail))
	}
	if follow {
		q.Set("follow", "true")
	}
	resp, err := c.send(ctx, http.MethodGet, "/v1/workloads/"+url.PathEscape(name)+"/logs?"+q.Encode(), nil)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	_, err = io.Copy(w, resp.Body)
	if ctx.Err() != nil {
		return nil
	}
	return err
}

// Cluster returns every host with its role, verdict, capacity and cycle.
func (c *Client) Cluster(ctx context.Context) (ClusterView, error) {
	var v ClusterView
	return v, c.do(ctx, http.MethodGet, "/v1/cluster", nil, &v)
}

// Mode returns the cluster's operation mode.
func (c *Client) Mode(ctx context.Context) (cluster.Mode, error) {
	var r ModeRequest
	err := c.do(ctx, http.MethodGet, "/v1/mode", nil, &r)
	return cluster.Mode(r.Mode), err
}

// SetMode sets the cluster's operation mode.
func (c *Client) SetMode(ctx context.Context, m string) error {
	return c.do(ctx, http.MethodPut, "/v1/mode", ModeRequest{Mode: m}, nil)
}

// Ask files a drain or rejuvenate request for host with the controller.
func (c *Client) Ask(ctx context.Context, host, kind string) error {
	return c.do(ctx, http.MethodPost, "/v1/hosts/"+url.PathEscape(host)+"/"+kind, nil, nil)
}

// Plan returns the controller's dry run.
func (c *Client) Plan(ctx context.Context) (PlanResponse, error) {
	var p PlanResponse
	return p, c.do(ctx, http.MethodGet, "/v1/plan", nil, &p)
}

// History returns the last limit events of host ("" for all).
func (c *Client) History(ctx context.Context, host string, limit int) ([]cluster.Event, error) {
	var evs []cluster.Event
	q := url.Values{}
	if host != "" {
		q.Set("host", host)
	}
	q.Set("limit", fmt.Sprint(limit))
	return evs, c.do(ctx, http.MethodGet, "/v1/history?"+q.Encode(), nil, &evs)
}
