# syntax=docker/dockerfile:1
#
# chatcache image: a static-ish Rust binary on distroless.
#
#   docker build -t registry.example.com/chatcache:0.1.0 .
#
# The builder is Debian 12 (bookworm) because the runtime image is distroless cc-debian12: the
# binary links against the builder's glibc and must not need a newer one than the runtime has.

ARG RUST_VERSION=1.95

FROM rust:${RUST_VERSION}-bookworm AS builder
WORKDIR /src
# The whole workspace: cargo needs every member's manifest (sim/ is one) to resolve it, even
# when it builds one package.
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY sim ./sim
COPY tests ./tests
COPY bench ./bench
COPY benches ./benches
# The cache mounts keep the registry and target dir between builds; the binary is copied out
# in the same step because a cache mount is not part of the image.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --package chatcache --bin chatcache \
    && install -D -m 0755 target/release/chatcache /out/chatcache

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=builder /out/chatcache /usr/local/bin/chatcache
# The documented defaults, so that the image also runs on its own (`docker run`, with
# CHATCACHE_* variables). In Kubernetes the chart's ConfigMap is mounted over /etc/chatcache.
COPY config.toml /etc/chatcache/config.toml
# distroless's "nonroot" user, by number: the kubelet can only prove that a numeric user is not
# root, so runAsNonRoot works without the pod having to name a runAsUser.
USER 65532:65532
# 8080: clients (chat streams, and everything else proxied to coderd). 9090: /live, /ready,
# /metrics.
EXPOSE 8080 9090
ENTRYPOINT ["/usr/local/bin/chatcache", "--config", "/etc/chatcache/config.toml"]
