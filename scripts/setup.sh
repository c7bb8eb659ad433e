# Shared set-up for scripts/demo and scripts/test (sourced, not run): Debian packages, a Rust
# toolchain check, and the repository root as the working directory.
# shellcheck shell=bash

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO_ROOT"

MIN_RUST=1.85

if [ -t 2 ]; then
    log() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }
else
    log() { printf '==> %s\n' "$*" >&2; }
fi
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

require_root() {
    [ "$(id -u)" = 0 ] || die "run as root: it creates network namespaces (as a user with sudo: sudo bash $0)"
}

# Debian packages by need. Header, library and data packages are listed as well as programs:
# `apt-get install --no-install-recommends` installs nothing the list does not name, and a
# missing .proto or header cannot be found by looking for programs (docs/install.md says why
# each package is here).
#   demo: build the workspace and run a vxlan lab (scripts/demo)
#   test: everything scripts/test runs (unit, integration, root e2e tests, deploy/check)
#   vm:   the VM stage (scripts/vm-test): a hypervisor, libvirt and Vagrant
PACKAGES_demo=(
    build-essential pkg-config protobuf-compiler libprotobuf-dev ca-certificates
    etcd-server etcd-client iproute2 iptables iputils-ping procps
)
PACKAGES_test=(
    "${PACKAGES_demo[@]}"
    nftables psmisc util-linux jq bc curl python3 python3-venv
    iperf3 prometheus ethtool tcpdump wireguard-tools wireguard-go
    busybox-static umoci skopeo runc containerd podman containernetworking-plugins
    systemd vagrant
)
PACKAGES_vm=(
    qemu-system-x86 qemu-utils libvirt-daemon-system libvirt-clients dnsmasq-base
    vagrant vagrant-libvirt debootstrap rsync openssh-client
)

# Prints the packages of list NAME (demo, test or vm) that dpkg does not report as installed.
missing_packages() {
    local -n list="PACKAGES_$1"
    local p
    for p in "${list[@]}"; do
        [ "$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null)" = "install ok installed" ] || echo "$p"
    done
}

# Installs what list NAME (demo, test or vm) lacks; apt-get runs only when something does.
# The stable entry point for other scripts: source scripts/setup.sh; ensure_packages vm
ensure_packages() {
    local need=$1
    declare -p "PACKAGES_$need" >/dev/null 2>&1 || die "unknown package list '$need' (demo, test, vm)"
    command -v dpkg-query >/dev/null 2>&1 || die "no dpkg-query: tweed's scripts need Debian 12"
    local missing
    mapfile -t missing < <(missing_packages "$need")
    if [ ${#missing[@]} -eq 0 ]; then
        log "all $need packages installed, skipping apt-get"
        return
    fi
    log "missing $need packages: ${missing[*]}; installing"
    command -v apt-get >/dev/null 2>&1 || die "no apt-get: install these by hand: ${missing[*]}"
    local extra=()
    # A qemu-utils backport (some images carry 1:10.x~bpo12 from no configured source) breaks
    # Debian 12's qemu-system-x86 ("Breaks: qemu-system-common (< 1:8.0)"): take bookworm's
    # qemu-utils with it, or apt refuses the whole install.
    if [ "$need" = vm ] && dpkg-query -W -f='${Version}' qemu-utils 2>/dev/null | grep -q '~bpo'; then
        log "qemu-utils is a backport ($(dpkg-query -W -f='${Version}' qemu-utils)); installing bookworm's with qemu-system-x86"
        extra=(--allow-downgrades qemu-utils/bookworm)
    fi
    # No daemon is needed from these packages: installing under a policy-rc.d that forbids
    # starting services (exit 101) works, and every test starts its own etcd on a free port.
    DEBIAN_FRONTEND=noninteractive apt-get update
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}" "${extra[@]}"
    mapfile -t missing < <(missing_packages "$need")
    [ ${#missing[@]} -eq 0 ] || die "still not installed after apt-get: ${missing[*]}"
}

# sudo resets PATH, hiding a rustup toolchain in the invoking user's home: look there too.
find_cargo() {
    local home d
    if ! command -v cargo >/dev/null 2>&1; then
        for d in ${CARGO_HOME:+"$CARGO_HOME/bin"} "$HOME/.cargo/bin" /root/.cargo/bin /usr/local/cargo/bin; do
            if [ -x "$d/cargo" ]; then
                PATH="$d:$PATH"
                break
            fi
        done
    fi
    if ! command -v cargo >/dev/null 2>&1 && [ -n "${SUDO_USER:-}" ]; then
        home=$(getent passwd "$SUDO_USER" | cut -d: -f6)
        if [ -n "$home" ] && [ -x "$home/.cargo/bin/cargo" ]; then
            PATH="$home/.cargo/bin:$PATH"
            # rustup's proxies find their toolchains through RUSTUP_HOME, which is per user.
            [ -z "${RUSTUP_HOME:-}" ] && [ -d "$home/.rustup" ] && export RUSTUP_HOME="$home/.rustup"
        fi
    fi
    export PATH
    command -v cargo >/dev/null 2>&1 ||
        die "cargo not found: install Rust >= $MIN_RUST with rustup (https://rustup.rs), then re-run"
    local v
    v=$(cargo --version | awk '{print $2}')
    if ! printf '%s\n%s\n' "$MIN_RUST" "${v%%-*}" | sort -V -C; then
        die "cargo $v is too old: tweed needs Rust >= $MIN_RUST (rustup update stable)"
    fi
    log "using $(cargo --version)"
}

# setup demo|test: root, that list's packages, and a recent enough cargo.
setup() {
    require_root
    ensure_packages "${1:?setup needs a package list: demo or test}"
    find_cargo
}
