#!/usr/bin/env bash
# scripts/deps.sh: install what duplex needs on a Debian 12 (bookworm) host.
# Called by `make deps`. Idempotent: a second run only checks and exits in a few seconds.
#
#   1. Debian packages from the system's own apt (bookworm), only the missing ones.
#   2. A CRIU >= 4.1 that passes `criu check` here, with nftables network-lock support:
#      - by default CRIU built with duplex's patches (contrib/criu/series) from the upstream
#        source that Debian's mirror carries (its .orig tarball, checked against a pinned
#        SHA-256), linked against the system's libraries; if that fails, with a warning:
#      - the system's criu, if it qualifies (a symlink to it is put at the default path);
#      - otherwise CRIU from a newer Debian suite (sid, then trixie), unpacked with its
#        shared libraries into a private prefix and run through that prefix's own dynamic
#        loader. The newer suite is only ever seen by a private apt configuration: the
#        system's apt keeps seeing bookworm alone and nothing system-wide is upgraded.
#        (Bookworm's criu 3.17 fails on kernels >= 6.13: "Unexpected rt vDSO area bounds".)
#   3. Go tools: none yet.
#
# Must run as root. Environment knobs:
#   DUPLEX_LIB_DIR      install root            (default /usr/local/lib/duplex; the duplex
#                       binaries look for $DUPLEX_LIB_DIR/bin/criu only at the default, else
#                       point them at it with DUPLEX_CRIU or their flag)
#   DUPLEX_CRIU_SUITES  newer suites to try     (default "sid trixie")
#   DUPLEX_CRIU_PATCHED auto (default): build the patched CRIU, else fall back with a
#                       warning (a failed build is not retried until the patches change or
#                       DUPLEX_DEPS_FORCE=1); 1: the patched CRIU or fail; 0: never build it
#   DUPLEX_DEPS_FORCE=1 reinstall CRIU even if the stamp says it is fine
#   DUPLEX_DEPS_SMOKE=0 skip the dump/restore smoke test after a CRIU (re)install
set -euo pipefail

# --- Debian packages (system apt, bookworm). Add new ones here. -----------------------
DEB_PACKAGES="nftables iproute2 procps util-linux bpftool libbpf-dev iputils-ping"

# --- CRIU ------------------------------------------------------------------------------
CRIU_MIN_VERSION=4.1
DUPLEX_LIB_DIR=${DUPLEX_LIB_DIR:-/usr/local/lib/duplex}
CRIU_PREFIX=$DUPLEX_LIB_DIR/criu-root
CRIU_WRAPPER=$DUPLEX_LIB_DIR/bin/criu   # default path the duplex binaries use
CRIU_STAMP=$DUPLEX_LIB_DIR/criu.stamp
CRIU_SUITES=${DUPLEX_CRIU_SUITES:-sid trixie}
DEBIAN_KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg
# duplex's CRIU: this upstream release, patched with contrib/criu/series.
CRIU_SOURCE_VERSION=4.2.1
CRIU_SOURCE_SHA256=29ec0ee09e296479fe7048c80980e8ef1d0684d0b0204c2b101dfea19f6725b9
CRIU_PATCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/../contrib/criu" && pwd)
CRIU_PATCHED_DIR=$DUPLEX_LIB_DIR/criu-duplex
CRIU_PATCHED=${DUPLEX_CRIU_PATCHED:-auto}
CRIU_BUILD_PACKAGES="gcc make pkg-config libc6-dev patch xz-utils protobuf-compiler
 protobuf-c-compiler libprotobuf-dev libprotobuf-c-dev libnl-3-dev libnet1-dev libcap-dev
 libbsd-dev libnftables-dev libnftnl-dev libmnl-dev libgnutls28-dev uuid-dev"
# Used only if apt cannot compute criu's dependency closure (names from sid, 2025/26).
CRIU_FALLBACK_PACKAGES="criu libcompel1 libc6 libnet9 libprotobuf-c1 libnftables1 libnftnl11
 libnl-3-200 libbsd0 libmd0 libgnutls30t64 libnettle8t64 libhogweed6t64 libp11-kit0
 libunistring5 libidn2-0 libtasn1-6 libgmp10 libjansson4 libmnl0 libxtables12 libuuid1
 libffi8 libgcc-s1 libedit2"

