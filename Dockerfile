# syntax=docker/dockerfile:1
#
# warden: a supervision daemon for a multi-account chat gateway.
#
#   docker build -t warden .          (podman: podman build --format docker -t warden .)
#   docker run -d --name warden --read-only --tmpfs /tmp \
#     -p 127.0.0.1:18789:18789 -p 127.0.0.1:18790:18790 \
#     -v warden-state:/var/lib/warden \
#     -e WARDEN_GATEWAY__TOKEN -e WARDEN_ADMIN__TOKEN \
#     warden
#   docker stop -t 30 warden
#
# scripts/container-test.sh builds and runs this with podman and checks each claim below
# against the running container (the README says what it adds).
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
# Run it with a restart policy (`--restart unless-stopped`, or deploy/kubernetes/).

# The toolchain is the builder image's: its tag pins the same Rust as rust-toolchain.toml
# (scripts/container-test.sh checks that they agree). rust-toolchain.toml itself stays out
# of the build context (.dockerignore), so rustup never downloads clippy and rustfmt here.
ARG RUST_IMAGE=rust:1.95.0-slim-bookworm
ARG RUNTIME_IMAGE=debian:bookworm-slim

# ---------------------------------------------------------------------------------------
# cargo-chef turns the workspace's manifests into a recipe and builds the dependencies from
# it, so the dependency layer is derived from Cargo.toml, */Cargo.toml and Cargo.lock and
# cannot drift from them: it is rebuilt exactly when they change, and a new bench, test or
# member needs nothing here.
FROM ${RUST_IMAGE} AS chef
ARG CARGO_CHEF_VERSION=0.1.78
# The slim image has gcc and libc6-dev, which is all the C the dependency tree needs
# (bundled SQLite, aws-lc for rustls). A dependency on OpenSSL would need libssl-dev and
# pkg-config here and libssl3 in the runtime stage.
RUN cargo install cargo-chef --locked --version "${CARGO_CHEF_VERSION}" \
    && rm -rf "${CARGO_HOME:-/usr/local/cargo}/registry"
WORKDIR /build

FROM chef AS planner
COPY . .
RUN cargo chef prepare --recipe-path recipe.json

FROM chef AS builder
COPY --from=planner /build/recipe.json recipe.json
# The `dist` profile (Cargo.toml): release, stripped.
RUN cargo chef cook --profile dist --locked --recipe-path recipe.json --bin warden
COPY . .
RUN cargo build --profile dist --locked --bin warden \
    && install -m 0755 target/dist/warden /usr/local/bin/warden \
    && warden --version

# ---------------------------------------------------------------------------------------
FROM ${RUNTIME_IMAGE} AS runtime

# Not pinned: bookworm's ca-certificates only moves forward, with security fixes we want.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && apt-get clean \
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
# children in reverse start order and flushes telemetry, all within shutdown.deadline_ms
# (10 s). Give it a grace period above that (`docker stop -t 30`; Kubernetes'
# terminationGracePeriodSeconds: 30 in deploy/kubernetes/): at the runtime's default of
# 10 s a slow stop would be SIGKILLed just as its deadline runs out.
STOPSIGNAL SIGTERM

ENTRYPOINT ["warden"]
CMD ["run"]
