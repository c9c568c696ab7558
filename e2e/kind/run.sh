#!/usr/bin/env bash
# The whole path on kind: create the cluster, build and load both images, install hookfleet with the chart,
# run the e2e suite, and delete the cluster (keep it with HOOKFLEET_KIND_KEEP=1, e.g. to look around after a
# failure). Arguments go to the suite's test binary.
#
#   HOOKFLEET_KIND_IMAGES=oci   build the images with `make images` instead of Docker (see build-images.sh)
# shellcheck source=e2e/kind/lib.sh
source "$(dirname "$0")/lib.sh"
cleanup() {
    rc=$?
    if [ "${HOOKFLEET_KIND_KEEP:-0}" = 1 ]; then
        log "keeping cluster $CLUSTER: export KUBECONFIG=$KUBECONFIG_PATH; delete with e2e/kind/delete-cluster.sh"
    elif [ $rc -ne 0 ]; then
        "$KIND_DIR/delete-cluster.sh" --logs "$WORK/logs" || true
        log "failed; node and pod logs are in $WORK/logs"
    else
        "$KIND_DIR/delete-cluster.sh" || true
    fi
    exit $rc
}
trap cleanup EXIT

"$KIND_DIR/create-cluster.sh" >/dev/null
if [ "${HOOKFLEET_KIND_IMAGES:-docker}" = oci ]; then
    "$KIND_DIR/build-images.sh" --oci
else
    "$KIND_DIR/build-images.sh"
fi
"$KIND_DIR/install.sh"
"$KIND_DIR/run-suite.sh" "$@"
