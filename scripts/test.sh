#!/usr/bin/env bash
# warden's test command: installs what the tests need when it is absent, then runs the
# whole suite, then runs each fuzz target of fuzz/ briefly, then proves the deployment
# (scripts/container-test.sh: the Kubernetes manifests, and the image built and run with
# podman; about 15 minutes the first time on 2 cores, 3-4 after a source change).
# Works from any directory;
# idempotent; fast when everything is present (no package index update then).
#
#   ./scripts/test.sh                  # everything
#   ./scripts/test.sh -- --nocapture   # extra arguments go to the test binaries
#
# Installs: promtool, Synapse (a venv), chromium + chromium-driver (apt), cargo-fuzz,
# podman (by scripts/container-test.sh).
#
# Environment:
#   CI=true             a tool that is missing and cannot be installed fails the run
#                       (outside CI it is a warning, and the tests that need it decide)
#   WARDEN_TOOLS_DIR    where fetched tools are kept (default ~/.cache/warden/tools)
#   PROMTOOL            a promtool to use instead of looking for one
#   FUZZ_SECONDS        how long each fuzz target runs (default 25; 0 skips fuzzing)
#   CONTAINER_TEST=0    skips scripts/container-test.sh (refused under CI=true)
#
# Exported for the tests:
#   PROMTOOL            path of promtool, which validates the /metrics exposition
#   SYNAPSE_TEST_URL    base URL of the one Synapse this run starts and stops (server name
#                       `localhost`); unset when Synapse is not available
#   SYNAPSE_TEST_SHARED_SECRET  its registration shared secret (HMAC admin registration)
#   SYNAPSE_TEST_DIR    its directory (homeserver.yaml, homeserver.log, data)
#   SYNAPSE_TEST_SCRIPT absolute path of scripts/synapse.sh, for tests that start their own
# (Not WARDEN_*: warden reads every WARDEN_* variable as configuration.)
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

CI=${CI:-false}
TOOLS_DIR=${WARDEN_TOOLS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/warden/tools}

log() { printf '==> %s\n' "$*" >&2; }

# Runs a command when the script exits, after the EXIT trap already set (if any).
on_exit() {
    local command=$1
    # `trap -p EXIT` prints `trap -- 'CMD' EXIT`, quoted for reuse: parse it back.
    eval "set -- $(trap -p EXIT)"
    local previous=${3:-}
    # shellcheck disable=SC2064 # expanded now on purpose
    trap "$command${previous:+; $previous}" EXIT
}

# Prints a command, then runs it.
run() {
    printf '+ %s\n' "$*" >&2
    "$@"
}

# Runs a command as root: directly when we are root, else through sudo.
as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        run "$@"
    elif command -v sudo >/dev/null 2>&1; then
        # Under CI nobody can type a password: fail instead of waiting for one.
        if [ "$CI" = true ]; then
            run sudo -n "$@"
        else
            run sudo "$@"
        fi
    else
        log "cannot run as root (no sudo): $*"
        return 1
    fi
}

# A tool is missing and could not be installed: fatal under CI, a warning otherwise.
missing() {
    if [ "$CI" = true ]; then
        log "error: $1 is required and could not be installed: $2"
        exit 1
    fi
    log "warning: $1 is not available ($2); tests that need it will say so"
}

# `apt-get update`, at most once per run, and only when an install needs it.
APT_UPDATED=false
apt_update_once() {
    if [ "$APT_UPDATED" = false ]; then
        # Explicit returns: callers use `||`, which turns off `set -e` in here.
        as_root apt-get update -qq || return 1
        APT_UPDATED=true
    fi
}

# The candidate version of a Debian package, or nothing.
apt_candidate() {
    apt-cache policy "$1" 2>/dev/null | awk '$1 == "Candidate:" && $2 != "(none)" { print $2 }'
}

