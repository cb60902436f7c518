#!/usr/bin/env bash
# Starts and stops a NATS server with JetStream for tests and benchmarks,
# on 127.0.0.1 only, with its data in a folder of its own.
#
#   scripts/nats.sh start DIR [PORT] [EXTRA nats-server FLAGS...]
#       starts nats-server (PORT 0 or absent: a free port), waits until it
#       accepts connections and prints  nats://127.0.0.1:PORT
#       (settings without a flag, such as max_payload, go in a config file:
#       pass  -c FILE)
#   scripts/nats.sh stop DIR
#       stops the server started with DIR and waits for it to exit
#
# nats-server comes from Debian's package (scripts/env.sh installs it).
set -euo pipefail

cmd="${1:-}"
dir="${2:-}"
[ -n "$cmd" ] && [ -n "$dir" ] || { echo "usage: $0 start|stop DIR [PORT] [FLAGS...]" >&2; exit 2; }

case "$cmd" in
start)
    port="${3:-0}"
    shift $(( $# >= 3 ? 3 : 2 ))
    command -v nats-server >/dev/null 2>&1 || { echo "error: nats-server is not installed (run scripts/env.sh)" >&2; exit 1; }
    mkdir -p "$dir/jetstream"
    rm -f "$dir"/*.ports
    [ "$port" = "0" ] && port=-1
    nats-server -a 127.0.0.1 -p "$port" -js -sd "$dir/jetstream" \
        --ports_file_dir "$dir" -P "$dir/nats.pid" -l "$dir/nats.log" "$@" \
        </dev/null >"$dir/stdout.log" 2>"$dir/stderr.log" &
    server=$!
    for _ in $(seq 1 200); do
        if ! kill -0 "$server" 2>/dev/null; then
            echo "error: nats-server exited at start:" >&2
            cat "$dir/stderr.log" "$dir/nats.log" >&2 2>/dev/null || true
            exit 1
        fi
        ports=$(ls "$dir"/*.ports 2>/dev/null | head -n 1 || true)
        if [ -n "$ports" ] && grep -q 'nats://' "$ports"; then
            url=$(grep -o 'nats://127\.0\.0\.1:[0-9]*' "$ports" | head -n 1)
            # The ports file is written once the listener is up.
            echo "$url"
            exit 0
        fi
        sleep 0.05
    done
    echo "error: nats-server did not start; log:" >&2
    cat "$dir/nats.log" >&2 || true
    exit 1
    ;;
stop)
    [ -f "$dir/nats.pid" ] || exit 0
    pid=$(cat "$dir/nats.pid")
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 200); do
        kill -0 "$pid" 2>/dev/null || { rm -f "$dir/nats.pid"; exit 0; }
        sleep 0.05
    done
    kill -9 "$pid" 2>/dev/null || true
    rm -f "$dir/nats.pid"
    ;;
*)
    echo "usage: $0 start|stop DIR [PORT] [FLAGS...]" >&2
    exit 2
    ;;
esac
