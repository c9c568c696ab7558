#!/usr/bin/env bash
# Builds the worker and operator images and loads them into the kind cluster's nodes.
#
#   e2e/kind/build-images.sh            docker build of ./Dockerfile's two targets, then `kind load docker-image`
#   e2e/kind/build-images.sh --oci      no Docker build: `make images` writes OCI archives (e2e/src/images.rs),
#                                       then `kind load image-archive` (the same images the local node runs)
# shellcheck source=e2e/kind/lib.sh
source "$(dirname "$0")/lib.sh"
need "$KIND" "install kind: go install sigs.k8s.io/kind@v0.33.0"

case "${1:-}" in
    "")
        need "$DOCKER" "or use --oci"
        for target in worker operator; do
            image="$WORKER_IMAGE"; [ "$target" = operator ] && image="$OPERATOR_IMAGE"
            log "docker build --target $target -t $image"
            DOCKER_BUILDKIT=1 "$DOCKER" build --target "$target" -t "$image" "$REPO"
        done
        log "loading $WORKER_IMAGE and $OPERATOR_IMAGE into $CLUSTER"
        "$KIND" load docker-image --name "$CLUSTER" "$WORKER_IMAGE" "$OPERATOR_IMAGE"
        ;;
    --oci)
        [ -z "${HOOKFLEET_IMAGE_TAG:-}" ] || [ "$HOOKFLEET_IMAGE_TAG" = "$(workspace_version)" ] ||
            die "--oci images are tagged with the workspace version $(workspace_version), not HOOKFLEET_IMAGE_TAG"
        out="$WORK/images"
        log "writing OCI archives into $out (cargo build --release when stale)"
        (cd "$REPO" && "$CARGO" run -q -p hookfleet-e2e --bin hookfleet-images -- --out "$out")
        for a in "$out/worker.tar" "$out/operator.tar"; do
            log "loading $a into $CLUSTER"
            "$KIND" load image-archive --name "$CLUSTER" "$a"
        done
        ;;
    *) die "unknown argument '$1' (expected nothing or --oci)" ;;
esac
