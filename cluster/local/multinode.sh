#!/usr/bin/env bash
# A multi-node Ray cluster on this machine: a head and worker nodes, each its own `ray start`
# process, a password-protected redis-server, and cluster/local/serve.yaml deployed across them
# (proxies and ingress on the head; one engine replica on each worker, which offers one
# `orthrus_engine` slot and no CPUs). tests/cluster/test_multinode.py does the same on free ports.
#
#   cluster/local/multinode.sh up [WORKERS]     # default 2 workers; HTTP :8000, gRPC :9000
#   cluster/local/multinode.sh worker NAME      # one more worker node (e.g. after stopping one)
#   cluster/local/multinode.sh stop NAME        # stop one node: head, w1, w2, ... (its whole process group)
#   kill -9 -- -"$(cat /tmp/orthrus-local/w1.pid)"   # or let one fail: its calls in flight fail, the rest go on
#   cluster/local/multinode.sh down             # stop everything this script started
#
# Stopping by process group touches only these nodes (`ray stop` would stop every Ray process of
# the user). Set ORTHRUS_MODEL to serve a local model directory instead of the built-in one.
set -euo pipefail
cd "$(dirname "$0")/../.."
RUN=${ORTHRUS_LOCAL_CLUSTER:-/tmp/orthrus-local}
BIN=$(dirname "$(command -v ray || echo .venv/bin/ray)")
[ -x "$BIN/ray" ] || BIN=.venv/bin
GCS_PORT=${GCS_PORT:-6380}
DASHBOARD_PORT=${DASHBOARD_PORT:-8265}
REDIS_PORT=${REDIS_PORT:-6379}

secret() { head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n'; }

env_setup() {
    # Token auth on every node and client, from one token: a worker that joins a token-auth head
    # without it is refused.
    export RAY_AUTH_MODE=token RAY_AUTH_TOKEN ORTHRUS_REDIS_PASSWORD
    RAY_AUTH_TOKEN=$(cat "$RUN/auth-token")
    ORTHRUS_REDIS_PASSWORD=$(cat "$RUN/redis-password")
}

wait_healthy() {  # the node's own health endpoint: raylet (and GCS on the head)
    for _ in $(seq 240); do
        curl -sf "http://127.0.0.1:$1/api/healthz" >/dev/null 2>&1 && return 0
        sleep 0.5
    done
    echo "node on agent port $1 did not become healthy; see $RUN/*.log" >&2
    return 1
}

start_node() {  # name agent_port args...
    local name=$1 agent=$2
    shift 2
    setsid "$BIN/ray" start --block --node-ip-address 127.0.0.1 --dashboard-agent-listen-port "$agent" \
        --disable-usage-stats "$@" >"$RUN/$name.log" 2>&1 &
    echo $! >"$RUN/$name.pid"
    wait_healthy "$agent"
    echo "$name up (pid $(cat "$RUN/$name.pid"))"
}

worker() {  # name: w1, w2, ... (the number picks its ports)
    local n=${1#w}
    start_node "$1" $((52370 + n)) --address "127.0.0.1:$GCS_PORT" --num-cpus 0 \
        --resources '{"orthrus_engine": 1}' --metrics-export-port $((8090 + n))
}

stop() {  # name: SIGTERM to the node's process group (Ray drains it, up to 30 s), then SIGKILL
    local pidfile="$RUN/$1.pid" pgid
    [ -f "$pidfile" ] || return 0
    pgid=$(cat "$pidfile")
    kill -TERM -- "-$pgid" 2>/dev/null || true
    for _ in $(seq 80); do kill -0 -- "-$pgid" 2>/dev/null || break; sleep 0.5; done
    kill -KILL -- "-$pgid" 2>/dev/null || true
    rm -f "$pidfile"
    echo "$1 stopped"
}

case "${1:-}" in
up)
    mkdir -p "$RUN"
    [ -f "$RUN/auth-token" ] || (umask 077 && secret >"$RUN/auth-token")
    [ -f "$RUN/redis-password" ] || (umask 077 && secret >"$RUN/redis-password")
    env_setup
    redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --requirepass "$ORTHRUS_REDIS_PASSWORD" --save "" \
        --appendonly no --daemonize yes --pidfile "$RUN/redis.pid" --logfile "$RUN/redis.log"
    start_node head 52365 --head --port "$GCS_PORT" --num-cpus 2 --dashboard-host 127.0.0.1 \
        --dashboard-port "$DASHBOARD_PORT" --temp-dir "$RUN/ray"
    for i in $(seq "${2:-2}"); do worker "w$i"; done
    config="$RUN/serve.yaml"
    sed -e "s|redis://127.0.0.1:6379/1|redis://127.0.0.1:$REDIS_PORT/1|" \
        -e "s|^      model: null|      model: ${ORTHRUS_MODEL:-null}|" cluster/local/serve.yaml >"$config"
    "$BIN/serve" deploy "$config" --address "http://127.0.0.1:$DASHBOARD_PORT"
    echo "deploying; watch it with:"
    echo "  RAY_AUTH_MODE=token RAY_AUTH_TOKEN=\$(cat $RUN/auth-token) $BIN/serve status --address http://127.0.0.1:$DASHBOARD_PORT"
    ;;
worker)
    env_setup
    worker "${2:?a worker name: w1, w2, ...}"
    ;;
stop)
    stop "${2:?a node name: head, w1, w2, ...}"
    ;;
down)
    for pidfile in "$RUN"/w*.pid "$RUN"/head.pid; do
        [ -f "$pidfile" ] && stop "$(basename "$pidfile" .pid)"
    done
    if [ -f "$RUN/redis.pid" ]; then kill "$(cat "$RUN/redis.pid")" 2>/dev/null || true; rm -f "$RUN/redis.pid"; fi
    ;;
*)
    sed -n '2,/^set -euo/p' "$0" | grep '^#'
    exit 2
    ;;
esac
