#!/usr/bin/env bash
# Deletes the kind cluster and its kubeconfig. With --logs DIR, first exports the nodes' logs there
# (`kind export logs`: kubelet, containerd, every pod's containers), for CI artifacts.
# shellcheck source=e2e/kind/lib.sh
source "$(dirname "$0")/lib.sh"
if [ "${1:-}" = "--logs" ]; then
    [ -n "${2:-}" ] || die "--logs needs a directory"
    log "exporting logs of $CLUSTER to $2"
    "$KIND" export logs --name "$CLUSTER" "$2" || log "kind export logs failed; deleting anyway"
fi
log "deleting kind cluster $CLUSTER"
"$KIND" delete cluster --name "$CLUSTER"
rm -f "$KUBECONFIG_PATH"