export DEBIAN_FRONTEND=noninteractive
export LC_ALL=C

# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

# Everything temporary is registered here and removed on exit, whatever happens.
# Smoke-test processes are killed only while their command line is still ours.
SMOKE_CMD="sleep 86399"
TMP_DIRS=()
SMOKE_PIDS=()
kill_smoke_pids() {
	local p c
	for p in "${SMOKE_PIDS[@]}"; do
		c=$(tr '\0' ' ' 2>/dev/null <"/proc/$p/cmdline" || true)
		case "$c" in *"$SMOKE_CMD"*) kill -9 "$p" 2>/dev/null || true ;; esac
	done
	SMOKE_PIDS=()
}
cleanup() {
	local d
	kill_smoke_pids
	for d in "${TMP_DIRS[@]}"; do
		[ -n "$d" ] && rm -rf -- "$d"
	done
}
trap cleanup EXIT

[ "$(id -u)" -eq 0 ] || die "must run as root (apt-get, CRIU)"

mkdir -p "$DUPLEX_LIB_DIR"
if command -v flock >/dev/null 2>&1; then
	exec 9>"$DUPLEX_LIB_DIR/.deps.lock"
	flock 9
fi

# ======================================================================================
# 1. Debian packages
# ======================================================================================

# ======================================================================================
# 2. CRIU
# ======================================================================================

# criu_version BIN: prints e.g. 4.2.1 (empty if BIN does not run).
criu_version() {
	"$1" --version 2>/dev/null | awk '/^Version:/ {print $2; exit}' || true
}

# version_ge A B: A >= B
version_ge() {
	[ "$(printf '%s\n%s\n' "$1" "$2" | sort -V | head -n1)" = "$2" ]
}

stamp_get() {
	[ -f "$CRIU_STAMP" ] && sed -n "s/^$1=//p" "$CRIU_STAMP" | head -n1 || true
}

# criu_qualifies BIN: version, `criu check` and the nftables network lock.
criu_qualifies() {
	local bin=$1 v
	v=$(criu_version "$bin")
	[ -n "$v" ] || return 1
	version_ge "$v" "$CRIU_MIN_VERSION" || return 1
	"$bin" check >/dev/null 2>&1 || return 1
	"$bin" check --feature network_lock_nftables >/dev/null 2>&1 || return 1
}

