"""Parses messages with the official CloudEvents SDK for Python.

Reads one JSON object per line on stdin, each a message a sink produced:

  {"mode": "structured", "body": "<the JSON text>"}
  {"mode": "kafka", "headers": {"ce_id": "...", ...}, "key": "...", "value_b64": "..." | null}
  {"mode": "nats-binary", "headers": {"ce-id": "...", ...}, "body_b64": "..."}

and prints one JSON object per line: {"ok": true, "attributes": {...},
"data_b64": ...} with the attributes the SDK parsed, or {"ok": false,
"error": "..."}. Besides what the SDK enforces, it checks the rules of the
CloudEvents 1.0 spec the SDK leaves out: required attributes non-empty
strings, subject non-empty when present, time RFC 3339, extension names
lower-case alphanumeric, Integer attributes within 32 bits.

Kafka records go through the SDK's Kafka binding (cloudevents.kafka.from_binary),
structured messages through its JSON event format (cloudevents.http.from_json).
The SDK has no NATS binding: binary NATS messages (the binding's 1.0.3 draft)
go through its HTTP binary-mode parser after the draft's differences are
undone (percent-decoded values, ce-datacontenttype as Content-Type).
"""

import base64
import datetime
import json
import re
import sys
import urllib.parse

from cloudevents.http import from_http, from_json
from cloudevents.kafka import KafkaMessage, from_binary

EXT = re.compile(r"^[a-z0-9]{1,20}$")


def identity(data):
    return data


def check(attrs):
    for name in ("id", "source", "type", "specversion"):
        v = attrs.get(name)
        if not isinstance(v, str) or not v:
            raise ValueError(f"{name} must be a non-empty string, got {v!r}")
    if attrs["specversion"] != "1.0":
        raise ValueError("specversion must be 1.0")
    if "subject" in attrs and not attrs["subject"]:
        raise ValueError("subject must not be empty")
    if "time" in attrs:
        t = attrs["time"]
        if isinstance(t, str):
            datetime.datetime.fromisoformat(t.replace("Z", "+00:00"))
    for name, v in attrs.items():
        if not EXT.match(name) and name not in ("data_base64",):
            raise ValueError(f"attribute name {name!r} is not valid")
        if isinstance(v, int) and not -(2**31) <= v < 2**31:
            raise ValueError(f"{name} = {v} is outside the CloudEvents Integer range")
        if v == "" and name not in ("data",):
            raise ValueError(f"attribute {name} is empty")


def parse(msg):
    mode = msg["mode"]
    if mode == "structured":
        event = from_json(msg["body"], data_unmarshaller=identity)
    elif mode == "kafka":
        headers = {k: v.encode() for k, v in msg["headers"].items()}
        value = msg.get("value_b64")
        value = base64.b64decode(value) if value is not None else None
        key = msg.get("key")
        event = from_binary(
            KafkaMessage(headers=headers, key=key, value=value), data_unmarshaller=identity
        )
    elif mode == "nats-binary":
        headers = {}
        for k, v in msg["headers"].items():
            lk = k.lower()
            if lk == "ce-datacontenttype":
                headers["content-type"] = urllib.parse.unquote(v)
            elif lk.startswith("ce-"):
                headers[lk] = urllib.parse.unquote(v)
        event = from_http(headers, base64.b64decode(msg["body_b64"]), data_unmarshaller=identity)
    else:
        raise ValueError(f"unknown mode {mode}")
    attrs = dict(event.get_attributes())
    for k, v in list(attrs.items()):
        if isinstance(v, (datetime.datetime,)):
            attrs[k] = v.isoformat()
    check(attrs)
    data = event.get_data()
    if isinstance(data, str):
        data = data.encode()
    elif data is not None and not isinstance(data, (bytes, bytearray)):
        data = json.dumps(data).encode()
    return {
        "ok": True,
        "attributes": attrs,
        "data_b64": base64.b64encode(data).decode() if data is not None else None,
    }


for line in sys.stdin:
    line = line.strip()
    if not line:
        continue
    try:
        out = parse(json.loads(line))
    except Exception as e:  # every failure is reported, none hidden
        out = {"ok": False, "error": f"{type(e).__name__}: {e}"}
    print(json.dumps(out, default=str), flush=True)
