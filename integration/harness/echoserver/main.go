// Command echoserver is a minimal TCP echo server used as the workload behind
// harness.Stream: every connection's bytes are sent back unchanged. It prints
// "LISTENING <addr>" once it accepts connections.
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
)

func main() {
	listen := flag.String("listen", "", "address to listen on, ADDR:PORT (IPv4)")
	flag.Parse()
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