# The first non-security URI of the system's Debian sources (deb822 first, then one-line).
debian_mirror_uri() {
	local uri=""
	if [ -f /etc/apt/sources.list.d/debian.sources ]; then
		uri=$(awk '
			BEGIN { RS = ""; FS = "\n" }
			{
				uris = ""; suites = ""; types = ""
				for (i = 1; i <= NF; i++) {
					if ($i ~ /^[ \t]*#/) continue
					if ($i ~ /^URIs:/)   { uris = $i;   sub(/^URIs:[ \t]*/, "", uris) }
					if ($i ~ /^Suites:/) { suites = $i; sub(/^Suites:[ \t]*/, "", suites) }
					if ($i ~ /^Types:/)  { types = $i }
				}
				if (uris == "" || types !~ /(^|[ \t:])deb([ \t]|$)/) next
				if (suites ~ /-security/ || uris ~ /security/) next
				split(uris, u, /[ \t]+/); print u[1]; exit
			}' /etc/apt/sources.list.d/debian.sources)
	fi
	if [ -z "$uri" ]; then
		uri=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null |
			sed -e 's/#.*//' -e 's/\[[^]]*\]//' |
			awk '$1 == "deb" && $3 !~ /-security/ && $2 !~ /security/ { print $2; exit }')
	fi
	[ -n "$uri" ] || die "no Debian mirror URI found in the system's apt sources"
	echo "${uri%/}"
}

# Private apt: its own sources, lists, caches and an empty dpkg status, so that it neither
# sees nor changes the system's apt state.
APT_PRIV=()
setup_private_apt() {
	local work=$1 suite=$2 uri=$3 arch=$4
	mkdir -p "$work/lists/partial" "$work/archives/partial" "$work/cache" "$work/debs"
	: >"$work/status"
	echo "deb [arch=$arch signed-by=$DEBIAN_KEYRING] $uri $suite main" >"$work/sources.list"
	APT_PRIV=(
		-o "Dir::Etc::SourceList=$work/sources.list"
		-o "Dir::Etc::SourceParts=/dev/null"
		-o "Dir::Etc::Preferences=/dev/null"
		-o "Dir::Etc::PreferencesParts=/dev/null"
		-o "Dir::State::Lists=$work/lists"
		-o "Dir::State::status=$work/status"
		-o "Dir::State::extended_states=$work/extended_states"
		-o "Dir::Cache=$work/cache"
		-o "Dir::Cache::pkgcache="
		-o "Dir::Cache::srcpkgcache="
		-o "Dir::Cache::Archives=$work/archives"
		-o "APT::Architectures=$arch"
		-o "APT::Default-Release="
		-o "Acquire::Languages=none"
		-o "Acquire::IndexTargets::deb::DEP-11::DefaultEnabled=false"
	)
	# apt downloads as the unprivileged _apt user; give it the private directories.
	if id _apt >/dev/null 2>&1; then
		chown _apt "$work/lists/partial" "$work/archives/partial" "$work/debs"
	else
		APT_PRIV+=(-o "APT::Sandbox::User=root")
	fi
}

# write_wrapper FILE PREFIX: the loader wrapper for the criu unpacked in PREFIX.
write_wrapper() {
	local file=$1 prefix=$2 triplet=$TRIPLET loader=$LOADER
	cat >"$file" <<EOF
#!/bin/sh
# CRIU from a private prefix, run through that prefix's own dynamic loader so that its
# newer glibc and libraries never mix with the system's. Written by duplex scripts/deps.sh.
# --library-path (unlike LD_LIBRARY_PATH) is not inherited by the helpers CRIU executes
# (ip, sh, tar, iptables-*), which keep using the system's libraries.
P='$prefix'
exec "\$P/usr/lib/$triplet/$loader" --library-path "\$P/usr/lib/$triplet:\$P/lib/$triplet" "\$P/usr/sbin/criu" "\$@"
EOF
	chmod 0755 "$file"
}

# Private-prefix parameters for this machine's architecture; sets ARCH TRIPLET LOADER.
private_arch() {
	ARCH=$(dpkg --print-architecture)
	case "$ARCH" in
	amd64) TRIPLET=x86_64-linux-gnu LOADER=ld-linux-x86-64.so.2 ;;
	arm64) TRIPLET=aarch64-linux-gnu LOADER=ld-linux-aarch64.so.1 ;;
	*) die "unsupported architecture $ARCH" ;;
	esac
}

