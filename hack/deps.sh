#!/usr/bin/env bash
# Installs the Debian packages the test stack runs, when missing: rabbitmq-server (a throwaway node per
# test, started by the harness in e2e/); containerd, runc and busybox-static (the images of e2e/src/images.rs
# are imported into a containerd and run; busybox is the pause and tools images); ca-certificates (the CA
# bundle the worker and operator images carry). Needs root (or sudo) and apt-get.
set -euo pipefail

need=()
[ -x /usr/lib/rabbitmq/bin/rabbitmq-server ] || need+=(rabbitmq-server)
command -v setpriv >/dev/null || need+=(util-linux)
command -v containerd >/dev/null || need+=(containerd)
command -v runc >/dev/null || need+=(runc)
# Debian's busybox-static installs /bin/busybox (the dynamic `busybox` package would do too: its libraries
# are copied into the images).
[ -x /bin/busybox ] || need+=(busybox-static)
[ -f /etc/ssl/certs/ca-certificates.crt ] || need+=(ca-certificates)
[ ${#need[@]} -eq 0 ] && exit 0

sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
echo "deps: installing ${need[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get install -y -q --no-install-recommends "${need[@]}" >/dev/null \
    || { $sudo apt-get update -q >/dev/null && $sudo apt-get install -y -q --no-install-recommends "${need[@]}" >/dev/null; }
