// Package vmtest boots a throwaway QEMU guest running Debian bookworm's own 6.1 kernel and
// runs one command in it as root, returning its output and exit status. It exists because
// pre-copy migration needs `criu pre-dump --track-mem`, which needs CONFIG_MEM_SOFT_DIRTY,
// and the kernel duplex is developed and tested on lacks it: tests that need such a kernel
// feature build a static binary (usually `CGO_ENABLED=0 go test -c`) and run it in a guest.
// Any test package may use it; scripts/vm-deps.sh (`make deps`) installs QEMU and the kernel.
//
// The guest's root is an initramfs (in guest memory) holding busybox, CRIU where `make
// deps` put it (/usr/local/lib/duplex/bin/criu, also on PATH as criu), the host's nft, ip
// and tc, Config.Files and Config.Binaries. /init mounts proc, sysfs, devtmpfs, devpts,
// tmpfs on /tmp and /run, tracefs, bpffs and the hybrid cgroup layout duplex's hosts have
// (v1 controllers at /sys/fs/cgroup/<controller>, cgroup2 at /sys/fs/cgroup/unified),
// brings loopback up and loads the modules of scripts/vm-deps.sh (nf_tables, the sock_diag
// modules CRIU needs, veth, bridge, dummy, tun, netem, tbf). There is no network device.
//
// KVM is used where it boots the guest, else TCG (about 4 s to /init, 8 s for a short
// command). A host whose /dev/kvm comes from PVM (module kvm_pvm, KVM without VMX/SVM,
// common in cloud sandboxes) runs only PVM-built guest kernels: Debian's kernel crawls
// through KVM's instruction emulator and stops with "KVM internal error. Suberror: 1", so
// vmtest goes straight to TCG there.
//
// Errors: Available and Run return ErrUnavailable (wrapped with the reason) when no guest
// can boot here; Run returns ErrNoExitStatus when the guest stopped without reporting one
// (kernel panic, crash of init), and wraps the context's error on timeout.
package vmtest
