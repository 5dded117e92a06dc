package migrate_test

import (
	"context"
	"crypto/tls"
	"errors"
	"net"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/duplex-ha/duplex/checkpoint"
	"github.com/duplex-ha/duplex/internal/pki"
	"github.com/duplex-ha/duplex/internal/workload"
	"github.com/duplex-ha/duplex/migrate"
)

// certs makes a cluster CA with certificates for hosts a and b, and an outsider
// signed by another CA.
func certs(t *testing.T) (a, b, outsider pki.Files) {
	dir := t.TempDir()
	for _, ca := range []string{"ca", "other-ca"} {
		if err := pki.InitCA(filepath.Join(dir, ca), ca, time.Hour); err != nil {
			t.Fatal(err)
		}
	}
	for _, h := range []struct{ ca, name string }{{"ca", "a"}, {"ca", "b"}, {"other-ca", "outsider"}} {
		if err := pki.Issue(filepath.Join(dir, h.ca), h.name, []string{"127.0.0.1"}, filepath.Join(dir, h.name), time.Hour); err != nil {
			t.Fatal(err)
		}
	}
	return pki.HostFiles(filepath.Join(dir, "a")), pki.HostFiles(filepath.Join(dir, "b")), pki.HostFiles(filepath.Join(dir, "outsider"))
}

func tlsConf(t *testing.T, f pki.Files) *tls.Config {
	c, err := f.Config()
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func criuTLS(f pki.Files) *checkpoint.TLS {
	return &checkpoint.TLS{CACert: f.CA, Cert: f.Cert, Key: f.Key, NoCNVerify: true}
}

// serve runs the pair's Target as an agent over mutual TLS on loopback.
func serve(t *testing.T, p *pair, f pki.Files) string {
	srv := httptest.NewUnstartedServer(migrate.Handler(p.dst))
	srv.TLS = tlsConf(t, f)
	srv.StartTLS()
	t.Cleanup(srv.Close)
	return srv.Listener.Addr().String()
}

type servedKey struct{}

func TestMigrateOverMutualTLS(t *testing.T) {
	p := newPair(t)
	fa, fb, _ := certs(t)
	// The image stream and restore request, opened just before the freeze, must not
	// wait for a TLS handshake: its connection has served a request before.
	h := migrate.Handler(p.dst)
	var imagesOnFreshConn atomic.Bool
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		served := r.Context().Value(servedKey{}).(*atomic.Int32)
		if strings.HasSuffix(r.URL.Path, "/restore") && served.Load() == 0 {
			imagesOnFreshConn.Store(true)
		}
		served.Add(1)
		h.ServeHTTP(w, r)
	}))
	srv.Config.ConnContext = func(ctx context.Context, _ net.Conn) context.Context {
		return context.WithValue(ctx, servedKey{}, new(atomic.Int32))
	}
	srv.TLS = tlsConf(t, fb)
	srv.StartTLS()
	t.Cleanup(srv.Close)
	addr := srv.Listener.Addr().String()
	defer func() {
		if imagesOnFreshConn.Load() {
			t.Error("the images went over a new connection: a TLS handshake inside the downtime")
		}
	}()
	rec := p.run(t, "counter", "counter")
	growing(t, rec.Stdout, "counting on a")

	c := migrate.NewClient(addr, tlsConf(t, fa))
	defer c.Close()
	res, err := p.src.Migrate(context.Background(), c, migrate.Request{Workload: "counter", To: "b"}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if b, _ := p.b.Get("counter"); b.State != workload.Running || b.Pid != res.Pid {
		t.Fatalf("on b: %+v", b)
	}
	growing(t, rec.Stdout, "counting on b")
	// Errors keep their kind across the wire.
	if _, err := c.RestoreImages(context.Background(), "no-such-migration", strings.NewReader("")); !errors.Is(err, migrate.ErrNoMigration) {
		t.Errorf("restore of an unknown migration: %v", err)
	}
}

