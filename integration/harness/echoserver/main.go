// Command echoserver is a minimal TCP echo server used as the workload behind
// harness.Stream: every connection's bytes are sent back unchanged. It prints
// "LISTENING <addr>" once it accepts connections.
//
// With -ballast it also keeps that much memory resident (filled, no zero pages), and
// with -dirty it rewrites that many MiB of it per second, like a busy service.
//
// To be checkpointed by CRIU it must run with GODEBUG=multipathtcp=0 (CRIU cannot dump
// MPTCP sockets, which Go's listeners otherwise use by default); it also turns MPTCP off
// on its listener and listens on tcp4 only.
package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"sync"
	"time"
)

var ballastReady sync.WaitGroup

// keep fills mib MiB and then rewrites dirty MiB of it every second, in 10 steps.
func keep(mib, dirty int) {
	buf := make([]byte, mib<<20)
	for i := range buf {
		buf[i] = byte(i>>12) | 1
	}
	ballastReady.Done()
	if dirty <= 0 {
		select {}
	}
	step := dirty << 20 / 10
	off := 0
	for n := byte(1); ; n++ {
		for i := 0; i < step; i += 4096 {
			buf[(off+i)%len(buf)] = n
		}
		off = (off + step) % len(buf)
		time.Sleep(100 * time.Millisecond)
	}
}

func init() { ballastReady.Add(1) }

func main() {
	listen := flag.String("listen", "", "address to listen on, ADDR:PORT (IPv4)")
	ballast := flag.Int("ballast", 0, "MiB of memory to keep resident")
	dirty := flag.Int("dirty", 0, "MiB of the ballast to rewrite per second")
	flag.Parse()
	if *ballast > 0 {
		go keep(*ballast, *dirty)
	} else {
		ballastReady.Done()
	}
	if err := run(*listen); err != nil {
		fmt.Fprintf(os.Stderr, "echoserver: %v\n", err)
		os.Exit(1)
	}
}

func run(addr string) error {
	if addr == "" {
		return fmt.Errorf("-listen ADDR:PORT is required")
	}
	var lc net.ListenConfig
	lc.SetMultipathTCP(false)
	ln, err := lc.Listen(context.Background(), "tcp4", addr)
	if err != nil {
		return fmt.Errorf("listen %s: %w", addr, err)
	}
	ballastReady.Wait()
	fmt.Printf("LISTENING %s\n", ln.Addr())
	for {
		conn, err := ln.Accept()
		if err != nil {
			return fmt.Errorf("accept: %w", err)
		}
		go func() {
			defer conn.Close()
			_, _ = io.Copy(conn, conn)
		}()
	}
}
