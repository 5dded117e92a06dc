#!/usr/bin/env bash
# scripts/vm-deps.sh: what internal/vmtest needs to boot a throwaway VM guest. Called by
# scripts/deps.sh (so by `make deps`). Idempotent: a second run checks a stamp and exits.
#
# Why: pre-copy migration needs `criu pre-dump --track-mem`, which needs a kernel with
# CONFIG_MEM_SOFT_DIRTY. A host kernel without it cannot run those tests itself, but it can
# boot Debian bookworm's own 6.1 kernel (which has it) under QEMU and run them there.
#
#   1. Debian packages from the system's apt (bookworm): qemu-system-x86, busybox-static
#      (the guest's /init and tools), kmod (depmod/modprobe, to resolve module order here),
#      xz-utils (to unpack the kernel image).
#   2. Bookworm's linux-image-6.1.*-amd64 .deb (the one linux-image-amd64 depends on), fetched
#      with `apt-get download` (not installed), unpacked into $DUPLEX_LIB_DIR/vm:
#        vmlinuz             the kernel as shipped (bzImage)
#        vmlinux             the same kernel uncompressed (ELF, PVH entry): boots about 2x
#                            faster under QEMU TCG because the decompressor does not run
#        config              the kernel's build configuration
#        kernel.release      e.g. 6.1.0-56-amd64
#        modules.load        the modules the guest loads at boot, in load order (dependencies
#                            first), as paths relative to lib/modules/<release>
#        lib/modules/<release>/  those modules (uncompressed .ko, so busybox insmod can load
#                            them) with a depmod index, so the guest's modprobe can also
#                            autoload any of them on demand
#
# Must run as root. Environment knobs (shared with deps.sh):
#   DUPLEX_LIB_DIR      install root (default /usr/local/lib/duplex)
#   DUPLEX_DEPS_FORCE=1 re-fetch the kernel even if the stamp says it is fine
set -euo pipefail

VM_DEB_PACKAGES="qemu-system-x86 busybox-static kmod xz-utils"

# Modules the guest loads at boot (their dependencies are added in load order):
#   nf_tables, nft_*      CRIU's `--network-lock nftables` (an inet table, a set, rules) and
#                         tests that add their own nftables rules
#   *_diag                CRIU reads sockets through sock_diag (unix, tcp, udp, raw, packet,
#                         netlink); without them it cannot dump a tree with sockets
#   veth, bridge, dummy   network namespaces joined by a bridge; dummy interfaces for VIPs
#   tun                   tap devices
#   sch_netem, sch_tbf    latency and bandwidth shaping for migration tests
# Cgroup controllers, CONFIG_MEM_SOFT_DIRTY, userfaultfd, AF_PACKET and IPv6 are built in.
VM_MODULES="nf_tables nft_ct nft_reject_inet unix_diag inet_diag tcp_diag udp_diag raw_diag
 af_packet_diag netlink_diag veth bridge dummy tun sch_netem sch_tbf"
# Kernel options the guest must have; checked in the kernel's config.
VM_REQUIRED_CONFIG="CONFIG_MEM_SOFT_DIRTY=y CONFIG_CHECKPOINT_RESTORE=y CONFIG_USERFAULTFD=y
 CONFIG_MEMCG=y CONFIG_PVH=y CONFIG_SERIAL_8250_CONSOLE=y CONFIG_DEVTMPFS=y"
# Stamp format: bump when the layout above changes, so old installs are redone.
VM_LAYOUT=1

DUPLEX_LIB_DIR=${DUPLEX_LIB_DIR:-/usr/local/lib/duplex}
VM_DIR=$DUPLEX_LIB_DIR/vm
VM_STAMP=$DUPLEX_LIB_DIR/vm.stamp

export DEBIAN_FRONTEND=noninteractive
export LC_ALL=C

# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

