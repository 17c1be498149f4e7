#!/usr/bin/env bash
# Benchmark of issue 5's goal "50 Matrix accounts on one Synapse": a release `warden run`
# with N password accounts on a private Synapse. Measures, against the goals:
#   * time from spawning `warden run` to GET /readyz = 200 (every account has synced once),
#     on a fresh state dir (N logins through the `matrix_login` pool)   goal <= 30 s
#   * the same after a SIGTERM, on the saved sessions (no logins)
#   * warden's RSS with N idle accounts (long-polling /sync) minus its RSS with none,
#     per account                                                         goal <= 10 MiB
# and prints a markdown table with the machine and the commit. Works from any directory.
#
#   ./scripts/bench-matrix.sh                     # N = 50, about 95 s plus the release build
#   BENCH_ACCOUNTS=10 ./scripts/bench-matrix.sh   # another N (for the marginal cost)
#
# Environment:
#   BENCH_ACCOUNTS        N, the number of accounts (default 50)
#   BENCH_IDLE_SECONDS    idle time before the RSS with N accounts is read (default 30)
#   BENCH_BASELINE_IDLE_SECONDS  idle time before the baseline RSS is read (default 10)
#   BENCH_READY_TIMEOUT   a start not ready within this many seconds fails (default 120)
#   BENCH_BCRYPT_ROUNDS   re-hash the users' passwords with this bcrypt cost (Synapse's
#                         default is 12; scripts/synapse.sh configures 4 for fast tests),
#                         so that logins cost what they cost on a production Synapse
#   BENCH_KEEP=1          keep the work directory (configs, warden logs, Synapse) at the
#                         end; it is always kept when the benchmark fails
#   WARDEN_BIN            the warden binary to measure; without it, this script runs
#                         `cargo build --release --bin warden` and uses target/release/warden
#   WARDEN_TOOLS_DIR      passed to scripts/synapse.sh (where its venv is kept)
# warden itself runs without any WARDEN_* or RUST_LOG variable of the caller: it reads
# every WARDEN_* variable as configuration, and the benchmark wants only its own config.
#
# Progress goes to stderr; the result tables to stdout.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$(pwd)
SYNAPSE_SH=$ROOT/scripts/synapse.sh

N=${BENCH_ACCOUNTS:-50}
IDLE_S=${BENCH_IDLE_SECONDS:-30}
BASELINE_IDLE_S=${BENCH_BASELINE_IDLE_SECONDS:-10}
READY_TIMEOUT_S=${BENCH_READY_TIMEOUT:-120}
KEEP=${BENCH_KEEP:-0}
BIN=${WARDEN_BIN:-}
BCRYPT_ROUNDS=${BENCH_BCRYPT_ROUNDS:-}
# Seconds between the restart's "all ready" and its RSS reading.
RESTART_IDLE_S=10
# Registrations running at once (each is a short Python process).
REGISTER_JOBS=4

log() { printf '==> %s\n' "$*" >&2; }
die() {
    log "error: $*"
    exit 1
}
run() {
    printf '+ %s\n' "$*" >&2
    "$@"
}

