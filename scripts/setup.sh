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
    [ "$(id -u)" = 0 ] || die "run as root: it creates network namespaces (sudo bash $0)"
}

# Every command the build and the lab need, mapped to the Debian package that ships it.
declare -A PROGRAM_PACKAGE=(
    [etcd]=etcd-server
    [etcdctl]=etcd-client
    [protoc]=protobuf-compiler
    [ip]=iproute2
    [ping]=iputils-ping
    [iperf3]=iperf3
    [prometheus]=prometheus
    [iptables]=iptables
    [sysctl]=procps
    [pgrep]=procps
    [killall]=psmisc
    [cc]=build-essential
    [make]=build-essential
    [pkg-config]=pkg-config
    [jq]=jq
    [nsenter]=util-linux
    [busybox]=busybox-static
    [umoci]=umoci
    [skopeo]=skopeo
    [runc]=runc
    [containerd]=containerd
    [ctr]=containerd
    [podman]=podman
    [nft]=nftables
    [bc]=bc
    [curl]=curl
    [python3]=python3
    [systemd-analyze]=systemd
    [vagrant]=vagrant
)
# Files the tests need that are not programs on PATH, and their packages.
declare -A FILE_PACKAGE=(
    [/usr/lib/cni/bridge]=containernetworking-plugins
    [/etc/ssl/certs/ca-certificates.crt]=ca-certificates
)
APT_PACKAGES=(etcd-server etcd-client protobuf-compiler iproute2 iputils-ping iperf3 iptables
    nftables procps psmisc build-essential pkg-config ca-certificates jq util-linux
    busybox-static umoci skopeo runc containerd podman containernetworking-plugins bc curl python3
    prometheus python3-venv systemd vagrant)

install_packages() {
    local missing=()
    local p
    for p in "${!PROGRAM_PACKAGE[@]}"; do
        command -v "$p" >/dev/null 2>&1 || missing+=("$p (${PROGRAM_PACKAGE[$p]})")
    done
    for p in "${!FILE_PACKAGE[@]}"; do
        [ -e "$p" ] || missing+=("$p (${FILE_PACKAGE[$p]})")
    done
    if [ ${#missing[@]} -eq 0 ]; then
        log "all tools present, skipping apt-get"
        return
    fi
    log "missing: ${missing[*]}; installing Debian packages"
    command -v apt-get >/dev/null 2>&1 || die "no apt-get: install these by hand: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update
    apt-get install -y --no-install-recommends "${APT_PACKAGES[@]}"
    for p in "${!PROGRAM_PACKAGE[@]}"; do
        command -v "$p" >/dev/null 2>&1 || die "$p still missing after installing ${PROGRAM_PACKAGE[$p]}"
    done
    for p in "${!FILE_PACKAGE[@]}"; do
        [ -e "$p" ] || die "$p still missing after installing ${FILE_PACKAGE[$p]}"
    done
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

setup() {
    require_root
    install_packages
    find_cargo
}
