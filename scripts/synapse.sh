#!/usr/bin/env bash
# A real Matrix homeserver (Synapse) for warden's Matrix tests: a pinned matrix-synapse
# in a reused venv, a generated loopback-only config with rate limits out of the way,
# started in the background and stopped by pid. Works from any directory.
#
#   ./scripts/synapse.sh install                        # prints the venv path
#   ./scripts/synapse.sh start DIR                      # prints the base URL
#   ./scripts/synapse.sh register DIR USER PASSWORD [admin]
#                                                       # prints {"user_id", "access_token", ...}
#   ./scripts/synapse.sh stop DIR                       # idempotent
#
# `start` installs when needed, generates DIR/homeserver.yaml on first use (a later start
# in the same DIR keeps the data, the signing key and the shared secret, and picks a new
# free port unless SYNAPSE_PORT names one), and leaves in DIR:
#   url             the base URL, http://127.0.0.1:PORT
#   pid             the Synapse process id
#   shared_secret   the registration shared secret (HMAC admin registration)
#   homeserver.log  Synapse's log, WARNING and above; stdout.log its stdout/stderr
# The server name is `localhost`: users are `@USER:localhost`.
#
# Environment:
#   CI=true             a Synapse that cannot be installed or started is an error (it
#                       always is here; test.sh decides whether that is fatal)
#   WARDEN_TOOLS_DIR    where the venv is kept (default ~/.cache/warden/tools)
#   PYTHON              the interpreter that creates the venv (default python3)
#   SYNAPSE_READY_TIMEOUT  seconds to wait for /_matrix/client/versions (default 60)
#   SYNAPSE_PORT        `start` listens on this loopback port instead of a free one, and
#                       fails when it is taken: to stop a Synapse and start it again with
#                       the same data at the same URL (`SYNAPSE_PORT=$PORT start DIR`)
set -euo pipefail

SYNAPSE_VERSION=1.163.2
TOOLS_DIR=${WARDEN_TOOLS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/warden/tools}
VENV=$TOOLS_DIR/synapse-$SYNAPSE_VERSION
VPY=$VENV/bin/python

log() { printf '==> %s\n' "$*" >&2; }
die() {
    log "error: $*"
    exit 1
}

# Prints a command, then runs it.
run() {
    printf '+ %s\n' "$*" >&2
    "$@"
}

usage() {
    sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}" >&2
}

# The matrix-synapse version installed in the venv, or nothing.
installed_version() {
    [ -x "$VPY" ] || return 0
    "$VPY" -c 'import importlib.metadata as m; print(m.version("matrix-synapse"))' 2>/dev/null || true
}

venv_ready() {
    [ -f "$VENV/.warden-complete" ] && [ "$(installed_version)" = "$SYNAPSE_VERSION" ]
}

# --- install ----------------------------------------------------------------------------
cmd_install() {
    mkdir -p "$TOOLS_DIR"
    if venv_ready; then
        printf '%s\n' "$VENV"
        return
    fi
    # Two runs installing at once would trample one venv: serialize them. The lock is
    # released when install returns, so the Synapse that `start` spawns never holds it.
    if command -v flock >/dev/null 2>&1; then
        exec 9>"$TOOLS_DIR/synapse-$SYNAPSE_VERSION.lock"
        flock 9
        local status=0
        venv_ready || install_venv || status=$?
        exec 9>&-
        [ "$status" -eq 0 ] || exit "$status"
    else
        install_venv
    fi
    printf '%s\n' "$VENV"
}

# Installs Debian packages (as root, or through sudo when there is one).
apt_install() {
    local sudo=
    [ "$(id -u)" -eq 0 ] || sudo=sudo
    $sudo apt-get update -qq || true
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "$@" \
        || die "could not install $* with apt-get"
}