TMP_DIRS=()
cleanup() {
	local d
	for d in "${TMP_DIRS[@]}"; do
		[ -n "$d" ] && rm -rf -- "$d"
	done
}
trap cleanup EXIT

[ "$(id -u)" -eq 0 ] || die "must run as root (apt-get)"

mkdir -p "$DUPLEX_LIB_DIR"
if command -v flock >/dev/null 2>&1; then
	# Its own lock: deps.sh holds .deps.lock while it runs this script.
	exec 8>"$DUPLEX_LIB_DIR/.vm-deps.lock"
	flock 8
fi

# ======================================================================================
# 1. Debian packages
# ======================================================================================

# ======================================================================================
# 2. Guest kernel
# ======================================================================================
stamp_get() {
	[ -f "$VM_STAMP" ] && sed -n "s/^$1=//p" "$VM_STAMP" | head -n1 || true
}

# What the stamp must say for the installed kernel to count as current.
modules_key() {
	echo "layout=$VM_LAYOUT modules=$(echo $VM_MODULES)" | cksum | awk '{print $1}'
}

vm_installed() {
	[ "${DUPLEX_DEPS_FORCE:-0}" != 1 ] || return 1
	[ -f "$VM_STAMP" ] && [ "$(stamp_get key)" = "$(modules_key)" ] || return 1
	local f rel
	rel=$(stamp_get release)
	for f in vmlinuz vmlinux config kernel.release modules.load "lib/modules/$rel/modules.dep"; do
		[ -s "$VM_DIR/$f" ] || return 1
	done
}

# The versioned kernel package linux-image-amd64 depends on, e.g. linux-image-6.1.0-56-amd64.
kernel_package() {
	apt-cache depends linux-image-amd64 2>/dev/null |
		awk '$1 == "Depends:" && $2 ~ /^linux-image-[0-9].*-amd64$/ {print $2; exit}'
}

# extract_vmlinux BZIMAGE OUT: the uncompressed ELF inside a bzImage (xz, as Debian's is).
extract_vmlinux() {
	local in=$1 out=$2 off
	off=$(LC_ALL=C grep -obUaP '\xfd7zXZ\x00' "$in" | head -n1 | cut -d: -f1)
	[ -n "$off" ] || { warn "no xz stream in $in"; return 1; }
	tail -c +"$((off + 1))" "$in" | xz -dc --single-stream >"$out" 2>/dev/null || true
	[ "$(head -c 4 "$out" | od -An -c | tr -d ' ')" = '177ELF' ] || { warn "could not unpack vmlinux from $in"; return 1; }
}

