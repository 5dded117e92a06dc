package migrate

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strings"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/duplex-ha/duplex/internal/pki"
)

// The agent protocol: JSON over HTTPS with mutual TLS. Only peers whose certificate
// the cluster CA signed get past the TLS handshake (the server's tls.Config requires
// and verifies client certificates); the handler refuses any request that arrives
// without a verified peer all the same.

const agentPrefix = "/agent/v1"

// error codes on the wire
const (
	codePreflight   = "preflight"
	codeStrategy    = "strategy"
	codeBadImages   = "bad_images"
	codeRestore     = "restore_failed"
	codeNoMigration = "no_migration"
	codeForbidden   = "forbidden"
	codeInternal    = "internal"
)

type wireError struct {
	Message string `json:"error"`
	Code    string `json:"code"`
}

// Handler serves a Target to other hosts' agents.
func Handler(t *Target) http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET "+agentPrefix+"/ping", func(w http.ResponseWriter, r *http.Request) {
		reply(w, t, struct{}{}, nil)
	})
	mux.HandleFunc("GET "+agentPrefix+"/capabilities", func(w http.ResponseWriter, r *http.Request) {
		c, err := t.Capabilities(r.Context())
		reply(w, t, c, err)
	})
	mux.HandleFunc("POST "+agentPrefix+"/migrations", func(w http.ResponseWriter, r *http.Request) {
		var req PrepareRequest
		if err := json.NewDecoder(io.LimitReader(r.Body, 16<<20)).Decode(&req); err != nil {
			reply(w, t, nil, fmt.Errorf("%w: request: %w", ErrPreflight, err))
			return
		}
		resp, err := t.Prepare(r.Context(), req)
		reply(w, t, resp, err)
	})
	mux.HandleFunc("POST "+agentPrefix+"/migrations/{id}/pages", func(w http.ResponseWriter, r *http.Request) {
		servePages(w, r, t)
	})
	mux.HandleFunc("PUT "+agentPrefix+"/migrations/{id}/restore", func(w http.ResponseWriter, r *http.Request) {
		// The body is the image stream. Once it ended whole, the restore runs to its
		// end even if the caller goes away; Abort undoes it.
		resp, release, err := t.restoreImages(context.WithoutCancel(r.Context()), r.PathValue("id"), r.Body)
		defer release() // once the answer left (see restoreImages)
		reply(w, t, resp, err)
		if f, ok := w.(http.Flusher); ok {
			f.Flush()
		}
	})
	mux.HandleFunc("POST "+agentPrefix+"/migrations/{id}/replay", func(w http.ResponseWriter, r *http.Request) {
		pkts, err := decodePackets(io.LimitReader(r.Body, maxReplayBytes+4*maxReplayPackets+4))
		if err != nil {
			reply(w, t, nil, fmt.Errorf("replay for %s: %w", r.PathValue("id"), err))
			return
		}
		n, err := t.Replay(r.Context(), r.PathValue("id"), pkts)
		reply(w, t, struct {
			Replayed int `json:"replayed"`
		}{n}, err)
	})
	mux.HandleFunc("POST "+agentPrefix+"/migrations/{id}/commit", func(w http.ResponseWriter, r *http.Request) {
		reply(w, t, struct{}{}, t.Commit(r.Context(), r.PathValue("id")))
	})
	mux.HandleFunc("POST "+agentPrefix+"/migrations/{id}/abort", func(w http.ResponseWriter, r *http.Request) {
		reply(w, t, struct{}{}, t.Abort(context.WithoutCancel(r.Context()), r.PathValue("id")))
	})
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		peer := pki.PeerName(r.TLS)
		if peer == "" {
			writeWire(w, http.StatusForbidden, wireError{Message: "a cluster certificate is required", Code: codeForbidden})
			return
		}
		t.log().WithFields(logrus.Fields{"peer": peer, "path": r.URL.Path}).Debug("agent request")
		mux.ServeHTTP(w, r)
	})
}

