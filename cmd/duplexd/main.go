// Command duplexd is duplex's host daemon.
package main

import (
	"os"

	"github.com/duplex-ha/duplex/internal/daemon"
)

func main() {
	os.Exit(daemon.Main(os.Args[1:]))
}