# stage_suite WORK URI SUITE: downloads criu and its libraries from SUITE and unpacks them
# into $CRIU_PREFIX.new, which it checks. Returns 1 (after a warning) on any failure so that
# the next suite can be tried. It runs with errexit off (called under `if`): every step that
# matters is checked explicitly.
stage_suite() {
	local work=$1 uri=$2 suite=$3 cand upstream pkgs d new=$CRIU_PREFIX.new v stray
	rm -rf "$work/lists" "$work/archives" "$work/cache" "$work/debs" "$work/status" "$new"
	setup_private_apt "$work" "$suite" "$uri" "$ARCH" || return 1
	log "fetching the package list of Debian $suite (private apt configuration)"
	apt-get -qq "${APT_PRIV[@]}" update || { warn "apt-get update for $suite failed"; return 1; }
	cand=$(apt-cache "${APT_PRIV[@]}" policy criu 2>/dev/null | awk '/Candidate:/ {print $2; exit}')
	if [ -z "$cand" ] || [ "$cand" = "(none)" ]; then
		warn "no criu in $suite"
		return 1
	fi
	upstream=$(echo "$cand" | sed -e 's/^[0-9]*://' -e 's/-[^-]*$//' -e 's/[+~].*$//')
	version_ge "$upstream" "$CRIU_MIN_VERSION" || { warn "criu in $suite is $cand (< $CRIU_MIN_VERSION)"; return 1; }
	log "using criu $cand from Debian $suite"

	# Dependency closure (Depends/Pre-Depends only) as apt's own resolver sees it against an
	# empty dpkg status: virtual packages and alternatives are resolved the way apt would.
	pkgs=$(apt-get "${APT_PRIV[@]}" -o Debug::NoLocking=1 -s install --no-install-recommends criu 2>/dev/null |
		awk '/^Inst / {print $2}' | tr '\n' ' ')
	if ! echo " $pkgs " | grep -q ' criu '; then
		warn "could not compute criu's dependencies in $suite; using the built-in list"
		pkgs=$CRIU_FALLBACK_PACKAGES
	fi
	log "downloading: $(echo $pkgs)"
	if ! (cd "$work/debs" && apt-get -qq "${APT_PRIV[@]}" download $pkgs); then
		# One by one, skipping names this suite does not have (fallback list drift).
		for d in $pkgs; do
			(cd "$work/debs" && apt-get -qq "${APT_PRIV[@]}" download "$d" 2>/dev/null) ||
				warn "skipping $d (not downloadable from $suite)"
		done
	fi
	ls "$work"/debs/criu_*.deb >/dev/null 2>&1 || { warn "criu .deb did not download from $suite"; return 1; }

	mkdir -p "$new" || return 1
	for d in "$work"/debs/*.deb; do
		dpkg -x "$d" "$new" || { warn "dpkg -x $d failed"; return 1; }
		dpkg-deb -f "$d" Package Version | paste -sd' ' >>"$new/.duplex-packages"
	done

	# Try the new tree before it replaces anything.
	write_wrapper "$work/criu-test" "$new" || return 1
	v=$(criu_version "$work/criu-test")
	if [ -z "$v" ]; then
		warn "criu from $suite does not run: $("$work/criu-test" --version 2>&1 | tail -n3)"
		return 1
	fi
	# Every shared library must come from the prefix: a missing .deb would silently pull in
	# the system's older copy through ld.so.cache.
	stray=$("$new/usr/lib/$TRIPLET/$LOADER" --library-path "$new/usr/lib/$TRIPLET:$new/lib/$TRIPLET" \
		--list "$new/usr/sbin/criu" | awk -v p="$new/" '/=>/ && index($3, p) != 1 {print $1}')
	if [ -n "$stray" ]; then
		warn "libraries missing from the $suite prefix: $(echo $stray)"
		return 1
	fi
	STAMP_SOURCE=private
	STAMP_SUITE=$suite
	STAMP_PACKAGE=$cand
	STAMP_TARGET=$CRIU_PREFIX/usr/sbin/criu
}

# Replaces the private prefix with the staged one and (re)writes the wrapper.
activate_staged() {
	local old=$CRIU_PREFIX.old
	rm -rf "$old"
	if [ -e "$CRIU_PREFIX" ]; then mv "$CRIU_PREFIX" "$old"; fi
	mv "$CRIU_PREFIX.new" "$CRIU_PREFIX"
	rm -rf "$old"
	mkdir -p "$(dirname "$CRIU_WRAPPER")"
	# Write next to the target and rename: never write through an old symlink (it may point
	# at the system's criu binary).
	write_wrapper "$CRIU_WRAPPER.tmp" "$CRIU_PREFIX"
	mv -f "$CRIU_WRAPPER.tmp" "$CRIU_WRAPPER"
}

# Tries each suite of $CRIU_SUITES until a CRIU from it installs and passes verify_criu.
install_private_criu() {
	local uri work suite
	private_arch
	[ -f "$DEBIAN_KEYRING" ] || die "$DEBIAN_KEYRING missing (package debian-archive-keyring)"
	uri=$(debian_mirror_uri)
	work=$(mktemp -d /var/tmp/duplex-criu.XXXXXX)
	TMP_DIRS+=("$work" "$CRIU_PREFIX.new" "$CRIU_PREFIX.old")
	chmod 0755 "$work"
	for suite in $CRIU_SUITES; do
		if ! stage_suite "$work" "$uri" "$suite"; then
			continue
		fi
		activate_staged
		if verify_criu "$CRIU_WRAPPER"; then
			return 0
		fi
		warn "CRIU from Debian $suite failed verification"
	done
	die "no CRIU >= $CRIU_MIN_VERSION from '$CRIU_SUITES' works here"
}

use_system_criu() {
	local sys=$1
	mkdir -p "$(dirname "$CRIU_WRAPPER")"
	ln -sfn "$sys" "$CRIU_WRAPPER.tmp"
	mv -Tf "$CRIU_WRAPPER.tmp" "$CRIU_WRAPPER"
	rm -rf "$CRIU_PREFIX"
	STAMP_SOURCE=system
	STAMP_SUITE=
	STAMP_PACKAGE=$(dpkg-query -S "$sys" 2>/dev/null | head -n1 | cut -d: -f1 || true)
	STAMP_TARGET=$sys
}

# Dump and restore a one-process tree that is the init of its own PID namespace and its own
# session leader (the shape that restores next to its source on one kernel). Whatever the
# outcome, the test processes are gone when it returns.
smoke_test() {
	local rc=0
	smoke_test_run "$1" || rc=1
	kill_smoke_pids
	return $rc
}

smoke_test_run() {
	local criu=$1 dir up pid="" newpid i nspid
	dir=$(mktemp -d /tmp/duplex-criu-smoke.XXXXXX)
	TMP_DIRS+=("$dir")
	# 9>&-: the test process must not inherit this script's flock on fd 9, or CRIU refuses
	# to dump ("Some file locks are hold by dumping tasks").
	unshare -p -f setsid $SMOKE_CMD </dev/null >/dev/null 2>&1 9>&- &
	up=$!
	disown "$up" # bash still reaps it, without "Killed" job notices
	SMOKE_PIDS+=("$up")
	for i in $(seq 100); do
		pid=$(pgrep -P "$up" -x sleep || true)
		[ -n "$pid" ] && break
		sleep 0.05
	done
	[ -n "$pid" ] || { warn "smoke test: the test process did not start"; return 1; }
	SMOKE_PIDS+=("$pid")
	if ! "$criu" dump -t "$pid" -D "$dir" -v4 -o dump.log; then
		warn "smoke test: dump failed; errors from $dir/dump.log:"
		grep -E 'Error|^Warn' "$dir/dump.log" | grep -v RLIMIT_NOFILE | tail -n 10 >&2 || true
		return 1
	fi
	if ! "$criu" restore -D "$dir" -d -v4 -o restore.log --pidfile "$dir/restored.pid"; then
		warn "smoke test: restore failed; errors from $dir/restore.log:"
		grep -E 'Error|^Warn' "$dir/restore.log" | grep -v RLIMIT_NOFILE | tail -n 10 >&2 || true
		return 1
	fi
	newpid=$(cat "$dir/restored.pid")
	SMOKE_PIDS+=("$newpid")
	nspid=$(awk '/^NSpid:/ {print $NF}' "/proc/$newpid/status" 2>/dev/null || true)
	if [ "$(cat "/proc/$newpid/comm" 2>/dev/null)" != sleep ] || [ "$nspid" != 1 ]; then
		warn "smoke test: restored process $newpid is not the expected sleep (ns pid '$nspid')"
		return 1
	fi
	log "smoke test passed: dumped pid $pid, restored as pid $newpid (pid 1 in its namespace)"
}

# verify_criu BIN: criu check, the features duplex relies on, and a dump/restore smoke test.
# Returns 1 with a warning on failure (it may run under `if`: checks are explicit).
verify_criu() {
	local criu=$1 out f
	if ! out=$("$criu" check 2>&1); then
		echo "$out" >&2
		warn "'criu check' failed"
		return 1
	fi
	log "criu check: $(echo "$out" | grep -v 'kdat cache' | tr '\n' ' ')"
	if ! "$criu" check --feature network_lock_nftables >/dev/null 2>&1; then
		warn "criu lacks the nftables network lock (criu check --feature network_lock_nftables)"
		return 1
	fi
	log "feature network_lock_nftables: supported"
	for f in uffd-noncoop mem_dirty_track; do
		if "$criu" check --feature "$f" >/dev/null 2>&1; then
			log "feature $f: supported"
		elif [ "$f" = mem_dirty_track ]; then
			log "feature $f: NOT supported (kernel without CONFIG_MEM_SOFT_DIRTY: no pre-copy here)"
		else
			warn "feature $f: NOT supported by this kernel (no lazy pages / post-copy)"
		fi
	done
	if [ "${DUPLEX_DEPS_SMOKE:-1}" != 0 ]; then
		smoke_test "$criu" || { warn "CRIU dump/restore smoke test failed"; return 1; }
	fi
}

# series_patches: the patch files of contrib/criu/series, in order.
series_patches() {
	sed -e 's/#.*//' -e '/^[[:space:]]*$/d' "$CRIU_PATCH_DIR/series"
}