# --- promtool ---------------------------------------------------------------------------
# promtool validates the Prometheus text exposition of /metrics (`promtool check metrics`).
# Debian ships it in the `prometheus` package, but installing that package pulls in 37
# packages (a Prometheus server, node exporter, JavaScript libraries) and starts services.
# We only fetch the package file (about 19 MB) and extract the promtool binary (about
# 46 MB, static) into $TOOLS_DIR: no root needed beyond refreshing the package index.
ensure_promtool() {
    if [ -n "${PROMTOOL:-}" ] && [ -x "$PROMTOOL" ]; then
        export PROMTOOL
        return
    fi
    local found
    if found=$(command -v promtool); then
        export PROMTOOL=$found
        return
    fi
    if [ -x "$TOOLS_DIR/promtool" ] && "$TOOLS_DIR/promtool" --version >/dev/null 2>&1; then
        export PROMTOOL=$TOOLS_DIR/promtool
        return
    fi
    if ! command -v apt-get >/dev/null 2>&1 || ! command -v dpkg-deb >/dev/null 2>&1; then
        missing promtool "no apt-get/dpkg-deb on this machine to fetch Debian's prometheus package"
        return
    fi

    log "promtool not found: extracting it from Debian's prometheus package into $TOOLS_DIR"
    if [ -z "$(apt_candidate prometheus)" ]; then
        apt_update_once || true
    fi
    if [ -z "$(apt_candidate prometheus)" ]; then
        missing promtool "Debian's package index has no prometheus package"
        return
    fi

    local work status=0
    work=$(mktemp -d)
    fetch_promtool "$work" || status=$?
    rm -rf "$work"
    case $status in
        0) export PROMTOOL=$TOOLS_DIR/promtool ;;
        1) missing promtool "could not download Debian's prometheus package" ;;
        *) missing promtool "could not extract promtool from Debian's prometheus package" ;;
    esac
}

# Downloads Debian's prometheus package into $1 and installs its promtool into
# $TOOLS_DIR. Returns 1 when the download fails, 2 when the extraction does.
fetch_promtool() {
    local work=$1
    # apt drops privileges to _apt for downloads, which cannot write to a root-owned
    # temporary folder; as root, download as root.
    local apt_opts=()
    if [ "$(id -u)" -eq 0 ]; then
        apt_opts=(-o APT::Sandbox::User=root)
    fi
    # A stale index can name a version the mirror no longer has: refresh once and retry.
    if ! (cd "$work" && run apt-get "${apt_opts[@]}" -qq download prometheus); then
        [ "$APT_UPDATED" = false ] || return 1
        apt_update_once || return 1
        (cd "$work" && run apt-get "${apt_opts[@]}" -qq download prometheus) || return 1
    fi
    local deb
    deb=$(find "$work" -maxdepth 1 -name 'prometheus_*.deb' -print -quit)
    [ -n "$deb" ] || return 1
    dpkg-deb --fsys-tarfile "$deb" | tar -x -C "$work" ./usr/bin/promtool || return 2
    "$work/usr/bin/promtool" --version >/dev/null 2>&1 || return 2
    mkdir -p "$TOOLS_DIR"
    # Install under a temporary name, then rename: concurrent runs never see half a file.
    install -m 0755 "$work/usr/bin/promtool" "$TOOLS_DIR/promtool.$$" || return 2
    mv -f "$TOOLS_DIR/promtool.$$" "$TOOLS_DIR/promtool" || return 2
}

# --- Synapse ----------------------------------------------------------------------------
# One real Matrix homeserver for the whole run (scripts/synapse.sh: a pinned matrix-synapse
# in a reused venv, a generated loopback-only config), started here in a temporary
# directory and stopped when this script exits. The tests register their own users on it.
SYNAPSE_SCRIPT=$PWD/scripts/synapse.sh
SYNAPSE_DIR=
ensure_synapse() {
    # Only what this run starts: never a Synapse named by the calling environment.
    unset SYNAPSE_TEST_URL SYNAPSE_TEST_SHARED_SECRET SYNAPSE_TEST_DIR SYNAPSE_TEST_SCRIPT
    local script=$SYNAPSE_SCRIPT
    if ! "$script" install >/dev/null; then
        missing synapse "matrix-synapse could not be installed (see above)"
        return
    fi
    SYNAPSE_DIR=$(mktemp -d "${TMPDIR:-/tmp}/warden-synapse.XXXXXX")
    on_exit stop_synapse
    if ! "$script" start "$SYNAPSE_DIR" >/dev/null; then
        missing synapse "Synapse did not start (see above)"
        return
    fi
    SYNAPSE_TEST_URL=$(cat "$SYNAPSE_DIR/url")
    SYNAPSE_TEST_SHARED_SECRET=$(cat "$SYNAPSE_DIR/shared_secret")
    export SYNAPSE_TEST_URL SYNAPSE_TEST_SHARED_SECRET
    export SYNAPSE_TEST_DIR=$SYNAPSE_DIR SYNAPSE_TEST_SCRIPT=$script
}

