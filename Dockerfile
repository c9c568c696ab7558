# syntax=docker/dockerfile:1
#
# The hookfleet worker and operator images, for users who build with Docker (or any BuildKit builder):
#
#   docker build --target worker   -t ghcr.io/hookfleet/worker:0.1.0   .
#   docker build --target operator -t ghcr.io/hookfleet/operator:0.1.0 .
#
# (the tag is the workspace version in Cargo.toml: the operator's default --worker-image is
# ghcr.io/hookfleet/worker:<its version>). e2e/kind/build-images.sh runs exactly these two commands.
#
# NOT BUILT IN THIS REPOSITORY'S OWN TESTS: the development machines have no Docker. There the same images are
# written without Docker by `make images` (e2e/src/images.rs), with the same layout, kept in step by hand:
#   /usr/local/bin/hookfleet-worker, /usr/local/bin/hookfleet-operator  the entrypoints (no CMD: the operator
#                                                                       renders the worker's args)
#   user 65532:65532 (nonroot), workdir /home/nonroot, a writable /tmp, the CA bundle
#   /etc/ssl/certs/ca-certificates.crt with SSL_CERT_FILE pointing at it.
# The runtime base, distroless "cc" (glibc, libgcc; no shell, no package manager), is Debian 12 like the
# builder below, so the binaries find the same glibc they were linked against.

ARG RUST_VERSION=1.95

FROM rust:${RUST_VERSION}-bookworm AS build
WORKDIR /src
COPY . .
# Cache mounts keep the registry and the target dir between builds on one builder; --locked builds exactly
# the dependency versions of Cargo.lock.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p hookfleet-worker -p hookfleet-operator \
        --bin hookfleet-worker --bin hookfleet-operator \
    && mkdir -p /out \
    && cp target/release/hookfleet-worker target/release/hookfleet-operator /out/

FROM gcr.io/distroless/cc-debian12:nonroot AS runtime
ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt
WORKDIR /home/nonroot
USER 65532:65532
LABEL org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://github.com/hookfleet/hookfleet"

FROM runtime AS worker
LABEL org.opencontainers.image.title="hookfleet-worker" \
      org.opencontainers.image.description="Consumes a RabbitMQ queue and delivers each message as a webhook"
COPY --from=build /out/hookfleet-worker /usr/local/bin/hookfleet-worker
ENTRYPOINT ["/usr/local/bin/hookfleet-worker"]

FROM runtime AS operator
LABEL org.opencontainers.image.title="hookfleet-operator" \
      org.opencontainers.image.description="Reconciles hookfleet Integrations into worker fleets"
COPY --from=build /out/hookfleet-operator /usr/local/bin/hookfleet-operator
ENTRYPOINT ["/usr/local/bin/hookfleet-operator"]
