# Task runner: the targets README.md and .ci/run call.
SHELL := /bin/bash
CARGO ?= cargo

.PHONY: help deps tools demo test lint fmt crds clean-cache images

help: ## List targets
	@grep -E '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

deps: ## Install system packages the tests use (Debian: rabbitmq-server, prometheus; containerd etc. for the node), when missing
	hack/deps.sh

tools: ## Build the pinned control-plane and node binaries into ~/.cache/hookfleet (cached by version)
	hack/build-tools.sh

demo: deps tools ## hookfleet at work: real node, chart install, sample Integration, live delivered count (root; else the rootless stack); Ctrl-C ends it
	@if [ "$$(id -u)" -eq 0 ]; then $(CARGO) run -q -p hookfleet-e2e --bin hookfleet-env -- demo; \
	else echo "make demo: not root, so no real node: the rootless stack (API only) instead" >&2; \
	$(CARGO) run -q -p hookfleet-e2e --bin hookfleet-env -- up; fi

test: deps tools lint ## The whole test suite: lints, unit tests, and integration tests on the real stack (benches: bench-*)
	$(CARGO) test --workspace --lib --bins --tests

lint: ## rustfmt, clippy (warnings are errors), no import cycle between modules, actionlint on the workflows; the generated CRD is checked by a test
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	python3 hack/modcycles.py operator/src worker/src crds/src testkit/src e2e/src kubectl-hookfleet/src
	"$$(hack/build-tools.sh --print-dir actionlint)/actionlint" .github/workflows/*.yml

fmt: ## Format the code
	$(CARGO) fmt --all

images: ## Worker and operator images as OCI archives in target/images (cargo build --release; no Docker)
	$(CARGO) run -q -p hookfleet-e2e --bin hookfleet-images -- --out $(CURDIR)/target/images

crds: ## Regenerate crds/integrations.hookfleet.io.yaml and the chart's copy from the Rust types
	$(CARGO) run -q -p hookfleet-crds --bin crdgen -- --write

.PHONY: test-worker-faults test-worker-nats test-broker-cluster bench bench-worker bench-nats bench-webhooks bench-operator test-node test-e2e

test-e2e: ## The e2e suite on the local real node (root): chart install, real worker pods, every scenario's account
	$(CARGO) test -p hookfleet-e2e --test suite -- --nocapture

.PHONY: test-nodes test-e2e-nodes test-incident chaos release-local

release-local: deps tools ## The release workflow against a local registry (root): multi-arch images, SBOMs, provenance, cosign signatures, chart as OCI, then helm install from the registry on the real node, which pulls the images
	HOOKFLEET_DEPS_RELEASE=1 hack/deps.sh
	hack/build-tools.sh crane cosign syft >/dev/null
	$(CARGO) run -q -p hookfleet-e2e --bin hookfleet-release -- local

chaos: ## Chaos soak (root; not in `make test`): 30 min of load on 3 nodes + 3 brokers, random faults (seed printed), per-id report; HOOKFLEET_CHAOS_MINUTES/SEED/RATE
	$(CARGO) run -q -p hookfleet-e2e --bin hookfleet-chaos

test-e2e-nodes: ## The e2e suite on 3 local real nodes (root; HOOKFLEET_E2E_NODES=3)
	HOOKFLEET_E2E_NODES=3 $(CARGO) test -p hookfleet-e2e --test suite -- --nocapture

test-incident: ## The incident on 3 local real nodes (root): node 3 at nofile 1024:1024, exit 3, node excluded, a page with the chart's default for:; drain and node loss under load (~10 min)
	HOOKFLEET_E2E_NODES=3 HOOKFLEET_E2E_SCENARIOS=incident,drain,nodeloss $(CARGO) test -p hookfleet-e2e --test suite -- --nocapture

test-node: ## The real node (root): a pod reaches the host's sink, RabbitMQ and the API; nofile limits; clean teardown
	$(CARGO) test -p hookfleet-e2e --test node -- --nocapture

test-nodes: ## 3 real nodes (root): own nofile limits, node 1 → Service → node 3, node loss and restart, clean teardown (~30 s)
	$(CARGO) test -p hookfleet-e2e --test nodes -- --nocapture

test-worker-faults: ## Worker fault scenarios: kill -9, broker restart, fd limit, SIGTERM, deleted queue, poison message, full queue, memory alarm (real RabbitMQ)
	$(CARGO) test -p hookfleet-worker --test faults -- --nocapture

test-worker-nats: ## The NATS JetStream source on a real nats-server: ack, nak retries, dead letters with PubAck; kill -9, SIGTERM, server restart, 3-node cluster leader loss, sink outage, fd pressure, poison message
	$(CARGO) test -p hookfleet-worker --test nats -- --nocapture

test-broker-cluster: ## 3-node RabbitMQ cluster: kill -9 of the work queue's leader node under load (10,000 msgs, two workers, flaky sink), 0 lost, node rejoins
	$(CARGO) test -p hookfleet-worker --test cluster -- --nocapture

bench: ## The benchmark suite (docs/benchmarks.md): figures beside same-run baselines, a table at the end; HOOKFLEET_BENCH_QUICK=1: a few minutes
	$(CARGO) bench -p hookfleet-worker --bench suite
	$(MAKE) bench-operator

bench-operator: ## Operator at scale: 100 and 1,000 Integrations beside a bare client's server-side apply (T0); 10,000 Webhooks on one Integration (Ready, snapshot, status writes/min, propagation)
	$(CARGO) build --release -p hookfleet-operator
	$(CARGO) run --release -q -p hookfleet-e2e --bin hookfleet-bench-operator

bench-worker: ## Only the suite's throughput section: B, H, L and hookfleet end to end (classic/quorum, 200 B/8 KiB, plain/signed+template)
	HOOKFLEET_BENCH_SECTIONS=throughput $(CARGO) bench -p hookfleet-worker --bench suite

bench-nats: ## Only the suite's nats section and, beside it, RabbitMQ's classic 200 B row: a bare JetStream consumer (B), the bare client (H), L, hookfleet on NATS
	HOOKFLEET_BENCH_SECTIONS=throughput,nats HOOKFLEET_BENCH_QUEUE_TYPES=classic HOOKFLEET_BENCH_SIZES=200 $(CARGO) bench -p hookfleet-worker --bench suite

bench-webhooks: ## Only the suite's webhooks section: 10,000 Webhooks on one worker (matching cost, drain and fan-out rates, RSS, propagation) beside one destination
	HOOKFLEET_BENCH_SECTIONS=webhooks $(CARGO) bench -p hookfleet-worker --bench suite
