// Command testprog is the workload duplex's tests checkpoint, restore and migrate.
//
//	testprog counter [interval]      print 1, 2, 3, ... one per line
//	testprog openfile PATH           hold PATH open, then count like counter
//	testprog hog SIZE                fill SIZE bytes (e.g. 64M) of memory, print READY, idle
//	testprog dirty SIZE RATE [HOT]   fill SIZE bytes, print READY, then rewrite RATE bytes
//	                                 a second (random pages of the first HOT bytes, default
//	                                 all, each page with its own generation) and check every
//	                                 page once a second: "OK n" (n pages rewritten so far)
//	                                 or "CORRUPT page i", which exits
//	testprog dirty-thp SIZE RATE [HOT]  like dirty, in memory advised for transparent huge
//	                                 pages (MADV_HUGEPAGE), 2 MiB aligned
//	testprog holes SIZE PCT          map SIZE bytes and fill all but PCT% of its pages (the
//	                                 holes, spread evenly, never touched), plus a second
//	                                 mapping with two guard pages (MADV_GUARD_INSTALL) where
//	                                 the kernel has them; print READY, then once a second
//	                                 check that every page holds its pattern, every hole
//	                                 reads zero and a guard page still faults: "OK n" or
//	                                 "CORRUPT ...", which exits
//	testprog echo                    echo every TCP connection's bytes back; print "PORT n"
//	testprog complex DIR             a tree with threads, a pipe to a child, an open
//	                                 file in DIR, a zombie and a listening TCP socket
//	                                 whose port it prints as "PORT n"; each connection
//	                                 gets a JSON Status
package main

import (
	"bufio"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"runtime/debug"
	"strconv"
	"sync/atomic"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Status is what complex reports to each connection.
type Status struct {
	Counter    int64  `json:"counter"`
	Sent       int64  `json:"sent"`        // sequence numbers written into the pipe
	Acked      int64  `json:"acked"`       // sequence numbers the child confirmed in order
	ChildPid   int    `json:"child_pid"`   // pipe reader, PID inside the namespace
	ZombiePid  int    `json:"zombie_pid"`  // exited child never waited for
	File       string `json:"file"`        // contents read through the held descriptor
	FileOffset int64  `json:"file_offset"` // its current offset
	Threads    int    `json:"threads"`
	Pid        int    `json:"pid"` // PID inside the namespace
}

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: testprog counter|openfile|complex|pipe-reader|exit0")
		os.Exit(2)
	}
	switch os.Args[1] {
	case "counter":
		interval := 20 * time.Millisecond
		if len(os.Args) > 2 {
			d, err := time.ParseDuration(os.Args[2])
			if err != nil {
				fatal(err)
			}
			interval = d
		}
		count(interval)
	case "openfile":
		f, err := os.OpenFile(os.Args[2], os.O_RDWR|os.O_CREATE, 0o644)
		if err != nil {
			fatal(err)
		}
		defer f.Close()
		fmt.Fprintf(f, "held by %d\n", os.Getpid())
		count(20 * time.Millisecond)
	case "complex":
		complexTree(os.Args[2])
	case "echo":
		echoServer()
	case "hog":
		hog(os.Args[2])
	case "dirty", "dirty-thp":
		hot := parseSize(os.Args[2])
		if len(os.Args) > 4 {
			hot = min(parseSize(os.Args[4]), hot)
		}
		dirty(parseSize(os.Args[2]), parseSize(os.Args[3]), hot, os.Args[1] == "dirty-thp")
	case "holes":
		pct, err := strconv.Atoi(os.Args[3])
		if err != nil || pct < 0 || pct > 100 {
			fatal(fmt.Errorf("holes: bad percentage %q", os.Args[3]))
		}
		holes(int(parseSize(os.Args[2])), pct)
	case "pipe-reader":
		pipeReader()
	case "exit0":
		os.Exit(0)
	default:
		fatal(fmt.Errorf("unknown mode %q", os.Args[1]))
	}
}

func fatal(err error) {
	fmt.Fprintln(os.Stderr, "testprog:", err)
	os.Exit(1)
}

func count(interval time.Duration) {
	w := bufio.NewWriter(os.Stdout)
	for i := 1; ; i++ {
		fmt.Fprintln(w, i)
		w.Flush()
		time.Sleep(interval)
	}
}

// pipeReader reads sequence numbers from fd 3 and acknowledges each on fd 4; it
// exits with status 3 on the first gap.
func pipeReader() {
	in := bufio.NewReader(os.NewFile(3, "seq"))
	out := os.NewFile(4, "ack")
	var want int64 = 1
	for {
		line, err := in.ReadString('\n')
		if err != nil {
			fatal(err)
		}
		n, err := strconv.ParseInt(line[:len(line)-1], 10, 64)
		if err != nil || n != want {
			fmt.Fprintf(os.Stderr, "pipe-reader: got %q, want %d\n", line, want)
			os.Exit(3)
		}
		fmt.Fprintf(out, "%d\n", n)
		want++
	}
}