# criu_patch_id: names the source and patches; a change to either rebuilds CRIU.
criu_patch_id() {
	local p
	{
		echo "$CRIU_SOURCE_VERSION $CRIU_SOURCE_SHA256"
		for p in $(series_patches); do
			echo "$p"
			cat "$CRIU_PATCH_DIR/$p"
		done
	} | sha256sum | cut -c1-12
}

# install_patched_criu ID: downloads the upstream source from Debian's pool, applies the
# series, builds `criu` and installs it at $CRIU_PATCHED_DIR/criu with the wrapper path
# as a symlink to it (no shell wrapper: every CRIU start inside a migration's downtime
# saves an exec). Its `criu --version` says "GitID: duplex-ID". Returns 1 (after a
# warning) on any failure, leaving the installed CRIU as it was.
install_patched_criu() {
	local id=$1 uri work new=$CRIU_PATCHED_DIR.new old=$CRIU_PATCHED_DIR.old
	uri=$(debian_mirror_uri)
	work=$(mktemp -d /var/tmp/duplex-criu-build.XXXXXX)
	TMP_DIRS+=("$work" "$new" "$old")
	chmod 0755 "$work"
	rm -rf "$new"
	# A subshell, so that die returns here instead of exiting. errexit does not work
	# under `if`, so every step is checked.
	if ! (
		install_packages "the CRIU build" $CRIU_BUILD_PACKAGES
		log "downloading CRIU $CRIU_SOURCE_VERSION's source from Debian's pool"
		/usr/lib/apt/apt-helper download-file "$uri/pool/main/c/criu/criu_${CRIU_SOURCE_VERSION}.orig.tar.xz" \
			"$work/criu.tar.xz" "SHA256:$CRIU_SOURCE_SHA256" >"$work/download.log" 2>&1 ||
			{ tail -n 5 "$work/download.log" >&2; die "downloading the CRIU source failed"; }
		tar -xJf "$work/criu.tar.xz" -C "$work" || die "unpacking the CRIU source failed"
		src=$work/criu-$CRIU_SOURCE_VERSION
		for p in $(series_patches); do
			log "applying contrib/criu/$p"
			patch -d "$src" -p1 -s --forward --no-backup-if-mismatch <"$CRIU_PATCH_DIR/$p" ||
				die "contrib/criu/$p does not apply to CRIU $CRIU_SOURCE_VERSION"
		done
		log "building CRIU $CRIU_SOURCE_VERSION (duplex-$id); takes about a minute"
		if ! make -C "$src" -j"$(nproc)" GITID="duplex-$id" criu >"$work/build.log" 2>&1; then
			tail -n 20 "$work/build.log" >&2
			die "building CRIU failed"
		fi
		install -D -m 0755 "$src/criu/criu" "$new/criu" || die "installing the CRIU binary failed"
	); then
		warn "could not build CRIU with duplex's patches"
		return 1
	fi
	if ! verify_criu "$new/criu"; then
		warn "CRIU with duplex's patches failed verification"
		return 1
	fi
	rm -rf "$old"
	if [ -e "$CRIU_PATCHED_DIR" ]; then mv "$CRIU_PATCHED_DIR" "$old"; fi
	mv "$new" "$CRIU_PATCHED_DIR"
	rm -rf "$old"
	mkdir -p "$(dirname "$CRIU_WRAPPER")"
	ln -sfn "$CRIU_PATCHED_DIR/criu" "$CRIU_WRAPPER.tmp"
	mv -Tf "$CRIU_WRAPPER.tmp" "$CRIU_WRAPPER"
	STAMP_SOURCE=patched
	STAMP_SUITE=
	STAMP_PACKAGE="criu $CRIU_SOURCE_VERSION + contrib/criu/series"
	STAMP_TARGET=$CRIU_PATCHED_DIR/criu
	STAMP_PATCHES=$id
	log "CRIU $CRIU_SOURCE_VERSION with duplex's patches (duplex-$id) installed at $CRIU_PATCHED_DIR/criu"
}