stop_synapse() {
    [ -n "$SYNAPSE_DIR" ] || return 0
    "$SYNAPSE_SCRIPT" stop "$SYNAPSE_DIR" || true
    rm -rf "$SYNAPSE_DIR"
}

# --- a browser -------------------------------------------------------------------------
# tests/it/page.rs drives the admin tree page in headless Chromium over WebDriver: Debian's
# `chromium` and `chromium-driver`, installed with apt when absent.
ensure_browser() {
    if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then
        return 0
    fi
    if ! command -v apt-get >/dev/null 2>&1; then
        missing chromium "no apt-get on this machine to install chromium and chromium-driver"
        return
    fi
    if [ -z "$(apt_candidate chromium-driver)" ]; then
        apt_update_once || true
    fi
    local install=(env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver)
    # Stale package lists name files the mirror no longer has: update once and try again.
    if ! as_root "${install[@]}" >/dev/null && ! { apt_update_once && as_root "${install[@]}" >/dev/null; }; then
        missing chromium "apt-get install chromium chromium-driver failed (see above)"
    fi
}

# --- fuzzing ----------------------------------------------------------------------------
# fuzz/ (cargo-fuzz layout, its own workspace, depends only on warden-protocol) holds
# coverage-guided targets for the frame parser and the handshake. Each runs for
# $FUZZ_SECONDS from its committed seeds in a scratch corpus; a crash fails the run and
# leaves the input in fuzz/artifacts/<target>/. The targets build with libFuzzer and
# AddressSanitizer, whose `-Z` flags stable rustc takes only with RUSTC_BOOTSTRAP=1, set
# for these commands alone; fuzz/target is their own target directory.
CARGO_FUZZ_VERSION=0.13.2
FUZZ_TARGETS=(frame handshake)
FUZZ_SECONDS=${FUZZ_SECONDS:-25}
FUZZ_SUMMARY=()

# cargo-fuzz on PATH (or in ~/.cargo/bin, where `cargo install` puts it), else installed.
ensure_cargo_fuzz() {
    if cargo fuzz --version >/dev/null 2>&1; then
        return 0
    fi
    log "cargo-fuzz not found: installing cargo-fuzz $CARGO_FUZZ_VERSION from crates.io"
    if ! run cargo install cargo-fuzz --version "$CARGO_FUZZ_VERSION" --locked; then
        missing cargo-fuzz "cargo install cargo-fuzz failed (see above)"
        return 1
    fi
}

