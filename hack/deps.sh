#!/usr/bin/env bash
# Installs the Debian packages the test stack runs, when missing: rabbitmq-server (a throwaway node per
# test, started by the harness in e2e/) and prometheus (promtool tests of the chart's alert rules, and a live
# Prometheus for e2e/src/prometheus.rs). Needs root (or sudo) and apt-get.
set -euo pipefail

need=()
[ -x /usr/lib/rabbitmq/bin/rabbitmq-server ] || need+=(rabbitmq-server)
command -v setpriv >/dev/null || need+=(util-linux)
{ [ -x /usr/bin/prometheus ] && [ -x /usr/bin/promtool ]; } || need+=(prometheus)
[ ${#need[@]} -eq 0 ] && exit 0

sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
echo "deps: installing ${need[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get install -y -q --no-install-recommends "${need[@]}" >/dev/null \
    || { $sudo apt-get update -q >/dev/null && $sudo apt-get install -y -q --no-install-recommends "${need[@]}" >/dev/null; }
