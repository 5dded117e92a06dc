package harness

import (
	"context"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"net"
	"net/netip"
	"sync"
	"time"
)

var (
	// ErrStreamMismatch means the server echoed a byte that differs from the one sent
	// at that offset, or more bytes than were sent.
	ErrStreamMismatch = errors.New("echo differs from the stream sent")
	// ErrStreamIncomplete means bytes sent had not come back when the stream stopped.
	ErrStreamIncomplete = errors.New("stream not fully echoed")
)

// streamDrain is how long Stop waits for the echo of bytes already sent.
const streamDrain = 2 * time.Second

// StreamStats is a snapshot of a Stream.
type StreamStats struct {
	BytesSent     int64         // bytes handed to the socket
	BytesVerified int64         // bytes echoed back and found equal to those sent
	Checksum      uint32        // CRC-32 (IEEE) of the verified bytes
	MaxGap        time.Duration // longest wait between successive echoes (includes the pacing interval chunk/rate)
	// MaxLatency is, for StartRequests, the longest a request waited for its answer.
	MaxLatency time.Duration
	Elapsed    time.Duration // since the connection was established
	Err        error         // first failure: a read or write error (reset, EOF), ErrStreamMismatch, ErrStreamIncomplete
	Reconnects int           // always 0: a Stream never reconnects, a broken connection is an Err
}

// Stream keeps one TCP connection from inside a client node to an echo server, sends
// a deterministic byte stream at a set rate and verifies the echo byte for byte. It
// proves that a client's connection survives a migration of the server.
type Stream struct {
	Client *Node
	Addr   netip.AddrPort

	conn  net.Conn
	rate  int
	chunk int
	start time.Time
	// requests: send one chunk, wait for all of it to come back, then the next.
	requests bool
	answered chan struct{} // requests: the reader signals a complete answer

	mu       sync.Mutex
	st       StreamStats
	lastEcho time.Time
	end      time.Time
	stopping bool

	stopWrite chan struct{}
	stopped   chan struct{}
	once      sync.Once
	wg        sync.WaitGroup
}

// StartStream connects from inside client to addr and starts streaming rate bytes per
// second in writes of chunk bytes. The socket is created in client's network
// namespace. The stream runs until Stop, a failure, or ctx ends (which stops it as
// Stop does).
func StartStream(ctx context.Context, client *Node, addr netip.AddrPort, rate, chunk int) (*Stream, error) {
	return start(ctx, client, addr, rate, chunk, false)
}

// StartRequests is StartStream for a client that sends a request of size bytes every
// interval and waits for its whole answer before it sends the next: with nothing else
// in flight, a request lost while the server is frozen waits for TCP's retransmission
// timeout, which a streaming client's next segment would cut short. MaxLatency in its
// stats is the longest wait for an answer.
func StartRequests(ctx context.Context, client *Node, addr netip.AddrPort, size int, interval time.Duration) (*Stream, error) {
	if interval <= 0 {
		return nil, fmt.Errorf("requests to %s: interval %s must be positive", addr, interval)
	}
	return start(ctx, client, addr, int(int64(size)*int64(time.Second)/int64(interval)), size, true)
}

