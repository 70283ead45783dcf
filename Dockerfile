# syntax=docker/dockerfile:1
# The Weir image: `weir` as the entrypoint, `serve` by default, running as user 10001.
#
#   docker build -t weir:0.1.0 .
#   docker run --rm weir:0.1.0 --help
#
# Stage 1 builds the release binary; librdkafka is compiled from source by rdkafka-sys and linked
# statically, OpenSSL and zlib dynamically. Stage 2 is Debian slim with only their runtime
# libraries and the CA bundle. The chart (charts/weir) runs it with a read-only root filesystem.

ARG RUST_VERSION=1.95
# Builder and runtime must be the same Debian release (the binary links its OpenSSL). Moving to
# trixie also means libssl3t64 instead of libssl3 below.
ARG DEBIAN_RELEASE=bookworm

FROM rust:${RUST_VERSION}-${DEBIAN_RELEASE} AS build
# librdkafka's `make libs` builds its C and C++ libraries: gcc and g++. Most of these are in the
# rust image already; listing them keeps the build independent of its contents. protoc: the
# Temporal client's protobuf build (feature `temporal`).
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc g++ make perl pkg-config libssl-dev zlib1g-dev \
      protobuf-compiler \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# .dockerignore keeps target/, .tmp/, .git/ and charts/ out of the context.
COPY . .
# The cache mounts keep the registry and build artifacts between builds (BuildKit).
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/usr/local/cargo/git,sharing=locked \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --release --locked --bin weir --features temporal \
 && install -D -m 0755 target/release/weir /out/weir

FROM debian:${DEBIAN_RELEASE}-slim AS runtime
# libssl3 for SASL_SSL/SSL to the brokers; ca-certificates for brokers with public certificates.
# zlib, libgcc and glibc are already in the slim image.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates libssl3 \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --gid 10001 weir \
 && useradd --uid 10001 --gid weir --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin weir
COPY --from=build /out/weir /usr/local/bin/weir
# Numeric, so Kubernetes can verify runAsNonRoot without resolving names.
USER 10001:10001
# 9090: admin (/metrics, /healthz, /readyz); 8080: the reference HTTP API.
EXPOSE 9090 8080
ENTRYPOINT ["/usr/local/bin/weir"]
CMD ["serve"]
