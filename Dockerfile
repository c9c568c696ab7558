# syntax=docker/dockerfile:1
#
# The hookfleet worker and operator images, for users who build with Docker (or any BuildKit builder):
#
#   docker build --target worker   -t ghcr.io/hookfleet/worker:0.1.0   .
#   docker build --target operator -t ghcr.io/hookfleet/operator:0.1.0 .
#
# (the tag is the workspace version in Cargo.toml: the operator's default --worker-image is
# ghcr.io/hookfleet/worker:<its version>). e2e/kind/build-images.sh runs exactly these two commands;
# .github/workflows/release.yml builds both for linux/amd64 and linux/arm64 with buildx.
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

# Multi-platform (`docker buildx build --platform linux/amd64,linux/arm64`, as .github/workflows/release.yml
# does): the build stage runs on the builder's own platform and cross-compiles for the target's, so no
# platform is emulated; a plain `docker build` builds for the machine's own platform the same way.
FROM --platform=$BUILDPLATFORM rust:${RUST_VERSION}-bookworm AS build
ARG TARGETARCH
ARG BUILDARCH
WORKDIR /src
# The Rust target, and for another platform than the builder's, Debian's cross linker and C library.
RUN set -eu; \
    case "$TARGETARCH" in \
        amd64) triple=x86_64-unknown-linux-gnu; gnu=x86_64-linux-gnu; gcc=gcc-x86-64-linux-gnu ;; \
        arm64) triple=aarch64-unknown-linux-gnu; gnu=aarch64-linux-gnu; gcc=gcc-aarch64-linux-gnu ;; \
        *) echo "unsupported platform linux/$TARGETARCH" >&2; exit 1 ;; \
    esac; \
    echo "$triple" > /target; \
    if [ "$TARGETARCH" != "$BUILDARCH" ]; then \
        apt-get update -q; \
        apt-get install -y -q --no-install-recommends "$gcc" "libc6-dev-${TARGETARCH}-cross"; \
        rm -rf /var/lib/apt/lists/*; \
        printf '[target.%s]\nlinker = "%s-gcc"\n' "$triple" "$gnu" >> /usr/local/cargo/config.toml; \
        echo "CC_$(echo "$triple" | tr - _)=${gnu}-gcc" > /cross.env; \
    else \
        : > /cross.env; \
    fi; \
    rustup target add "$triple"
# cargo auditable records the dependency tree in the binaries, where SBOM scanners (syft, trivy) read it.
RUN cargo install cargo-auditable --locked --version 0.7.7
COPY . .
# Cache mounts keep the registry and the target dir between builds on one builder; --locked builds exactly
# the dependency versions of Cargo.lock.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target,id=hookfleet-target-$TARGETARCH \
    set -eu; triple=$(cat /target); set -a; . /cross.env; set +a; \
    cargo auditable build --release --locked --target "$triple" -p hookfleet-worker -p hookfleet-operator \
        --bin hookfleet-worker --bin hookfleet-operator \
    && mkdir -p /out \
    && cp "target/$triple/release/hookfleet-worker" "target/$triple/release/hookfleet-operator" /out/

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