func start(ctx context.Context, client *Node, addr netip.AddrPort, rate, chunk int, requests bool) (*Stream, error) {
	if rate <= 0 || chunk <= 0 {
		return nil, fmt.Errorf("stream to %s: rate %d and chunk %d must be positive", addr, rate, chunk)
	}
	network := "tcp4"
	if addr.Addr().Unmap().Is6() {
		network = "tcp6"
	}
	var conn net.Conn
	err := inNetNS(client.NSPath, func() error {
		// A literal address and one network: the dialer creates the socket on this
		// goroutine, hence on this thread, in the client's namespace.
		dctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		defer cancel()
		var err error
		conn, err = (&net.Dialer{}).DialContext(dctx, network, addr.String())
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("stream from %s to %s: dial: %w", client.Name, addr, err)
	}
	now := time.Now()
	s := &Stream{
		Client: client, Addr: addr, conn: conn, rate: rate, chunk: chunk,
		start: now, lastEcho: now,
		stopWrite: make(chan struct{}), stopped: make(chan struct{}),
		requests: requests, answered: make(chan struct{}, 1),
	}
	s.wg.Add(2)
	go s.write()
	go s.read()
	go func() {
		select {
		case <-ctx.Done():
			s.Stop()
		case <-s.stopped:
		}
	}()
	return s, nil
}

// LocalAddr returns the client end of the connection.
func (s *Stream) LocalAddr() netip.AddrPort {
	if a, ok := s.conn.LocalAddr().(*net.TCPAddr); ok {
		return a.AddrPort()
	}
	return netip.AddrPort{}
}

// Stats returns the current counters. While bytes are outstanding, MaxGap includes
// the wait for the current echo, so a stalled stream shows.
func (s *Stream) Stats() StreamStats {
	s.mu.Lock()
	defer s.mu.Unlock()
	st := s.st
	end := s.end
	if end.IsZero() {
		end = time.Now()
		if st.Err == nil && st.BytesSent > st.BytesVerified {
			st.MaxGap = max(st.MaxGap, end.Sub(s.lastEcho))
		}
	}
	st.Elapsed = end.Sub(s.start)
	return st
}

// Stop stops sending, waits up to 2 s for the echo of what was sent (reporting
// ErrStreamIncomplete if it does not come), closes the connection and returns the
// final counters. It may be called more than once.
func (s *Stream) Stop() StreamStats { return s.StopWithin(streamDrain) }

// StopWithin is Stop waiting up to drain for the outstanding echo. Only the first
// call's drain counts.
func (s *Stream) StopWithin(drain time.Duration) StreamStats {
	s.once.Do(func() {
		close(s.stopWrite)
		deadline := time.Now().Add(drain)
		for {
			s.mu.Lock()
			settled := s.st.Err != nil || s.st.BytesVerified >= s.st.BytesSent
			s.mu.Unlock()
			if settled || time.Now().After(deadline) {
				break
			}
			time.Sleep(5 * time.Millisecond)
		}
		s.mu.Lock()
		if s.st.Err == nil && s.st.BytesVerified < s.st.BytesSent {
			s.st.Err = fmt.Errorf("%w: %d of %d bytes came back within %s of stopping",
				ErrStreamIncomplete, s.st.BytesVerified, s.st.BytesSent, drain)
		}
		s.stopping = true
		s.mu.Unlock()
		_ = s.conn.Close()
		s.wg.Wait()
		s.mu.Lock()
		s.end = time.Now()
		s.mu.Unlock()
		close(s.stopped)
	})
	return s.Stats()
}

// fail records the stream's first error and closes the connection so both loops end.
func (s *Stream) fail(err error) {
	s.mu.Lock()
	record := s.st.Err == nil && !s.stopping
	if record {
		s.st.Err = err
	}
	s.mu.Unlock()
	if record {
		_ = s.conn.Close()
	}
}

func (s *Stream) write() {
	defer s.wg.Done()
	period := time.Duration(int64(s.chunk) * int64(time.Second) / int64(s.rate))
	period = min(max(period, time.Millisecond), 100*time.Millisecond)
	ticker := time.NewTicker(period)
	defer ticker.Stop()
	// Token bucket: no burst after a stall beyond a tenth of a second's worth.
	burst := float64(max(s.chunk, s.rate/10))
	allowance := float64(s.chunk)
	last := time.Now()
	buf := make([]byte, s.chunk)
	var off int64
	for {
		now := time.Now()
		allowance = min(allowance+float64(s.rate)*now.Sub(last).Seconds(), burst)
		last = now
		for allowance >= float64(s.chunk) {
			select {
			case <-s.stopWrite:
				return
			default:
			}
			for i := range buf {
				buf[i] = patternByte(off + int64(i))
			}
			s.mu.Lock()
			s.st.BytesSent += int64(len(buf))
			s.mu.Unlock()
			sent := time.Now()
			if _, err := s.conn.Write(buf); err != nil {
				s.fail(fmt.Errorf("write at byte %d: %w", off, err))
				return
			}
			off += int64(len(buf))
			allowance -= float64(s.chunk)
			if s.requests {
				select {
				case <-s.stopWrite:
					return
				case <-s.answered:
				}
				s.mu.Lock()
				s.st.MaxLatency = max(s.st.MaxLatency, time.Since(sent))
				s.mu.Unlock()
				allowance = 0 // the next request waits for its turn
				last = time.Now()
			}
		}
		select {
		case <-s.stopWrite:
			return
		case <-ticker.C:
		}
	}
}

func (s *Stream) read() {
	defer s.wg.Done()
	buf := make([]byte, 64<<10)
	var off int64
	var crc uint32
	for {
		n, err := s.conn.Read(buf)
		if n > 0 {
			now := time.Now()
			good, bad := n, false
			for i, b := range buf[:n] {
				if b != patternByte(off+int64(i)) {
					good, bad = i, true
					break
				}
			}
			crc = crc32.Update(crc, crc32.IEEETable, buf[:good])
			s.mu.Lock()
			sent := s.st.BytesSent
			over := off+int64(good) > sent
			if !over {
				s.st.MaxGap = max(s.st.MaxGap, now.Sub(s.lastEcho))
				s.lastEcho = now
				s.st.BytesVerified += int64(good)
				s.st.Checksum = crc
			}
			complete := s.st.BytesVerified == sent
			s.mu.Unlock()
			if complete && s.requests {
				select {
				case s.answered <- struct{}{}:
				default:
				}
			}
			switch {
			case over:
				s.fail(fmt.Errorf("%w: %d bytes echoed, %d sent", ErrStreamMismatch, off+int64(good), sent))
				return
			case bad:
				at := off + int64(good)
				s.fail(fmt.Errorf("%w: byte %d is %#02x, sent %#02x", ErrStreamMismatch, at, buf[good], patternByte(at)))
				return
			}
			off += int64(n)
		}
		if err != nil {
			if errors.Is(err, io.EOF) {
				err = fmt.Errorf("server closed the connection: %w", err)
			}
			s.fail(fmt.Errorf("read echo at byte %d: %w", off, err))
			return
		}
	}
}

// patternByte is the stream's byte at offset off: no short period, so a lost,
// repeated or reordered segment shows as a mismatch.
func patternByte(off int64) byte {
	x := uint64(off) * 0x9E3779B97F4A7C15
	return byte(x>>56) ^ byte(off)
}
