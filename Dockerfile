# syntax=docker/dockerfile:1
#
# warden: a supervision daemon for a multi-account chat gateway.
#
#   docker build -t warden .
#   docker run -d --name warden \
#     -p 18789:18789 -p 18790:18790 \
#     -v warden-state:/var/lib/warden \
#     -e WARDEN_GATEWAY__TOKEN=… -e WARDEN_ADMIN__TOKEN=… \
#     warden
#
# Tokens are required. The image binds the gateway and the admin endpoint on 0.0.0.0, and
# warden refuses a non-loopback bind without a token, so a container started without them
# exits at once with code 64 naming the missing key. That is intended. Give them as
#   WARDEN_GATEWAY__TOKEN / WARDEN_ADMIN__TOKEN                   (the value itself), or
#   WARDEN_GATEWAY__TOKEN_FILE / WARDEN_ADMIN__TOKEN_FILE         (an absolute path to a
#                                                                  mounted secret file)
# Matrix passwords and access tokens work the same way, e.g.
#   WARDEN_MATRIX__ACCOUNTS__NOVA__PASSWORD_FILE=/run/secrets/nova_password
#
# Configuration: /etc/warden/warden.toml (the documented defaults; mount your own over it),
# then WARDEN_… environment variables, which win. State (sessions, pending approvals,
# Matrix stores) lives in the volume /var/lib/warden, owned by uid 10001.
#
# Exit codes the container runtime sees: 0 after a clean stop (SIGTERM), 64 bad config,
# 75 a restart budget ran out, 78 a fatal failure (e.g. bad credentials) chose to exit.
# Run it with a restart policy (`--restart unless-stopped`, or a Kubernetes Deployment).

ARG RUST_IMAGE=rust:1.95.0-slim-bookworm
ARG RUNTIME_IMAGE=debian:bookworm-slim

# ---------------------------------------------------------------------------------------
FROM ${RUST_IMAGE} AS builder

# The slim image has gcc and libc6-dev, which is all the C the dependency tree needs
# (bundled SQLite, aws-lc for rustls). A dependency on OpenSSL would need libssl-dev and
# pkg-config here and libssl3 in the runtime stage.
WORKDIR /build

# The toolchain first: rust-toolchain.toml pins the version and components, which rustup
# installs here once (a cached layer) rather than at the first cargo call.
COPY rust-toolchain.toml ./
RUN rustup toolchain install && cargo --version

# Dependencies next, built against stub sources so this layer is reused until
# Cargo.toml, actors/Cargo.toml or Cargo.lock change.
COPY Cargo.toml Cargo.lock ./
COPY actors/Cargo.toml actors/
COPY protocol/Cargo.toml protocol/
RUN mkdir -p src actors/src actors/benches tests/it protocol/src \
    && echo 'fn main() {}' > src/main.rs \
    && touch src/lib.rs actors/src/lib.rs protocol/src/lib.rs tests/it/main.rs \
    && echo 'fn main() {}' > actors/benches/kernel.rs \
    && cargo build --release --locked --bin warden \
    && rm -rf src actors/src actors/benches protocol/src tests

# The real sources. Touch them so cargo never mistakes the stub build for a fresh one
# (COPY keeps the files' modification times, which may be older than the stub build).
COPY src src
COPY actors actors
COPY protocol protocol
COPY config config
RUN find src actors/src protocol/src -name '*.rs' -exec touch {} + \
    && cargo build --release --locked --bin warden \
    && install -m 0755 target/release/warden /usr/local/bin/warden

# ---------------------------------------------------------------------------------------
FROM ${RUNTIME_IMAGE} AS runtime

# Not pinned: bookworm's ca-certificates only moves forward, with security fixes we want.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/*

RUN groupadd --system --gid 10001 warden \
    && useradd --system --uid 10001 --gid warden --home-dir /var/lib/warden \
       --no-create-home --shell /usr/sbin/nologin warden \
    && mkdir -p /var/lib/warden /etc/warden \
    && chown warden:warden /var/lib/warden \
    && chmod 0750 /var/lib/warden

COPY --from=builder /usr/local/bin/warden /usr/local/bin/warden
COPY config/warden.toml /etc/warden/warden.toml

ENV WARDEN_CONFIG=/etc/warden/warden.toml \
    WARDEN_STATE__DIR=/var/lib/warden \
    WARDEN_GATEWAY__BIND=0.0.0.0:18789 \
    WARDEN_ADMIN__BIND=0.0.0.0:18790 \
    WARDEN_TELEMETRY__LOG_FORMAT=json

# Declared after the chown above: changes to a volume's path after VOLUME are discarded.
VOLUME ["/var/lib/warden"]
WORKDIR /var/lib/warden

# Numeric, so Kubernetes' runAsNonRoot can verify it.
USER 10001:10001

# 18789: gateway WebSocket (/ws) and /health. 18790: admin HTTP (/healthz, /readyz,
# /metrics, /admin/*).
EXPOSE 18789 18790

# /healthz needs no token. `warden health` exits 0 when live, 1 otherwise.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["warden", "health", "--admin", "http://127.0.0.1:18790"]

# warden shuts down gracefully on SIGTERM: it tells connected clients, stops the tree's
# children in reverse start order and flushes telemetry. Allow it the runtime's default
# 10 s grace period or more.
STOPSIGNAL SIGTERM

ENTRYPOINT ["warden"]
CMD ["run"]