install_vm_kernel() {
	local pkg work root rel stage=$VM_DIR.new m line path name dst order=() seen=" " opt
	if vm_installed; then
		log "VM guest kernel $(stamp_get release) ($(stamp_get version)) already installed"
		return
	fi
	pkg=$(kernel_package)
	if [ -z "$pkg" ]; then
		apt-get -qq -o DPkg::Lock::Timeout=300 update
		pkg=$(kernel_package)
	fi
	[ -n "$pkg" ] || die "cannot tell which kernel package linux-image-amd64 depends on (apt-cache depends linux-image-amd64)"

	work=$(mktemp -d /var/tmp/duplex-vm.XXXXXX)
	TMP_DIRS+=("$work" "$stage" "$VM_DIR.old")
	chmod 0755 "$work"
	mkdir "$work/debs"
	# apt downloads as the unprivileged _apt user; give it the directory.
	if id _apt >/dev/null 2>&1; then chown _apt "$work/debs"; fi
	log "downloading $pkg for the VM guest (not installed on this host)"
	if ! (cd "$work/debs" && apt-get -qq download "$pkg"); then
		log "retrying after apt-get update"
		apt-get -qq -o DPkg::Lock::Timeout=300 update
		(cd "$work/debs" && apt-get -qq download "$pkg") || die "apt-get download $pkg failed"
	fi
	root=$work/root
	dpkg -x "$work"/debs/"$pkg"_*.deb "$root" || die "dpkg -x $pkg failed"
	# usrmerge-ready packages may ship usr/lib/modules.
	for m in "$root/lib/modules" "$root/usr/lib/modules"; do
		if [ -d "$m" ]; then
			[ "$m" = "$root/lib/modules" ] || { mkdir -p "$root/lib"; ln -s ../usr/lib/modules "$root/lib/modules"; }
			break
		fi
	done
	rel=$(ls "$root/lib/modules" | head -n1)
	[ -n "$rel" ] && [ -f "$root/boot/vmlinuz-$rel" ] || die "$pkg has no kernel image or modules"
	for opt in $VM_REQUIRED_CONFIG; do
		grep -qx "$opt" "$root/boot/config-$rel" || die "$pkg lacks $opt: it cannot serve as the VM guest kernel"
	done

	rm -rf "$stage"
	mkdir -p "$stage/lib/modules/$rel"
	cp "$root/boot/vmlinuz-$rel" "$stage/vmlinuz"
	cp "$root/boot/config-$rel" "$stage/config"
	echo "$rel" >"$stage/kernel.release"
	extract_vmlinux "$stage/vmlinuz" "$stage/vmlinux" || die "cannot unpack vmlinux from $pkg"

	# Load order from the package's own dependency index.
	depmod -b "$root" "$rel" || die "depmod on $pkg failed"
	for m in $VM_MODULES; do
		line=$(modprobe -d "$root" -S "$rel" --show-depends --ignore-install "$m" 2>&1) ||
			die "module $m: $line"
		while read -r kind path _; do
			[ "$kind" = insmod ] || continue # "builtin NAME": nothing to load
			name=${path#"$root/lib/modules/$rel/"}
			case "$seen" in *" $name "*) continue ;; esac
			seen="$seen$name "
			order+=("$name")
		done <<<"$line"
	done
	: >"$stage/modules.load"
	for name in "${order[@]}"; do
		dst=$stage/lib/modules/$rel/${name%.xz}
		dst=${dst%.zst}
		dst=${dst%.gz}
		mkdir -p "$(dirname "$dst")"
		case "$name" in
		*.ko) cp "$root/lib/modules/$rel/$name" "$dst" ;;
		*.ko.xz) xz -dc "$root/lib/modules/$rel/$name" >"$dst" ;;
		*.ko.zst) zstd -qdc "$root/lib/modules/$rel/$name" >"$dst" ;;
		*.ko.gz) gzip -dc "$root/lib/modules/$rel/$name" >"$dst" ;;
		*) die "unexpected module file $name" ;;
		esac
		echo "${dst#"$stage/lib/modules/$rel/"}" >>"$stage/modules.load"
	done
	cp "$root/lib/modules/$rel/modules.builtin" "$root/lib/modules/$rel/modules.builtin.modinfo" "$root/lib/modules/$rel/modules.order" "$stage/lib/modules/$rel/" 2>/dev/null || true
	depmod -b "$stage" "$rel" || die "depmod on the guest's modules failed"

	rm -rf "$VM_DIR.old"
	if [ -e "$VM_DIR" ]; then mv "$VM_DIR" "$VM_DIR.old"; fi
	mv "$stage" "$VM_DIR"
	rm -rf "$VM_DIR.old"
	cat >"$VM_STAMP.tmp" <<EOF
package=$pkg
version=$(dpkg-deb -f "$work"/debs/"$pkg"_*.deb Version)
release=$rel
key=$(modules_key)
modules=$(tr '\n' ' ' <"$VM_DIR/modules.load")
installed=$(date -u +%Y-%m-%dT%H:%M:%SZ)
EOF
	mv -f "$VM_STAMP.tmp" "$VM_STAMP"
	log "VM guest kernel $rel ($(stamp_get version)) in $VM_DIR with ${#order[@]} modules"
}

install_packages "VM tests" $VM_DEB_PACKAGES
install_vm_kernel
