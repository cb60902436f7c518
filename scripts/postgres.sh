#!/usr/bin/env bash
# Starts and stops a throwaway PostgreSQL server for benchmarks, on
# 127.0.0.1 only, with its data (and its socket) in a folder of its own.
#
#   scripts/postgres.sh start DIR [PORT]
#       initdb (first start only), starts the server, waits until it accepts
#       connections and prints  host=127.0.0.1 port=PORT user=postgres
#       (PORT 0 or absent: a free port)
#   scripts/postgres.sh stop DIR
#       stops it (fast shutdown) and waits
#
# PostgreSQL comes from Debian's package (scripts/env.sh installs it). As
# root, the server runs as the `postgres` user (initdb refuses root).
set -euo pipefail

cmd="${1:-}"
dir="${2:-}"
[ -n "$cmd" ] && [ -n "$dir" ] || { echo "usage: $0 start|stop DIR [PORT]" >&2; exit 2; }

bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
[ -x "$bin/initdb" ] || { echo "error: PostgreSQL is not installed (run scripts/env.sh)" >&2; exit 1; }

as_owner() {
    if [ "$(id -u)" -eq 0 ]; then
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

case "$cmd" in
start)
    port="${3:-0}"
    mkdir -p "$dir"
    dir="$(cd "$dir" && pwd)"
    [ "$(id -u)" -eq 0 ] && chown postgres: "$dir"
    if [ ! -f "$dir/data/PG_VERSION" ]; then
        as_owner "$bin/initdb" -D "$dir/data" -U postgres --auth=trust -E UTF8 >"$dir/initdb.log" 2>&1 || {
            echo "error: initdb failed:" >&2; cat "$dir/initdb.log" >&2; exit 1; }
    fi
    if [ "$port" = "0" ]; then
        # Below the kernel's ephemeral range: a port in it may be the local
        # end of an outgoing connection, invisible to a connect test.
        low=$(cut -f1 /proc/sys/net/ipv4/ip_local_port_range 2>/dev/null || echo 32768)
        for _ in $(seq 1 100); do
            port=$(( 10000 + RANDOM % (${low:-32768} - 10000) ))
            (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null || break
        done
    fi
    as_owner "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 \
        -o "-c listen_addresses=127.0.0.1 -p $port -c unix_socket_directories=$dir -c max_connections=100 -c shared_buffers=256MB" \
        start >/dev/null || { echo "error: PostgreSQL did not start:" >&2; tail -n 30 "$dir/server.log" >&2; exit 1; }
    echo "host=127.0.0.1 port=$port user=postgres"
    ;;
stop)
    [ -f "$dir/data/postmaster.pid" ] || exit 0
    as_owner "$bin/pg_ctl" -D "$dir/data" -m fast -w stop >/dev/null 2>&1 || true
    ;;
*)
    echo "usage: $0 start|stop DIR [PORT]" >&2
    exit 2
    ;;
esac