install_venv() {
    local python=${PYTHON:-python3}
    if ! command -v "$python" >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
        log "no $python: installing Debian's python3"
        apt_install python3 python3-venv
    fi
    command -v "$python" >/dev/null 2>&1 || die "no $python to create the Synapse venv"
    # Debian's python3 comes without venv/ensurepip until python3-venv is installed.
    if ! "$python" -c 'import venv, ensurepip' >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
        log "$python cannot make a venv: installing Debian's python3-venv"
        apt_install python3-venv
    fi
    log "installing matrix-synapse $SYNAPSE_VERSION into $VENV"
    # A venv is not relocatable, so it is built in place; the marker file says it is whole.
    rm -rf "$VENV"
    if ! run "$python" -m venv "$VENV" \
        || ! run "$VPY" -m pip install --quiet --disable-pip-version-check \
            --only-binary matrix-synapse "matrix-synapse==$SYNAPSE_VERSION" \
        || [ "$(installed_version)" != "$SYNAPSE_VERSION" ]; then
        rm -rf "$VENV"
        die "could not install matrix-synapse $SYNAPSE_VERSION"
    fi
    touch "$VENV/.warden-complete"
}

# --- start ------------------------------------------------------------------------------
# The pid in DIR/pid when it names a live Synapse, or nothing.
live_pid() {
    local dir=$1 pid
    [ -f "$dir/pid" ] || return 0
    pid=$(cat "$dir/pid")
    [[ $pid =~ ^[0-9]+$ ]] || return 0
    kill -0 "$pid" 2>/dev/null || return 0
    # A recycled pid is someone else's process: only claim it when it runs Synapse.
    if [ -r "/proc/$pid/cmdline" ] && ! tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q synapse.app.homeserver; then
        return 0
    fi
    printf '%s\n' "$pid"
}

abs_dir() {
    mkdir -p "$1"
    (cd "$1" && pwd)
}

cmd_start() {
    [ $# -eq 1 ] || {
        usage
        exit 2
    }
    if [ -n "${SYNAPSE_PORT:-}" ] && ! [[ $SYNAPSE_PORT =~ ^[0-9]+$ && $SYNAPSE_PORT -ge 1 && $SYNAPSE_PORT -le 65535 ]]; then
        die "SYNAPSE_PORT must be a port number, not '$SYNAPSE_PORT'"
    fi
    local dir pid
    dir=$(abs_dir "$1")
    pid=$(live_pid "$dir")
    [ -z "$pid" ] || die "Synapse is already running in $dir (pid $pid, $(cat "$dir/url" 2>/dev/null))"
    cmd_install >/dev/null

    if [ ! -f "$dir/homeserver.yaml" ]; then
        (cd "$dir" && run "$VPY" -m synapse.app.homeserver --server-name localhost \
            --config-path "$dir/homeserver.yaml" --generate-config --report-stats=no \
            --data-directory "$dir/data" >/dev/null)
    fi
    if [ ! -s "$dir/shared_secret" ]; then
        (umask 077 && "$VPY" -c 'import secrets; print(secrets.token_hex(32))' >"$dir/shared_secret")
    fi
    local port
    port=$(patch_config "$dir") || die "could not configure Synapse in $dir"
    local url=http://127.0.0.1:$port

    rm -f "$dir/pid" "$dir/url"
    log "starting Synapse $SYNAPSE_VERSION on $url (in $dir)"
    (cd "$dir" && exec nohup "$VPY" -m synapse.app.homeserver -c "$dir/homeserver.yaml" \
        >"$dir/stdout.log" 2>&1 </dev/null) &
    pid=$!
    printf '%s\n' "$pid" >"$dir/pid"
    printf '%s\n' "$url" >"$dir/url"

    local deadline=$((SECONDS + ${SYNAPSE_READY_TIMEOUT:-60}))
    until [ "$(http_status "$url/_matrix/client/versions")" = 200 ]; do
        if ! kill -0 "$pid" 2>/dev/null; then
            show_logs "$dir"
            rm -f "$dir/pid" "$dir/url"
            die "Synapse exited before it was ready"
        fi
        if [ "$SECONDS" -ge "$deadline" ]; then
            show_logs "$dir"
            cmd_stop "$dir"
            die "Synapse was not ready within ${SYNAPSE_READY_TIMEOUT:-60} s"
        fi
        sleep 0.2
    done
    log "Synapse is ready at $url (pid $pid)"
    printf '%s\n' "$url"
}

