package checkpoint

import (
	"os"
	"os/exec"
)

// DefaultCRIUPath is where `make deps` installs a CRIU that works on this kernel.
const DefaultCRIUPath = "/usr/local/lib/duplex/bin/criu"

// EnvCRIUPath names the environment variable that overrides the CRIU binary.
const EnvCRIUPath = "DUPLEX_CRIU"

// FindCRIU returns the CRIU binary to use: the DUPLEX_CRIU environment variable if
// set, else the copy `make deps` installed, else `criu` from PATH. It does not check
// that the binary works; Engine.Check does.
func FindCRIU() string {
	if p := os.Getenv(EnvCRIUPath); p != "" {
		return p
	}
	if st, err := os.Stat(DefaultCRIUPath); err == nil && st.Mode().IsRegular() {
		return DefaultCRIUPath
	}
	if p, err := exec.LookPath("criu"); err == nil {
		return p
	}
	return DefaultCRIUPath
}
