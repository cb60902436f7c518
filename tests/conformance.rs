//! Conformance with real peers: every message the file, NATS and Kafka sinks
//! produce is parsed by the official CloudEvents SDK for Python (its Kafka
//! binding, its JSON event format; see scripts/ce_check.py), against a real
//! nats-server and a real Kafka broker; the metrics are checked by promtool.

mod common;
#[path = "common/kafka.rs"]
mod kafka;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::{KafkaBroker, NatsServer, cloudevents_parse, promtool_check};
use outboxkv::relay::{
    Relay, RelayMetricFamilies, RelayMetrics, Shutdown, Sink, register_store_metrics,
};
use outboxkv::sink::FileSink;
use outboxkv::sink::cloudevents::{HEADERS_EXTENSION, STRUCTURED_JSON, base64};
use outboxkv::sink::kafka::{KafkaOptions, KafkaSink};
use outboxkv::sink::nats::{ContentMode, NatsOptions, NatsSink, StreamSetup};
use outboxkv::{Event, OutboxEntry, Store};
use serde_json::{Value, json};

use common::TestResult;

const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

/// A store whose next seq is beyond the CloudEvents Integer range (so
/// `outboxseq` must become a String there), with events of every shape.
fn store_with_every_shape(
    dir: &std::path::Path,
) -> Result<(Store, Vec<OutboxEntry>), Box<dyn std::error::Error>> {
    use rocksdb::{ColumnFamilyDescriptor, DB, Options};
    drop(Store::open(dir)?);
    {
        let cfs = ["tables", "outbox", "meta", "dead_letters"]
            .map(|n| ColumnFamilyDescriptor::new(n, Options::default()));
        let db = DB::open_cf_descriptors(&Options::default(), dir.join("db"), cfs)?;
        // Everything up to 2^31 - 3 "pruned": the events get seqs
        // 2^31 - 2 .. 2^31 + 2, across the Integer limit.
        let pruned: u64 = (1 << 31) - 3;
        db.put_cf(
            db.cf_handle("meta").ok_or("cf")?,
            b"outbox.pruned_through",
            pruned.to_be_bytes(),
        )?;
    }
    let store = Store::open(dir)?;
    store.write(|tx| {
        tx.emit(
            Event::json(
                "orders.paid",
                "order-1",
                &json!({"id": 1, "note": "ü \"quoted\""}),
            )?
            .with_header("traceparent", TRACEPARENT)
            .with_header("tracestate", "vendor=1")
            .with_header("tenant", "acme")
            .with_header("X-Request-Id", "r-1")
            .with_header("tenant", "twice"),
        )?;
        tx.emit(Event::bytes(
            "blobs.stored",
            "blob 7",
            vec![0, 159, 146, 150, 255],
        ))?;
        // No key, no payload, no content type.
        tx.emit(Event::bytes("pings", "", Vec::new()).with_content_type(""))?;
        tx.emit(
            Event::bytes("texts", "k", b"plain text".to_vec())
                .with_content_type("text/plain; charset=utf-8"),
        )?;
        tx.emit(Event::json("orders.paid", "order-2", &json!([1, 2, 3]))?)
    })?;
    let entries = store.outbox().read(1, 100)?;
    assert_eq!(entries.len(), 5);
    assert!(entries[4].seq > i32::MAX as u64, "{}", entries[4].seq);
    Ok((store, entries))
}

