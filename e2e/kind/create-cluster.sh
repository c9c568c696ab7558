#!/usr/bin/env bash
# Creates the kind cluster (e2e/kind/cluster.yaml) unless it exists, and writes its kubeconfig to
# $HOOKFLEET_KIND_DIR/kubeconfig-<cluster>. Prints the kubeconfig path.
# shellcheck source=e2e/kind/lib.sh
source "$(dirname "$0")/lib.sh"
need "$KIND" "install kind: go install sigs.k8s.io/kind@v0.33.0"
need "$DOCKER" "kind runs its nodes as Docker containers"
mkdir -p "$WORK"

if "$KIND" get clusters 2>/dev/null | grep -qx "$CLUSTER"; then
    log "cluster $CLUSTER exists; reusing it"
else
    log "creating kind cluster $CLUSTER"
    args=(create cluster --name "$CLUSTER" --config "$KIND_DIR/cluster.yaml" --wait 5m)
    [ -n "${HOOKFLEET_KIND_NODE_IMAGE:-}" ] && args+=(--image "$HOOKFLEET_KIND_NODE_IMAGE")
    "$KIND" "${args[@]}" --kubeconfig "$KUBECONFIG_PATH"
fi
"$KIND" get kubeconfig --name "$CLUSTER" >"$KUBECONFIG_PATH"
echo "$KUBECONFIG_PATH"
