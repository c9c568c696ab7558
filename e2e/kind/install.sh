#!/usr/bin/env bash
# Installs (or upgrades) hookfleet into the kind cluster with its Helm chart, using the images that
# build-images.sh loaded. This is the one place the chart is called: adjust values here.
# Extra arguments are passed to helm (e.g. --set operator.logFormat=text).
# shellcheck source=e2e/kind/lib.sh
source "$(dirname "$0")/lib.sh"
HELM_BIN="$(tool helm)"
chart="${HOOKFLEET_CHART:-$REPO/charts/hookfleet}"
[ -f "$chart/Chart.yaml" ] || die "no Helm chart at $chart (charts/hookfleet is not in this checkout yet)"
[ -f "$KUBECONFIG_PATH" ] || die "no kubeconfig at $KUBECONFIG_PATH: run e2e/kind/create-cluster.sh first"

log "helm upgrade --install hookfleet ($OPERATOR_IMAGE, workers $WORKER_IMAGE) into $NAMESPACE"
"$HELM_BIN" upgrade --install hookfleet "$chart" \
    --kubeconfig "$KUBECONFIG_PATH" \
    --namespace "$NAMESPACE" --create-namespace \
    --set image.repository="$OPERATOR_REPOSITORY" \
    --set image.tag="$TAG" \
    --set image.pullPolicy=IfNotPresent \
    --set worker.image.repository="$WORKER_REPOSITORY" \
    --set worker.image.tag="$TAG" \
    --wait --timeout 5m \
    "$@"