/// Checks the SDK's parse of `entry`'s message.
fn check_parsed(entry: &OutboxEntry, parsed: &Value, how: &str) -> TestResult {
    assert_eq!(parsed["ok"], true, "{how}: seq {}: {parsed}", entry.seq);
    let a = &parsed["attributes"];
    assert_eq!(a["id"], entry.id.to_string(), "{how}");
    assert_eq!(a["source"], format!("outboxkv:{}", entry.id.store), "{how}");
    assert_eq!(a["type"], entry.event_type, "{how}");
    if entry.key.is_empty() {
        assert!(
            a.get("subject").is_none(),
            "{how}: no subject for an empty key: {a}"
        );
    } else {
        assert_eq!(a["subject"], entry.key, "{how}");
        assert_eq!(a["partitionkey"], entry.key, "{how}");
    }
    if entry.content_type.is_empty() {
        assert!(a.get("datacontenttype").is_none(), "{how}: {a}");
    } else {
        assert_eq!(a["datacontenttype"], entry.content_type, "{how}");
    }
    // outboxseq: an Integer while it fits, else a String; in binary modes
    // every attribute is a string on the wire.
    let seq = &a["outboxseq"];
    assert!(
        seq == &json!(entry.seq) || seq == &json!(entry.seq.to_string()),
        "{how}: outboxseq {seq} for seq {}",
        entry.seq
    );
    if how == "structured" && entry.seq > i32::MAX as u64 {
        assert_eq!(
            seq,
            &json!(entry.seq.to_string()),
            "beyond the Integer range: a String"
        );
    }
    if entry.header("traceparent").is_some() {
        assert_eq!(a["traceparent"], TRACEPARENT, "{how}");
        assert_eq!(a["tracestate"], "vendor=1", "{how}");
        assert_eq!(a["tenant"], "acme", "{how}");
        let rest: Value = serde_json::from_str(
            a[HEADERS_EXTENSION]
                .as_str()
                .ok_or("no headers extension")?,
        )?;
        assert_eq!(
            rest,
            json!([["X-Request-Id", "r-1"], ["tenant", "twice"]]),
            "{how}"
        );
    }
    // The data, as bytes, equals the payload (JSON payloads compared as
    // JSON: the structured format re-serializes them).
    let data = match parsed["data_b64"].as_str() {
        Some(b64) => decode_b64(b64)?,
        None => Vec::new(),
    };
    if entry.content_type.starts_with("application/json") && how == "structured" {
        let want: Value = serde_json::from_slice(&entry.payload)?;
        let got: Value = serde_json::from_slice(&data)?;
        assert_eq!(got, want, "{how}");
    } else {
        assert_eq!(data, entry.payload, "{how}: seq {}", entry.seq);
    }
    Ok(())
}