func reply(w http.ResponseWriter, t *Target, v any, err error) {
	if err == nil {
		writeWire(w, http.StatusOK, v)
		return
	}
	code, status := codeInternal, http.StatusInternalServerError
	switch {
	case errors.Is(err, ErrStrategyUnavailable):
		code, status = codeStrategy, http.StatusConflict
	case errors.Is(err, ErrPreflight):
		code, status = codePreflight, http.StatusConflict
	case errors.Is(err, ErrBadImages):
		code, status = codeBadImages, http.StatusBadRequest
	case errors.Is(err, ErrRestoreFailed):
		code, status = codeRestore, http.StatusInternalServerError
	case errors.Is(err, ErrNoMigration):
		code, status = codeNoMigration, http.StatusNotFound
	}
	t.log().WithError(err).WithField("code", code).Warn("agent request failed")
	writeWire(w, status, wireError{Message: err.Error(), Code: code})
}

func writeWire(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(v)
}

// pagesProtocol is the Upgrade token of the page channel.
const pagesProtocol = "duplex-pages/1"

// servePages turns the request's connection into the migration's page channel: the
// HTTP/1.1 connection is upgraded and from then on carries the page-server protocol
// in both directions, inside the agents' TLS session.
func servePages(w http.ResponseWriter, r *http.Request, t *Target) {
	if !strings.EqualFold(r.Header.Get("Upgrade"), pagesProtocol) {
		writeWire(w, http.StatusBadRequest, wireError{Message: "the page channel needs Upgrade: " + pagesProtocol, Code: codeInternal})
		return
	}
	channel, err := t.Pages(r.Context(), r.PathValue("id"))
	if err != nil {
		reply(w, t, nil, err)
		return
	}
	hj, ok := w.(http.Hijacker)
	if !ok {
		channel.Close()
		writeWire(w, http.StatusInternalServerError, wireError{Message: "connection cannot be upgraded", Code: codeInternal})
		return
	}
	conn, brw, err := hj.Hijack()
	if err != nil {
		channel.Close()
		return
	}
	_, _ = brw.WriteString("HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: " + pagesProtocol + "\r\n\r\n")
	if err := brw.Flush(); err != nil {
		conn.Close()
		channel.Close()
		return
	}
	done := make(chan struct{})
	go func() { // source -> page server
		// Bytes the client sent early sit in brw; the rest is read straight from the
		// connection: through brw's 4 KiB buffer every TLS record would cost four
		// reads and four writes.
		if n := brw.Reader.Buffered(); n > 0 {
			b, _ := brw.Reader.Peek(n)
			if _, err := channel.Write(b); err != nil {
				conn.Close()
			}
		}
		_, _ = io.CopyBuffer(channel, struct{ io.Reader }{conn}, make([]byte, copyBuffer))
		if cw, ok := channel.(interface{ CloseWrite() error }); ok {
			_ = cw.CloseWrite()
		}
		close(done)
	}()
	_, _ = io.CopyBuffer(conn, channel, make([]byte, 64<<10)) // page server -> source, until it exits
	conn.Close()
	<-done
	channel.Close()
}

// Client is a Destination on another host, reached over mutual TLS.
type Client struct {
	base string
	http *http.Client
}

// NewClient returns a Destination for the agent at addr (host:port).
func NewClient(addr string, tlsConf *tls.Config) *Client {
	// HTTP/1.1 only: the page channel is an upgraded connection.
	tr := &http.Transport{TLSClientConfig: tlsConf, IdleConnTimeout: time.Minute,
		TLSNextProto: map[string]func(string, *tls.Conn) http.RoundTripper{}}
	return &Client{base: "https://" + addr + agentPrefix, http: &http.Client{Transport: tr}}
}

