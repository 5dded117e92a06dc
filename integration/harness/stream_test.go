package harness_test

import (
	"context"
	"errors"
	"io"
	"net"
	"net/netip"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/duplex-ha/duplex/integration/harness"
	"github.com/duplex-ha/duplex/internal/testutil"
)

// self is a Node for the test's own network namespace: these tests stay on loopback.
var self = &harness.Node{Name: "self", NSPath: "/proc/self/ns/net"}

// loopbackServer serves each connection with handle on 127.0.0.1 until the test ends.
func loopbackServer(t *testing.T, handle func(net.Conn)) netip.AddrPort {
	t.Helper()
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	t.Cleanup(func() { ln.Close(); <-done })
	go func() {
		defer close(done)
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				handle(c)
			}()
		}
	}()
	return ln.Addr().(*net.TCPAddr).AddrPort()
}

func startStream(t *testing.T, addr netip.AddrPort) *harness.Stream {
	t.Helper()
	s, err := harness.StartStream(context.Background(), self, addr, 1<<20, 1024)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Stop() })
	return s
}

func TestStreamFailures(t *testing.T) {
	testutil.RequiresRoot(t) // entering a namespace, even one's own, needs CAP_SYS_ADMIN

	t.Run("faithful echo", func(t *testing.T) {
		s := startStream(t, loopbackServer(t, func(c net.Conn) { _, _ = io.Copy(c, c) }))
		testutil.Eventually(t, 3*time.Second, "20 KiB verified", func() bool { return s.Stats().BytesVerified >= 20<<10 })
		if st := s.Stop(); st.Err != nil || st.BytesSent != st.BytesVerified {
			t.Errorf("stats %+v", st)
		}
	})

	t.Run("corrupted echo", func(t *testing.T) {
		s := startStream(t, loopbackServer(t, func(c net.Conn) {
			buf := make([]byte, 4096)
			var off int
			for {
				n, err := c.Read(buf)
				for i := range buf[:n] {
					if off+i == 3000 {
						buf[i] ^= 0x40
					}
				}
				off += n
				if _, werr := c.Write(buf[:n]); err != nil || werr != nil {
					return
				}
			}
		}))
		testutil.Eventually(t, 3*time.Second, "a mismatch", func() bool { return s.Stats().Err != nil })
		if st := s.Stop(); !errors.Is(st.Err, harness.ErrStreamMismatch) || st.BytesVerified != 3000 {
			t.Errorf("stats %+v; want a mismatch at byte 3000", st)
		}
	})

	t.Run("server closes", func(t *testing.T) {
		s := startStream(t, loopbackServer(t, func(c net.Conn) { _, _ = io.CopyN(c, c, 5000) }))
		testutil.Eventually(t, 3*time.Second, "an error", func() bool { return s.Stats().Err != nil })
		st := s.Stop()
		if !errors.Is(st.Err, io.EOF) && !errors.Is(st.Err, syscall.ECONNRESET) {
			t.Errorf("stats %+v; want EOF or reset", st)
		}
	})

	t.Run("no echo", func(t *testing.T) {
		s := startStream(t, loopbackServer(t, func(c net.Conn) { _, _ = io.Copy(io.Discard, c) }))
		time.Sleep(300 * time.Millisecond)
		if st := s.Stats(); st.MaxGap < 250*time.Millisecond || st.Err != nil {
			t.Errorf("stats while stalled %+v; want a gap of 300ms and no error yet", st)
		}
		if st := s.StopWithin(100 * time.Millisecond); !errors.Is(st.Err, harness.ErrStreamIncomplete) || st.BytesVerified != 0 {
			t.Errorf("stats %+v; want incomplete", st)
		}
	})
}

func TestPatternHasNoShortPeriod(t *testing.T) {
	for _, p := range []int64{1, 2, 4, 256, 1024, 4096, 65536} {
		same := 0
		for i := int64(0); i < 4096; i++ {
			if harness.PatternByte(i) == harness.PatternByte(i+p) {
				same++
			}
		}
		if same > 100 {
			t.Errorf("pattern repeats with period %d at %d of 4096 offsets", p, same)
		}
	}
}

// A request client keeps one request in flight: a server that answers each after
// 30 ms shows as a 30 ms latency, and a stalled answer as a longer one.
func TestRequests(t *testing.T) {
	testutil.RequiresRoot(t)
	var stall atomic.Bool
	addr := loopbackServer(t, func(c net.Conn) {
		buf := make([]byte, 512)
		for {
			if _, err := io.ReadFull(c, buf); err != nil {
				return
			}
			d := 30 * time.Millisecond
			if stall.Swap(false) {
				d = 250 * time.Millisecond
			}
			time.Sleep(d)
			if _, err := c.Write(buf); err != nil {
				return
			}
		}
	})
	s, err := harness.StartRequests(context.Background(), self, addr, 512, 10*time.Millisecond)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Stop()
	testutil.Eventually(t, 3*time.Second, "5 answers", func() bool { return s.Stats().BytesVerified >= 5*512 })
	st := s.Stats()
	if st.MaxLatency < 30*time.Millisecond || st.MaxLatency > 150*time.Millisecond {
		t.Errorf("max latency %s for answers taking 30 ms", st.MaxLatency)
	}
	if st.BytesSent > st.BytesVerified+512 {
		t.Errorf("%d bytes sent, %d answered: more than one request in flight", st.BytesSent, st.BytesVerified)
	}
	stall.Store(true)
	n := st.BytesVerified
	testutil.Eventually(t, 3*time.Second, "the stalled answer and two more", func() bool { return s.Stats().BytesVerified >= n+3*512 })
	if st := s.Stop(); st.Err != nil || st.MaxLatency < 250*time.Millisecond {
		t.Errorf("after a 250 ms stall: %+v", st)
	}
}