# The HTTP status of a GET, or 000 when there is no answer.
http_status() {
    "$VPY" - "$1" <<'EOF'
import sys, urllib.request, urllib.error
try:
    with urllib.request.urlopen(sys.argv[1], timeout=2) as r:
        print(r.status)
except urllib.error.HTTPError as e:
    print(e.code)
except Exception:
    print("000")
EOF
}

show_logs() {
    local f
    for f in "$1/stdout.log" "$1/homeserver.log"; do
        [ -f "$f" ] || continue
        log "last lines of $f:"
        tail -n 40 "$f" >&2
    done
}

# Rewrites DIR/homeserver.yaml for tests (again on every start: a new free port each
# time, or SYNAPSE_PORT) and writes DIR/log.config. Prints the port.
patch_config() {
    "$VPY" - "$1" "${SYNAPSE_PORT:-0}" <<'EOF'
import socket, sys, yaml

d = sys.argv[1]
path = f"{d}/homeserver.yaml"
with open(path) as f:
    c = yaml.safe_load(f)

# A free loopback port: the kernel picks one; Synapse binds it a moment later. A fixed
# port must be free now: SO_REUSEADDR as Synapse sets it, so connections of a previous
# Synapse in TIME_WAIT do not count, but a listener does.
with socket.socket() as s:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind(("127.0.0.1", int(sys.argv[2])))
    except OSError as e:
        sys.exit(f"==> error: cannot listen on 127.0.0.1:{sys.argv[2]}: {e.strerror}")
    port = s.getsockname()[1]

c["listeners"] = [{
    "port": port,
    "bind_addresses": ["127.0.0.1"],
    "type": "http",
    "tls": False,
    "x_forwarded": False,
    "resources": [{"names": ["client"], "compress": False}],
}]
c["public_baseurl"] = f"http://127.0.0.1:{port}/"
with open(f"{d}/shared_secret") as f:
    c["registration_shared_secret"] = f.read().strip()
c["enable_registration"] = False
c["trusted_key_servers"] = []
c["suppress_key_server_warning"] = True
c["report_stats"] = False
c["presence"] = {"enabled": False}
c["url_preview_enabled"] = False
c["enable_metrics"] = False
c["bcrypt_rounds"] = 4

# Every rate limit out of the way: the SDK retries a 429 for up to 15 minutes, so a test
# that hits one stalls instead of failing.
fast = {"per_second": 10000, "burst_count": 100000}
# The keys are those Synapse 1.163.2 reads (synapse/config/ratelimiting.py).
for key in ("rc_message", "rc_registration", "rc_registration_token_validity",
            "rc_admin_redaction", "rc_joins_per_room", "rc_key_requests",
            "rc_3pid_validation", "rc_third_party_invite", "rc_media_create",
            "rc_delayed_event_mgmt", "rc_room_creation", "rc_reports",
            "rc_user_directory", "rc_profile"):
    c[key] = dict(fast)
c["rc_presence"] = {"per_user": dict(fast)}
c["rc_login"] = {k: dict(fast) for k in ("address", "account", "failed_attempts")}
c["rc_joins"] = {k: dict(fast) for k in ("local", "remote")}
c["rc_invites"] = {k: dict(fast) for k in ("per_room", "per_user", "per_issuer")}
c["rc_federation"] = {"window_size": 1000, "sleep_limit": 100000, "sleep_delay": 0,
                      "reject_limit": 100000, "concurrent": 10000}

c["log_config"] = f"{d}/log.config"
with open(f"{d}/log.config", "w") as f:
    yaml.safe_dump({
        "version": 1,
        "formatters": {"precise": {"format": "%(asctime)s - %(name)s - %(lineno)d - "
                                             "%(levelname)s - %(request)s - %(message)s"}},
        "handlers": {"file": {"class": "logging.FileHandler", "formatter": "precise",
                              "filename": f"{d}/homeserver.log", "encoding": "utf8"}},
        "loggers": {"synapse.storage.SQL": {"level": "WARNING"}},
        "root": {"level": "WARNING", "handlers": ["file"]},
        "disable_existing_loggers": False,
    }, f)

with open(path + ".tmp", "w") as f:
    f.write("# Generated by Synapse, then rewritten by warden's scripts/synapse.sh.\n")
    yaml.safe_dump(c, f, sort_keys=False)
import os
os.replace(path + ".tmp", path)
print(port)
EOF
}