func complexTree(dir string) {
	var st Status
	st.Pid = os.Getpid()

	// Threads beyond the Go runtime's own.
	for i := 0; i < 4; i++ {
		go func() {
			runtime.LockOSThread()
			for {
				time.Sleep(50 * time.Millisecond)
			}
		}()
	}

	// A child reading a pipe and acknowledging through another.
	seqR, seqW, err := os.Pipe()
	if err != nil {
		fatal(err)
	}
	ackR, ackW, err := os.Pipe()
	if err != nil {
		fatal(err)
	}
	reader := exec.Command("/proc/self/exe", "pipe-reader")
	reader.ExtraFiles = []*os.File{seqR, ackW}
	reader.Stderr = os.Stderr
	if err := reader.Start(); err != nil {
		fatal(err)
	}
	seqR.Close()
	ackW.Close()
	st.ChildPid = reader.Process.Pid
	var sent, acked, counter atomic.Int64
	go func() {
		for i := int64(1); ; i++ {
			if _, err := fmt.Fprintf(seqW, "%d\n", i); err != nil {
				return
			}
			sent.Store(i)
			time.Sleep(10 * time.Millisecond)
		}
	}()
	go func() {
		sc := bufio.NewScanner(ackR)
		for sc.Scan() {
			n, _ := strconv.ParseInt(sc.Text(), 10, 64)
			acked.Store(n)
		}
	}()

	// A zombie: a child that exits and is never waited for.
	z := exec.Command("/proc/self/exe", "exit0")
	if err := z.Start(); err != nil {
		fatal(err)
	}
	st.ZombiePid = z.Process.Pid

	// An open file with a known offset.
	f, err := os.Create(filepath.Join(dir, "held.txt"))
	if err != nil {
		fatal(err)
	}
	if _, err := f.WriteString("complex-tree-data"); err != nil {
		fatal(err)
	}

	go func() {
		for {
			counter.Add(1)
			time.Sleep(10 * time.Millisecond)
		}
	}()

	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		fatal(err)
	}
	fmt.Printf("PORT %d\n", ln.Addr().(*net.TCPAddr).Port)
	for {
		c, err := ln.Accept()
		if err != nil {
			fatal(err)
		}
		s := st
		s.Counter, s.Sent, s.Acked = counter.Load(), sent.Load(), acked.Load()
		off, _ := f.Seek(0, io.SeekCurrent)
		s.FileOffset = off
		buf := make([]byte, 64)
		n, _ := f.ReadAt(buf, 0)
		s.File = string(buf[:n])
		tasks, _ := os.ReadDir("/proc/self/task")
		s.Threads = len(tasks)
		_ = json.NewEncoder(c).Encode(s)
		c.Close()
	}
}

// hog keeps size bytes of anonymous memory resident, filled so no page is zero.
func parseSize(size string) int64 {
	mult := int64(1)
	switch size[len(size)-1] {
	case 'K', 'k':
		mult = 1 << 10
	case 'M', 'm':
		mult = 1 << 20
	case 'G', 'g':
		mult = 1 << 30
	}
	if mult > 1 {
		size = size[:len(size)-1]
	}
	n, err := strconv.ParseInt(size, 10, 64)
	if err != nil {
		fatal(err)
	}
	return n * mult
}

func hog(size string) {
	buf := make([]byte, parseSize(size))
	for i := range buf {
		buf[i] = byte(i*7 + i>>12)
	}
	fmt.Println("READY")
	for {
		time.Sleep(time.Hour)
		buf[0]++
	}
}

