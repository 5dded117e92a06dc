# Shared by deps.sh and vm-deps.sh (sourced, not run).

log() { echo "deps: $*"; }
warn() { echo "deps: WARNING: $*" >&2; }
die() { echo "deps: ERROR: $*" >&2; exit 1; }

# install_packages WHAT PKG...: installs the Debian packages that are missing, with
# the system's own apt sources, and checks that each one is installed afterwards.
install_packages() {
	local what=$1 p missing=()
	shift
	for p in "$@"; do
		dpkg-query -W -f='${db:Status-Abbrev}' "$p" 2>/dev/null | grep -q '^ii' || missing+=("$p")
	done
	if [ ${#missing[@]} -eq 0 ]; then
		log "$what present: $*"
		return
	fi
	log "installing Debian packages for $what: ${missing[*]}"
	apt-get -qq -o DPkg::Lock::Timeout=300 update
	apt-get -y -qq -o DPkg::Lock::Timeout=300 install --no-install-recommends "${missing[@]}" >/dev/null
	for p in "${missing[@]}"; do
		dpkg-query -W -f='${db:Status-Abbrev}' "$p" 2>/dev/null | grep -q '^ii' || die "package $p did not install"
	done
}