# --- register ---------------------------------------------------------------------------
cmd_register() {
    if [ $# -lt 3 ] || [ $# -gt 4 ] || { [ $# -eq 4 ] && [ "$4" != admin ]; }; then
        usage
        exit 2
    fi
    local dir
    dir=$(abs_dir "$1")
    [ -f "$dir/url" ] && [ -f "$dir/shared_secret" ] || die "no Synapse started in $dir"
    [ -x "$VPY" ] || die "no Synapse venv at $VENV"
    "$VPY" - "$(cat "$dir/url")" "$(cat "$dir/shared_secret")" "$2" "$3" "${4:-}" <<'EOF'
import hashlib, hmac, json, sys, urllib.request, urllib.error

url, secret, user, password, admin = sys.argv[1:6]
endpoint = url + "/_synapse/admin/v1/register"
try:
    with urllib.request.urlopen(endpoint, timeout=30) as r:
        nonce = json.load(r)["nonce"]
    mac = hmac.new(secret.encode(), digestmod=hashlib.sha1)
    mac.update(b"\0".join([nonce.encode(), user.encode(), password.encode(),
                           b"admin" if admin == "admin" else b"notadmin"]))
    body = json.dumps({"nonce": nonce, "username": user, "password": password,
                       "admin": admin == "admin", "mac": mac.hexdigest()}).encode()
    req = urllib.request.Request(endpoint, data=body, method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        reply = json.load(r)
except urllib.error.HTTPError as e:
    sys.exit(f"==> error: registering {user} failed: HTTP {e.code} {e.read().decode(errors='replace')}")
except OSError as e:
    sys.exit(f"==> error: registering {user} failed: {e}")
print(json.dumps({k: reply.get(k) for k in ("user_id", "access_token", "device_id")}))
EOF
}

# --- stop -------------------------------------------------------------------------------
cmd_stop() {
    [ $# -eq 1 ] || {
        usage
        exit 2
    }
    local dir=$1 pid
    [ -d "$dir" ] || return 0
    pid=$(live_pid "$dir")
    if [ -n "$pid" ]; then
        log "stopping Synapse (pid $pid)"
        kill -TERM "$pid" 2>/dev/null || true
        local deadline=$((SECONDS + 10))
        while kill -0 "$pid" 2>/dev/null && [ "$SECONDS" -lt "$deadline" ]; do
            sleep 0.1
        done
        if kill -0 "$pid" 2>/dev/null; then
            log "Synapse did not stop within 10 s: killing it"
            kill -KILL "$pid" 2>/dev/null || true
        fi
    fi
    rm -f "$dir/pid" "$dir/url"
}

main() {
    local cmd=${1:-}
    [ $# -eq 0 ] || shift
    case $cmd in
        install) cmd_install "$@" ;;
        start) cmd_start "$@" ;;
        register) cmd_register "$@" ;;
        stop) cmd_stop "$@" ;;
        -h | --help | help)
            usage
            ;;
        *)
            usage
            exit 2
            ;;
    esac
}

main "$@"