// dirty keeps rewriting random pages of its memory, each page filled from its index
// and its own generation, and checks them all once a second: a migration that
// loses or mixes up a page round shows as CORRUPT.
func dirty(size, rate, hot int64, thp bool) {
	const page = 4096
	pages := int(size / page)
	hotPages := max(int(hot/page), 1)
	buf := make([]byte, pages*page)
	if thp {
		buf = hugeBuffer(pages * page)
	}
	gen := make([]uint32, pages)
	word := func(i, j int) uint32 { return uint32(i)*2654435761 ^ gen[i]<<20 ^ uint32(j) }
	fill := func(i int) {
		p := buf[i*page : (i+1)*page]
		for j := 0; j < page; j += 4 {
			binary.LittleEndian.PutUint32(p[j:], word(i, j))
		}
	}
	check := func() int {
		for i := 0; i < pages; i++ {
			p := buf[i*page : (i+1)*page]
			for j := 0; j < page; j += 4 {
				if binary.LittleEndian.Uint32(p[j:]) != word(i, j) {
					return i
				}
			}
		}
		return -1
	}
	for i := 0; i < pages; i++ {
		fill(i)
	}
	fmt.Println("READY")
	const tick = 10 * time.Millisecond
	perTick := int(rate / page / int64(time.Second/tick))
	if perTick == 0 && rate > 0 {
		perTick = 1
	}
	rng := rand.New(rand.NewPCG(uint64(time.Now().UnixNano()), 1))
	var rewritten int64
	last := time.Now()
	for range time.Tick(tick) {
		for k := 0; k < perTick; k++ {
			i := rng.IntN(hotPages)
			gen[i]++
			fill(i)
			rewritten++
		}
		if time.Since(last) >= time.Second {
			last = time.Now()
			if i := check(); i >= 0 {
				fmt.Printf("CORRUPT page %d\n", i)
				os.Exit(1)
			}
			fmt.Printf("OK %d\n", rewritten)
		}
	}
}

// sink keeps a read the compiler would otherwise drop.
var sink byte

// madvGuardInstall is MADV_GUARD_INSTALL (Linux 6.13).
const madvGuardInstall = 102

func holes(size, pct int) {
	const page = 4096
	pages := size / page
	m, err := unix.Mmap(-1, 0, pages*page, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		fatal(err)
	}
	hole := func(i int) bool { return pct > 0 && i*pct/100 != (i+1)*pct/100 }
	word := func(i, j int) uint32 { return uint32(i)*2654435761 ^ uint32(j) ^ 0x5a5a0000 }
	for i := 0; i < pages; i++ {
		if hole(i) {
			continue
		}
		for j := 0; j < page; j += 4 {
			binary.LittleEndian.PutUint32(m[i*page+j:], word(i, j))
		}
	}
	// The guarded mapping is NORESERVE so that it never merges with m: its VMA
	// is the one smaps marks as maybe holding guard regions.
	const gpages = 64
	g, err := unix.Mmap(-1, 0, gpages*page, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS|unix.MAP_NORESERVE)
	if err != nil {
		fatal(err)
	}
	for i := range g {
		g[i] = byte(i / page)
	}
	guarded := unix.Madvise(g[8*page:10*page], madvGuardInstall) == nil
	faults := func(b []byte) (f bool) {
		defer debug.SetPanicOnFault(debug.SetPanicOnFault(true))
		defer func() { f = recover() != nil }()
		sink = b[0]
		return false
	}
	check := func() string {
		for i := 0; i < pages; i++ {
			for j := 0; j < page; j += 4 {
				v, want := binary.LittleEndian.Uint32(m[i*page+j:]), word(i, j)
				if hole(i) {
					want = 0
				}
				if v != want {
					return fmt.Sprintf("page %d (hole %v) word %d: %#x, want %#x", i, hole(i), j/4, v, want)
				}
			}
		}
		for i := 0; i < gpages; i++ {
			if guarded && (i == 8 || i == 9) {
				if !faults(g[i*page:]) {
					return fmt.Sprintf("guard page %d reads", i)
				}
				continue
			}
			if g[i*page] != byte(i) {
				return fmt.Sprintf("guarded mapping page %d: %d", i, g[i*page])
			}
		}
		return ""
	}
	fmt.Printf("READY guard=%v\n", guarded)
	for n := 1; ; n++ {
		time.Sleep(time.Second)
		if bad := check(); bad != "" {
			fmt.Printf("CORRUPT %s\n", bad)
			os.Exit(1)
		}
		fmt.Printf("OK %d\n", n)
	}
}

func echoServer() {
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		fatal(err)
	}
	fmt.Printf("PORT %d\n", ln.Addr().(*net.TCPAddr).Port)
	for {
		c, err := ln.Accept()
		if err != nil {
			fatal(err)
		}
		go func() {
			defer c.Close()
			_, _ = io.Copy(c, c)
		}()
	}
}

// hugeBuffer maps n bytes, 2 MiB aligned, advised for transparent huge pages before
// anything touches them, so that the kernel backs them with huge pages where it can.
func hugeBuffer(n int) []byte {
	const huge = 2 << 20
	m, err := unix.Mmap(-1, 0, n+huge, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		fatal(err)
	}
	off := (huge - int(uintptr(unsafe.Pointer(&m[0]))%huge)) % huge
	buf := m[off : off+n]
	if err := unix.Madvise(buf, unix.MADV_HUGEPAGE); err != nil {
		fatal(err)
	}
	return buf
}