fn decode_b64(s: &str) -> Result<Vec<u8>, Box<dyn std::error::Error>> {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = Vec::new();
    let mut acc = 0u32;
    let mut bits = 0;
    for c in s.bytes().filter(|&c| c != b'=') {
        let v = A.iter().position(|&x| x == c).ok_or("bad base64")? as u32;
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_sink_lines_parse_with_the_cloudevents_sdk() -> TestResult {
    let dir = tempfile::tempdir()?;
    let (store, entries) = store_with_every_shape(&dir.path().join("store"))?;
    let out = dir.path().join("events.jsonl");
    let relay = Relay::builder(&store).sink(FileSink::open(&out)?).start()?;
    relay
        .wait_delivered(entries[4].seq, Duration::from_secs(10))
        .await?;
    relay.shutdown(Shutdown::Now).await?;
    let text = std::fs::read_to_string(&out)?;
    let messages: Vec<Value> = text
        .lines()
        .map(|l| json!({"mode": "structured", "body": l}))
        .collect();
    assert_eq!(messages.len(), entries.len());
    let parsed = cloudevents_parse(&messages)?;
    for (entry, p) in entries.iter().zip(&parsed) {
        check_parsed(entry, p, "structured")?;
    }
    Ok(())
}

/// Publishes `entries` through a NATS sink in `mode` and returns, per
/// entry, the message for ce_check.py.
async fn via_nats(
    server: &NatsServer,
    prefix: &str,
    mode: ContentMode,
    entries: &[OutboxEntry],
) -> Result<Vec<Value>, Box<dyn std::error::Error>> {
    let stream = format!("S{prefix}");
    let opts = NatsOptions::new(server.url.clone())
        .prefix(prefix)
        .content_mode(mode)
        .create_stream(StreamSetup {
            name: stream.clone(),
            subjects: vec![format!("{prefix}.>")],
            duplicate_window: Duration::from_secs(120),
        });
    let sink = NatsSink::connect(opts).await?;
    let outcomes = sink.publish(entries).await;
    for o in &outcomes {
        assert!(matches!(o, outboxkv::relay::Outcome::Acked { .. }), "{o:?}");
    }
    let s = sink.jetstream().get_stream(&stream).await?;
    let mut out = Vec::new();
    for seq in 1..=entries.len() as u64 {
        let m = s.get_raw_message(seq).await?;
        let headers: HashMap<String, String> = m
            .headers
            .iter()
            .map(|(k, v)| {
                (
                    k.to_string(),
                    v.iter()
                        .map(|x| x.to_string())
                        .collect::<Vec<_>>()
                        .join(","),
                )
            })
            .collect();
        out.push(match mode {
            ContentMode::Structured => {
                assert_eq!(
                    headers.get("content-type").map(String::as_str),
                    Some(STRUCTURED_JSON)
                );
                json!({"mode": "structured", "body": String::from_utf8(m.payload.to_vec())?})
            }
            _ => {
                assert!(
                    !headers.contains_key("content-type"),
                    "binary mode: {headers:?}"
                );
                json!({"mode": "nats-binary", "headers": headers, "body_b64": base64(&m.payload)})
            }
        });
    }
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_messages_parse_with_the_cloudevents_sdk_in_both_modes() -> TestResult {
    let server = NatsServer::start(&[])?;
    let dir = tempfile::tempdir()?;
    let (_store, entries) = store_with_every_shape(&dir.path().join("store"))?;
    for (prefix, mode, how) in [
        ("structured", ContentMode::Structured, "structured"),
        ("binary", ContentMode::Binary, "nats-binary"),
    ] {
        let messages = via_nats(&server, prefix, mode, &entries).await?;
        let parsed = cloudevents_parse(&messages)?;
        for (entry, p) in entries.iter().zip(&parsed) {
            check_parsed(entry, p, how)?;
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_records_parse_with_the_cloudevents_sdk_kafka_binding() -> TestResult {
    use rdkafka::ClientConfig;
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::message::{Headers, Message};
    use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
    let broker = KafkaBroker::start(&[])?;
    let dir = tempfile::tempdir()?;
    let (_store, entries) = store_with_every_shape(&dir.path().join("store"))?;
    kafka::create_topic(&broker.bootstrap, "ce", 1, &[]).await?;
    let sink = KafkaSink::connect(KafkaOptions::new(broker.bootstrap.clone()).topic_template("ce"))
        .await?;
    let outcomes = sink.publish(&entries).await;
    for o in &outcomes {
        assert!(matches!(o, outboxkv::relay::Outcome::Acked { .. }), "{o:?}");
    }
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &broker.bootstrap)
        .set("group.id", "conformance")
        .create()?;
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset("ce", 0, Offset::Beginning)?;
    consumer.assign(&tpl)?;
    let mut messages = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while messages.len() < entries.len() && Instant::now() < deadline {
        let Some(m) = consumer.poll(Duration::from_millis(200)) else {
            continue;
        };
        let m = m?;
        let mut headers = HashMap::new();
        for h in m.headers().ok_or("no headers")?.iter() {
            let v = String::from_utf8(h.value.unwrap_or_default().to_vec())?;
            // The event's own headers may repeat a name (Kafka allows it);
            // the CloudEvents ones and content-type never do.
            let unique = h.key.starts_with("ce_") || h.key == "content-type";
            let previous = headers.insert(h.key.to_string(), v);
            assert!(!(unique && previous.is_some()), "header {} twice", h.key);
        }
        let index = messages.len();
        if entries[index].payload.is_empty() {
            assert!(m.payload().is_none(), "an empty payload is a null value");
        }
        if entries[index].key.is_empty() {
            assert!(m.key().is_none(), "an empty key is a null key");
        }
        messages.push(json!({
            "mode": "kafka",
            "headers": headers,
            "key": m.key().map(|k| String::from_utf8_lossy(k).into_owned()),
            "value_b64": m.payload().map(base64),
        }));
    }
    assert_eq!(messages.len(), entries.len());
    let parsed = cloudevents_parse(&messages)?;
    for (entry, p) in entries.iter().zip(&parsed) {
        check_parsed(entry, p, "kafka")?;
    }
    Ok(())
}

#[test]
fn metrics_pass_promtool_with_labels_and_two_relays_in_one_registry() -> TestResult {
    use prometheus_client::registry::Registry;
    let dir = tempfile::tempdir()?;
    let store = Store::open(dir.path())?;
    let families = RelayMetricFamilies::new();
    let mut registry = Registry::default();
    families.register(&mut registry);
    let a = families.relay(&[("sink", "nats"), ("relay", "orders")]);
    let b = families.relay(&[("sink", "kafka"), ("relay", "payments")]);
    a.acked.inc_by(3);
    a.commit_to_ack_seconds.observe(0.002);
    b.failed.inc();
    register_store_metrics(&mut registry, &store);
    // A lone relay registered on its own passes too.
    let single = RelayMetrics::new();
    let mut alone = Registry::default();
    single.register(&mut alone);
    let mut text = String::new();
    prometheus_client::encoding::prometheus_text::encode(&mut text, &alone)?;
    let (ok, printed) = promtool_check(&text)?;
    assert!(ok, "promtool: {printed}\n{text}");
    let mut text = String::new();
    prometheus_client::encoding::prometheus_text::encode(&mut text, &registry)?;
    let (ok, printed) = promtool_check(&text)?;
    assert!(ok, "promtool: {printed}\n{text}");
    assert!(
        text.contains(r#"outboxkv_relay_acked_total{sink="nats",relay="orders"} 3"#),
        "{text}"
    );
    assert!(
        text.contains("# TYPE outboxkv_relay_acked_total counter"),
        "{text}"
    );
    Ok(())
}