// Pages implements Destination: an upgraded connection to the agent.
func (c *Client) Pages(ctx context.Context, id string) (io.ReadWriteCloser, error) {
	req, err := http.NewRequestWithContext(context.WithoutCancel(ctx), http.MethodPost, c.base+"/migrations/"+url.PathEscape(id)+"/pages", nil)
	if err != nil {
		return nil, err
	}
	req.Header.Set("Connection", "Upgrade")
	req.Header.Set("Upgrade", pagesProtocol)
	resp, err := c.http.Do(req)
	if err != nil {
		return nil, err
	}
	if resp.StatusCode != http.StatusSwitchingProtocols {
		defer resp.Body.Close()
		var we wireError
		if json.NewDecoder(resp.Body).Decode(&we) == nil && we.Message != "" {
			return nil, errors.New(we.Message)
		}
		return nil, fmt.Errorf("page channel: %s", resp.Status)
	}
	rw, ok := resp.Body.(io.ReadWriteCloser)
	if !ok {
		resp.Body.Close()
		return nil, errors.New("page channel: the connection was not upgraded")
	}
	// The upgrade took the pooled connection: the next request (the images and
	// restore, opened just before the freeze) would pay for a new TLS handshake, 4-5 ms. Make that
	// connection now, while the workload still runs.
	_ = c.call(ctx, http.MethodGet, "/ping", nil, nil)
	return rw, nil
}

// Close releases the client's connections.
func (c *Client) Close() { c.http.CloseIdleConnections() }

func (c *Client) call(ctx context.Context, method, path string, body io.Reader, out any) error {
	req, err := http.NewRequestWithContext(ctx, method, c.base+path, body)
	if err != nil {
		return err
	}
	resp, err := c.http.Do(req)
	if err != nil {
		return err
	}
	defer func() {
		// Read to the end (JSON decoding stops before the final newline): only a
		// fully read response lets its connection serve the next request instead
		// of a new TLS handshake, 4-5 ms.
		_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 1<<20))
		resp.Body.Close()
	}()
	if resp.StatusCode == http.StatusOK {
		if out == nil {
			return nil
		}
		return json.NewDecoder(resp.Body).Decode(out)
	}
	var we wireError
	if err := json.NewDecoder(resp.Body).Decode(&we); err != nil {
		return fmt.Errorf("agent %s: %s", path, resp.Status)
	}
	var kind error
	switch we.Code {
	case codePreflight:
		kind = ErrPreflight
	case codeStrategy:
		kind = ErrStrategyUnavailable
	case codeBadImages:
		kind = ErrBadImages
	case codeRestore:
		kind = ErrRestoreFailed
	case codeNoMigration:
		kind = ErrNoMigration
	default:
		return errors.New(we.Message)
	}
	return remoteError{kind: kind, msg: we.Message}
}

// remoteError is an error the other host reported; it matches its kind.
type remoteError struct {
	kind error
	msg  string
}

func (e remoteError) Error() string { return e.msg }
func (e remoteError) Unwrap() error { return e.kind }

func jsonBody(v any) io.Reader {
	b, _ := json.Marshal(v)
	return bytes.NewReader(b)
}

// Capabilities implements Destination.
func (c *Client) Capabilities(ctx context.Context) (Capabilities, error) {
	var caps Capabilities
	return caps, c.call(ctx, http.MethodGet, "/capabilities", nil, &caps)
}

// Prepare implements Destination.
func (c *Client) Prepare(ctx context.Context, req PrepareRequest) (PrepareResponse, error) {
	var resp PrepareResponse
	return resp, c.call(ctx, http.MethodPost, "/migrations", jsonBody(req), &resp)
}

// RestoreImages implements Destination.
func (c *Client) RestoreImages(ctx context.Context, id string, r io.Reader) (RestoreResponse, error) {
	var resp RestoreResponse
	return resp, c.call(ctx, http.MethodPut, "/migrations/"+url.PathEscape(id)+"/restore", r, &resp)
}

// Commit implements Destination.
func (c *Client) Commit(ctx context.Context, id string) error {
	return c.call(ctx, http.MethodPost, "/migrations/"+url.PathEscape(id)+"/commit", nil, nil)
}

// Abort implements Destination.
func (c *Client) Abort(ctx context.Context, id string) error {
	return c.call(ctx, http.MethodPost, "/migrations/"+url.PathEscape(id)+"/abort", nil, nil)
}
