#!/usr/bin/env bash
# Fetches, starts and stops a single-node Apache Kafka broker (KRaft mode:
# broker and controller in one JVM) for tests and benchmarks, listening on
# 127.0.0.1 only, with its data in a folder of its own.
#
#   scripts/kafka.sh fetch
#       downloads Apache Kafka (org.apache.kafka:kafka_2.13 with its runtime
#       dependencies, plus a log4j2 backend) from Maven Central into
#       $OUTBOXKV_KAFKA_HOME (default: ~/.cache/outboxkv/kafka-VERSION);
#       does nothing when it is already there
#   scripts/kafka.sh start DIR [PORT [CONTROLLER_PORT]] [KEY=VALUE...]
#       fetches if needed, formats a KRaft log folder under DIR (first start
#       only: a restart keeps the data), starts the broker, waits until it
#       serves and prints  127.0.0.1:PORT  (PORT 0 or absent: a free port).
#       KEY=VALUE pairs are added to server.properties (first start only).
#       With OUTBOXKV_KAFKA_SASL_PLAIN=USER:PASSWORD[,USER:PASSWORD...] the
#       listener is SASL_PLAINTEXT with the PLAIN mechanism and these users
#       (first start only; letters, digits, _ and - only). With
#       OUTBOXKV_KAFKA_ACL=1 as well, the broker authorizes with ACLs
#       (StandardAuthorizer, nothing allowed without an ACL; the broker
#       itself and USER admin are super users).
#   scripts/kafka.sh acl DIR ADMIN_PASSWORD PRINCIPAL OPERATION TOPIC
#       as user admin, allows PRINCIPAL (User:name) OPERATION (WRITE, READ,
#       DESCRIBE, ...) on TOPIC (scripts/KafkaAcl.java)
#   scripts/kafka.sh stop DIR
#       stops the broker started with DIR (SIGTERM, a clean shutdown) and
#       waits for it to exit
#
# Needs Java 17 or newer and Maven (scripts/env.sh installs both).
set -euo pipefail

KAFKA_VERSION="${OUTBOXKV_KAFKA_VERSION:-4.1.1}"
LOG4J_VERSION="${OUTBOXKV_LOG4J_VERSION:-2.25.3}"
SLF4J_VERSION="${OUTBOXKV_SLF4J_VERSION:-2.0.17}"
KAFKA_HOME="${OUTBOXKV_KAFKA_HOME:-$HOME/.cache/outboxkv/kafka-$KAFKA_VERSION}"

usage() {
    echo "usage: $0 fetch | start DIR [PORT [CONTROLLER_PORT]] [KEY=VALUE...] | acl DIR ADMIN_PASSWORD PRINCIPAL OPERATION TOPIC | stop DIR" >&2
    exit 2
}

# Several tests may start brokers at once on a machine that has no Kafka
# yet: one fetches, the others wait for it (the lock is held only by the
# subshell, never by a broker started afterwards).
fetch() {
    if [ -f "$KAFKA_HOME/.complete" ]; then
        return 0
    fi
    mkdir -p "$(dirname "$KAFKA_HOME")"
    (
        flock 9
        [ -f "$KAFKA_HOME/.complete" ] || fetch_now
    ) 9>"$KAFKA_HOME.lock" || exit 1
}

fetch_now() {
    command -v mvn >/dev/null 2>&1 || { echo "error: Maven (mvn) is not installed (run scripts/env.sh)" >&2; exit 1; }
    mkdir -p "$KAFKA_HOME"
    cat >"$KAFKA_HOME/pom.xml" <<EOF
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>outboxkv</groupId>
  <artifactId>kafka-for-tests</artifactId>
  <version>1</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency><groupId>org.apache.kafka</groupId><artifactId>kafka_2.13</artifactId><version>$KAFKA_VERSION</version></dependency>
    <!-- Kafka's POM resolves slf4j-api 1.7, which cannot see a log4j2 backend. -->
    <dependency><groupId>org.slf4j</groupId><artifactId>slf4j-api</artifactId><version>$SLF4J_VERSION</version></dependency>
    <dependency><groupId>org.apache.logging.log4j</groupId><artifactId>log4j-core</artifactId><version>$LOG4J_VERSION</version></dependency>
    <dependency><groupId>org.apache.logging.log4j</groupId><artifactId>log4j-slf4j2-impl</artifactId><version>$LOG4J_VERSION</version></dependency>
  </dependencies>
</project>
EOF
    echo ">> fetching Apache Kafka $KAFKA_VERSION from Maven Central into $KAFKA_HOME" >&2
    rm -rf "$KAFKA_HOME/lib"
    (cd "$KAFKA_HOME" && mvn -q -B dependency:copy-dependencies \
        -DincludeScope=runtime -DoutputDirectory=lib >"$KAFKA_HOME/fetch.log" 2>&1) || {
        echo "error: fetching Kafka failed; log: $KAFKA_HOME/fetch.log" >&2
        tail -n 30 "$KAFKA_HOME/fetch.log" >&2
        exit 1
    }
    cat >"$KAFKA_HOME/log4j2.properties" <<'EOF'
status = warn
appender.file.type = File
appender.file.name = FILE
appender.file.fileName = ${sys:kafka.logs.dir}/server.log
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = WARN
rootLogger.appenderRef.file.ref = FILE
logger.server.name = kafka.server
logger.server.level = INFO
EOF
    touch "$KAFKA_HOME/.complete"
}

