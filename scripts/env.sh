# Sourced by the project's scripts: installs what the build needs on a
# Debian machine and points cargo at one persistent target directory, so
# RocksDB (about 30 minutes to build from source on 2 cores) is built once
# and shared by the tests, the benchmarks, the demo and CI.

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/outboxkv/target}"
mkdir -p "$CARGO_TARGET_DIR"

# apt packages: libclang for RocksDB's bindgen, a C++ toolchain for RocksDB,
# cmake for bundled C libraries, util-linux for `flock` (used by a lock test),
# nats-server for the JetStream tests, OpenSSL, zlib and curl headers for the
# bundled librdkafka, Java and Maven to fetch and run Apache Kafka,
# PostgreSQL for the side-by-side benchmark, prometheus for promtool (the
# metrics conformance test), python3-venv for the CloudEvents SDK the
# conformance tests parse the sinks' messages with.
OUTBOXKV_APT_PACKAGES=(libclang-dev clang build-essential cmake pkg-config util-linux nats-server libssl-dev zlib1g-dev libcurl4-openssl-dev default-jre-headless maven postgresql prometheus python3-venv)

outboxkv_install_apt() {
    local missing=()
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    if [ "${#missing[@]}" -gt 0 ]; then
        echo ">> installing: ${missing[*]}" >&2
        local sudo=""
        [ "$(id -u)" -eq 0 ] || sudo="sudo"
        $sudo apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
    fi
}

outboxkv_install_apt "${OUTBOXKV_APT_PACKAGES[@]}"

if ! command -v cargo >/dev/null 2>&1; then
    [ -x "$HOME/.cargo/bin/cargo" ] && export PATH="$HOME/.cargo/bin:$PATH"
fi
if ! command -v cargo >/dev/null 2>&1; then
    echo "error: no Rust toolchain found; install Rust 1.89 or newer (rustup) and re-run" >&2
    exit 1
fi