# Builds and runs every fuzz target; fills FUZZ_SUMMARY; returns 1 on a failing input (a
# crash, a timeout or running out of memory) or a failed build.
run_fuzz() {
    if [ "$FUZZ_SECONDS" = 0 ]; then
        log "fuzz: skipped (FUZZ_SECONDS=0)"
        return 0
    fi
    if ! ensure_cargo_fuzz; then
        FUZZ_SUMMARY+=("fuzz: skipped (cargo-fuzz is not available)")
        return 0
    fi
    # cargo-fuzz has no --locked: check the committed lock file first.
    local started=$SECONDS
    if ! run cargo metadata --locked --format-version 1 --manifest-path fuzz/Cargo.toml \
        >/dev/null || ! run env RUSTC_BOOTSTRAP=1 cargo fuzz build; then
        FUZZ_SUMMARY+=("fuzz: the targets did not build (see above)")
        return 1
    fi
    log "fuzz: targets built in $((SECONDS - started)) s"
    local target scratch output status=0 line command
    for target in "${FUZZ_TARGETS[@]}"; do
        scratch=$(mktemp -d "${TMPDIR:-/tmp}/warden-fuzz-$target.XXXXXX")
        output=$scratch.log
        cp fuzz/corpus/"$target"/* "$scratch"/
        command=(env RUSTC_BOOTSTRAP=1 cargo fuzz run "$target" "$scratch" --
            -dict="$PWD/fuzz/protocol.dict" -max_total_time="$FUZZ_SECONDS" -timeout=10
            -print_final_stats=1)
        printf '+ %s > %s\n' "${command[*]}" "$output" >&2
        if "${command[@]}" >"$output" 2>&1; then
            # libFuzzer ends with "#N DONE cov: C ft: F …" and "Done N runs in T second(s)".
            line=$(awk -v t="$target" '
                $2 == "DONE" { for (i = 1; i <= NF; i++) { if ($i == "cov:") c = $(i+1); if ($i == "ft:") f = $(i+1) } }
                /^Done [0-9]+ runs in / { n = $2; s = $5 }
                END { printf "fuzz: %s: %d runs in %d s, no crash (cov %s, ft %s)", t, n, s, c, f }' "$output")
            rm -f "$output"
        else
            status=1
            # The panic message, libFuzzer's verdict, and the input cargo-fuzz saved.
            awk '/panicked at/ { p = 1 } /^stack backtrace:/ { p = 0 } p
                 /ERROR: libFuzzer:/ || /^SUMMARY:/ { print }
                 /^Failing input:/ { f = 2 } f && NF { print; f-- }' "$output" >&2
            line="fuzz: $target: FAILED, the input is in fuzz/artifacts/$target/ (log: $output)"
        fi
        log "$line"
        FUZZ_SUMMARY+=("$line")
        rm -rf "$scratch"
    done
    return "$status"
}

# --- the deployment --------------------------------------------------------------------
# scripts/container-test.sh, its output kept in $1 for the summary. It installs its own
# tools (podman, runc, debootstrap; a Python venv) and skips the image checks only where no
# engine can be installed, never under CI=true.
run_container_test() {
    if [ "${CONTAINER_TEST:-1}" = 0 ]; then
        if [ "$CI" = true ]; then
            log "error: CONTAINER_TEST=0 is refused under CI=true"
            return 1
        fi
        log "container: skipped (CONTAINER_TEST=0)"
        return 0
    fi
    run ./scripts/container-test.sh 2>&1 | tee "$1"
}

main() {
    if ! command -v cargo >/dev/null 2>&1; then
        log "error: cargo is not on PATH"
        exit 1
    fi
    ensure_promtool
    ensure_synapse
    ensure_browser

    if [ -n "${PROMTOOL:-}" ]; then
        log "PROMTOOL=$PROMTOOL ($("$PROMTOOL" --version 2>&1 | head -n 1))"
    fi
    if [ -n "${SYNAPSE_TEST_URL:-}" ]; then
        log "SYNAPSE_TEST_URL=$SYNAPSE_TEST_URL (in $SYNAPSE_TEST_DIR)"
    fi
    # The benchmark smoke run prints last; end with one plain line that totals every test
    # binary's "test result" line, so the outcome is the closing line of the log.
    local out status=0 fuzz_status=0 container_status=0 container_out
    out=$(mktemp)
    container_out=$(mktemp)
    run cargo test --workspace --all-targets --locked "$@" 2>&1 | tee "$out" || status=$?
    # After the tests, so that their failures show first; fuzz/ is not a workspace member.
    run_fuzz || fuzz_status=$?
    run_container_test "$container_out" || container_status=$?
    # One line per fuzz target and per deployment check, then the plain test total as the
    # closing line.
    if [ "${#FUZZ_SUMMARY[@]}" -gt 0 ]; then
        printf '%s\n' "${FUZZ_SUMMARY[@]}"
    fi
    grep '^container: ' "$container_out" || true
    rm -f "$container_out"
    awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed;?$/) p += $i; if ($(i+1) ~ /^failed;?$/) f += $i } }
         END { printf "warden: %d passed, %d failed\n", p, f }' "$out"
    rm -f "$out"
    if [ "$fuzz_status" != 0 ]; then
        log "error: fuzzing failed (see the fuzz: lines above)"
        [ "$status" != 0 ] || status=$fuzz_status
    fi
    if [ "$container_status" != 0 ]; then
        log "error: the deployment test failed (see the container: lines above)"
        [ "$status" != 0 ] || status=$container_status
    fi
    return "$status"
}

main "$@"