port_free() {
    ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

# Ports are picked below the kernel's ephemeral range: a port in it may be
# the local end of some outgoing connection, which a connect test does not
# see but which makes the broker's bind fail ("Address already in use").
ephemeral_low() {
    local low
    low=$(cut -f1 /proc/sys/net/ipv4/ip_local_port_range 2>/dev/null || echo 32768)
    echo "${low:-32768}"
}

free_port() {
    local p low
    low=$(ephemeral_low)
    for _ in $(seq 1 100); do
        p=$(( 10000 + RANDOM % (low - 10000) ))
        if port_free "$p"; then
            echo "$p"
            return 0
        fi
    done
    echo "error: no free port found" >&2
    exit 1
}

cmd="${1:-}"
case "$cmd" in
fetch)
    fetch
    ;;
start)
    dir="${2:-}"
    [ -n "$dir" ] || usage
    port="${3:-0}"
    cport="${4:-0}"
    shift $(( $# >= 4 ? 4 : $# ))
    command -v java >/dev/null 2>&1 || { echo "error: java is not installed (run scripts/env.sh)" >&2; exit 1; }
    fetch
    mkdir -p "$dir"
    dir="$(cd "$dir" && pwd)"
    if [ -f "$dir/kafka.pid" ] && kill -0 "$(cat "$dir/kafka.pid")" 2>/dev/null; then
        echo "error: a broker is already running for $dir" >&2
        exit 1
    fi
    extra=("$@")
    fresh=0
    if [ ! -f "$dir/server.properties" ]; then
        # Only ports picked here may be picked again after a bind failure.
        [ "$port" = "0" ] && [ "$cport" = "0" ] && fresh=1
        [ "$port" = "0" ] && port=$(free_port)
        if [ "$cport" = "0" ]; then
            cport=$(free_port)
            while [ "$cport" = "$port" ]; do cport=$(free_port); done
        fi
        proto=PLAINTEXT
        sasl_users="${OUTBOXKV_KAFKA_SASL_PLAIN:-}"
        if [ -n "$sasl_users" ]; then
            proto=SASL_PLAINTEXT
            if ! [[ "$sasl_users" =~ ^[A-Za-z0-9_-]+:[A-Za-z0-9_-]+(,[A-Za-z0-9_-]+:[A-Za-z0-9_-]+)*$ ]]; then
                echo "error: OUTBOXKV_KAFKA_SASL_PLAIN must be USER:PASSWORD[,USER:PASSWORD...]" >&2
                exit 2
            fi
        fi
        cat >"$dir/server.properties" <<EOF
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:$cport
listeners=$proto://127.0.0.1:$port,CONTROLLER://127.0.0.1:$cport
advertised.listeners=$proto://127.0.0.1:$port
controller.listener.names=CONTROLLER
listener.security.protocol.map=$proto:$proto,CONTROLLER:PLAINTEXT
inter.broker.listener.name=$proto
log.dirs=$dir/data
num.partitions=1
default.replication.factor=1
offsets.topic.replication.factor=1
offsets.topic.num.partitions=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
auto.create.topics.enable=true
EOF
        if [ -n "$sasl_users" ]; then
            jaas='org.apache.kafka.common.security.plain.PlainLoginModule required username="broker" password="broker-secret" user_broker="broker-secret"'
            IFS=',' read -ra pairs <<<"$sasl_users"
            for pair in "${pairs[@]}"; do
                jaas="$jaas user_${pair%%:*}=\"${pair#*:}\""
            done
            {
                echo "sasl.enabled.mechanisms=PLAIN"
                echo "sasl.mechanism.inter.broker.protocol=PLAIN"
                echo "listener.name.sasl_plaintext.plain.sasl.jaas.config=$jaas;"
            } >>"$dir/server.properties"
            if [ "${OUTBOXKV_KAFKA_ACL:-}" = 1 ]; then
                {
                    echo "authorizer.class.name=org.apache.kafka.metadata.authorizer.StandardAuthorizer"
                    echo "allow.everyone.if.no.acl.found=false"
                    # The controller listener is PLAINTEXT (ANONYMOUS).
                    echo "super.users=User:broker;User:admin;User:ANONYMOUS"
                } >>"$dir/server.properties"
            fi
        fi
        for kv in "$@"; do echo "$kv" >>"$dir/server.properties"; done
    else
        port=$(sed -n 's/^advertised.listeners=[A-Z_]*:\/\/127.0.0.1:\([0-9]*\)$/\1/p' "$dir/server.properties")
    fi
    port_free "$port" || { echo "error: port $port is in use" >&2; exit 1; }
    java_cmd=(java -Xms256m -Xmx512m -XX:+UseG1GC -Djava.awt.headless=true
        "-Dkafka.logs.dir=$dir/logs" "-Dlog4j2.configurationFile=$KAFKA_HOME/log4j2.properties"
        -cp "$KAFKA_HOME/lib/*")
    mkdir -p "$dir/logs"
    if [ ! -f "$dir/data/meta.properties" ]; then
        cluster_id=$("${java_cmd[@]}" kafka.tools.StorageTool random-uuid 2>>"$dir/logs/format.log")
        "${java_cmd[@]}" kafka.tools.StorageTool format -t "$cluster_id" \
            -c "$dir/server.properties" >>"$dir/logs/format.log" 2>&1 || {
            echo "error: formatting the KRaft log folder failed:" >&2
            cat "$dir/logs/format.log" >&2
            exit 1
        }
    fi
    : >"$dir/logs/server.log"
    "${java_cmd[@]}" kafka.Kafka "$dir/server.properties" \
        </dev/null >"$dir/logs/stdout.log" 2>&1 &
    pid=$!
    echo "$pid" >"$dir/kafka.pid"
    # Ready once the broker logs that it has started and the port accepts.
    for _ in $(seq 1 1200); do
        if ! kill -0 "$pid" 2>/dev/null; then
            rm -f "$dir/kafka.pid"
            attempt="${OUTBOXKV_KAFKA_ATTEMPT:-1}"
            if [ "$fresh" = 1 ] && [ "$attempt" -lt 3 ] \
                && grep -q "Address already in use" "$dir/logs/server.log" 2>/dev/null; then
                # Ports we picked were taken meanwhile: pick others.
                rm -rf "$dir/server.properties" "$dir/data" "$dir/logs"
                OUTBOXKV_KAFKA_ATTEMPT=$((attempt + 1)) exec "$0" start "$dir" 0 0 "${extra[@]}"
            fi
            echo "error: the Kafka broker exited at start:" >&2
            tail -n 40 "$dir/logs/stdout.log" "$dir/logs/server.log" >&2 2>/dev/null || true
            exit 1
        fi
        if grep -q "Kafka Server started" "$dir/logs/server.log" 2>/dev/null && ! port_free "$port"; then
            echo "127.0.0.1:$port"
            exit 0
        fi
        sleep 0.1
    done
    echo "error: the Kafka broker did not start within 120 s; log:" >&2
    tail -n 40 "$dir/logs/server.log" >&2 || true
    kill -9 "$pid" 2>/dev/null || true
    exit 1
    ;;
acl)
    dir="${2:-}"
    [ -n "$dir" ] && [ "$#" -eq 6 ] || usage
    port=$(sed -n 's/^advertised.listeners=[A-Z_]*:\/\/127.0.0.1:\([0-9]*\)$/\1/p' "$dir/server.properties")
    java -cp "$KAFKA_HOME/lib/*" "$(dirname "$0")/KafkaAcl.java" "127.0.0.1:$port" admin "$3" "$4" "$5" "$6"
    ;;
stop)
    dir="${2:-}"
    [ -n "$dir" ] || usage
    [ -f "$dir/kafka.pid" ] || exit 0
    pid=$(cat "$dir/kafka.pid")
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 600); do
        kill -0 "$pid" 2>/dev/null || { rm -f "$dir/kafka.pid"; exit 0; }
        sleep 0.1
    done
    kill -9 "$pid" 2>/dev/null || true
    rm -f "$dir/kafka.pid"
    ;;
*)
    usage
    ;;
esac
