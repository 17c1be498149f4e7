#!/usr/bin/env bash
# Proves the deployment: the Kubernetes manifests validate offline, and the container image,
# built from the Dockerfile with a real engine (podman), does what the README says:
#
#   1. it runs as uid 10001, not root, on a read-only root filesystem plus the state volume;
#   2. without tokens it exits 64 with one line naming the missing key;
#   3. with tokens, /readyz answers 200 through the published port, the image's HEALTHCHECK
#      reports healthy, and the host's `warden tree` reads the published admin port;
#   4. the host's `warden node` connects through the published gateway port and
#      `warden call nodes.invoke` runs its command;
#   5. `stop` (SIGTERM) ends it with exit code 0 within shutdown.deadline_ms, and a
#      connected client saw `shutdown` and close code 1012;
#   6. a pending approval created before `stop` is still pending after `start` on the same
#      volume;
#   7. after `kill -9` of the container's process, `start` brings it back ready.
#
# It prints one `container: …` line per result (image size, build time, each check, idle
# RSS) and exits non-zero when any check fails. scripts/test.sh runs it.
#
# No image registry reachable (as on our CI machines)? The Dockerfile's base images are then
# made locally, once, and kept in the engine's storage: `debian:bookworm-slim` from
# debootstrap (slimmed as the official image is), `rust:<pinned>-slim-bookworm` from it plus
# gcc and this machine's pinned toolchain (scripts/container/rust-standin.Containerfile).
# They stand in for the official images only here; the Dockerfile is the one users build.
#
# Environment:
#   CI=true            a missing engine, or one that cannot be installed, fails the run;
#                      outside CI the image checks are skipped with one line saying why
#   WARDEN_TOOLS_DIR   where the Python tools (websockets, kubernetes-validate) are kept
#   CONTAINER_TEST_KEEP=1  leave the container, volume and scratch folder for inspection
# (Not WARDEN_*: warden reads every WARDEN_* variable as configuration.)
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD

CI=${CI:-false}
TOOLS_DIR=${WARDEN_TOOLS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/warden/tools}
IMAGE=warden
# Per run, so that two runs on one machine do not remove each other's container.
NAME=warden-container-test-$$
VOLUME=warden-container-test-state-$$
# The manifests are validated against the oldest and the newest Kubernetes they support.
KUBERNETES_VERSIONS=(1.30.0 1.37.0)
PY_TOOLS=(websockets==17.4 kubernetes-validate==1.37.0)
# What the stop check allows: shutdown.deadline_ms of config/warden.toml (the image's).
DEADLINE_MS=$(awk -F' *= *' '/^\[shutdown\]/ { s = 1 } s && $1 == "deadline_ms" { print $2; exit }' config/warden.toml)

log() { printf '==> %s\n' "$*" >&2; }
run() {
    printf '+ %s\n' "$*" >&2
    "$@"
}
# A result line: collected, and printed again at the end.
RESULTS=()
result() {
    printf 'container: %s\n' "$*"
    RESULTS+=("container: $*")
}

as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        run "$@"
    elif command -v sudo >/dev/null 2>&1; then
        if [ "$CI" = true ]; then run sudo -n "$@"; else run sudo "$@"; fi
    else
        log "cannot run as root (no sudo): $*"
        return 1
    fi
}

WORK=$(mktemp -d "${TMPDIR:-/tmp}/warden-container.XXXXXX")
NODE_PID=
PROBE_PID=
cleanup() {
    local status=$?
    [ -z "$PROBE_PID" ] || kill "$PROBE_PID" 2>/dev/null || true
    [ -z "$NODE_PID" ] || kill "$NODE_PID" 2>/dev/null || true
    wait 2>/dev/null || true
    if [ "$status" != 0 ] && [ -s "$WORK/podman.err" ]; then
        log "podman's messages:"
        tail -n 20 "$WORK/podman.err" >&2
    fi
    if [ "${CONTAINER_TEST_KEEP:-0}" = 1 ]; then
        log "kept: container $NAME, volume $VOLUME, scratch $WORK"
    elif command -v podman >/dev/null 2>&1; then
        podman rm -f -t 0 "$NAME" >/dev/null 2>&1 || true
        podman rm -f -t 0 "$NAME-notoken" >/dev/null 2>&1 || true
        podman volume rm -f "$VOLUME" >/dev/null 2>&1 || true
        rm -rf "$WORK"
    else
        rm -rf "$WORK"
    fi
    exit "$status"
}
trap cleanup EXIT

