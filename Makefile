# Task runner: the targets README.md and .ci/run call.
SHELL := /bin/bash
CARGO ?= cargo

.PHONY: help deps tools demo test lint fmt crds clean-cache

help: ## List targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

deps: ## Install system packages the tests use (Debian: rabbitmq-server), when missing
	hack/deps.sh

tools: ## Build the pinned control-plane binaries into ~/.cache/hookfleet (cached by version)
	hack/build-tools.sh

demo: deps tools ## Bring up the local stack (control plane + RabbitMQ), install the CRD, apply a sample; Ctrl-C ends it
	$(CARGO) run -q -p hookfleet-e2e --bin hookfleet-env -- up

test: deps tools lint ## The whole test suite: lints, unit tests, and integration tests on the real stack (benches: bench-*)
	$(CARGO) test --workspace --lib --bins --tests

lint: ## rustfmt and clippy (warnings are errors); the generated CRD is checked by a test
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

fmt: ## Format the code
	$(CARGO) fmt --all

crds: ## Regenerate crds/integrations.hookfleet.io.yaml from the Rust types
	$(CARGO) run -q -p hookfleet-crds --bin crdgen -- --write

.PHONY: test-worker-faults bench-worker

test-worker-faults: ## Worker fault scenarios: kill -9, broker restart, fd limit, SIGTERM, deleted queue, poison message, full queue, memory alarm (real RabbitMQ)
	$(CARGO) test -p hookfleet-worker --test faults -- --nocapture

bench-worker: ## Worker throughput beside its baselines (raw broker consume+ack, raw sink), one run
	$(CARGO) bench -p hookfleet-worker --bench throughput
