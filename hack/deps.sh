#!/usr/bin/env bash
# Installs the Debian packages the test stack runs, when missing. Needs root (or sudo) and apt-get.
#   rabbitmq-server   a throwaway broker per test (started by the harness in testkit/)
#   util-linux        setpriv (children die with the harness), prlimit (containerd's nofile limits)
#   ca-certificates   the CA bundle the worker and operator images carry
#   prometheus        promtool, for the chart's alert-rule tests
#   containerd runc containernetworking-plugins iptables busybox-static
#                     the real node (e2e/src/node.rs), which only runs as root anyway
# With HOOKFLEET_DEPS_RELEASE=1 (make release-local) also, for the arm64 images:
#   gcc-aarch64-linux-gnu   the cross linker and arm64 C library (libc6-arm64-cross, copied into the image)
#   binutils                readelf, which names an arm64 binary's shared libraries
#   qemu-user               runs the arm64 binaries from their image's own root (a check, not the build)
# and the Rust target aarch64-unknown-linux-gnu (rustup) and cargo-auditable (cargo install, crates.io).
# As a user without password-less sudo, missing node packages are reported, not installed: the rootless stack
# (control plane, kwok, RabbitMQ) does not need them, and its tests still run.
set -euo pipefail

have() { command -v "$1" >/dev/null; }
core=() node=()
[ -x /usr/lib/rabbitmq/bin/rabbitmq-server ] || core+=(rabbitmq-server)
{ have setpriv && have prlimit; } || core+=(util-linux)
{ have promtool && [ -x /usr/bin/prometheus ]; } || core+=(prometheus)
have containerd && have ctr || node+=(containerd)
have runc || node+=(runc)
for p in bridge host-local portmap loopback; do
    [ -x "/usr/lib/cni/$p" ] || { node+=(containernetworking-plugins); break; }
done
{ have iptables && have iptables-save && have iptables-restore; } || node+=(iptables)
# The static build: it has the ssl_client applet busybox's wget needs for https.
{ [ -x /bin/busybox ] && /bin/busybox --list | grep -qx ssl_client; } || node+=(busybox-static)
[ -f /etc/ssl/certs/ca-certificates.crt ] || core+=(ca-certificates)
if [ -n "${HOOKFLEET_DEPS_RELEASE:-}" ]; then
    have aarch64-linux-gnu-gcc || core+=(gcc-aarch64-linux-gnu)
    have readelf || core+=(binutils)
    have qemu-aarch64 || core+=(qemu-user)
    rustup target list --installed 2>/dev/null | grep -qx aarch64-unknown-linux-gnu \
        || rustup target add aarch64-unknown-linux-gnu >&2
    cargo auditable --version >/dev/null 2>&1 || cargo install cargo-auditable --locked --version 0.7.7 >&2
fi

sudo=""
if [ "$(id -u)" -ne 0 ]; then
    sudo="sudo"
    if ((${#node[@]} > 0)) && ! { have sudo && sudo -n true 2>/dev/null; }; then
        echo "deps: the real node needs ${node[*]} (and root to run); not installing them without root." >&2
        echo "deps: the rootless stack works without them. For the node: sudo apt-get install ${node[*]}" >&2
        node=()
    fi
fi
need=("${core[@]}" "${node[@]}")
[ ${#need[@]} -eq 0 ] && exit 0

echo "deps: installing ${need[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get install -y -q --no-install-recommends "${need[@]}" >/dev/null \
    || { $sudo apt-get update -q >/dev/null && $sudo apt-get install -y -q --no-install-recommends "${need[@]}" >/dev/null; }
