#!/usr/bin/env bash
# Runs the e2e suite (e2e/tests/suite.rs) against the kind cluster. RabbitMQ and the HTTP sink run on this
# host, bound to the host's address on kind's docker network so that pods reach them; RabbitMQ is Debian's or
# Ubuntu's rabbitmq-server package (the suite starts its own node from it). Extra arguments go to the test
# binary (e.g. a test name to run only that scenario).
# shellcheck source=e2e/kind/lib.sh
source "$(dirname "$0")/lib.sh"
[ -f "$KUBECONFIG_PATH" ] || die "no kubeconfig at $KUBECONFIG_PATH: run e2e/kind/create-cluster.sh first"
[ -x /usr/lib/rabbitmq/bin/rabbitmq-server ] || die "rabbitmq-server is not installed (apt-get install rabbitmq-server)"
addr="$(host_addr)"
log "suite against $KUBECONFIG_PATH, host services on $addr"
cd "$REPO" || exit
HOOKFLEET_E2E_KUBECONFIG="$KUBECONFIG_PATH" HOOKFLEET_E2E_HOST_ADDR="$addr" \
    "$CARGO" test -p hookfleet-e2e --test suite -- --test-threads=1 "$@"