write_stamp() {
	local v=$1
	cat >"$CRIU_STAMP.tmp" <<EOF
version=$v
source=$STAMP_SOURCE
suite=$STAMP_SUITE
package=$STAMP_PACKAGE
target=$STAMP_TARGET
patches=${STAMP_PATCHES:-}
patch_failed=${STAMP_PATCH_FAILED:-}
wrapper=$CRIU_WRAPPER
prefix=$CRIU_PREFIX
installed=$(date -u +%Y-%m-%dT%H:%M:%SZ)
EOF
	mv -f "$CRIU_STAMP.tmp" "$CRIU_STAMP"
}

install_criu() {
	local v sys="" id="" src ok
	STAMP_PATCHES=
	STAMP_PATCH_FAILED=
	case "$CRIU_PATCHED" in
	auto | 1) id=$(criu_patch_id) ;;
	0) ;;
	*) die "DUPLEX_CRIU_PATCHED is '$CRIU_PATCHED'; use auto, 1 or 0" ;;
	esac
	# Fast path: stamp present, the installed criu still runs at the stamped version and
	# is the kind asked for (patched with these patches, or not patched).
	if [ "${DUPLEX_DEPS_FORCE:-0}" != 1 ] && [ -f "$CRIU_STAMP" ] &&
		[ "$(stamp_get wrapper)" = "$CRIU_WRAPPER" ] && [ -x "$CRIU_WRAPPER" ]; then
		v=$(criu_version "$CRIU_WRAPPER")
		src=$(stamp_get source)
		ok=0
		if [ -z "$id" ]; then
			[ "$src" != patched ] && ok=1
		elif [ "$src" = patched ]; then
			[ "$(stamp_get patches)" = "$id" ] && ok=1
		elif [ "$CRIU_PATCHED" = auto ] && [ "$(stamp_get patch_failed)" = "$id" ]; then
			ok=1 # this build failed before: not retried until the patches change
			warn "using CRIU without duplex's patches: building them failed before (DUPLEX_DEPS_FORCE=1 retries)"
			STAMP_PATCH_FAILED=$id
		fi
		if [ -n "$v" ] && [ "$v" = "$(stamp_get version)" ] && [ "$ok" = 1 ]; then
			if [ "$src" = patched ]; then src="patched, duplex-$id"; fi
			log "CRIU $v ($src) already installed"
			CRIU_FINAL_VERSION=$v
			return
		fi
		log "installed CRIU at $CRIU_WRAPPER is broken, changed or not the kind asked for (got '${v}', $src); reinstalling"
	fi

	if [ -n "$id" ]; then
		if install_patched_criu "$id"; then
			v=$(criu_version "$CRIU_WRAPPER")
			[ -n "$v" ] || die "$CRIU_WRAPPER does not run"
			write_stamp "$v"
			CRIU_FINAL_VERSION=$v
			return
		fi
		[ "$CRIU_PATCHED" = 1 ] && die "DUPLEX_CRIU_PATCHED=1 and CRIU with duplex's patches did not install"
		warn "falling back to CRIU without duplex's patches (post-copy's frozen time then grows with memory)"
		STAMP_PATCH_FAILED=$id
	fi

	sys=$(command -v criu 2>/dev/null || true)
	if [ -n "$sys" ]; then
		sys=$(readlink -f "$sys")
		case "$sys" in "$DUPLEX_LIB_DIR"/*) sys= ;; esac
	fi
	if [ -n "$sys" ] && criu_qualifies "$sys"; then
		log "using the system's CRIU $(criu_version "$sys") at $sys"
		use_system_criu "$sys"
		if ! verify_criu "$CRIU_WRAPPER"; then
			warn "the system's CRIU $sys failed verification; installing a private one"
			sys=
		fi
	else
		if [ -n "$sys" ]; then
			log "system criu $sys (version '$(criu_version "$sys")') does not qualify (need >= $CRIU_MIN_VERSION, 'criu check', nftables lock)"
		fi
		sys=
	fi
	[ -n "$sys" ] || install_private_criu
	v=$(criu_version "$CRIU_WRAPPER")
	[ -n "$v" ] || die "$CRIU_WRAPPER does not run"
	write_stamp "$v"
	CRIU_FINAL_VERSION=$v
}

# ======================================================================================
# 3. Go tools
# ======================================================================================
install_go_tools() {
	# None needed yet. Add `go install pkg@version` lines here (pinned versions only).
	:
}

install_packages "duplex" $DEB_PACKAGES
install_criu
install_go_tools
DUPLEX_LIB_DIR=$DUPLEX_LIB_DIR bash "$(dirname "${BASH_SOURCE[0]}")/vm-deps.sh" # VM guest for internal/vmtest
log "done: CRIU $CRIU_FINAL_VERSION at $CRIU_WRAPPER"
