// Package rejuv rejuvenates a host once every workload has left it: a ladder of actions
// run in order (sync and drop caches, compact memory, clear declared scratch directories,
// restart systemd units, restart the host), each behind the Action interface, configured
// by Config and checked by Config.Ladder before anything runs.
//
// Safety rules. A scratch directory is absolute and clean, never a system directory (/,
// /etc, /usr, /var/lib, /home, ...) nor a parent of one, nor inside /proc, /sys, /dev
// (but /dev/shm), /etc, /usr, /boot. clear-state empties it and keeps it, refuses it if
// it is a symlink, not a directory, resolves (through its parents' symlinks) to a path
// the rules refuse, or has a mount point inside, and never follows a symlink out of it.
// A unit name cannot pass an option to systemctl. The reboot rung comes last. The
// machine calls (Options.Exec, Options.Reboot, Options.Exit) are swappable, so tests
// never restart the host.
//
// Errors callers act on, checked with errors.Is: ErrInvalidConfig (Ladder rejected the
// config; each problem is a *ConfigError naming the field and value, all joined),
// ErrUnsafeScratch (clear-state met a scratch directory it must not empty and removed
// nothing from it). The package never logs: Run reports each step through a callback.
// The daemon uses it; a test harness may reuse it with fake Options.
package rejuv
