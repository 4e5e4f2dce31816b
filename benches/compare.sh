#!/usr/bin/env bash
# Compares the balancer with nginx and HAProxy on this machine, loopback only.
#
#   benches/compare.sh            # full run: 3 repetitions, 8 s per run (~13 minutes)
#   benches/compare.sh --quick    # 1 repetition, 2 s per run (~2 minutes)
#
# It installs what is missing (wrk, h2load from nghttp2-client, nginx, haproxy) with apt-get,
# builds the balancer (cargo build --release), starts two nginx backends and the four proxies
# (balancer on its shipped defaults, benches/compare/balancer.toml, with the access log off, and
# untouched with it on and stdout to /dev/null; nginx;
# HAProxy), then measures each proxy in turn, interleaved, each run on a freshly started
# proxy, in these scenarios:
#   small   small GET, keep-alive, wrk -c64
#   close   small GET, Connection: close, wrk -c64
#   large   1 MiB responses, wrk -c16
#   upload  64 KiB POST bodies, wrk -c64
#   c1000   small GET over 1000 keep-alive connections, wrk -c1000
#   h2      HTTP/2 with prior knowledge (h2c), h2load -c4 -m100
#   cached  small GET answered from the proxy's cache (max-age=600), keep-alive, wrk -c64
#           (balancer: [cache]; nginx: proxy_cache; HAProxy: its cache)
#   h2up    the same h2load run, but the proxy speaks HTTP/2 to its backends too: two more nginx
#           backends listening h2c; balancer `protocol = "h2c"`, HAProxy `proto h2` servers,
#           nginx `grpc_pass` (nginx OSS proxies to HTTP/2 only through its gRPC module)
# and the memory of 10,000 idle keep-alive connections. Results: benches/results/latest.json
# and benches/results/latest.md (medians over repetitions, ratios to nginx and HAProxy).
#
# Every proxy is pinned to CPU 0 (PROXY_CPU); wrk/h2load and the backends to CPU 1 (LOAD_CPU).
#
# Environment knobs: REPS, DURATION (seconds per run), WARMUP (seconds), IDLE_CONNS,
# BENCH_PORT_BASE (default 18000; ports BASE+1..BASE+14 and BASE+101..104 are used),
# BALANCER_BIN (skip the build and use this binary), SCENARIOS (space-separated subset),
# PROXIES (subset of: balancer balancer-log nginx haproxy hyper), KEEP_WORK=1 (keep the temp dir).
#
# `hyper` is not measured unless asked for: examples/thin_proxy.rs, the thinnest reverse proxy
# hyper and tokio make (no routing, limits, health, logging or cache), built with the balancer.
# It is the floor under the balancer's own cost: PROXIES="balancer nginx haproxy hyper"
# SCENARIOS="small close large upload c1000 h2" (it has no cache and speaks HTTP/1.1 upstream,
# so `cached` and `h2up` do not apply to it). THIN_PROXY_BIN: use this binary instead.
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; }

QUICK=0
for arg in "$@"; do
    case "$arg" in
        --quick) QUICK=1 ;;
        -h | --help) usage; exit 0 ;;
        *) echo "unknown argument: $arg (try --help)" >&2; exit 2 ;;
    esac
done

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
HERE=$ROOT/benches/compare
RESULTS=$ROOT/benches/results

if [[ $QUICK == 1 ]]; then
    REPS=${REPS:-1}
    DURATION=${DURATION:-2}
else
    REPS=${REPS:-3}
    DURATION=${DURATION:-8}
fi
WARMUP=${WARMUP:-1}
IDLE_CONNS=${IDLE_CONNS:-10000}
PORT_BASE=${BENCH_PORT_BASE:-18000}
PROXY_CPU=${PROXY_CPU:-0}
LOAD_CPU=${LOAD_CPU:-1}
SCENARIOS=${SCENARIOS:-"small close large upload c1000 h2 cached h2up"}
PROXIES=${PROXIES:-"balancer balancer-log nginx haproxy"}

