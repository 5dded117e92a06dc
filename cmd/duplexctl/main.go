// Command duplexctl controls the local duplexd.
package main

import (
	"os"

	"github.com/duplex-ha/duplex/internal/ctl"
)

func main() {
	os.Exit(ctl.Main(os.Args[1:]))
}
