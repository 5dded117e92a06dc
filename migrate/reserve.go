package migrate

import (
	"errors"
	"fmt"
	"io"
	"sync"

	"golang.org/x/sys/unix"
)

// memReserve holds, from Prepare on, memory the size of a migration's incoming
// pages, written once so that it is really there, and gives it back to the kernel
// a little ahead of the pages as they arrive.
//
// Two reasons. The destination learns before anything freezes whether it can hold
// the workload, instead of running out of memory halfway through the copy. And the
// first write to a page is much dearer than the next ones on many virtual machines:
// the hypervisor takes back the memory of pages the guest reported free (virtio-balloon
// free page reporting) and faults it in again on first touch. On this project's
// test machine a fresh tmpfs page costs about 8 µs against 1 µs for one freed a
// moment ago, which made the page server's writes, not the network, the limit of
// stop-and-copy. Pages released just ahead of the copy are reused before they are
// reported, so that cost is paid at Prepare, outside the downtime.
type memReserve struct {
	mu       sync.Mutex
	mem      []byte
	released int   // bytes from the front given back so far
	arrived  int64 // page bytes that arrived, over all of the migration's channels
	paused   bool  // count arrivals, give nothing back (see pause)
}

const (
	// reserveMin is the smallest reservation worth making.
	reserveMin = 16 << 20
	// reserveAhead is how far ahead of the arrived bytes memory is given back.
	reserveAhead = 64 << 20
	// reserveChunk is the step in which it is given back.
	reserveChunk = 16 << 20
	// reserveWorkers write the reservation in parallel.
	reserveWorkers = 2
)

// reserveMemory reserves n bytes, rounded down to whole chunks, and writes them.
// It returns nil for reservations too small to matter.
func reserveMemory(n int64) (*memReserve, error) {
	n -= n % reserveChunk
	if n < reserveMin {
		return nil, nil
	}
	mem, err := unix.Mmap(-1, 0, int(n), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS|unix.MAP_NORESERVE)
	if err != nil {
		return nil, fmt.Errorf("reserve %d MiB: %w", n>>20, err)
	}
	// Huge pages would come back to the kernel as huge pages, where the page
	// server and the restored copy allocate small ones.
	_ = unix.Madvise(mem, unix.MADV_NOHUGEPAGE)
	// MADV_POPULATE_WRITE, unlike MAP_POPULATE, says when memory ran out.
	part := len(mem) / reserveWorkers
	part -= part % reserveChunk
	errs := make([]error, reserveWorkers)
	var wg sync.WaitGroup
	for i := range reserveWorkers {
		lo, hi := i*part, (i+1)*part
		if i == reserveWorkers-1 {
			hi = len(mem)
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs[i] = unix.Madvise(mem[lo:hi], unix.MADV_POPULATE_WRITE)
		}()
	}
	wg.Wait()
	for _, err := range errs {
		if errors.Is(err, unix.EINVAL) {
			// A kernel before 5.14 has no MADV_POPULATE_WRITE: go on without.
			_ = unix.Munmap(mem)
			return nil, nil
		}
		if err != nil {
			_ = unix.Munmap(mem)
			return nil, fmt.Errorf("reserve %d MiB: %w", n>>20, err)
		}
	}
	return &memReserve{mem: mem}, nil
}

// size is the reservation's size in bytes; 0 for none.
func (r *memReserve) size() int64 {
	if r == nil {
		return 0
	}
	return int64(len(r.mem))
}

// arrive counts n more page bytes and gives memory back until reserveAhead bytes
// beyond all that arrived are free.
func (r *memReserve) arrive(n int) {
	if r == nil {
		return
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	r.arrived += int64(n)
	r.release()
}

// release gives memory back up to reserveAhead beyond what arrived. r.mu is held.
func (r *memReserve) release() {
	for !r.paused && r.mem != nil && int64(r.released) < r.arrived+reserveAhead && r.released < len(r.mem) {
		end := min(r.released+reserveChunk, len(r.mem))
		_ = unix.Madvise(r.mem[r.released:end], unix.MADV_DONTNEED)
		r.released = end
	}
}

// pause stops giving memory back until resume. Post-copy pauses through the
// restore: pages the restore faults in arrive then, and giving back 64 MiB (a few
// milliseconds of the kernel's time, and TLB flushes on every CPU) would fall into
// the downtime.
func (r *memReserve) pause() {
	if r == nil {
		return
	}
	r.mu.Lock()
	r.paused = true
	r.mu.Unlock()
}

// resume undoes pause and catches up with what arrived meanwhile.
func (r *memReserve) resume() {
	if r == nil {
		return
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	r.paused = false
	r.release()
}

// free gives back whatever is left. It may be called more than once.
func (r *memReserve) free() {
	if r == nil {
		return
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.mem != nil {
		_ = unix.Munmap(r.mem)
		r.mem = nil
	}
}

// reservingConn is the destination's end of a page channel: what arrives through
// it releases the reservation ahead of the page server's writes.
type reservingConn struct {
	io.ReadWriteCloser // to the page server
	r                  *memReserve
}

func (c *reservingConn) Write(p []byte) (int, error) {
	c.r.arrive(len(p))
	return c.ReadWriteCloser.Write(p)
}

// CloseWrite passes the end of the source's stream on to the page server.
func (c *reservingConn) CloseWrite() error {
	if cw, ok := c.ReadWriteCloser.(interface{ CloseWrite() error }); ok {
		return cw.CloseWrite()
	}
	return nil
}
