# shellcheck shell=bash
# Shared by the scripts in e2e/kind/ (sourced, not run). Every setting is an environment variable with a
# default, so CI and users change them without editing the scripts.
#
#   HOOKFLEET_KIND_CLUSTER   kind cluster name                          (hookfleet-e2e)
#   HOOKFLEET_KIND_DIR       where the kubeconfig and logs go            (${TMPDIR:-/tmp}/hookfleet-kind)
#   HOOKFLEET_KIND_NODE_IMAGE  node image for `kind create cluster`      (kind's default)
#   HOOKFLEET_IMAGE_TAG      tag of both images                         (the workspace version, Cargo.toml)
#   HOOKFLEET_NAMESPACE      namespace hookfleet is installed into      (hookfleet-system)
#   HOOKFLEET_CHART          the Helm chart install.sh installs         (charts/hookfleet)
#   KIND, DOCKER, HELM, KUBECTL, CARGO   the binaries (helm and kubectl default to the pinned ones that
#                                        hack/build-tools.sh builds when they are not on PATH)
# shellcheck disable=SC2034  # the variables are used by the scripts that source this file
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
KIND_DIR="$REPO/e2e/kind"
CLUSTER="${HOOKFLEET_KIND_CLUSTER:-hookfleet-e2e}"
WORK="${HOOKFLEET_KIND_DIR:-${TMPDIR:-/tmp}/hookfleet-kind}"
KUBECONFIG_PATH="$WORK/kubeconfig-$CLUSTER"
NAMESPACE="${HOOKFLEET_NAMESPACE:-hookfleet-system}"
KIND="${KIND:-kind}"
DOCKER="${DOCKER:-docker}"
CARGO="${CARGO:-cargo}"

log() { printf '%(%T)T kind-e2e: %s\n' -1 "$*" >&2; }
die() { log "error: $*"; exit 1; }

# The version in [workspace.package] of the root Cargo.toml: the operator's default --worker-image is
# ghcr.io/hookfleet/worker:<that version>, so the images carry it too.
workspace_version() {
    awk '/^\[workspace\.package\]/ { p = 1; next } /^\[/ { p = 0 }
         p && $1 == "version" { gsub(/"/, "", $3); print $3; exit }' "$REPO/Cargo.toml"
}
TAG="${HOOKFLEET_IMAGE_TAG:-$(workspace_version)}"
[ -n "$TAG" ] || die "no version found in [workspace.package] of $REPO/Cargo.toml (set HOOKFLEET_IMAGE_TAG)"
WORKER_REPOSITORY="ghcr.io/hookfleet/worker"
OPERATOR_REPOSITORY="ghcr.io/hookfleet/operator"
WORKER_IMAGE="$WORKER_REPOSITORY:$TAG"
OPERATOR_IMAGE="$OPERATOR_REPOSITORY:$TAG"

need() { command -v "$1" >/dev/null || die "$1 not found on PATH ($2)"; }

# helm or kubectl: $HELM/$KUBECTL, else on PATH, else the pinned build of hack/build-tools.sh.
tool() {
    local var="${1^^}"
    if [ -n "${!var:-}" ]; then echo "${!var}"; return; fi
    if command -v "$1" >/dev/null; then command -v "$1"; return; fi
    echo "$("$REPO/hack/build-tools.sh" --print-dir "$1")/$1"
}

# The IPv4 address of the host on kind's docker network (its gateway): pods reach a server the host binds
# there, which is how the suite's RabbitMQ and HTTP sink are reached from the cluster.
host_addr() {
    local net="${KIND_EXPERIMENTAL_DOCKER_NETWORK:-kind}" addr id
    addr=$("$DOCKER" network inspect "$net" -f '{{range .IPAM.Config}}{{println .Gateway}}{{end}}' |
        grep -E '^[0-9]+(\.[0-9]+){3}$' | head -n1 || true)
    if [ -z "$addr" ]; then
        # Some Docker versions leave the gateway out of IPAM: read it off the network's bridge.
        id=$("$DOCKER" network inspect "$net" -f '{{.Id}}')
        addr=$(ip -4 -o addr show dev "br-${id:0:12}" 2>/dev/null | awk '{ split($4, a, "/"); print a[1]; exit }')
    fi
    [ -n "$addr" ] || die "no IPv4 gateway on docker network '$net' (is the kind cluster up?)"
    echo "$addr"
}
