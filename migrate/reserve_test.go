package migrate

import (
	"io"
	"net"
	"os"
	"testing"
	"unsafe"

	"golang.org/x/sys/unix"
)

// resident counts the pages of b that are in memory.
func resident(t *testing.T, b []byte) int {
	t.Helper()
	if len(b) == 0 {
		return 0
	}
	vec := make([]byte, (len(b)+4095)/4096)
	if _, _, errno := unix.Syscall(unix.SYS_MINCORE, uintptr(unsafe.Pointer(&b[0])), uintptr(len(b)), uintptr(unsafe.Pointer(&vec[0]))); errno != 0 {
		t.Fatal(errno)
	}
	n := 0
	for _, v := range vec {
		n += int(v & 1)
	}
	return n
}

func TestReserveMemory(t *testing.T) {
	if r, err := reserveMemory(reserveMin - 1); r != nil || err != nil {
		t.Fatalf("a reservation below %d MiB: %v, %v; want none", reserveMin>>20, r, err)
	}
	const size = 8*reserveChunk + reserveChunk/2 // rounded down to whole chunks
	r, err := reserveMemory(size)
	if err != nil {
		t.Fatal(err)
	}
	defer r.free()
	if r.size() != 8*reserveChunk {
		t.Fatalf("size %d, want %d", r.size(), 8*reserveChunk)
	}
	pages := int(r.size() / 4096)
	if n := resident(t, r.mem); n != pages {
		t.Fatalf("%d of %d pages resident after reserving", n, pages)
	}

	// The first bytes release reserveAhead beyond them, in whole chunks.
	r.arrive(1)
	ahead := int((1 + reserveAhead + reserveChunk - 1) / reserveChunk * reserveChunk)
	if r.released != ahead {
		t.Fatalf("released %d bytes after 1 arrived, want %d", r.released, ahead)
	}
	if n := resident(t, r.mem[:r.released]); n != 0 {
		t.Errorf("%d released pages still resident", n)
	}
	if n, want := resident(t, r.mem[r.released:]), (len(r.mem)-r.released)/4096; n != want {
		t.Errorf("%d of %d pages not yet released are resident", n, want)
	}
	// Paused, arrivals are counted and nothing is given back until resume.
	r.pause()
	held := r.released
	r.arrive(2 * reserveChunk)
	if r.released != held {
		t.Errorf("released %d bytes while paused, had %d", r.released, held)
	}
	r.resume()
	if want := int((1 + 2*reserveChunk + reserveAhead + reserveChunk - 1) / reserveChunk * reserveChunk); r.released != want {
		t.Errorf("released %d bytes after resume, want %d", r.released, want)
	}
	// Arrivals add up; past the end everything is released and nothing breaks.
	r.arrive(int(r.size()))
	if r.released != len(r.mem) || resident(t, r.mem) != 0 {
		t.Errorf("released %d of %d bytes after all arrived", r.released, len(r.mem))
	}
	r.free()
	r.free() // twice is fine
	r.arrive(4096)

	var none *memReserve // no reservation: every method is a no-op
	none.arrive(1)
	none.pause()
	none.resume()
	none.free()
	if none.size() != 0 {
		t.Error("a nil reservation has a size")
	}
}

func TestReservingConnPassesBytesAndReleases(t *testing.T) {
	r, err := reserveMemory(2 * reserveAhead)
	if err != nil {
		t.Fatal(err)
	}
	defer r.free()
	fa, fb, err := bigSocketPair()
	if err != nil {
		t.Fatal(err)
	}
	a, b := fileConn(t, fa), fileConn(t, fb)
	c := &reservingConn{ReadWriteCloser: a, r: r}
	go func() {
		_, _ = c.Write([]byte("pages"))
		_ = c.CloseWrite() // the reader sees the end of the stream
	}()
	got, err := io.ReadAll(b)
	if err != nil || string(got) != "pages" {
		t.Fatalf("read %q, %v; want \"pages\"", got, err)
	}
	if r.arrived != 5 || r.released < reserveAhead {
		t.Errorf("arrived %d, released %d; want 5 and at least %d", r.arrived, r.released, reserveAhead)
	}
}

func fileConn(t *testing.T, f *os.File) net.Conn {
	t.Helper()
	defer f.Close()
	c, err := net.FileConn(f)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}