BACKEND1=$((PORT_BASE + 101))
BACKEND2=$((PORT_BASE + 102))
# The h2up scenario's backends: the same nginx origin, listening h2c (prior knowledge).
H2BACKEND1=$((PORT_BASE + 103))
H2BACKEND2=$((PORT_BASE + 104))
declare -A PORT=([balancer]=$((PORT_BASE + 1)) [balancer-log]=$((PORT_BASE + 2))
    [nginx]=$((PORT_BASE + 3)) [haproxy]=$((PORT_BASE + 4)) [hyper]=$((PORT_BASE + 5)))
# The balancer serves h2c on its HTTP/1.1 port; nginx 1.22 and HAProxy get a second port.
declare -A H2PORT=([balancer]=$((PORT_BASE + 1)) [balancer-log]=$((PORT_BASE + 2))
    [nginx]=$((PORT_BASE + 13)) [haproxy]=$((PORT_BASE + 14)) [hyper]=$((PORT_BASE + 5)))

log() { printf '[compare %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "error: $*"; exit 1; }

# ---------------------------------------------------------------------------------------------
# Tools

install_missing() {
    local -a pkgs=()
    command -v wrk >/dev/null || pkgs+=(wrk)
    command -v h2load >/dev/null || pkgs+=(nghttp2-client)
    command -v nginx >/dev/null || [[ -x /usr/sbin/nginx ]] || pkgs+=(nginx)
    command -v haproxy >/dev/null || [[ -x /usr/sbin/haproxy ]] || pkgs+=(haproxy)
    command -v python3 >/dev/null || pkgs+=(python3)
    command -v curl >/dev/null || pkgs+=(curl)
    command -v taskset >/dev/null || pkgs+=(util-linux)
    [[ ${#pkgs[@]} -eq 0 ]] && return
    log "installing ${pkgs[*]}"
    local sudo=""
    [[ $(id -u) -ne 0 ]] && sudo="sudo"
    # RUNLEVEL=1: do not start the packaged nginx/haproxy services on install.
    $sudo apt-get update -qq
    $sudo env DEBIAN_FRONTEND=noninteractive RUNLEVEL=1 apt-get install -y -qq "${pkgs[@]}" >/dev/null
}

install_missing
export PATH=$PATH:/usr/sbin:/sbin
for t in wrk h2load nginx haproxy python3 curl taskset; do
    command -v "$t" >/dev/null || die "$t is still missing"
done
NCPU=$(nproc)
if ((NCPU < 2)); then
    log "only $NCPU CPU: proxies and load generator share it"
    PROXY_CPU=0 LOAD_CPU=0
fi

# Enough descriptors for 10,000 idle connections (and 2 per proxied connection).
HARD=$(ulimit -Hn)
ulimit -n "$HARD" 2>/dev/null || true
if (($(ulimit -n) < IDLE_CONNS + 2000)); then
    IDLE_CONNS=$(($(ulimit -n) - 2000))
    log "open-files limit $(ulimit -n): idle-connection test reduced to $IDLE_CONNS connections"
fi

# ---------------------------------------------------------------------------------------------
# Build

if [[ -n ${BALANCER_BIN:-} ]]; then
    BIN=$BALANCER_BIN
else
    log "cargo build --release"
    (cd "$ROOT" && cargo build --release --quiet --bin balancer)
    TARGET_DIR=$(cd "$ROOT" && cargo metadata --format-version 1 --no-deps |
        python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
    BIN=$TARGET_DIR/release/balancer
fi
THIN_BIN=${THIN_PROXY_BIN:-}
if [[ " $PROXIES " == *" hyper "* && -z $THIN_BIN ]]; then
    log "cargo build --release --example thin_proxy"
    (cd "$ROOT" && cargo build --release --quiet --example thin_proxy)
    THIN_BIN=$(cd "$ROOT" && cargo metadata --format-version 1 --no-deps |
        python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')/release/examples/thin_proxy
fi
[[ -x $BIN ]] || die "no balancer binary at $BIN"
if [[ -n ${BALANCER_BIN:-} ]]; then
    git_desc="binary from BALANCER_BIN"
else
    git_desc="$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)"
    git -C "$ROOT" diff --quiet HEAD -- src Cargo.toml 2>/dev/null ||
        git_desc+=" + uncommitted changes"
fi

# ---------------------------------------------------------------------------------------------
# Work directory, process bookkeeping, cleanup

WORK=$(mktemp -d /tmp/balancer-compare.XXXXXX)
chmod 755 "$WORK"
mkdir -p "$WORK/www" "$WORK/out" "$RESULTS"
RAW=$WORK/raw.jsonl
: >"$RAW"

declare -A PID=()      # name -> pid of every long-running process we started
BACKEND_PIDS=()

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

stop_proxies() {
    local name
    for name in "${!PID[@]}"; do
        stop_pid "${PID[$name]}"
        unset "PID[$name]"
    done
}

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    stop_proxies
    local p
    for p in "${BACKEND_PIDS[@]}"; do stop_pid "$p"; done
    if [[ ${KEEP_WORK:-0} == 1 || $rc -ne 0 ]]; then
        log "work directory kept: $WORK"
    else
        rm -rf "$WORK"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_http() { # url [curl options...] -> waits up to 10 s for a 2xx
    local url=$1
    shift
    for _ in $(seq 100); do
        if curl -fs -o /dev/null --max-time 1 "$@" "$url"; then return 0; fi
        sleep 0.1
    done
    return 1
}

fill() { # template output [extra sed expressions...]
    local tmpl=$1 out=$2
    shift 2
    sed -e "s#@WORK@#$WORK#g" -e "s#@BACKEND1@#$BACKEND1#g" -e "s#@BACKEND2@#$BACKEND2#g" \
        "$@" "$tmpl" >"$out"
}

for p in "$BACKEND1" "$BACKEND2" "$H2BACKEND1" "$H2BACKEND2" "${PORT[@]}" "${H2PORT[@]}"; do
    port_busy "$p" && die "port $p is in use (set BENCH_PORT_BASE)"
done

# ---------------------------------------------------------------------------------------------
# Backends: two nginx instances on LOAD_CPU

printf 'hello world!\n' >"$WORK/www/index.txt" # 13 bytes
head -c 1048576 /dev/urandom >"$WORK/www/1m.bin"
printf 'ok\n' >"$WORK/www/ok.txt"

for bport in "$BACKEND1" "$BACKEND2"; do
    fill "$HERE/backend.nginx.conf" "$WORK/backend-$bport.conf" -e "s#@PORT@#$bport#g"
    taskset -c "$LOAD_CPU" nginx -p "$WORK" -c "$WORK/backend-$bport.conf" \
        2>>"$WORK/backend-$bport.stderr" &
    BACKEND_PIDS+=($!)
done
for bport in "$BACKEND1" "$BACKEND2"; do
    wait_http "http://127.0.0.1:$bport/" || die "backend on $bport did not start (see $WORK)"
done
if [[ " $SCENARIOS " == *" h2up "* ]]; then
    for bport in "$H2BACKEND1" "$H2BACKEND2"; do
        fill "$HERE/backend.nginx.conf" "$WORK/backend-$bport.conf" -e "s#@PORT@#$bport#g" \
            -e "s#backlog=4096;#http2 backlog=4096;#"
        taskset -c "$LOAD_CPU" nginx -p "$WORK" -c "$WORK/backend-$bport.conf" \
            2>>"$WORK/backend-$bport.stderr" &
        BACKEND_PIDS+=($!)
    done
    for bport in "$H2BACKEND1" "$H2BACKEND2"; do
        wait_http "http://127.0.0.1:$bport/" --http2-prior-knowledge ||
            die "h2c backend on $bport did not start (see $WORK)"
    done
fi
head -c 65536 /dev/zero >"$WORK/upload.bin"
got=$(curl -fs --data-binary @"$WORK/upload.bin" "http://127.0.0.1:$BACKEND1/upload") ||
    die "backend /upload does not answer"
[[ $got == ok ]] || die "backend /upload answered '$got'"

# ---------------------------------------------------------------------------------------------
# Proxies, all on PROXY_CPU

start_proxy() { # name (the scenario is SCENARIO_NOW)
    local name=$1 port=${PORT[$1]} h2port=${H2PORT[$1]} scenario=${SCENARIO_NOW:-}
    case $name in
        balancer | balancer-log)
            local access=false template=$HERE/balancer.toml
            [[ $name == balancer-log ]] && access=true
            [[ ${SCENARIO_NOW:-} == cached ]] && template=$HERE/balancer-cached.toml
            fill "$template" "$WORK/$name.toml" -e "s#@PORT@#$port#g" \
                -e "s#@ACCESS@#$access#g"
            if [[ $scenario == h2up ]]; then
                sed -i -e "s#:$BACKEND1\"#:$H2BACKEND1\"#" -e "s#:$BACKEND2\"#:$H2BACKEND2\"#" \
                    -e '/^backends = /a protocol = "h2c"' "$WORK/$name.toml"
            fi
            "$BIN" check --config "$WORK/$name.toml" >/dev/null ||
                die "balancer rejects $WORK/$name.toml"
            taskset -c "$PROXY_CPU" "$BIN" --config "$WORK/$name.toml" \
                >/dev/null 2>>"$WORK/$name.stderr" &
            ;;
        nginx)
            local tmpl=$HERE/proxy.nginx.conf
            [[ $scenario == h2up ]] && tmpl=$HERE/proxy-h2up.nginx.conf
            fill "$tmpl" "$WORK/proxy-nginx.conf" -e "s#@PORT@#$port#g" \
                -e "s#@H2PORT@#$h2port#g" -e "s#@H2BACKEND1@#$H2BACKEND1#g" \
                -e "s#@H2BACKEND2@#$H2BACKEND2#g"
            taskset -c "$PROXY_CPU" nginx -p "$WORK" -c "$WORK/proxy-nginx.conf" \
                2>>"$WORK/nginx.stderr" &
            ;;
        haproxy)
            fill "$HERE/haproxy.cfg" "$WORK/haproxy.cfg" -e "s#@PORT@#$port#g" \
                -e "s#@H2PORT@#$h2port#g"
            if [[ $scenario == h2up ]]; then
                sed -i -e "s#127.0.0.1:$BACKEND1\$#127.0.0.1:$H2BACKEND1 proto h2#" \
                    -e "s#127.0.0.1:$BACKEND2\$#127.0.0.1:$H2BACKEND2 proto h2#" "$WORK/haproxy.cfg"
            fi
            taskset -c "$PROXY_CPU" haproxy -db -f "$WORK/haproxy.cfg" \
                >>"$WORK/haproxy.stderr" 2>&1 &
            ;;
        hyper)
            taskset -c "$PROXY_CPU" "$THIN_BIN" "127.0.0.1:$port" "127.0.0.1:$BACKEND1" \
                "127.0.0.1:$BACKEND2" >>"$WORK/hyper.stderr" 2>&1 &
            ;;
    esac
    PID[$name]=$!
}

check_proxy() { # the three request kinds and h2c work through it
    local name=$1 port=${PORT[$1]} h2port=${H2PORT[$1]} ok=1
    wait_http "http://127.0.0.1:$port/" || { log "$name: GET / fails"; return 1; }
    curl -fs -o /dev/null "http://127.0.0.1:$port/cached" ||
        { log "$name: GET /cached fails"; ok=0; }
    [[ $(curl -fs "http://127.0.0.1:$port/1m" | wc -c) -eq 1048576 ]] ||
        { log "$name: GET /1m is not 1 MiB"; ok=0; }
    [[ $(curl -fs --data-binary @"$WORK/upload.bin" "http://127.0.0.1:$port/upload") == ok ]] ||
        { log "$name: POST /upload fails"; ok=0; }
    if curl -V | grep -q HTTP2; then
        curl -fs -o /dev/null --http2-prior-knowledge "http://127.0.0.1:$h2port/" ||
            { log "$name: h2c GET / fails"; ok=0; }
    fi
    ((ok))
}

# Each measurement gets a freshly started proxy, so that memory left over from one scenario
# (allocators rarely give it back) does not show up as the next one's peak.
start_checked() {
    local name=$1
    start_proxy "$name"
    check_proxy "$name" || log "warning: $name fails a sanity check (see $WORK/$name.stderr)"
}

stop_proxy() {
    stop_pid "${PID[$1]}"
    unset "PID[$1]"
}

# The proxy's processes: itself and its direct children (the nginx worker).
proc_tree() {
    local pid=$1
    echo "$pid"
    cat /proc/"$pid"/task/*/children 2>/dev/null | tr ' ' '\n' | grep -v '^$' || true
}

cpu_ticks() { # utime + stime of the processes (and all their threads), in clock ticks
    local total=0 p
    for p in "$@"; do
        local t
        t=$(awk '{sub(/^.*\) /, ""); print $12 + $13}' "/proc/$p/stat" 2>/dev/null || echo 0)
        total=$((total + t))
    done
    echo "$total"
}

hwm_kb() {
    local p
    for p in "$@"; do awk '/^VmHWM:/ {print $2}' "/proc/$p/status" 2>/dev/null; done |
        awk '{s += $1} END {print s + 0}'
}

reset_hwm() {
    local p
    for p in "$@"; do echo 5 >"/proc/$p/clear_refs" 2>/dev/null || true; done
}

CLK_TCK=$(getconf CLK_TCK)

run_tool() { # scenario port h2port duration out [h2log]
    local scenario=$1 port=$2 h2port=$3 dur=$4 out=$5 h2log=${6:-/dev/null}
    local url="http://127.0.0.1:$port"
    local -a wrk=(taskset -c "$LOAD_CPU" wrk -t1 --latency -s "$HERE/wrk.lua" -d"${dur}s")
    case $scenario in
        small) "${wrk[@]}" -c64 "$url/" ;;
        close) "${wrk[@]}" -c64 -H 'Connection: close' "$url/" ;;
        large) "${wrk[@]}" -c16 --timeout 10s "$url/1m" ;;
        upload) WRK_BODY_BYTES=65536 "${wrk[@]}" -c64 "$url/upload" ;;
        c1000) "${wrk[@]}" -c1000 --timeout 10s "$url/" ;;
        cached) "${wrk[@]}" -c64 "$url/cached" ;;
        h2 | h2up)
            taskset -c "$LOAD_CPU" h2load -t1 -c4 -m100 -D "$dur" --log-file="$h2log" \
                "http://127.0.0.1:$h2port/"
            ;;
        *) die "unknown scenario $scenario" ;;
    esac >"$out" 2>&1 || true
}

measure() { # proxy scenario rep
    local name=$1 scenario=$2 rep=$3
    [[ $name == hyper && ($scenario == cached || $scenario == h2up) ]] && return
    SCENARIO_NOW=$scenario
    start_checked "$name"
    local pid=${PID[$name]}
    kill -0 "$pid" 2>/dev/null || { log "$name is not running; skipping $scenario"; return; }
    local -a pids
    mapfile -t pids < <(proc_tree "$pid")
    local out=$WORK/out/$rep-$name-$scenario.txt h2log=$WORK/out/$rep-$name-$scenario.h2log
    run_tool "$scenario" "${PORT[$name]}" "${H2PORT[$name]}" "$WARMUP" /dev/null /dev/null
    reset_hwm "${pids[@]}"
    local t0 t1
    t0=$(cpu_ticks "${pids[@]}")
    run_tool "$scenario" "${PORT[$name]}" "${H2PORT[$name]}" "$DURATION" "$out" "$h2log"
    t1=$(cpu_ticks "${pids[@]}")
    local tool=wrk
    [[ $scenario == h2 || $scenario == h2up ]] && tool=h2load
    python3 "$HERE/aggregate.py" record --raw "$RAW" --tool "$tool" --output "$out" \
        --h2-log "$h2log" --proxy "$name" --scenario "$scenario" --rep "$rep" \
        --cpu-ticks $((t1 - t0)) --clk-tck "$CLK_TCK" --hwm-kb "$(hwm_kb "${pids[@]}")"
    rm -f "$h2log"
    kill -0 "$pid" 2>/dev/null || log "$name died during $scenario (see $WORK/$name.stderr)"
    stop_proxy "$name"
}

measure_idle() { # proxy rep
    local name=$1 rep=$2 out=$WORK/out/$rep-$name-idle.json
    SCENARIO_NOW=idle
    start_checked "$name"
    kill -0 "${PID[$name]}" 2>/dev/null || { log "$name is not running; skipping idle"; return; }
    taskset -c "$LOAD_CPU" python3 "$HERE/idle_conns.py" --port "${PORT[$name]}" \
        --pid "${PID[$name]}" --conns "$IDLE_CONNS" >"$out" 2>>"$WORK/out/idle.stderr" || true
    python3 "$HERE/aggregate.py" idle --raw "$RAW" --output "$out" --proxy "$name" --rep "$rep"
    stop_proxy "$name"
}

rotate() { # n words... -> the words rotated left by n
    local n=$1
    shift
    local -a a=("$@")
    local k=$((n % ${#a[@]}))
    echo "${a[@]:k}" "${a[@]:0:k}"
}

# ---------------------------------------------------------------------------------------------
# The run

started=$(date +%s)
read -r -a proxy_list <<<"$PROXIES"
for rep in $(seq "$REPS"); do
    log "repetition $rep/$REPS: load scenarios ($SCENARIOS), $DURATION s each"
    for scenario in $SCENARIOS; do
        for name in $(rotate $((rep - 1)) "${proxy_list[@]}"); do
            measure "$name" "$scenario" "$rep"
        done
    done
    log "repetition $rep/$REPS: $IDLE_CONNS idle keep-alive connections"
    for name in $(rotate $((rep - 1)) "${proxy_list[@]}"); do
        measure_idle "$name" "$rep"
    done
done

first() { head -n1 | tr -d '\n'; }
cpu_model=$(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo)
note=""
[[ $QUICK == 1 ]] && note="--quick run: one short repetition, indicative only"
python3 - "$WORK/meta.json" <<EOF
import json, sys
json.dump({
    "date": "$(date -u +%Y-%m-%dT%H:%M:%SZ)",
    "nproc": $NCPU,
    "cpu_model": """${cpu_model:-unknown}""",
    "mem": "$(awk '/^MemTotal/ {printf "%.0f GiB RAM", $2 / 1048576}' /proc/meminfo)",
    "kernel": "$(uname -r)",
    "balancer_version": "$("$BIN" --version 2>/dev/null | awk '{print $NF}' | first)",
    "git": "$git_desc",
    "nginx_version": "$(nginx -v 2>&1 | sed 's/^nginx version: //' | first)",
    "haproxy_version": "$(haproxy -v 2>&1 | awk '{print "HAProxy " $3}' | first)",
    "wrk_version": "$(wrk -v 2>&1 | awk '{print "wrk " $2}' | first)",
    "h2load_version": "$(h2load --version 2>&1 | first)",
    "reps": $REPS, "duration_s": $DURATION, "warmup_s": $WARMUP, "idle_conns": $IDLE_CONNS,
    "proxy_cpu": $PROXY_CPU, "load_cpu": $LOAD_CPU, "quick": bool($QUICK),
    "elapsed_s": $(($(date +%s) - started)),
    "note": "$note",
}, open(sys.argv[1], "w"), indent=2)
EOF
python3 "$HERE/aggregate.py" report --raw "$RAW" --meta "$WORK/meta.json" \
    --json "$RESULTS/latest.json" --md "$RESULTS/latest.md"
cat "$RESULTS/latest.md"
log "done in $(($(date +%s) - started)) s: $RESULTS/latest.md, $RESULTS/latest.json"