func TestAgentRefusesPeersWithoutClusterCertificate(t *testing.T) {
	p := newPair(t)
	_, fb, outsider := certs(t)
	addr := serve(t, p, fb)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()

	// Signed by another CA: the handshake fails, nothing is prepared or restored.
	bad := migrate.NewClient(addr, tlsConf(t, outsider))
	defer bad.Close()
	if _, err := bad.Prepare(ctx, migrate.PrepareRequest{ID: "x", Workload: workload.Record{Spec: workload.Spec{Name: "x"}}}); err == nil {
		t.Error("an outsider prepared a migration")
	}
	if _, err := bad.RestoreImages(ctx, "x", strings.NewReader("")); err == nil || errors.Is(err, migrate.ErrNoMigration) {
		t.Errorf("an outsider reached the restore handler: %v", err)
	}
	// No certificate at all.
	anon := tlsConf(t, fb)
	anon.Certificates = nil
	if _, err := migrate.NewClient(addr, anon).Capabilities(ctx); err == nil {
		t.Error("a peer without a certificate was served")
	}
	// Plain HTTP is not spoken.
	resp, err := http.Get("http://" + addr + "/agent/v1/capabilities")
	if err == nil {
		resp.Body.Close()
		if resp.StatusCode == http.StatusOK {
			t.Error("plain HTTP served the agent API")
		}
	}
}

// The page server of a TLS migration refuses a peer without a cluster certificate:
// memory pages cannot be read or written by anyone on the network.
func TestPageServerRequiresClusterCertificate(t *testing.T) {
	eng := newPair(t).dst.Engine
	_, fb, outsider := certs(t)
	ps, err := eng.StartPageServer(context.Background(), checkpoint.PageServerOptions{ImagesDir: t.TempDir(), Address: "127.0.0.1", TLS: criuTLS(fb)})
	if err != nil {
		t.Fatal(err)
	}
	defer ps.Stop()
	conf := tlsConf(t, outsider)
	conf.InsecureSkipVerify = true // even a client that trusts anything must be refused
	conn, err := tls.DialWithDialer(&net.Dialer{Timeout: 3 * time.Second}, "tcp", net.JoinHostPort("127.0.0.1", itoa(ps.Port)), conf)
	if err == nil {
		_ = conn.SetDeadline(time.Now().Add(3 * time.Second))
		_, err = conn.Write([]byte(strings.Repeat("x", 64)))
		if err == nil {
			_, err = conn.Read(make([]byte, 1))
		}
		conn.Close()
	}
	if err == nil {
		t.Fatal("the page server talked to a peer with a foreign certificate")
	}
	t.Logf("refused as expected: %v", err)
}

func itoa(n int) string { return strconv.Itoa(n) }

// Successive requests share one connection: each new one would cost a TLS
// handshake, several milliseconds of the downtime when it falls after the freeze.
func TestAgentReusesConnections(t *testing.T) {
	p := newPair(t)
	fa, fb, _ := certs(t)
	srv := httptest.NewUnstartedServer(migrate.Handler(p.dst))
	srv.TLS = tlsConf(t, fb)
	var conns atomic.Int32
	srv.Config.ConnState = func(_ net.Conn, s http.ConnState) {
		if s == http.StateNew {
			conns.Add(1)
		}
	}
	srv.StartTLS()
	t.Cleanup(srv.Close)
	c := migrate.NewClient(srv.Listener.Addr().String(), tlsConf(t, fa))
	defer c.Close()
	ctx := context.Background()
	for range 3 {
		if _, err := c.Capabilities(ctx); err != nil {
			t.Fatal(err)
		}
		if err := c.Commit(ctx, "no-such-migration"); !errors.Is(err, migrate.ErrNoMigration) {
			t.Fatalf("commit of an unknown migration: %v", err)
		}
	}
	if n := conns.Load(); n != 1 {
		t.Errorf("6 requests opened %d connections, want 1", n)
	}
}
