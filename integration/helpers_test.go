package integration

import (
	"os/exec"

	"github.com/duplex-ha/duplex/checkpoint"
)

func checkpointPath() string { return checkpoint.FindCRIU() }

// runDaemonOnce runs duplexd expecting it to exit (a refused start) and returns its output.
func runDaemonOnce(bin string, args ...string) (string, error) {
	out, err := exec.Command(bin, args...).CombinedOutput()
	return string(out), err
}
