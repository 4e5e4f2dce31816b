#!/usr/bin/env bash
# HTTP/2 rapid-reset flood against the real balancer, loopback only: how long a normal client
# on other connections waits while one address floods.
#
#   benches/flood.sh                 # every variant once (~25 s plus the build)
#   VARIANTS=split8 benches/flood.sh # one variant
#   H2LOAD=1 benches/flood.sh        # also h2load -c4 -m100 without a flood (req/s)
#
# What runs (examples/h2flood.rs, built with cargo build --release --example h2flood):
#   backend   a minimal HTTP/1.1 backend (h2flood backend)
#   balancer  the release binary, one listener, access log off, stderr to a file
#   client    a normal client from 127.0.0.2: one GET at a time, 10 ms apart, on a keep-alive
#             connection and on a fresh connection per request (two series)
#   flood     from 127.0.0.1: CONNS connections (default 200) sending HEADERS + RST_STREAM
#             (CANCEL) in a tight loop for DURATION s (default 3), re-opened when closed
# The client measures BEFORE s without the flood, DURATION s with it, AFTER s without, and
# prints p50/p99/max per phase; the flood prints what it sent and how often it was cut off.
#
# Variants (VARIANTS, space-separated):
#   pairs64  64 HEADERS+RST pairs per write: h2's own guard (max_pending_accept_reset_streams)
#            sees the resets before hyper accepts the streams
#   pairs1   one pair per write
#   split8   8 HEADERS, a yield, then their 8 RST_STREAMs: most streams are accepted, and
#            their handlers started, before the reset arrives; only the balancer's own
#            premature-reset accounting (src/flood.rs) catches this one
#
# Pinning: the balancer on PROXY_CPU (0), everything else on LOAD_CPU (1), like compare.sh.
# The machine is shared with other builds, so by default (as root) the balancer runs at nice
# -20, the flood at nice -10, the backend at SCHED_FIFO 20 and the measuring client at
# SCHED_FIFO 30 on the load CPU: the client then measures the balancer (and the backend work
# the flood made it do), not its own wait for a CPU behind the flood.
# PRIORITY=0 turns all of that off.
#
# Environment knobs: CONNS, DURATION, BEFORE, AFTER, VARIANTS, PORT_BASE (default 18500; uses
# BASE+1 and BASE+101), BALANCER_BIN (skip the build and use this binary), H2LOAD=1, PRIORITY.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CONNS=${CONNS:-200}
DURATION=${DURATION:-3}
BEFORE=${BEFORE:-1}
AFTER=${AFTER:-1}
VARIANTS=${VARIANTS:-"pairs64 pairs1 split8"}
PORT_BASE=${PORT_BASE:-18500}
PROXY_CPU=${PROXY_CPU:-0}
LOAD_CPU=${LOAD_CPU:-1}
PRIORITY=${PRIORITY:-1}
H2LOAD=${H2LOAD:-0}
PORT=$((PORT_BASE + 1))
BACKEND=$((PORT_BASE + 101))