for pair in "BENCH_ACCOUNTS=$N" "BENCH_IDLE_SECONDS=$IDLE_S" \
    "BENCH_BASELINE_IDLE_SECONDS=$BASELINE_IDLE_S" "BENCH_READY_TIMEOUT=$READY_TIMEOUT_S"; do
    [[ ${pair#*=} =~ ^[0-9]+$ ]] || die "${pair%%=*} must be a whole number, not '${pair#*=}'"
done
[ "$N" -ge 1 ] || die "BENCH_ACCOUNTS must be at least 1"
if [ -n "$BCRYPT_ROUNDS" ] && ! [[ $BCRYPT_ROUNDS =~ ^[0-9]+$ && $BCRYPT_ROUNDS -ge 4 && $BCRYPT_ROUNDS -le 31 ]]; then
    die "BENCH_BCRYPT_ROUNDS must be a bcrypt cost from 4 to 31, not '$BCRYPT_ROUNDS'"
fi
for tool in curl python3 awk; do
    command -v "$tool" >/dev/null 2>&1 || die "$tool is required"
done

# warden's environment: the caller's, without WARDEN_* and RUST_LOG.
WARDEN_ENV=(env -u RUST_LOG)
while IFS= read -r name; do
    case $name in WARDEN_*) WARDEN_ENV+=(-u "$name") ;; esac
done < <(compgen -e)

WORK=$(mktemp -d "${TMPDIR:-/tmp}/warden-bench-matrix.XXXXXX")
SYNAPSE_DIR=$WORK/synapse
WARDEN_PID=
FAILED=1

# --- clean-up ----------------------------------------------------------------------------
stop_quietly() {
    if [ -n "$WARDEN_PID" ] && kill -0 "$WARDEN_PID" 2>/dev/null; then
        kill -TERM "$WARDEN_PID" 2>/dev/null || true
        local i
        for ((i = 0; i < 150; i++)); do
            kill -0 "$WARDEN_PID" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$WARDEN_PID" 2>/dev/null || true
        wait "$WARDEN_PID" 2>/dev/null || true
    fi
    WARDEN_PID=
}

cleanup() {
    stop_quietly
    "$SYNAPSE_SH" stop "$SYNAPSE_DIR" >/dev/null 2>&1 || true
    if [ "$FAILED" = 1 ] || [ "$KEEP" = 1 ]; then
        log "work directory kept: $WORK"
    else
        rm -rf "$WORK"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# --- helpers -----------------------------------------------------------------------------
# Microseconds since the epoch, without a fork.
now_us() { printf '%s\n' "${EPOCHREALTIME/./}"; }

# Seconds with two decimals from microseconds.
secs() { awk -v us="$1" 'BEGIN { printf "%.2f", us / 1e6 }'; }

# MiB with one decimal from kB.
mib() { awk -v kb="$1" 'BEGIN { printf "%.1f", kb / 1024 }'; }

# A field of /proc/PID/status, in kB (or a count): VmRSS, VmHWM, RssAnon, RssFile, Threads.
status_field() { awk -v key="$2:" '$1 == key { print $2 }' "/proc/$1/status"; }

# CPU time (user + system) of a process, in clock ticks.
CLK_TCK=$(getconf CLK_TCK)
cpu_ticks() {
    # After "pid (comm) ", utime and stime are fields 12 and 13.
    sed 's/^.*) //' "/proc/$1/stat" | awk '{ print $12 + $13 }'
}
cpu_secs() { awk -v t="$1" -v hz="$CLK_TCK" 'BEGIN { printf "%.1f", t / hz }'; }

# N free loopback ports.
free_ports() {
    python3 - "$1" <<'EOF'
import socket, sys
socks = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))
EOF
}

# Spawns `warden run` with CONFIG, STATE_DIR, LOG. Sets WARDEN_PID, ADMIN_URL, SPAWNED_US.
start_warden() {
    local config=$1 state=$2 logfile=$3 gw admin
    read -r gw admin < <(free_ports 2)
    ADMIN_URL=http://127.0.0.1:$admin
    log "starting warden (config $config, state $state, admin $ADMIN_URL)"
    SPAWNED_US=$(now_us)
    "${WARDEN_ENV[@]}" "$BIN" --config "$config" run --gateway-bind "127.0.0.1:$gw" \
        --admin-bind "127.0.0.1:$admin" --state-dir "$state" --log-format json \
        >"$logfile" 2>&1 &
    WARDEN_PID=$!
}

# Polls /readyz every 50 ms until 200. Sets READY_US (since the spawn). Fails after
# READY_TIMEOUT_S, or when warden exits.
wait_ready() {
    local logfile=$1 code now deadline=$((SPAWNED_US + READY_TIMEOUT_S * 1000000))
    while :; do
        code=$(curl -s -o "$WORK/readyz.json" -w '%{http_code}' --max-time 2 \
            "$ADMIN_URL/readyz" || true)
        now=$(now_us)
        if [ "$code" = 200 ]; then
            READY_US=$((now - SPAWNED_US))
            return 0
        fi
        if ! kill -0 "$WARDEN_PID" 2>/dev/null; then
            tail -n 30 "$logfile" >&2
            die "warden exited before it was ready (log: $logfile)"
        fi
        if [ "$now" -ge "$deadline" ]; then
            log "last /readyz answer ($code): $(head -c 2000 "$WORK/readyz.json" 2>/dev/null)"
            tail -n 30 "$logfile" >&2
            die "not ready within $READY_TIMEOUT_S s (log: $logfile)"
        fi
        sleep 0.05
    done
}

# SIGTERMs warden and waits for it. Sets STOP_US and STOP_CODE.
stop_warden() {
    local t0 code=0
    t0=$(now_us)
    kill -TERM "$WARDEN_PID"
    wait "$WARDEN_PID" || code=$?
    STOP_US=$(($(now_us) - t0))
    STOP_CODE=$code
    WARDEN_PID=
}

# The sum of warden_restarts_total in /metrics (0 when none was recorded).
restarts_total() {
    curl -s --max-time 5 "$ADMIN_URL/metrics" \
        | awk '/^warden_restarts_total[{ ]/ { sum += $NF } END { printf "%d\n", sum }'
}

# Reads the memory and thread figures of warden into SNAP_* variables.
snapshot_process() {
    local pid=$WARDEN_PID
    SNAP_RSS=$(status_field "$pid" VmRSS)
    SNAP_HWM=$(status_field "$pid" VmHWM)
    SNAP_ANON=$(status_field "$pid" RssAnon)
    SNAP_FILE=$(status_field "$pid" RssFile)
    SNAP_SHMEM=$(status_field "$pid" RssShmem)
    SNAP_THREADS=$(status_field "$pid" Threads)
    SNAP_FDS=$(find "/proc/$pid/fd" -mindepth 1 -maxdepth 1 2>/dev/null | wc -l)
}

# Summarizes a warden JSON log: prints shell assignments (LOGINS, LOGIN_P50_MS, …).
analyze_log() {
    python3 - "$1" "$2" <<'EOF'
import json, shlex, sys
from datetime import datetime

path, spawned_us = sys.argv[1], int(sys.argv[2])
logins, ready_ms, ready_at, warns, errors = [], [], [], {}, {}
opened_at = []  # "Logged in to Matrix." or "Restored the Matrix session.", ms after spawn

def field(ev, key):
    if key in ev:
        return ev[key]
    return (ev.get("fields") or {}).get(key)

def epoch_us(ts):
    # RFC 3339 with up to nanoseconds, "Z" or an offset.
    ts = ts.replace("Z", "+00:00")
    head, _, rest = ts.partition(".")
    if rest:
        digits = "".join(c for c in rest if c.isdigit())
        tz = rest[len(digits):]
        ts = f"{head}.{(digits + '000000')[:6]}{tz}"
    d = datetime.fromisoformat(ts)
    return int(d.timestamp()) * 1_000_000 + d.microsecond

with open(path, errors="replace") as f:
    for line in f:
        try:
            ev = json.loads(line)
        except ValueError:
            continue
        msg = field(ev, "message") or ""
        level = ev.get("level", "")
        if msg in ("Logged in to Matrix.", "Restored the Matrix session.") and "timestamp" in ev:
            opened_at.append((epoch_us(ev["timestamp"]) - spawned_us) / 1000)
        if msg == "Logged in to Matrix.":
            logins.append(int(field(ev, "login_ms") or 0))
        elif msg == "Matrix account ready.":
            ready_ms.append(int(field(ev, "start_ms") or 0))
            if "timestamp" in ev:
                ready_at.append((epoch_us(ev["timestamp"]) - spawned_us) / 1000)
        if level in ("WARN", "ERROR"):
            bucket = warns if level == "WARN" else errors
            bucket[msg] = bucket.get(msg, 0) + 1

def pct(xs, p):
    if not xs:
        return "-"
    xs = sorted(xs)
    return str(round(xs[max(0, min(len(xs) - 1, -(-len(xs) * p // 100) - 1))]))

out = {
    "LOGINS": len(logins), "LOGIN_P50_MS": pct(logins, 50), "LOGIN_MAX_MS": pct(logins, 100),
    "READY_LINES": len(ready_ms), "START_P50_MS": pct(ready_ms, 50),
    "START_MAX_MS": pct(ready_ms, 100), "FIRST_READY_MS": pct(ready_at, 0),
    "MEDIAN_READY_MS": pct(ready_at, 50), "LAST_READY_MS": pct(ready_at, 100),
    "OPENED": len(opened_at), "FIRST_OPENED_MS": pct(opened_at, 0),
    "LAST_OPENED_MS": pct(opened_at, 100),
    "WARNS": sum(warns.values()), "ERRORS": sum(errors.values()),
    "PROBLEMS": "; ".join(f"{lvl} x{n}: {m}" for lvl, d in (("ERROR", errors), ("WARN", warns))
                          for m, n in sorted(d.items(), key=lambda kv: -kv[1])[:5]),
}
for k, v in out.items():
    print(f"{k}={shlex.quote(str(v))}")
EOF
}

# --- 1. build ----------------------------------------------------------------------------
if [ -z "$BIN" ]; then
    run cargo build --release --bin warden
    BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release/warden
fi
[ -x "$BIN" ] || die "no warden binary at $BIN"
BIN=$(cd "$(dirname "$BIN")" && pwd)/$(basename "$BIN")
LOAD_AT_START=$(cut -d' ' -f1-3 /proc/loadavg)
BENCH_STARTED=$SECONDS

# --- 2. Synapse and N users --------------------------------------------------------------
SYNAPSE_URL=$("$SYNAPSE_SH" start "$SYNAPSE_DIR")
SYNAPSE_PID=$(cat "$SYNAPSE_DIR/pid")
WIDTH=${#N}
[ "$WIDTH" -ge 2 ] || WIDTH=2
alias_of() { printf 'bench%0*d' "$WIDTH" "$1"; }
# One password for every user: a re-hash (BENCH_BCRYPT_ROUNDS) then costs one bcrypt.
PASSWORD=bench-password

log "registering $N users on $SYNAPSE_URL ($REGISTER_JOBS at a time)"
t0=$(now_us)
pids=()
for ((i = 1; i <= N; i++)); do
    user=$(alias_of "$i")
    "$SYNAPSE_SH" register "$SYNAPSE_DIR" "$user" "$PASSWORD" >/dev/null &
    pids+=("$!")
    if [ "${#pids[@]}" -ge "$REGISTER_JOBS" ]; then
        for pid in "${pids[@]}"; do wait "$pid" || die "registering a user failed"; done
        pids=()
    fi
done
for pid in "${pids[@]}"; do wait "$pid" || die "registering a user failed"; done
REGISTER_US=$(($(now_us) - t0))
log "registered $N users in $(secs "$REGISTER_US") s"
HASH_NOTE="bcrypt cost 4 (scripts/synapse.sh)"
if [ -n "$BCRYPT_ROUNDS" ]; then
    # Synapse's admin API hashes with the configured cost only, so the hashes are written
    # into its database while it is stopped; it comes back at the same URL.
    log "re-hashing the users' password with bcrypt cost $BCRYPT_ROUNDS"
    "$SYNAPSE_SH" stop "$SYNAPSE_DIR"
    VPY=$("$SYNAPSE_SH" install)/bin/python
    "$VPY" - "$SYNAPSE_DIR/homeserver.yaml" "$BCRYPT_ROUNDS" "$PASSWORD" <<'EOF'
import sqlite3, sys, bcrypt, yaml
config, rounds, password = sys.argv[1], int(sys.argv[2]), sys.argv[3]
with open(config) as f:
    db = yaml.safe_load(f)["database"]
if db["name"] != "sqlite3":
    sys.exit(f"==> error: cannot re-hash passwords in a {db['name']} database")
hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds)).decode()
with sqlite3.connect(db["args"]["database"]) as conn:
    n = conn.execute("UPDATE users SET password_hash = ? WHERE name LIKE '@bench%:localhost'",
                     (hashed,)).rowcount
print(f"==> re-hashed {n} passwords", file=sys.stderr)
EOF
    SYNAPSE_URL=$(SYNAPSE_PORT=${SYNAPSE_URL##*:} "$SYNAPSE_SH" start "$SYNAPSE_DIR")
    SYNAPSE_PID=$(cat "$SYNAPSE_DIR/pid")
    HASH_NOTE="bcrypt cost $BCRYPT_ROUNDS (re-hashed)"
fi

# --- 3. configs --------------------------------------------------------------------------
BASE_CONFIG=$WORK/baseline.toml
ACCOUNTS_CONFIG=$WORK/accounts.toml
printf '# warden benchmark baseline: no accounts.\n' >"$BASE_CONFIG"
{
    printf '# warden benchmark: %s Matrix accounts on %s.\n' "$N" "$SYNAPSE_URL"
    for ((i = 1; i <= N; i++)); do
        user=$(alias_of "$i")
        printf '\n[matrix.accounts.%s]\n' "$user"
        printf 'homeserver = "%s"\n' "$SYNAPSE_URL"
        printf 'user_id = "@%s:localhost"\n' "$user"
        printf 'password = "%s"\n' "$PASSWORD"
    done
} >"$ACCOUNTS_CONFIG"

# --- 4. baseline -------------------------------------------------------------------------
log "baseline: no accounts, ${BASELINE_IDLE_S} s idle"
start_warden "$BASE_CONFIG" "$WORK/state-baseline" "$WORK/baseline.log"
wait_ready "$WORK/baseline.log"
BASE_READY_US=$READY_US
sleep "$BASELINE_IDLE_S"
snapshot_process
BASE_RSS=$SNAP_RSS
BASE_HWM=$SNAP_HWM
BASE_ANON=$SNAP_ANON
BASE_FILE=$SNAP_FILE
BASE_SHMEM=$SNAP_SHMEM
BASE_THREADS=$SNAP_THREADS
BASE_FDS=$SNAP_FDS
stop_warden
BASE_STOP_US=$STOP_US
[ "$STOP_CODE" = 0 ] || die "baseline warden exited with $STOP_CODE after SIGTERM"

# --- 5. + 6. fresh start with N accounts -------------------------------------------------
STATE=$WORK/state
FRESH_LOG=$WORK/fresh.log
log "fresh start: $N accounts, empty state dir"
syn_cpu0=$(cpu_ticks "$SYNAPSE_PID")
start_warden "$ACCOUNTS_CONFIG" "$STATE" "$FRESH_LOG"
wait_ready "$FRESH_LOG"
FRESH_READY_US=$READY_US
FRESH_SPAWNED_US=$SPAWNED_US
FRESH_SYN_CPU=$(($(cpu_ticks "$SYNAPSE_PID") - syn_cpu0))
FRESH_WARDEN_CPU=$(cpu_ticks "$WARDEN_PID")
snapshot_process
FRESH_RSS_AT_READY=$SNAP_RSS
log "all $N accounts ready after $(secs "$FRESH_READY_US") s; idling ${IDLE_S} s"
idle_cpu0=$(cpu_ticks "$WARDEN_PID")
syn_idle_cpu0=$(cpu_ticks "$SYNAPSE_PID")
sleep "$IDLE_S"
IDLE_WARDEN_CPU=$(($(cpu_ticks "$WARDEN_PID") - idle_cpu0))
IDLE_SYN_CPU=$(($(cpu_ticks "$SYNAPSE_PID") - syn_idle_cpu0))
snapshot_process
IDLE_RSS=$SNAP_RSS
IDLE_HWM=$SNAP_HWM
IDLE_ANON=$SNAP_ANON
IDLE_FILE=$SNAP_FILE
IDLE_SHMEM=$SNAP_SHMEM
IDLE_THREADS=$SNAP_THREADS
IDLE_FDS=$SNAP_FDS
FRESH_RESTARTS=$(restarts_total)
curl -s --max-time 5 "$ADMIN_URL/readyz" -o "$WORK/readyz.json" -w '%{http_code}' \
    | grep -qx 200 || log "warning: /readyz is no longer 200 after ${IDLE_S} s idle: $(cat "$WORK/readyz.json")"
stop_warden
FRESH_STOP_US=$STOP_US
[ "$STOP_CODE" = 0 ] || log "warning: warden exited with $STOP_CODE after SIGTERM"
STATE_KB=$(du -sk "$STATE" | cut -f1)

# --- 7. restart on the saved sessions ----------------------------------------------------
RESTART_LOG=$WORK/restart.log
log "restart: $N accounts, saved sessions"
syn_cpu0=$(cpu_ticks "$SYNAPSE_PID")
start_warden "$ACCOUNTS_CONFIG" "$STATE" "$RESTART_LOG"
wait_ready "$RESTART_LOG"
RESTART_READY_US=$READY_US
RESTART_SPAWNED_US=$SPAWNED_US
RESTART_SYN_CPU=$(($(cpu_ticks "$SYNAPSE_PID") - syn_cpu0))
RESTART_WARDEN_CPU=$(cpu_ticks "$WARDEN_PID")
sleep "$RESTART_IDLE_S"
snapshot_process
RESTART_RSS=$SNAP_RSS
RESTART_RESTARTS=$(restarts_total)
stop_warden
RESTART_STOP_US=$STOP_US
[ "$STOP_CODE" = 0 ] || log "warning: warden exited with $STOP_CODE after SIGTERM"

# --- 8. report ---------------------------------------------------------------------------
eval "$(analyze_log "$FRESH_LOG" "$FRESH_SPAWNED_US" | sed 's/^/F_/')"
eval "$(analyze_log "$RESTART_LOG" "$RESTART_SPAWNED_US" | sed 's/^/R_/')"

PER_ACCOUNT_KB=$(awk -v a="$IDLE_RSS" -v b="$BASE_RSS" -v n="$N" 'BEGIN { printf "%.0f", (a - b) / n }')
verdict() { awk -v x="$1" -v goal="$2" 'BEGIN { print (x <= goal) ? "PASS" : "FAIL" }'; }
START_VERDICT=$(verdict "$(secs "$FRESH_READY_US")" 30)
RSS_VERDICT=$(verdict "$(mib "$PER_ACCOUNT_KB")" 10)

COMMIT=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)
if [ -n "$(git -C "$ROOT" status --porcelain --untracked-files=no 2>/dev/null)" ]; then
    COMMIT="$COMMIT (working tree has uncommitted changes)"
fi
CPU_MODEL=$(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)
MEM_KB=$(awk '/^MemTotal:/ { print $2 }' /proc/meminfo)
RUSTC=$(rustc --version 2>/dev/null || echo unknown)
TOTAL_S=$((SECONDS - BENCH_STARTED))

cat <<EOF

## Matrix accounts benchmark: N = $N

| | |
|---|---|
| Machine | $CPU_MODEL, \`nproc\` = $(nproc), MemTotal $(mib "$MEM_KB") MiB, Linux $(uname -r) |
| Toolchain | $RUSTC; binary \`$BIN\` |
| Commit | \`$COMMIT\` |
| Date | $(date -u '+%Y-%m-%d %H:%M UTC'), load average at start $LOAD_AT_START |
| Synapse | $("$SYNAPSE_SH" install 2>/dev/null | sed 's/.*synapse-/matrix-synapse /'), one process on the same machine; $N users registered in $(secs "$REGISTER_US") s; passwords: $HASH_NOTE |

| Figure | Value | Goal |
|---|---|---|
| fresh start (N logins) → all $N ready | **$(secs "$FRESH_READY_US") s** | ≤ 30 s: **$START_VERDICT** |
| restart with saved sessions → all $N ready | **$(secs "$RESTART_READY_US") s** | — |
| baseline RSS, no accounts, after ${BASELINE_IDLE_S} s idle | $(mib "$BASE_RSS") MiB (VmHWM $(mib "$BASE_HWM")) | — |
| RSS with $N idle accounts, after ${IDLE_S} s idle | $(mib "$IDLE_RSS") MiB (VmHWM $(mib "$IDLE_HWM")) | — |
| RSS per account, (RSS − baseline) / $N | **$(mib "$PER_ACCOUNT_KB") MiB** | ≤ 10 MiB: **$RSS_VERDICT** |

| Detail | fresh start | restart |
|---|---|---|
| logins ("Logged in to Matrix."), login_ms p50 / max | $F_LOGINS, $F_LOGIN_P50_MS / $F_LOGIN_MAX_MS ms | $R_LOGINS |
| sessions opened (logged in or restored) after spawn: first / last | $F_FIRST_OPENED_MS / $F_LAST_OPENED_MS ms ($F_OPENED) | $R_FIRST_OPENED_MS / $R_LAST_OPENED_MS ms ($R_OPENED) |
| accounts ready ("Matrix account ready."), start_ms p50 / max | $F_READY_LINES, $F_START_P50_MS / $F_START_MAX_MS ms | $R_READY_LINES, $R_START_P50_MS / $R_START_MAX_MS ms |
| account ready after spawn: first / median / last | $F_FIRST_READY_MS / $F_MEDIAN_READY_MS / $F_LAST_READY_MS ms | $R_FIRST_READY_MS / $R_MEDIAN_READY_MS / $R_LAST_READY_MS ms |
| CPU until all ready: warden / Synapse | $(cpu_secs "$FRESH_WARDEN_CPU") / $(cpu_secs "$FRESH_SYN_CPU") s | $(cpu_secs "$RESTART_WARDEN_CPU") / $(cpu_secs "$RESTART_SYN_CPU") s |
| RSS when all ready | $(mib "$FRESH_RSS_AT_READY") MiB | $(mib "$RESTART_RSS") MiB (${RESTART_IDLE_S} s after ready) |
| restarts (warden_restarts_total) | $FRESH_RESTARTS | $RESTART_RESTARTS |
| warnings / errors in warden's log | $F_WARNS / $F_ERRORS | $R_WARNS / $R_ERRORS |
| SIGTERM → exited | $(secs "$FRESH_STOP_US") s | $(secs "$RESTART_STOP_US") s |

| Idle process (after ${IDLE_S} s) | no accounts | $N accounts |
|---|---|---|
| RssAnon / RssFile / RssShmem | $(mib "$BASE_ANON") / $(mib "$BASE_FILE") / $(mib "$BASE_SHMEM") MiB | $(mib "$IDLE_ANON") / $(mib "$IDLE_FILE") / $(mib "$IDLE_SHMEM") MiB |
| threads / open fds | $BASE_THREADS / $BASE_FDS | $IDLE_THREADS / $IDLE_FDS |
| CPU during the idle period: warden / Synapse | — | $(cpu_secs "$IDLE_WARDEN_CPU") / $(cpu_secs "$IDLE_SYN_CPU") s |
| state dir on disk | — | $(mib "$STATE_KB") MiB |
| baseline: spawn → ready, SIGTERM → exited | $(secs "$BASE_READY_US") s, $(secs "$BASE_STOP_US") s | — |

Benchmark time (after the build): ${TOTAL_S} s.
EOF
if [ -n "$F_PROBLEMS$R_PROBLEMS" ]; then
    printf '\nLog problems: fresh: %s; restart: %s\n' "${F_PROBLEMS:-none}" "${R_PROBLEMS:-none}"
fi
[ "$F_READY_LINES" = "$N" ] || log "warning: $F_READY_LINES of $N accounts logged \"Matrix account ready.\" on the fresh start"

FAILED=0
