#!/usr/bin/env bash
# A Python virtual environment with the official CloudEvents SDK for Python
# (PyPI `cloudevents`, pinned), for the conformance tests: they parse every
# message the sinks produce with it (scripts/ce_check.py).
#
#   scripts/cloudevents.sh python
#       creates $OUTBOXKV_VENV (default ~/.cache/outboxkv/venv) if needed
#       and prints the path of its python
set -euo pipefail
VERSION="${OUTBOXKV_CLOUDEVENTS_VERSION:-1.11.0}"
VENV="${OUTBOXKV_VENV:-$HOME/.cache/outboxkv/venv}"
case "${1:-}" in
python)
    if [ ! -f "$VENV/.cloudevents-$VERSION" ]; then
        py=python3
        [ -x /usr/bin/python3 ] && py=/usr/bin/python3
        "$py" -m venv "$VENV" >&2 || { echo "error: python3 -m venv failed (install python3-venv)" >&2; exit 1; }
        "$VENV/bin/pip" install -q --disable-pip-version-check "cloudevents==$VERSION" >&2 \
            || { echo "error: pip install cloudevents==$VERSION failed" >&2; exit 1; }
        touch "$VENV/.cloudevents-$VERSION"
    fi
    echo "$VENV/bin/python"
    ;;
*)
    echo "usage: $0 python" >&2
    exit 2
    ;;
esac