log() { printf '[flood %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "error: $*"; exit 1; }

for t in taskset chrt; do command -v "$t" >/dev/null || die "$t is missing (util-linux)"; done
if [[ $H2LOAD == 1 ]] && ! command -v h2load >/dev/null; then
    die "h2load is missing (apt-get install nghttp2-client)"
fi
if (($(nproc) < 2)); then PROXY_CPU=0 LOAD_CPU=0; fi
if [[ $PRIORITY == 1 && $(id -u) -ne 0 ]]; then
    log "not root: running without priorities"
    PRIORITY=0
fi
if [[ $PRIORITY == 1 ]]; then
    NICE_PROXY=(nice -n -20) NICE_FLOOD=(nice -n -10) FIFO_BACKEND=(chrt -f 20)
    FIFO_CLIENT=(chrt -f 30)
else
    NICE_PROXY=() NICE_FLOOD=() FIFO_BACKEND=() FIFO_CLIENT=()
fi

TARGET_DIR=$(cd "$ROOT" && cargo metadata --format-version 1 --no-deps |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
if [[ -n ${BALANCER_BIN:-} ]]; then
    BIN=$BALANCER_BIN
    log "cargo build --release --example h2flood"
    (cd "$ROOT" && cargo build --release --quiet --example h2flood)
else
    log "cargo build --release --bin balancer --example h2flood"
    (cd "$ROOT" && cargo build --release --quiet --bin balancer --example h2flood)
    BIN=$TARGET_DIR/release/balancer
fi
TOOL=$TARGET_DIR/release/examples/h2flood
[[ -x $BIN ]] || die "no balancer binary at $BIN"

WORK=$(mktemp -d /tmp/balancer-flood.XXXXXX)
PIDS=()
stop_pid() {
    local pid=$1
    kill -0 "$pid" 2>/dev/null || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 50); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null
    wait "$pid" 2>/dev/null || true
}
cleanup() {
    local rc=$? p
    trap - EXIT INT TERM
    for p in "${PIDS[@]}"; do stop_pid "$p"; done
    if [[ $rc -ne 0 ]]; then log "work directory kept: $WORK"; else rm -rf "$WORK"; fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
for p in "$PORT" "$BACKEND"; do port_busy "$p" && die "port $p is in use (set PORT_BASE)"; done

cat >"$WORK/balancer.toml" <<EOF
shutdown_grace = "1s"
watch = false

[log]
access = false
level = "warn"

[[listeners]]
bind = "127.0.0.1:$PORT"

[limits]
max_connections = 19000

[pools.backends]
strategy = "round_robin"
backends = ["127.0.0.1:$BACKEND"]
EOF
"$BIN" check --config "$WORK/balancer.toml" >/dev/null || die "balancer rejects its config"

taskset -c "$LOAD_CPU" "${FIFO_BACKEND[@]}" "$TOOL" backend --backend "127.0.0.1:$BACKEND" &
PIDS+=($!)

wait_port() {
    for _ in $(seq 100); do
        port_busy "$1" && return 0
        sleep 0.05
    done
    return 1
}
wait_port "$BACKEND" || die "the backend did not start"

start_balancer() {
    taskset -c "$PROXY_CPU" "${NICE_PROXY[@]}" "$BIN" --config "$WORK/balancer.toml" \
        >/dev/null 2>>"$WORK/balancer.stderr" &
    BPID=$!
    PIDS+=("$BPID")
    wait_port "$PORT" || die "the balancer did not start (see $WORK/balancer.stderr)"
}

cpu_ticks() { awk '{sub(/^.*\) /, ""); print $12 + $13}' "/proc/$1/stat"; }

run_variant() {
    local name=$1
    shift
    start_balancer
    local t0 t1
    t0=$(cpu_ticks "$BPID")
    taskset -c "$LOAD_CPU" "${FIFO_CLIENT[@]}" "$TOOL" client --target "127.0.0.1:$PORT" \
        --before "$BEFORE" --duration "$DURATION" --after "$AFTER" >"$WORK/client-$name.txt" &
    local cpid=$!
    taskset -c "$LOAD_CPU" "${NICE_FLOOD[@]}" "$TOOL" flood --target "127.0.0.1:$PORT" \
        --conns "$CONNS" --before "$BEFORE" --duration "$DURATION" "$@" >"$WORK/flood-$name.txt"
    wait "$cpid"
    t1=$(cpu_ticks "$BPID")
    local hwm
    hwm=$(awk '/^VmHWM:/ {print $2}' "/proc/$BPID/status")
    echo "== $name ($*)"
    cat "$WORK/flood-$name.txt" "$WORK/client-$name.txt"
    echo "BALANCER cpu_s=$(awk -v t=$((t1 - t0)) -v h="$(getconf CLK_TCK)" 'BEGIN {printf "%.2f", t / h}') peak_rss_kib=$hwm"
    stop_pid "$BPID"
}

log "balancer $BIN; $CONNS flood connections for $DURATION s per variant"
for v in $VARIANTS; do
    case $v in
        pairs64) run_variant pairs64 --batch 64 ;;
        pairs1) run_variant pairs1 --batch 1 ;;
        split8) run_variant split8 --batch 8 --split 1 ;;
        *) die "unknown variant $v" ;;
    esac
done

if [[ $H2LOAD == 1 ]]; then
    start_balancer
    taskset -c "$LOAD_CPU" h2load -t1 -c4 -m100 -D 2 "http://127.0.0.1:$PORT/" >/dev/null 2>&1 || true
    echo "== h2load -c4 -m100 -D 5 (no flood)"
    t0=$(cpu_ticks "$BPID")
    taskset -c "$LOAD_CPU" h2load -t1 -c4 -m100 -D 5 "http://127.0.0.1:$PORT/" >"$WORK/h2load.txt" 2>&1 || true
    t1=$(cpu_ticks "$BPID")
    grep -E '^(finished in|requests:|status codes:)' "$WORK/h2load.txt" || true
    # req/s swings with whatever else the machine runs; the balancer's CPU time per request
    # is the steadier figure (as in compare.sh).
    done_reqs=$(awk '/^requests:/ {print $8}' "$WORK/h2load.txt")
    awk -v t=$((t1 - t0)) -v h="$(getconf CLK_TCK)" -v n="${done_reqs:-0}" \
        'BEGIN { if (n > 0) printf "BALANCER cpu_us_per_req=%.1f\n", t / h * 1e6 / n }'
    stop_pid "$BPID"
fi
log "balancer log lines: $(wc -l <"$WORK/balancer.stderr")"