# A check failed: say which and why, show the container's last lines, stop.
fail() {
    printf 'container: FAILED: %s\n' "$*"
    if command -v podman >/dev/null 2>&1 && podman container exists "$NAME" 2>/dev/null; then
        log "last lines of the container's log:"
        podman logs --tail 30 "$NAME" >&2 2>&1 || true
    fi
    [ ! -s "$WORK/node.log" ] || { log "last lines of the host node's log:"; tail -n 15 "$WORK/node.log" >&2; }
    exit 1
}

# eventually SECONDS WHAT COMMAND…: runs COMMAND until it succeeds, or fails the run
# naming WHAT once SECONDS have passed.
eventually() {
    local seconds=$1 what=$2
    shift 2
    local deadline=$((SECONDS + seconds))
    until "$@" >/dev/null 2>&1; do
        [ "$SECONDS" -lt "$deadline" ] || fail "$what: not within $seconds s"
        sleep 0.2
    done
}

# A free TCP port on 127.0.0.1.
free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# The HTTP status of a GET (000 when nothing answered).
http_status() {
    curl -s -o /dev/null -w '%{http_code}' --max-time 5 "$@" || true
}

ready() { [ "$(http_status "http://127.0.0.1:$ADMIN_PORT/readyz")" = 200 ]; }

# Runs podman with its stderr in $WORK/podman.err (shown when a check fails): without
# systemd, podman logs an error at every start and removal of a container with a
# HEALTHCHECK because it cannot schedule the periodic check; `podman healthcheck run` (what
# check 3 uses) works regardless.
quiet_podman() {
    printf '+ podman %s\n' "$*" >&2
    podman "$@" 2>>"$WORK/podman.err"
}

# --- tools ------------------------------------------------------------------------------
# The Python tools, in their own venv under $TOOLS_DIR (pinned, reused).
PY=
ensure_py_tools() {
    local venv=$TOOLS_DIR/deploy-venv
    if ! "$venv/bin/python" -c 'import websockets, kubernetes_validate' 2>/dev/null; then
        log "installing ${PY_TOOLS[*]} into $venv"
        if ! python3 -m venv "$WORK/venv-probe" >/dev/null 2>&1; then
            # Debian's python3 has venv in a package of its own.
            as_root apt-get update -qq && as_root env DEBIAN_FRONTEND=noninteractive \
                apt-get install -y -qq --no-install-recommends python3-venv
        fi
        run python3 -m venv "$venv"
        run "$venv/bin/pip" install --quiet --disable-pip-version-check "${PY_TOOLS[@]}"
    fi
    PY=$venv/bin/python
}

# The engine and what the checks use, installed with apt when absent: podman with runc and
# the networking it needs for published ports, debootstrap for the stand-in base image,
# curl and readelf (binutils). Returns 1 (with the reason on stderr) when they cannot be.
ENGINE_PACKAGES=(podman runc debootstrap uidmap slirp4netns fuse-overlayfs
    containernetworking-plugins iptables curl binutils)
ensure_engine() {
    local missing=() package
    if command -v dpkg >/dev/null 2>&1; then
        for package in "${ENGINE_PACKAGES[@]}"; do
            dpkg -s "$package" >/dev/null 2>&1 || missing+=("$package")
        done
    else
        for package in podman runc debootstrap curl readelf; do
            command -v "$package" >/dev/null 2>&1 || [ -x "/usr/sbin/$package" ] || missing+=("$package")
        done
    fi
    [ "${#missing[@]}" -gt 0 ] || return 0
    if ! command -v apt-get >/dev/null 2>&1; then
        log "missing ${missing[*]}, and no apt-get to install them"
        return 1
    fi
    log "installing ${missing[*]} with apt-get"
    as_root apt-get update -qq || return 1
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        "${missing[@]}" || return 1
}

# podman, configured for this script only: runc (crun fails on some kernels, ours among
# them) and explicit ulimits (runc cannot take the host's there). The image is built with
# `--format docker`, as OCI images drop HEALTHCHECK.
configure_engine() {
    cat >"$WORK/containers.conf" <<'EOF'
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=4096:4096"]

[engine]
runtime = "runc"
EOF
    export CONTAINERS_CONF=$WORK/containers.conf
}

# --- base images ------------------------------------------------------------------------
RUST_VERSION=$(awk -F'"' '/^channel/ { print $2 }' rust-toolchain.toml)
RUST_IMAGE=docker.io/library/rust:$RUST_VERSION-slim-bookworm
DEBIAN_IMAGE=docker.io/library/debian:bookworm-slim

# The image exists locally, or can be pulled.
have_image() {
    podman image exists "$1" || podman pull --quiet "$1" >/dev/null 2>&1
}

# debian:bookworm-slim from debootstrap: minbase, then slimmed like the official image
# (no docs but copyrights, man pages, info, locales; no package lists or .deb cache).
make_debian_standin() {
    local root=$WORK/rootfs started=$SECONDS
    log "no $DEBIAN_IMAGE here and no registry: making a stand-in with debootstrap"
    as_root debootstrap --variant=minbase bookworm "$root" http://deb.debian.org/debian >/dev/null
    as_root sh -c "cat >'$root/etc/apt/sources.list'" <<'EOF'
deb http://deb.debian.org/debian bookworm main
deb http://deb.debian.org/debian bookworm-updates main
deb http://deb.debian.org/debian-security bookworm-security main
EOF
    as_root sh -c "cat >'$root/etc/dpkg/dpkg.cfg.d/docker-slim'" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/lintian/*
path-exclude /usr/share/linda/*
path-exclude /usr/share/locale/*
EOF
    as_root find "$root/usr/share/doc" -type f ! -name copyright -delete
    as_root sh -c "rm -rf '$root'/usr/share/man/* '$root'/usr/share/groff/* '$root'/usr/share/info/* \
        '$root'/usr/share/lintian/* '$root'/usr/share/locale/* '$root'/var/cache/apt/archives/*.deb \
        '$root'/var/cache/apt/*.bin '$root'/var/lib/apt/lists/* '$root'/var/log/*.log"
    as_root tar --numeric-owner -C "$root" -c . |
        run podman import --quiet --change 'CMD ["bash"]' \
            --change 'LABEL org.warden.stand-in=debian:bookworm-slim' - "$DEBIAN_IMAGE" >/dev/null
    as_root rm -rf "$root"
    log "made $DEBIAN_IMAGE in $((SECONDS - started)) s"
}

# rust:<pinned>-slim-bookworm from the Debian stand-in, gcc, this machine's toolchain and
# its local CAs (a TLS-intercepting egress proxy is trusted only through them).
make_rust_standin() {
    local sysroot started=$SECONDS context=$WORK/rust-standin
    sysroot=$(rustup run "$RUST_VERSION" rustc --print sysroot) ||
        { log "the pinned toolchain $RUST_VERSION is not on this machine"; return 1; }
    log "no $RUST_IMAGE here and no registry: making a stand-in from $sysroot"
    mkdir -p "$context/toolchain" "$context/local-ca"
    # Docs stay out (0.8 GB); the rest is what cargo and rustc need.
    (cd "$sysroot" && tar -c --exclude=./share/doc .) | tar -x -C "$context/toolchain"
    find /usr/local/share/ca-certificates -maxdepth 1 -name '*.crt' -exec cp {} "$context/local-ca/" \; 2>/dev/null || true
    run podman build --quiet --build-arg RUST_VERSION="$RUST_VERSION" \
        --build-arg BASE_IMAGE="$DEBIAN_IMAGE" \
        -f "$ROOT/scripts/container/rust-standin.Containerfile" -t "$RUST_IMAGE" "$context" >/dev/null
    rm -rf "$context"
    log "made $RUST_IMAGE in $((SECONDS - started)) s"
}

ensure_base_images() {
    have_image "$DEBIAN_IMAGE" || make_debian_standin
    have_image "$RUST_IMAGE" || make_rust_standin
}

# --- the manifests ----------------------------------------------------------------------
check_manifests() {
    local version
    for version in "${KUBERNETES_VERSIONS[@]}"; do
        run "$PY" -m kubernetes_validate --strict --quiet -k "$version" deploy/kubernetes/*.yaml \
            >"$WORK/kv.log" 2>&1 ||
            { cat "$WORK/kv.log" >&2; fail "kubernetes-validate --strict (Kubernetes $version) refused deploy/kubernetes"; }
    done
    # What a schema cannot know: the manifests agree with the image and the config.
    run "$PY" scripts/container/check_manifests.py deploy/kubernetes Dockerfile config/warden.toml ||
        fail "deploy/kubernetes disagrees with the Dockerfile or config/warden.toml"
    result "manifests: $(find deploy/kubernetes -name '*.yaml' | wc -l) files valid (strict) for Kubernetes ${KUBERNETES_VERSIONS[*]}, consistent with the image and config"
}

# --- the image --------------------------------------------------------------------------
build_image() {
    grep -q "^ARG RUST_IMAGE=rust:$RUST_VERSION-slim-bookworm\$" Dockerfile ||
        fail "the Dockerfile's RUST_IMAGE does not pin rust-toolchain.toml's $RUST_VERSION"
    local started=$SECONDS
    # README: podman build --format docker -t warden .
    run podman build --format docker -t "$IMAGE" . >"$WORK/build.log" 2>&1 ||
        { tail -n 40 "$WORK/build.log" >&2; fail "podman build --format docker -t $IMAGE . failed"; }
    local took=$((SECONDS - started))

    local size base binary
    size=$(podman image inspect "$IMAGE" --format '{{.Size}}')
    base=$(podman image inspect "$DEBIAN_IMAGE" --format '{{.Size}}')
    local cid
    cid=$(podman create --no-healthcheck "$IMAGE") || fail "podman create $IMAGE failed"
    podman cp "$cid:/usr/local/bin/warden" "$WORK/warden-image" >/dev/null || fail "podman cp failed"
    podman rm "$cid" >/dev/null
    binary=$(stat -c %s "$WORK/warden-image")
    local sections
    sections=$(readelf -S --wide "$WORK/warden-image") || fail "readelf cannot read the image's binary"
    if grep -q '\.debug_' <<<"$sections"; then
        fail "the image's binary carries debug info"
    fi
    if grep -q '\.symtab' <<<"$sections"; then
        fail "the image's binary is not stripped (it has a symbol table)"
    fi
    # The HEALTHCHECK is the Dockerfile's (an OCI build would have dropped it).
    local health
    health=$(podman image inspect "$IMAGE" --format '{{json .Config.Healthcheck.Test}}')
    [ "$health" = '["CMD","warden","health","--admin","http://127.0.0.1:18790"]' ] ||
        fail "the image's HEALTHCHECK is '$health', not the Dockerfile's warden health"
    local mb=$((1024 * 1024))
    result "image: built in $took s; $((size / mb)) MB in all = base $((base / mb)) MB + $(((size - base) / mb)) MB of ours; binary $((binary / mb)) MB (stripped)"
    # Goal: at most 150 MB on debian:bookworm-slim (about 75 MB), so at most 75 MB of ours.
    [ $((size - base)) -le $((75 * mb)) ] || fail "the image adds $(((size - base) / mb)) MB to its base (goal: at most 75 MB)"
}

# --- the checks -------------------------------------------------------------------------
# The tokens travel in the environment, never on a command line (which the log shows): the
# container gets them by name (`-e NAME`), the host's `warden call` and `warden tree` read
# them as config, the probe as PROBE_TOKEN.
token() { head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n'; }
export WARDEN_GATEWAY__TOKEN WARDEN_ADMIN__TOKEN WARDEN_GATEWAY__NODES__HOSTBOX__TOKEN
WARDEN_GATEWAY__TOKEN=$(token)
WARDEN_ADMIN__TOKEN=$(token)
WARDEN_GATEWAY__NODES__HOSTBOX__TOKEN=$(token)

start_container() {
    # README: docker run -d --name warden --read-only --tmpfs /tmp -p … -v … -e … warden
    quiet_podman run -d --name "$NAME" --read-only --tmpfs /tmp \
        -p "127.0.0.1:$GATEWAY_PORT:18789" -p "127.0.0.1:$ADMIN_PORT:18790" \
        -v "$VOLUME:/var/lib/warden" \
        -e WARDEN_GATEWAY__TOKEN -e WARDEN_ADMIN__TOKEN \
        -e WARDEN_GATEWAY__NODES__HOSTBOX__TOKEN \
        "$IMAGE" >/dev/null || fail "podman run failed"
}

call() {
    "$WARDEN" call --gateway "ws://127.0.0.1:$GATEWAY_PORT/ws" "$@"
}

check_no_tokens() {
    local output status=0
    output=$(podman run --rm --no-healthcheck --name "$NAME-notoken" --read-only "$IMAGE" 2>&1) || status=$?
    [ "$status" = 64 ] || fail "2: without tokens it exited $status, not 64: $output"
    [ "$(printf '%s\n' "$output" | wc -l)" = 1 ] || fail "2: without tokens it printed more than one line: $output"
    case $output in
        *gateway.token*) ;;
        *) fail "2: the line does not name gateway.token: $output" ;;
    esac
    result "2 ok: without tokens: exit 64, one line: $output"
}

check_non_root() {
    # Read inside the container (right under rootless podman too): its process 1 is warden.
    local comm uid out mounts
    comm=$(podman exec "$NAME" cat /proc/1/comm) || fail "1: cannot read the container's process"
    [ "$comm" = warden ] || fail "1: the container's process 1 is '$comm', not warden"
    uid=$(podman exec "$NAME" awk '/^Uid:/ { print $2 "/" $3 }' /proc/1/status)
    [ "$uid" = 10001/10001 ] || fail "1: warden runs as uid $uid (real/effective), not 10001"
    # Even root cannot write to the root filesystem.
    if out=$(podman exec --user 0 "$NAME" sh -c ': >/probe' 2>&1); then
        fail "1: the root filesystem took a write"
    fi
    case $out in
        *"Read-only file system"*) ;;
        *) fail "1: a write to / failed, but not as a read-only filesystem: $out" ;;
    esac
    mounts=$(podman inspect "$NAME" --format '{{range .Mounts}}{{.Name}}:{{.Destination}} {{end}}')
    case " $mounts" in
        *" $VOLUME:/var/lib/warden "*) ;;
        *) fail "1: /var/lib/warden is not the volume $VOLUME (mounts: $mounts)" ;;
    esac
    result "1 ok: warden is process 1 with uid 10001 (real/effective); / is read-only even for root; /var/lib/warden is the volume"
}

check_ready_health_tree() {
    eventually 30 "3: /readyz 200 through the published port" ready
    # The Kubernetes readiness probe's question (deploy/kubernetes/statefulset.yaml).
    [ "$(http_status "http://127.0.0.1:$ADMIN_PORT/readyz?path=root/gateway")" = 200 ] ||
        fail "3: /readyz?path=root/gateway is not 200"
    local health
    podman healthcheck run "$NAME" >"$WORK/health.log" 2>&1 ||
        { cat "$WORK/health.log" >&2; fail "3: podman healthcheck run: not healthy"; }
    health=$(podman inspect "$NAME" --format '{{.State.Health.Status}}')
    [ "$health" = healthy ] || fail "3: health status is '$health', not healthy"
    "$WARDEN" tree --admin "http://127.0.0.1:$ADMIN_PORT" >"$WORK/tree.txt" 2>&1 ||
        { cat "$WORK/tree.txt" >&2; fail "3: warden tree from the host failed"; }
    grep -q gateway "$WORK/tree.txt" || fail "3: warden tree shows no gateway: $(cat "$WORK/tree.txt")"
    result "3 ok: /readyz and /readyz?path=root/gateway 200 on 127.0.0.1:$ADMIN_PORT, HEALTHCHECK healthy, warden tree from the host ($(wc -l <"$WORK/tree.txt") lines)"
}

node_connected() {
    call nodes.list | grep -q '"hostbox"'
}

check_node() {
    cat >"$WORK/node.toml" <<EOF
[node]
gateway_url = "ws://127.0.0.1:$GATEWAY_PORT/ws"
token_file = "$WORK/node.token"
name = "hostbox"

[node.commands.hello]
argv = ["echo", "hello from the host"]
EOF
    printf '%s\n' "$WARDEN_GATEWAY__NODES__HOSTBOX__TOKEN" >"$WORK/node.token"
    chmod 0600 "$WORK/node.token"
    env -u WARDEN_GATEWAY__TOKEN -u WARDEN_ADMIN__TOKEN -u WARDEN_GATEWAY__NODES__HOSTBOX__TOKEN \
        "$WARDEN" --config "$WORK/node.toml" node --state-dir "$WORK/node-state" >"$WORK/node.log" 2>&1 &
    NODE_PID=$!
    eventually 30 "4: the host's node in nodes.list" node_connected
    local output
    output=$(call nodes.invoke --params '{"node":"hostbox","command":"hello"}') ||
        fail "4: nodes.invoke failed: $output"
    case $output in
        *"hello from the host"*) ;;
        *) fail "4: nodes.invoke did not return the command's output: $output" ;;
    esac
    result "4 ok: the host's warden node connected through 127.0.0.1:$GATEWAY_PORT; nodes.invoke ran echo on the host"
}

# The pending approvals' ids, one per line.
pending_approvals() {
    call approvals.list | "$PY" -c '
import json, sys
for a in json.load(sys.stdin)["approvals"]:
    if not a.get("resolved") and a.get("decision") is None:
        print(a["id"])'
}

create_pending_approval() {
    # The request stays open until a decision; the call gives up after 3 s, the approval
    # stays pending (the broker stored it first).
    call --timeout 3 approvals.request \
        --params '{"node":"hostbox","command":"hello","reason":"container test: survives a restart","timeout_s":3600}' \
        >"$WORK/request.log" 2>&1 || true
    APPROVAL=$(pending_approvals)
    [ -n "$APPROVAL" ] && [ "$(printf '%s\n' "$APPROVAL" | wc -l)" = 1 ] ||
        fail "6: expected one pending approval, found '${APPROVAL}' ($(cat "$WORK/request.log"))"
}

start_probe() {
    PROBE_TOKEN=$WARDEN_GATEWAY__TOKEN "$PY" scripts/container/probe.py \
        "ws://127.0.0.1:$GATEWAY_PORT/ws" "$WORK/probe.json" >"$WORK/probe.out" 2>&1 &
    PROBE_PID=$!
    eventually 15 "5: the probe client's handshake" grep -qx ready "$WORK/probe.out"
}

check_stop() {
    local started took code
    started=$(date +%s%N)
    # README: docker stop -t 30 warden
    quiet_podman stop -t 30 "$NAME" >/dev/null || fail "5: podman stop failed"
    took=$((($(date +%s%N) - started) / 1000000))
    code=$(podman inspect "$NAME" --format '{{.State.ExitCode}}')
    [ "$code" = 0 ] || fail "5: stop ended it with exit code $code, not 0"
    [ "$took" -lt "$DEADLINE_MS" ] || fail "5: stop took $took ms, past shutdown.deadline_ms $DEADLINE_MS"
    wait "$PROBE_PID" || fail "5: the probe client failed: $(cat "$WORK/probe.out")"
    PROBE_PID=
    "$PY" - "$WORK/probe.json" <<'EOF' || fail "5: the client did not see shutdown + 1012: $(cat "$WORK/probe.json")"
import json, sys
seen = json.load(open(sys.argv[1]))
assert seen["shutdown"] is not None and seen["shutdown"].get("restart") is True, seen
assert seen["close_code"] == 1012, seen
EOF
    result "5 ok: stop → exit 0 in $took ms (deadline $DEADLINE_MS ms); the client saw shutdown $("$PY" -c 'import json,sys; print(json.dumps(json.load(open(sys.argv[1]))["shutdown"]))' "$WORK/probe.json") then close 1012"
}

check_state_survives() {
    quiet_podman start "$NAME" >/dev/null || fail "6: podman start failed"
    eventually 30 "6: /readyz 200 after start" ready
    local after
    after=$(pending_approvals)
    [ "$after" = "$APPROVAL" ] || fail "6: approval $APPROVAL pending before stop; after start the pending ones are '$after'"
    # It is the volume that kept it (check 1: /var/lib/warden is the volume): the broker's
    # file, written by uid 10001.
    local owner
    owner=$(podman exec "$NAME" stat -c %u "/var/lib/warden/approvals/$APPROVAL.json" 2>&1) ||
        fail "6: the approval's file is not in /var/lib/warden: $owner"
    [ "$owner" = 10001 ] || fail "6: the approval's file belongs to uid $owner, not 10001"
    result "6 ok: approval $APPROVAL pending before stop, still pending after start on volume $VOLUME"
}

check_kill() {
    local pid code
    pid=$(podman inspect "$NAME" --format '{{.State.Pid}}')
    # kill -9 of the container's process, from the host.
    run kill -9 "$pid" || fail "7: kill -9 $pid failed"
    eventually 15 "7: the container exits after kill -9" \
        sh -c "[ \"\$(podman inspect $NAME --format '{{.State.Running}}')\" = false ]"
    code=$(podman inspect "$NAME" --format '{{.State.ExitCode}}')
    [ "$code" = 137 ] || fail "7: after kill -9 the exit code is $code, not 137"
    local started took
    started=$(date +%s%N)
    quiet_podman start "$NAME" >/dev/null || fail "7: podman start failed"
    eventually 30 "7: /readyz 200 after kill -9 and start" ready
    took=$((($(date +%s%N) - started) / 1000000))
    [ "$(pending_approvals)" = "$APPROVAL" ] || fail "7: approval $APPROVAL lost after kill -9"
    result "7 ok: kill -9 → exit 137; start → /readyz 200 after $took ms, approval $APPROVAL still pending"
}

measure_rss() {
    local pid rss
    pid=$(podman inspect "$NAME" --format '{{.State.Pid}}')
    rss=$(awk '/^VmRSS:/ { print $2 }' "/proc/$pid/status")
    result "idle RSS: $((rss / 1024)) MiB (gateway, admin, one node connected, no Matrix account)"
}

main() {
    # Checked first: needs no engine.
    ensure_py_tools
    check_manifests

    if ! ensure_engine; then
        if [ "$CI" = true ]; then
            fail "no container engine (podman, runc, debootstrap) and none could be installed"
        fi
        result "skipped the image checks: no container engine here and none could be installed"
        return 0
    fi
    configure_engine
    ensure_base_images
    build_image

    log "building the host's warden (for warden tree, warden node, warden call)"
    run cargo build --locked --quiet --bin warden
    WARDEN=${CARGO_TARGET_DIR:-$ROOT/target}/debug/warden
    GATEWAY_PORT=$(free_port)
    ADMIN_PORT=$(free_port)
    while [ "$ADMIN_PORT" = "$GATEWAY_PORT" ]; do ADMIN_PORT=$(free_port); done

    podman rm -f -t 0 "$NAME" >/dev/null 2>&1 || true
    podman volume rm -f "$VOLUME" >/dev/null 2>&1 || true

    check_no_tokens
    start_container
    check_ready_health_tree
    check_non_root
    check_node
    measure_rss
    create_pending_approval
    start_probe
    check_stop
    check_state_survives
    check_kill
}

main "$@"
