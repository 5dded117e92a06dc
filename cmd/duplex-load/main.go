// Command duplex-load makes the load duplex's aging detector is tested, benchmarked and
// demonstrated against:
//
//	duplex-load leak   --rate 20M [--max 4G]            leak memory at a set rate
//	duplex-load sockhog [--rate 1M]                     fill socket buffers: a reader that stops reading
//	duplex-load noisy  --base 200M --swing 50M [--period 1s] [--busy 0.3]
//	                                                    busy but stable: memory swings at random around a base
//	duplex-load churn                                   map, touch and unmap 1 MiB as fast as it can;
//	                                                    prints "churn: N ops/s" every second
//
// Every mode prints one status line per second ("leak: 120 MiB held") and runs until
// killed. Sizes take K, M and G suffixes.
package main

import (
	"flag"
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"runtime"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

func main() {
	if len(os.Args) < 2 {
		usage()
	}
	fs := flag.NewFlagSet(os.Args[1], flag.ExitOnError)
	rate := fs.String("rate", "20M", "bytes per second")
	max := fs.String("max", "4G", "leak: stop growing at this size")
	base := fs.String("base", "200M", "noisy: memory held on average")
	swing := fs.String("swing", "50M", "noisy: largest swing around the base")
	period := fs.Duration("period", time.Second, "noisy: how often the held memory changes")
	busy := fs.Float64("busy", 0.3, "noisy: fraction of one CPU kept busy")
	seed := fs.Uint64("seed", uint64(time.Now().UnixNano()), "noisy: random seed")
	_ = fs.Parse(os.Args[2:])
	var err error
	switch os.Args[1] {
	case "leak":
		err = leak(size(*rate), size(*max))
	case "sockhog":
		err = sockhog(size(*rate))
	case "noisy":
		err = noisy(size(*base), size(*swing), *period, *busy, *seed)
	case "churn":
		err = churn()
	default:
		usage()
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "duplex-load: %s\n", err)
		os.Exit(1)
	}
}

func usage() {
	fmt.Fprintln(os.Stderr, "usage: duplex-load leak|sockhog|noisy [flags] (see -h of each)")
	os.Exit(2)
}

// size parses 20M, 4G, 512K or a plain byte count.
func size(s string) int64 {
	mult := int64(1)
	switch strings.ToUpper(s[len(s)-1:]) {
	case "K":
		mult = 1 << 10
	case "M":
		mult = 1 << 20
	case "G":
		mult = 1 << 30
	}
	if mult > 1 {
		s = s[:len(s)-1]
	}
	n, err := strconv.ParseFloat(s, 64)
	if err != nil || n < 0 {
		fmt.Fprintf(os.Stderr, "duplex-load: bad size %q\n", s)
		os.Exit(2)
	}
	return int64(n * float64(mult))
}

// touch makes every page of b resident with non-zero content.
func touch(b []byte) {
	for i := 0; i < len(b); i += 4096 {
		b[i] = byte(i>>12) | 1
	}
}

func leak(rate, max int64) error {
	const step = 10 // allocations per second
	var held [][]byte
	var total int64
	t := time.NewTicker(time.Second / step)
	defer t.Stop()
	report := time.Now()
	for range t.C {
		if total < max {
			b := make([]byte, rate/step)
			touch(b)
			held = append(held, b)
			total += int64(len(b))
		}
		if time.Since(report) >= time.Second {
			report = time.Now()
			fmt.Printf("leak: %d MiB held\n", total>>20)
		}
	}
	runtime.KeepAlive(held)
	return nil
}

// sockhog connects to itself over loopback and writes at rate while the receiving
// side never reads: the kernel's socket buffers fill and stay full.
func sockhog(rate int64) error {
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		return err
	}
	var held []net.Conn
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			held = append(held, c) // accepted, never read
		}
	}()
	var sent int64
	report := time.Now()
	for conns := 0; ; conns++ {
		c, err := net.Dial("tcp4", ln.Addr().String())
		if err != nil {
			return err
		}
		tc := c.(*net.TCPConn)
		_ = tc.SetWriteBuffer(4 << 20)
		chunk := make([]byte, 64<<10)
		for {
			_ = tc.SetWriteDeadline(time.Now().Add(2 * time.Second))
			n, err := tc.Write(chunk)
			sent += int64(n)
			if time.Since(report) >= time.Second {
				report = time.Now()
				fmt.Printf("sockhog: %d MiB queued on %d connections\n", sent>>20, conns+1)
			}
			if err != nil { // buffers full both ways: open another connection
				break
			}
			if rate > 0 {
				time.Sleep(time.Duration(float64(time.Second) * float64(n) / float64(rate)))
			}
		}
		held = append(held, c)
		if conns > 64 {
			select {} // enough; keep it all
		}
	}
}

// noisy holds base±swing bytes, changing at random every period, and keeps a fraction
// of a CPU busy: load without aging. The memory is one mapping outside the Go heap
// whose resident part is set exactly (pages beyond the target are dropped with
// madvise), so the figure has no drift of its own.
func noisy(base, swing int64, period time.Duration, busy float64, seed uint64) error {
	rng := rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15))
	go func() {
		for {
			spin := time.Duration(float64(100*time.Millisecond) * busy)
			end := time.Now().Add(spin)
			for time.Now().Before(end) {
			}
			time.Sleep(100*time.Millisecond - spin)
		}
	}()
	limit := int(base + swing)
	buf, err := unix.Mmap(-1, 0, limit, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		return err
	}
	for {
		want := int(base + int64((rng.Float64()*2-1)*float64(swing)))
		want -= want % 4096
		touch(buf[:want])
		if want < limit {
			if err := unix.Madvise(buf[want:], unix.MADV_DONTNEED); err != nil {
				return err
			}
		}
		fmt.Printf("noisy: %d MiB held\n", want>>20)
		time.Sleep(period)
	}
}

// churn allocates and frees memory as fast as it can: the worst case for probes that
// run on every page a process gains or loses.
func churn() error {
	const size = 1 << 20
	n := 0
	report := time.Now()
	for {
		m, err := unix.Mmap(-1, 0, size, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
		if err != nil {
			return err
		}
		touch(m)
		if err := unix.Munmap(m); err != nil {
			return err
		}
		n++
		if d := time.Since(report); d >= time.Second {
			fmt.Printf("churn: %.0f ops/s\n", float64(n)/d.Seconds())
			n, report = 0, time.Now()
		}
	}
}
