#!/usr/bin/env bash
# One command for sidecar's benchmarks, side by side with LiteLLM:
#
#   benches/run.sh [overhead|allocations|memory|goodput|cluster|all]
#
# Installs or checks its tools (wrk and nginx from Debian, LiteLLM from PyPI
# in a venv under target/bench), builds the release binary and the load
# generator, starts everything on loopback, runs, stops everything, and prints
# a results table (markdown) to stdout and target/bench/results.md. Raw JSON
# and logs stay in target/bench/.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
MODE=${1:-all}
OUT=$ROOT/target/bench
mkdir -p "$OUT"
RESULTS=$OUT/results.md
: > "$RESULTS"
PIDS=()

log() { echo "[bench] $*" >&2; }
emit() { echo "$*" | tee -a "$RESULTS"; }
cleanup() {
  for p in "${PIDS[@]:-}"; do [ -n "$p" ] && kill "$p" 2>/dev/null || true; done
  sleep 0.5
  for p in "${PIDS[@]:-}"; do [ -n "$p" ] && kill -9 "$p" 2>/dev/null || true; done
  pkill -f "$OUT/litellm-venv/bin/litellm" 2>/dev/null || true
}
trap cleanup EXIT

# ---- tools -------------------------------------------------------------------
need=()
command -v wrk >/dev/null || need+=(wrk)
command -v nginx >/dev/null || need+=(nginx-light)
command -v redis-server >/dev/null || need+=(redis-server)
if [ ${#need[@]} -gt 0 ]; then
  log "installing ${need[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
LITELLM_VERSION=${LITELLM_VERSION:-1.106.2}
if [ ! -x "$OUT/litellm-venv/bin/litellm" ]; then
  log "installing litellm[proxy]==$LITELLM_VERSION into $OUT/litellm-venv"
  python3 -m venv "$OUT/litellm-venv"
  "$OUT/litellm-venv/bin/pip" install -q "litellm[proxy]==$LITELLM_VERSION" || "$OUT/litellm-venv/bin/pip" install -q 'litellm[proxy]'
fi
LITELLM=$OUT/litellm-venv/bin/litellm
# Portkey's gateway (Node), started offline in headless mode.
PORTKEY_VERSION=${PORTKEY_VERSION:-1.15.2}
PORTKEY=$OUT/portkey/node_modules/@portkey-ai/gateway/build/start-server.js
if [ ! -f "$PORTKEY" ]; then
  log "installing @portkey-ai/gateway@$PORTKEY_VERSION into $OUT/portkey"
  mkdir -p "$OUT/portkey"
  npm install --silent --no-audit --no-fund --prefix "$OUT/portkey" "@portkey-ai/gateway@$PORTKEY_VERSION" >/dev/null
fi
# LiteLLM refuses to start without a master key; every client sends it (sidecar
# and nginx ignore it). LiteLLM wants the `sk-` prefix; the rest says what it is.
export LITELLM_MASTER_KEY=sk-FAKE-local-bench-only
log "building the allocation-counting binary (--features alloc-stats), then the release binary and load generator"
cargo build --release --quiet --features alloc-stats --bin sidecar
cp target/release/sidecar "$OUT/sidecar-alloc-stats"
cargo build --release --quiet --bin sidecar --example loadgen --example floor
SIDECAR=$ROOT/target/release/sidecar
LOADGEN=$ROOT/target/release/examples/loadgen
FLOOR=$ROOT/target/release/examples/floor

wait_listening() { # url: any HTTP answer (the floor has no route to poll)
  for _ in $(seq 1 100); do curl -s -o /dev/null "$1" 2>/dev/null && return 0; sleep 0.1; done
  log "timed out waiting for $1"; return 1
}
wait_http() { # url
  for _ in $(seq 1 300); do curl -fsS -o /dev/null "$1" 2>/dev/null && return 0; sleep 0.2; done
  log "timed out waiting for $1"; return 1
}
peak_rss_kb() { awk '/VmHWM/ {print $2}' "/proc/$1/status"; }
rss_tree_kb() { # pid: RSS of a process and all its descendant processes (not threads)
  local total=0 p todo=("$1")
  while [ ${#todo[@]} -gt 0 ]; do
    p=${todo[0]}; todo=("${todo[@]:1}")
    total=$((total + $(awk '/VmRSS/ {print $2}' "/proc/$p/status" 2>/dev/null || echo 0)))
    for c in $(pgrep -P "$p" 2>/dev/null || true); do todo+=("$c"); done
  done
  echo "$total"
}

CANNED='{"id":"chatcmpl-bench","object":"chat.completion","created":0,"model":"native-m","choices":[{"index":0,"message":{"role":"assistant","content":"ok"},"finish_reason":"stop"}],"usage":{"prompt_tokens":5,"completion_tokens":1,"total_tokens":6}}'

start_nginx() {
  # `all` runs overhead and cluster in one go: the first nginx serves both.
  if [ -n "${NGINX_PID:-}" ] && kill -0 "$NGINX_PID" 2>/dev/null; then return 0; fi
  mkdir -p "$OUT/nginx/logs"
  cat > "$OUT/nginx/nginx.conf" <<EOF
worker_processes 1;
error_log $OUT/nginx/logs/error.log warn;
pid $OUT/nginx/nginx.pid;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 100000;
  client_body_temp_path $OUT/nginx/body;
  server {
    listen 127.0.0.1:18080;
    location /v1/chat/completions { default_type application/json; return 200 '$CANNED'; }
    location /v1/models { default_type application/json; return 200 '{"object":"list","data":[{"id":"native-m","object":"model"}]}'; }
  }
  # nginx as a reverse proxy in front of the same answer: the line of what a
  # proxy (two HTTP exchanges per request) costs at best.
  upstream canned { server 127.0.0.1:18080; keepalive 64; }
  server {
    listen 127.0.0.1:18081;
    location / { proxy_pass http://canned; proxy_http_version 1.1; proxy_set_header Connection ""; }
  }
}
EOF
  nginx -c "$OUT/nginx/nginx.conf" -p "$OUT/nginx" -g 'daemon off;' &
  NGINX_PID=$!
  PIDS+=("$NGINX_PID")
  wait_http http://127.0.0.1:18080/v1/models
}

# nginx as a streaming reverse proxy in front of the mock on $2, listening on
# $1: one worker as in the overhead peer, upstream keepalive, and
# `proxy_buffering off` so each chunk is passed on as it comes (what a gateway
# must do with events). The physically sensible line for TTFT and for memory
# per open stream, as nginx-as-proxy is for throughput.
# nginx allocates every connection slot at start: sized for the load (each
# stream holds two), so its idle memory does not grow with the fd limit.
start_nginx_stream_proxy() { # port upstream-port connections -> sets NGINX_SP_PID, NGINX_SP_WORKER
  local dir=$OUT/nginx-stream-$1 conns=$3
  [ "$conns" -lt "$(( $(ulimit -Hn) - 100 ))" ] || conns=$(( $(ulimit -Hn) - 100 ))
  mkdir -p "$dir/logs"
  cat > "$dir/nginx.conf" <<EOF
worker_processes 1;
worker_rlimit_nofile $(ulimit -Hn);
error_log $dir/logs/error.log warn;
pid $dir/nginx.pid;
events { worker_connections $conns; }
http {
  access_log off;
  keepalive_requests 100000;
  client_body_temp_path $dir/body;
  proxy_temp_path $dir/proxy;
  upstream mock { server 127.0.0.1:$2; keepalive 64; }
  server {
    listen 127.0.0.1:$1;
    location / { proxy_pass http://mock; proxy_http_version 1.1; proxy_set_header Connection ""; proxy_buffering off; }
  }
}
EOF
  nginx -c "$dir/nginx.conf" -p "$dir" -g 'daemon off;' &
  NGINX_SP_PID=$!
  PIDS+=("$NGINX_SP_PID")
  wait_listening "http://127.0.0.1:$1/"
  NGINX_SP_WORKER=$(pgrep -P "$NGINX_SP_PID" | head -1) || { log "nginx on $1 has no worker"; return 1; }
}

start_sidecar() { # config-file port -> sets SIDECAR_PID
  rm -rf "$OUT/sidecar-data"; mkdir -p "$OUT/sidecar-data"
  SIDECAR_ENCRYPTION_KEY=$("$SIDECAR" keygen) LOG_FORMAT=json \
    "$SIDECAR" serve --config "$1" > "$OUT/sidecar-$2.log" 2>&1 &
  SIDECAR_PID=$!
  PIDS+=("$SIDECAR_PID")
  wait_http "http://127.0.0.1:$2/health"
}

start_litellm() { # config-file port -> sets LITELLM_PID
  "$LITELLM" --config "$1" --host 127.0.0.1 --port "$2" --num_workers 2 > "$OUT/litellm-$2.log" 2>&1 &
  LITELLM_PID=$!
  PIDS+=("$LITELLM_PID")
  wait_http "http://127.0.0.1:$2/health/liveliness"
}

start_portkey() { # port -> sets PORTKEY_PID
  (cd "$OUT/portkey" && exec node "$PORTKEY" --headless --port="$1") > "$OUT/portkey-$1.log" 2>&1 &
  PORTKEY_PID=$!
  PIDS+=("$PORTKEY_PID")
  for _ in $(seq 1 300); do curl -sS -o /dev/null "http://127.0.0.1:$1/" 2>/dev/null && return 0; sleep 0.2; done
  log "timed out waiting for portkey on $1"; return 1
}

stop_pid() { kill "$1" 2>/dev/null || true; wait "$1" 2>/dev/null || true; }

post_lua() {
  cat > "$OUT/post.lua" <<'EOF'
wrk.method = "POST"
wrk.body = '{"model":"m","messages":[{"role":"user","content":"benchmark request"}]}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer sk-FAKE-local-bench-only"
EOF
  # Portkey is told its target per request (one x-portkey-config target per backend).
  cp "$OUT/post.lua" "$OUT/post-portkey.lua"
  cat >> "$OUT/post-portkey.lua" <<'EOF'
wrk.headers["x-portkey-config"] = '{"provider":"openai","api_key":"fake-upstream","custom_host":"http://127.0.0.1:18080/v1"}'
EOF
}

wrk_run() { # label url conns -> prints "rps p50_ms p99_ms"
  local out script=$OUT/post.lua
  case "$1" in portkey*) script=$OUT/post-portkey.lua ;; esac
  out=$(wrk -t "$(( $3 < 2 ? 1 : 2 ))" -c "$3" -d "${WRK_SECS:-15}s" --latency -s "$script" "$2/v1/chat/completions" 2>&1)
  echo "$out" > "$OUT/wrk-$1-c$3.txt"
  python3 - "$OUT/wrk-$1-c$3.txt" <<'EOF'
import re, sys
t = open(sys.argv[1]).read()
def ms(v):
    n, u = re.match(r"([\d.]+)(us|ms|s)", v).groups()
    return float(n) * {"us": 0.001, "ms": 1, "s": 1000}[u]
rps = float(re.search(r"Requests/sec:\s+([\d.]+)", t).group(1))
p50 = ms(re.search(r"^\s+50%\s+(\S+)", t, re.M).group(1))
p99 = ms(re.search(r"^\s+99%\s+(\S+)", t, re.M).group(1))
non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", t)
errs = re.search(r"Socket errors: (.*)", t)
print(f"{rps:.0f} {p50:.3f} {p99:.3f} {non2xx.group(1) if non2xx else 0}")
EOF
}

# ---- overhead ----------------------------------------------------------------
overhead() {
  log "overhead: nginx direct, nginx as proxy, sidecar, Portkey, LiteLLM (2 workers); c=1 and c=64, ${WRK_SECS:-15} s each, interleaved"
  start_nginx
  post_lua
  cat > "$OUT/overhead.toml" <<EOF
port = 19190
metrics_port = 19191
db_path = "$OUT/sidecar-data/sidecar.db"
backup_dir = "$OUT/sidecar-data/backups"
queue_timeout = 5
[[backends]]
name = "nginx"
base_url = "http://127.0.0.1:18080/v1"
api_key = "fake-upstream"
rpm_limit = 100000000
burst = 100000000
models = { "m" = "native-m" }
EOF
  cat > "$OUT/litellm-overhead.yaml" <<EOF
model_list:
  - model_name: m
    litellm_params: { model: openai/native-m, api_base: "http://127.0.0.1:18080/v1", api_key: fake-upstream }
litellm_settings: { drop_params: true, telemetry: false }
general_settings: { disable_spend_logs: true }
EOF
  start_sidecar "$OUT/overhead.toml" 19190
  # The HTTP stack's floor: actix-web + awc forwarding and nothing else.
  "$FLOOR" --port 19290 --upstream http://127.0.0.1:18080/v1/chat/completions > "$OUT/floor.log" 2>&1 &
  local floor=$!; PIDS+=("$floor")
  start_portkey 18787
  [ -n "${SKIP_LITELLM:-}" ] || start_litellm "$OUT/litellm-overhead.yaml" 14000
  local targets="direct proxy floor sidecar portkey"
  [ -n "${SKIP_LITELLM:-}" ] || targets="$targets litellm"
  declare -A R
  declare -A URL=([direct]=http://127.0.0.1:18080 [proxy]=http://127.0.0.1:18081 [floor]=http://127.0.0.1:19290 [sidecar]=http://127.0.0.1:19190 [portkey]=http://127.0.0.1:18787 [litellm]=http://127.0.0.1:14000)
  # Interleaved: each round runs every target once, so drift in the machine
  # lands on all of them alike; the table shows the median round.
  local rounds=${ROUNDS:-3}
  for c in 1 64; do
    for r in $(seq 1 "$rounds"); do
      for t in $targets; do R[$t-$c-$r]=$(wrk_run "$t-r$r" "${URL[$t]}" "$c"); done
    done
  done
  [ -n "${SKIP_LITELLM:-}" ] || stop_pid "$LITELLM_PID"
  stop_pid "$PORTKEY_PID"; stop_pid "$floor"
  emit ""
  emit "### Overhead (non-streaming, one backend; $rounds interleaved rounds of ${WRK_SECS:-15} s per cell, wrk; median round by req/s)"
  emit ""
  emit "| target | c | req/s | p50 ms | p99 ms | non-2xx | req/s vs nginx proxy | p50 vs nginx proxy | p99 vs nginx proxy | every round req/s |"
  emit "|---|---|---|---|---|---|---|---|---|---|"
  for c in 1 64; do
    local cells=""
    for t in $targets; do
      for r in $(seq 1 "$rounds"); do cells="$cells $t:${R[$t-$c-$r]// /,}"; done
    done
    # shellcheck disable=SC2086
    python3 "$ROOT/benches/median.py" "$c" $cells | tee -a "$RESULTS"
  done
  stop_pid "$SIDECAR_PID"

  log "streaming: mock upstream (10 chunks, 20 ms apart) direct vs through sidecar"
  "$SIDECAR" mock-upstream --port 18090 --keys "fake-upstream:0" --chunks 10 --chunk-ms 20 --models native-m > "$OUT/mock-stream.log" 2>&1 &
  local mock=$!; PIDS+=("$mock")
  wait_http http://127.0.0.1:18090/_mock/stats
  sed 's|http://127.0.0.1:18080/v1|http://127.0.0.1:18090/v1|' "$OUT/overhead.toml" > "$OUT/stream.toml"
  start_sidecar "$OUT/stream.toml" 19190
  # The floor passes a stream through as it comes (actix-web + awc only).
  "$FLOOR" --port 19291 --upstream http://127.0.0.1:18090/v1/chat/completions --key fake-upstream > "$OUT/floor-stream.log" 2>&1 &
  local sfloor=$!; PIDS+=("$sfloor")
  wait_listening http://127.0.0.1:19291/
  start_nginx_stream_proxy 18092 18090 1024
  LOADGEN_KEY=fake-upstream "$LOADGEN" ttft --url http://127.0.0.1:18090 --n 300 --model native-m > "$OUT/ttft-direct.json"
  LOADGEN_KEY=fake-upstream "$LOADGEN" ttft --url http://127.0.0.1:18092 --n 300 --model native-m > "$OUT/ttft-nginx.json"
  "$LOADGEN" ttft --url http://127.0.0.1:19291 --n 300 --model native-m > "$OUT/ttft-floor.json"
  "$LOADGEN" ttft --url http://127.0.0.1:19190 --n 300 > "$OUT/ttft-sidecar.json"
  stop_pid "$SIDECAR_PID"; stop_pid "$sfloor"; stop_pid "$NGINX_SP_PID"; stop_pid "$mock"
  emit ""
  emit "### Streaming (300 sequential streams, 10 chunks 20 ms apart)"
  emit ""
  python3 - "$OUT/ttft-direct.json" "$OUT/ttft-nginx.json" "$OUT/ttft-floor.json" "$OUT/ttft-sidecar.json" <<'EOF' | tee -a "$RESULTS"
import json, sys
d, n, f, s = (json.load(open(p)) for p in sys.argv[1:5])
print("| target | TTFT p50 ms | TTFT p99 ms | total p50 ms | total p99 ms | failed |")
print("|---|---|---|---|---|---|")
for name, r in (("direct", d), ("nginx as proxy (proxy_buffering off)", n), ("floor (actix-web + awc)", f), ("sidecar", s)):
    print(f"| {name} | {r['ttft']['p50_ms']:.3f} | {r['ttft']['p99_ms']:.3f} | {r['total']['p50_ms']:.3f} | {r['total']['p99_ms']:.3f} | {r['failed']} |")
for name, r in (("added by nginx as proxy", n), ("added by the floor", f), ("**added by sidecar**", s)):
    print(f"| {name} | {r['ttft']['p50_ms']-d['ttft']['p50_ms']:+.3f} | {r['ttft']['p99_ms']-d['ttft']['p99_ms']:+.3f} | "
          f"{r['total']['p50_ms']-d['total']['p50_ms']:+.3f} | {r['total']['p99_ms']-d['total']['p99_ms']:+.3f} | |")
EOF
}

# ---- allocations ---------------------------------------------------------------
allocations() {
  log "allocations: heap allocations and bytes per non-streaming request (dhat-counting build)"
  curl -fsS -o /dev/null http://127.0.0.1:18080/v1/models 2>/dev/null || start_nginx
  post_lua
  one_backend_config 19190 > "$OUT/allocs.toml"
  rm -rf "$OUT/sidecar-data"; mkdir -p "$OUT/sidecar-data"
  # dhat also writes the allocation sites to $OUT/dhat-heap.json at exit.
  (cd "$OUT" && SIDECAR_ENCRYPTION_KEY=$("$OUT/sidecar-alloc-stats" keygen) LOG_FORMAT=json \
    exec "$OUT/sidecar-alloc-stats" serve --config "$OUT/allocs.toml") > "$OUT/sidecar-allocs.log" 2>&1 &
  local pid=$!; PIDS+=("$pid")
  wait_http http://127.0.0.1:19190/health
  wrk -t1 -c4 -d2s -s "$OUT/post.lua" http://127.0.0.1:19190/v1/chat/completions > /dev/null
  local m0 m1 n
  m0=$(curl -fsS http://127.0.0.1:19191/metrics | awk '/^sidecar_alloc_(blocks|bytes)_total/ {printf "%s ", $2}')
  n=$(wrk -t1 -c4 -d5s -s "$OUT/post.lua" http://127.0.0.1:19190/v1/chat/completions | awk '/requests in/ {print $1}')
  m1=$(curl -fsS http://127.0.0.1:19191/metrics | awk '/^sidecar_alloc_(blocks|bytes)_total/ {printf "%s ", $2}')
  stop_pid "$pid"
  emit ""
  emit "### Allocations per request (non-streaming chat completion, one backend)"
  emit ""
  python3 - "$n" $m0 $m1 <<'EOF' | tee -a "$RESULTS"
import sys
n, b0, y0, b1, y1 = (float(x) for x in sys.argv[1:6])
print("| requests counted | allocations per request | bytes allocated per request |")
print("|---|---|---|")
print(f"| {n:.0f} | {(b1 - b0) / n:.1f} | {(y1 - y0) / n:.0f} |")
EOF
}

# ---- memory ------------------------------------------------------------------
memory() {
  local N=${MEM_STREAMS:-8000}
  # Each stream holds two sockets in the gateway (and one in the mock and
  # one in the load generator): raise the soft limit to the hard one.
  ulimit -n "$(ulimit -Hn)" || true
  log "memory: peak RSS idle with 11 backends, then with $N open streams (fd limit $(ulimit -n))"
  "$SIDECAR" mock-upstream --port 18091 --keys "$(seq -s, -f 'fake-%02g:0' 1 11)" --chunks 40 --chunk-ms 250 --models native-m > "$OUT/mock-mem.log" 2>&1 &
  local mock=$!; PIDS+=("$mock")
  wait_http http://127.0.0.1:18091/_mock/stats
  {
    echo "port = 19192"; echo "metrics_port = 19193"; echo "queue_max = 100000"
    echo "db_path = \"$OUT/sidecar-data/sidecar.db\""; echo "backup_dir = \"$OUT/sidecar-data/backups\""
    for i in $(seq -f '%02g' 1 11); do
      printf '[[backends]]\nname = "key-%s"\nbase_url = "http://127.0.0.1:18091/v1"\napi_key = "fake-%s"\nrpm_limit = 100000\nmodels = { "m" = "native-m" }\n' "$i" "$i"
    done
  } > "$OUT/memory.toml"
  start_sidecar "$OUT/memory.toml" 19192
  sleep 3
  local idle; idle=$(peak_rss_kb "$SIDECAR_PID")
  "$LOADGEN" streams --url http://127.0.0.1:19192 --n "$N" > "$OUT/streams-$N.json"
  local busy; busy=$(peak_rss_kb "$SIDECAR_PID")
  stop_pid "$SIDECAR_PID"
  # The same streams through the floor (actix-web + awc passing them on):
  # what the HTTP stack itself holds per open stream.
  "$FLOOR" --port 19294 --upstream http://127.0.0.1:18091/v1/chat/completions --key fake-01 > "$OUT/floor-mem.log" 2>&1 &
  local mfloor=$!; PIDS+=("$mfloor")
  wait_listening http://127.0.0.1:19294/
  sleep 3
  local fidle; fidle=$(peak_rss_kb "$mfloor")
  "$LOADGEN" streams --url http://127.0.0.1:19294 --n "$N" --model native-m > "$OUT/streams-floor-$N.json"
  local fbusy; fbusy=$(peak_rss_kb "$mfloor")
  stop_pid "$mfloor"
  # The same streams through nginx as a streaming proxy (its one worker holds them).
  start_nginx_stream_proxy 18093 18091 $(( 2 * N + 200 ))
  sleep 1
  local nidle nmaster; nidle=$(peak_rss_kb "$NGINX_SP_WORKER")
  LOADGEN_KEY=fake-01 "$LOADGEN" streams --url http://127.0.0.1:18093 --n "$N" --model native-m > "$OUT/streams-nginx-$N.json"
  local nbusy; nbusy=$(peak_rss_kb "$NGINX_SP_WORKER"); nmaster=$(peak_rss_kb "$NGINX_SP_PID")
  stop_pid "$NGINX_SP_PID"; stop_pid "$mock"
  # LiteLLM idle, same 11 keys, for comparison.
  {
    echo "model_list:"
    for i in $(seq -f '%02g' 1 11); do
      echo "  - model_name: m"
      echo "    litellm_params: { model: openai/native-m, api_base: \"http://127.0.0.1:18091/v1\", api_key: fake-$i, rpm: 100000 }"
    done
    echo "litellm_settings: { telemetry: false }"
  } > "$OUT/litellm-memory.yaml"
  start_litellm "$OUT/litellm-memory.yaml" 14001
  sleep 3
  local lidle; lidle=$(rss_tree_kb "$LITELLM_PID")
  stop_pid "$LITELLM_PID"
  emit ""
  emit "### Memory"
  emit ""
  python3 - "$OUT/streams-$N.json" "$idle" "$busy" "$lidle" "$OUT/streams-floor-$N.json" "$fidle" "$fbusy" \
    "$OUT/streams-nginx-$N.json" "$nidle" "$nbusy" "$nmaster" <<'EOF' | tee -a "$RESULTS"
import json, sys
s = json.load(open(sys.argv[1])); idle, busy, lidle = (int(x) / 1024 for x in sys.argv[2:5])
f = json.load(open(sys.argv[5])); fidle, fbusy = (int(x) / 1024 for x in sys.argv[6:8])
g = json.load(open(sys.argv[8])); nidle, nbusy, nmaster = (int(x) / 1024 for x in sys.argv[9:12])
n = s['opened']
print("| measurement | value |")
print("|---|---|")
print(f"| sidecar peak RSS, idle, 11 backends | {idle:.1f} MB |")
print(f"| sidecar peak RSS, {n} concurrent streams ({s['completed']}/{n} completed, 10 s each) | {busy:.1f} MB ({(busy - idle) * 1024 / n:.1f} KB per stream) |")
print(f"| the floor (actix-web + awc passing streams on) peak RSS, idle / {n} streams ({f['completed']}/{n} completed) | {fidle:.1f} / {fbusy:.1f} MB ({(fbusy - fidle) * 1024 / n:.1f} KB per stream) |")
print(f"| nginx as a streaming proxy (`proxy_buffering off`), its worker's peak RSS, idle / {g['opened']} streams ({g['completed']}/{g['opened']} completed; the master {nmaster:.1f} MB) | {nidle:.1f} / {nbusy:.1f} MB ({(nbusy - nidle) * 1024 / g['opened']:.1f} KB per stream) |")
print(f"| LiteLLM RSS, idle, 11 deployments (proxy + 2 workers) | {lidle:.1f} MB |")
EOF
}

# ---- goodput -----------------------------------------------------------------
goodput() {
  local L=20 W=10 KEYS=11 SECS=${GOODPUT_SECS:-40}
  local cap; cap=$(python3 -c "print($KEYS*$L/$W)")
  log "goodput: $KEYS keys x $L per ${W}s rolling window (capacity $cap req/s), ${SECS}s at 1.2x and 0.9x in bursts"
  local keys; keys=$(seq -s, -f "fake-%02g:$L" 1 $KEYS)
  {
    echo "port = 19194"; echo "metrics_port = 19195"; echo "window_secs = $W"; echo "queue_timeout = 30"; echo "queue_max = 5000"
    echo "cooldown_base = 2"; echo "cooldown_max = 30"
    echo "db_path = \"$OUT/sidecar-data/sidecar.db\""; echo "backup_dir = \"$OUT/sidecar-data/backups\""
    for i in $(seq -f '%02g' 1 $KEYS); do
      printf '[[backends]]\nname = "key-%s"\nbase_url = "http://127.0.0.1:18092/v1"\napi_key = "fake-%s"\nrpm_limit = %s\nmodels = { "m" = "native-m" }\n' "$i" "$i" "$L"
    done
  } > "$OUT/goodput.toml"
  # LiteLLM counts rpm per minute: the per-10 s limit scaled to a minute.
  {
    echo "model_list:"
    for i in $(seq -f '%02g' 1 $KEYS); do
      echo "  - model_name: m"
      echo "    litellm_params: { model: openai/native-m, api_base: \"http://127.0.0.1:18092/v1\", api_key: fake-$i, rpm: $((L * 60 / W)) }"
    done
    echo "router_settings: { routing_strategy: usage-based-routing-v2, num_retries: 3, retry_after: 0, allowed_fails: 3, cooldown_time: 10 }"
    echo "litellm_settings: { telemetry: false, num_retries: 3 }"
  } > "$OUT/litellm-goodput.yaml"
  : > "$OUT/goodput.jsonl"
  for peer in sidecar litellm; do
    for load in steady burst; do
      "$SIDECAR" mock-upstream --port 18092 --keys "$keys" --window "$W" --chunks 1 --chunk-ms 0 --models native-m > "$OUT/mock-goodput.log" 2>&1 &
      local mock=$!; PIDS+=("$mock")
      wait_http http://127.0.0.1:18092/_mock/stats
      local url
      if [ "$peer" = sidecar ]; then start_sidecar "$OUT/goodput.toml" 19194; url=http://127.0.0.1:19194
      else start_litellm "$OUT/litellm-goodput.yaml" 14002; url=http://127.0.0.1:14002; fi
      local args
      if [ "$load" = steady ]; then args=(--rps "$(python3 -c "print($cap*1.2)")" --secs "$SECS")
      else args=(--burst-every 5 --burst "$(python3 -c "print(int($cap*0.9*5))")" --secs "$SECS"); fi
      "$LOADGEN" rate --url "$url" --model m "${args[@]}" > "$OUT/goodput-$peer-$load.json"
      curl -fsS http://127.0.0.1:18092/_mock/stats > "$OUT/goodput-$peer-$load-mock.json"
      if [ "$peer" = sidecar ]; then stop_pid "$SIDECAR_PID"; else stop_pid "$LITELLM_PID"; fi
      stop_pid "$mock"
      python3 -c "import json;print(json.dumps({'peer':'$peer','load':'$load','client':json.load(open('$OUT/goodput-$peer-$load.json')),'mock':json.load(open('$OUT/goodput-$peer-$load-mock.json'))}))" >> "$OUT/goodput.jsonl"
    done
  done
  emit ""
  emit "### Goodput under rate limits ($KEYS keys x $L req per ${W} s rolling window = $cap req/s; ${SECS} s)"
  emit ""
  python3 - "$OUT/goodput.jsonl" "$L" "$W" "$KEYS" "$SECS" <<'EOF' | tee -a "$RESULTS"
import json, sys
L, W, K, S = int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
print("| peer | load | sent | ok | ok / allowed | client 429 (with Retry-After) | client 503 (with Retry-After) | other | upstream 429s provoked | max per key per window (limit) | p50 ms | p99 ms |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|")
for line in open(sys.argv[1]):
    r = json.loads(line); c, m = r["client"], r["mock"]["keys"]
    st, ra = c["status"], c["with_retry_after"]
    # What the keys' rolling limits allow while load is offered (plus the queue drain).
    elapsed = c["elapsed_s"]
    allowed = min(c["sent"], K * L * (elapsed // W + 1))
    other = sum(v for k, v in st.items() if k not in ("200", "429", "503"))
    provoked = sum(k["rate_limited"] for k in m.values())
    mx = max(k["max_in_window"] for k in m.values())
    lat = c["latency_all"]
    print(f"| {r['peer']} | {r['load']} | {c['sent']} | {c['ok']} | {c['ok']/allowed:.3f} | {st.get('429',0)} ({ra.get('429',0)}) | "
          f"{st.get('503',0)} ({ra.get('503',0)}) | {other} | {provoked} | {mx} ({L}) | {lat['p50_ms']:.0f} | {lat['p99_ms']:.0f} |")
EOF
}


# ---- cluster -----------------------------------------------------------------
start_redis() {
  redis-server --bind 127.0.0.1 --port 16379 --save "" --appendonly no > "$OUT/redis.log" 2>&1 &
  PIDS+=($!)
  for _ in $(seq 1 100); do redis-cli -p 16379 ping >/dev/null 2>&1 && return 0; sleep 0.1; done
  log "redis did not start"; return 1
}

start_front() { # name port upstream-ports... : nginx round-robin in front of replicas
  local name=$1 port=$2; shift 2
  mkdir -p "$OUT/$name/logs"
  {
    echo "worker_processes 1; error_log $OUT/$name/logs/error.log warn; pid $OUT/$name/nginx.pid;"
    echo "events { worker_connections 4096; }"
    echo "http { access_log off; client_body_temp_path $OUT/$name/body; proxy_temp_path $OUT/$name/proxy;"
    echo "  upstream replicas {"
    for p in "$@"; do echo "    server 127.0.0.1:$p;"; done
    echo "    keepalive 64; }"
    # The client's Host travels on: the gateway refuses a non-loopback Host
    # when nothing else protects it (DNS rebinding), and "replicas" is one.
    echo "  server { listen 127.0.0.1:$port; location / { proxy_pass http://replicas; proxy_http_version 1.1; proxy_set_header Host \$host;"
    echo "    proxy_set_header Connection \"\"; proxy_read_timeout 120s; proxy_buffering off; } } }"
  } > "$OUT/$name/nginx.conf"
  nginx -c "$OUT/$name/nginx.conf" -p "$OUT/$name" -g 'daemon off;' &
  FRONT_PID=$!
  PIDS+=("$FRONT_PID")
}

one_backend_config() { # port state-lines... : one backend in front of nginx's canned answer
  local port=$1; shift
  echo "port = $port"; echo "metrics_port = $((port + 1))"
  echo "db_path = \"$OUT/sidecar-data/sidecar.db\""; echo "backup_dir = \"$OUT/sidecar-data/backups\""
  echo "queue_timeout = 5"
  for l in "$@"; do echo "$l"; done
  printf '[[backends]]\nname = "nginx"\nbase_url = "http://127.0.0.1:18080/v1"\napi_key = "fake-upstream"\nrpm_limit = 100000000\nburst = 100000000\nmodels = { "m" = "native-m" }\n'
}

cluster() {
  start_redis
  # 1. What a Redis reservation adds per request: the same gateway and
  #    backend, embedded vs state_backend = "redis".
  log "cluster: the added latency of a Redis reservation (wrk, c=1 and c=64)"
  start_nginx
  post_lua
  one_backend_config 19196 > "$OUT/embedded.toml"
  one_backend_config 19196 'state_backend = "redis"' 'redis_url = "redis://127.0.0.1:16379/"' 'redis_prefix = "bench-overhead"' > "$OUT/redis.toml"
  declare -A O
  for mode in embedded redis; do
    start_sidecar "$OUT/$mode.toml" 19196
    for c in 1 64; do O[$mode-$c]=$(wrk_run "state-$mode" http://127.0.0.1:19196 "$c"); done
    stop_pid "$SIDECAR_PID"
  done
  emit ""
  emit "### Redis reservation on the request path (one backend, nginx upstream, ${WRK_SECS:-15} s per cell)"
  emit ""
  emit "| state | c | req/s | p50 ms | p99 ms | added p50 ms | added p99 ms |"
  emit "|---|---|---|---|---|---|---|"
  for c in 1 64; do
    read -r erps ep50 ep99 _ <<<"${O[embedded-$c]}"
    for mode in embedded redis; do
      read -r rps p50 p99 _ <<<"${O[$mode-$c]}"
      emit "$(python3 -c "print(f'| $mode | $c | $rps | $p50 | $p99 | {$p50-$ep50:+.3f} | {$p99-$ep99:+.3f} |')")"
    done
  done

  # 2. Three replicas behind nginx sharing Redis, vs LiteLLM's documented
  #    multi-instance setup (three instances, router_settings with Redis).
  local L=20 W=10 KEYS=11 SECS=${CLUSTER_SECS:-40}
  local cap; cap=$(python3 -c "print($KEYS*$L/$W)")
  log "cluster: 3 replicas + Redis vs 3 LiteLLM + Redis; $KEYS keys x $L per ${W}s; ${SECS}s at 1.2x"
  local keys; keys=$(seq -s, -f "fake-%02g:$L" 1 $KEYS)
  : > "$OUT/cluster.jsonl"
  for peer in sidecar litellm; do
    redis-cli -p 16379 flushall >/dev/null
    "$SIDECAR" mock-upstream --port 18093 --keys "$keys" --window "$W" --chunks 1 --chunk-ms 0 --models native-m > "$OUT/mock-cluster.log" 2>&1 &
    local mock=$!; PIDS+=("$mock")
    wait_http http://127.0.0.1:18093/_mock/stats
    local ports=() pids=()
    for r in 1 2 3; do
      local port=$((19200 + r * 2))
      ports+=("$port")
      if [ "$peer" = sidecar ]; then
        mkdir -p "$OUT/replica-$r"; rm -f "$OUT/replica-$r"/sidecar.db*
        {
          echo "port = $port"; echo "metrics_port = $((port + 1))"; echo "window_secs = $W"; echo "queue_timeout = 30"; echo "queue_max = 5000"
          echo "cooldown_base = 2"; echo "cooldown_max = 30"
          echo 'state_backend = "redis"'; echo 'redis_url = "redis://127.0.0.1:16379/"'; echo 'redis_prefix = "bench-cluster"'
          echo "db_path = \"$OUT/replica-$r/sidecar.db\""; echo "backup_dir = \"$OUT/replica-$r/backups\""
          for i in $(seq -f '%02g' 1 $KEYS); do
            printf '[[backends]]\nname = "key-%s"\nbase_url = "http://127.0.0.1:18093/v1"\napi_key = "fake-%s"\nrpm_limit = %s\nmodels = { "m" = "native-m" }\n' "$i" "$i" "$L"
          done
        } > "$OUT/replica-$r.toml"
        SIDECAR_ENCRYPTION_KEY=$("$SIDECAR" keygen) LOG_FORMAT=json \
          "$SIDECAR" serve --config "$OUT/replica-$r.toml" > "$OUT/replica-$r.log" 2>&1 &
        pids+=($!); PIDS+=($!)
        wait_http "http://127.0.0.1:$port/health"
      else
        {
          echo "model_list:"
          for i in $(seq -f '%02g' 1 $KEYS); do
            echo "  - model_name: m"
            echo "    litellm_params: { model: openai/native-m, api_base: \"http://127.0.0.1:18093/v1\", api_key: fake-$i, rpm: $((L * 60 / W)) }"
          done
          echo "router_settings: { routing_strategy: usage-based-routing-v2, redis_host: 127.0.0.1, redis_port: 16379, num_retries: 3, retry_after: 0, allowed_fails: 3, cooldown_time: 10 }"
          echo "litellm_settings: { telemetry: false, num_retries: 3 }"
        } > "$OUT/litellm-cluster.yaml"
        "$LITELLM" --config "$OUT/litellm-cluster.yaml" --host 127.0.0.1 --port "$port" --num_workers 1 > "$OUT/litellm-cluster-$r.log" 2>&1 &
        pids+=($!); PIDS+=($!)
        wait_http "http://127.0.0.1:$port/health/liveliness"
      fi
    done
    start_front "front-$peer" 19210 "${ports[@]}"
    sleep 0.5
    "$LOADGEN" rate --url http://127.0.0.1:19210 --model m --rps "$(python3 -c "print($cap*1.2)")" --secs "$SECS" > "$OUT/cluster-$peer.json"
    curl -fsS http://127.0.0.1:18093/_mock/stats > "$OUT/cluster-$peer-mock.json"
    for p in "${pids[@]}"; do stop_pid "$p"; done
    pkill -f "$OUT/litellm-venv/bin/litellm" 2>/dev/null || true
    stop_pid "$FRONT_PID"; stop_pid "$mock"
    python3 -c "import json;print(json.dumps({'peer':'$peer','client':json.load(open('$OUT/cluster-$peer.json')),'mock':json.load(open('$OUT/cluster-$peer-mock.json'))}))" >> "$OUT/cluster.jsonl"
  done
  emit ""
  emit "### Three replicas sharing Redis, behind nginx ($KEYS keys x $L req per ${W} s = $cap req/s; 1.2x for ${SECS} s)"
  emit ""
  python3 - "$OUT/cluster.jsonl" "$L" "$W" "$KEYS" <<'EOF' | tee -a "$RESULTS"
import json, sys
L, W, K = int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
print("| peer | sent | ok | ok / allowed | client 503/429 | other | upstream 429s provoked | max per key per window (limit) | p50 ms | p99 ms |")
print("|---|---|---|---|---|---|---|---|---|---|")
for line in open(sys.argv[1]):
    r = json.loads(line); c, m = r["client"], r["mock"]["keys"]
    st = c["status"]
    allowed = min(c["sent"], K * L * (c["elapsed_s"] // W + 1))
    other = sum(v for k, v in st.items() if k not in ("200", "429", "503"))
    provoked = sum(k["rate_limited"] for k in m.values())
    mx = max(k["max_in_window"] for k in m.values())
    lat = c["latency_all"]
    print(f"| {r['peer']} | {c['sent']} | {c['ok']} | {c['ok']/allowed:.3f} | {st.get('503',0) + st.get('429',0)} | {other} | {provoked} | {mx} ({L}) | {lat['p50_ms']:.0f} | {lat['p99_ms']:.0f} |")
EOF
}

case "$MODE" in
  overhead) overhead; allocations ;;
  allocations) allocations ;;
  memory) memory ;;
  goodput) goodput ;;
  cluster) cluster ;;
  all) overhead; allocations; memory; goodput; cluster ;;
  *) echo "usage: benches/run.sh [overhead|allocations|memory|goodput|cluster|all]" >&2; exit 2 ;;
esac
log "results in $RESULTS"
