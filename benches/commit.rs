//! Commit throughput.
//!
//! - `buffered_1_thread`: one ~200-byte state put plus one ~300-byte event per
//!   commit, outboxkv against a raw RocksDB `WriteBatch` of the same bytes with
//!   the same write options (sync off), in the same run. Target: >= 0.8x raw.
//! - `sync_threads/N`: durable commits from 1, 4 and 16 threads. Target: 16
//!   threads >= 6x the single-thread rate (group commit).
//!
//! Run: `cargo bench --bench commit` (see README for the cached target dir).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use outboxkv::{Durability, Event, Store, Table};
use rocksdb::{WriteBatch, WriteOptions};

#[path = "common/raw.rs"]
mod raw;
use raw::open_raw;

const STATE: Table<u64, Vec<u8>> = Table::new("state");
const STATE_BYTES: usize = 200;
const EVENT_BYTES: usize = 300;

#[allow(clippy::ptr_arg)] // the table's value type is Vec<u8>
fn commit_one(store: &Store, id: u64, state: &Vec<u8>, payload: &[u8]) {
    let r = store.write(|tx| {
        tx.put(&STATE, &id, state)?;
        tx.emit(Event::bytes("bench.changed", "k", payload.to_vec()))
    });
    if let Err(e) = r {
        panic!("commit failed: {e}");
    }
}

fn buffered_single_thread(c: &mut Criterion) {
    let mut group = c.benchmark_group("buffered_1_thread");
    group.throughput(Throughput::Elements(1));
    group.measurement_time(Duration::from_secs(8));
    let state = vec![7u8; STATE_BYTES];
    let payload = vec![9u8; EVENT_BYTES];

    // The raw side gets the same column families and compression as
    // outboxkv's, and is closed (its background flushes finished) before
    // outboxkv is measured.
    let raw_dir = tempfile::tempdir().expect("tempdir");
    let db = open_raw(raw_dir.path()).expect("open raw rocksdb");
    let mut wo = WriteOptions::default();
    wo.set_sync(false);
    let mut seq = 0u64;
    group.bench_function("raw_rocksdb_writebatch", |b| {
        let (t, o) = (
            db.cf_handle("tables").expect("cf"),
            db.cf_handle("outbox").expect("cf"),
        );
        b.iter(|| {
            seq += 1;
            let mut key = b"state\0".to_vec();
            key.extend_from_slice(&(seq % 10_000).to_be_bytes());
            let mut batch = WriteBatch::default();
            batch.put_cf(t, &key, &state);
            batch.put_cf(o, seq.to_be_bytes(), &payload);
            db.write_opt(batch, &wo).expect("raw write");
        })
    });
    drop(db);

    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::options()
        .durability(Durability::Buffered)
        .open(dir.path())
        .expect("open store");
    let mut id = 0u64;
    group.bench_function("outboxkv_write", |b| {
        b.iter(|| {
            id += 1;
            commit_one(&store, id % 10_000, &state, &payload);
        })
    });
    group.finish();
}

fn sync_threads(c: &mut Criterion) {
    let mut group = c.benchmark_group("sync_threads");
    group.throughput(Throughput::Elements(1));
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(10));
    let state = vec![7u8; STATE_BYTES];
    let payload = vec![9u8; EVENT_BYTES];
    for threads in [1usize, 4, 16] {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::options()
            .durability(Durability::Sync)
            .open(dir.path())
            .expect("open store");
        let next_id = Arc::new(AtomicU64::new(0));
        group.bench_function(format!("{threads}"), |b| {
            b.iter_custom(|iters| {
                let per_thread = iters.div_ceil(threads as u64);
                let barrier = Arc::new(Barrier::new(threads + 1));
                let handles: Vec<_> = (0..threads)
                    .map(|_| {
                        let (store, barrier, next_id) =
                            (store.clone(), barrier.clone(), next_id.clone());
                        let (state, payload) = (state.clone(), payload.clone());
                        thread::spawn(move || {
                            barrier.wait();
                            for _ in 0..per_thread {
                                let id = next_id.fetch_add(1, Ordering::Relaxed) % 10_000;
                                commit_one(&store, id, &state, &payload);
                            }
                        })
                    })
                    .collect();
                barrier.wait();
                let start = Instant::now();
                for h in handles {
                    h.join().expect("bench thread");
                }
                // Time per commit, so criterion's throughput is commits/s.
                start
                    .elapsed()
                    .mul_f64(iters as f64 / (per_thread * threads as u64) as f64)
            })
        });
    }
    group.finish();
}

criterion_group!(benches, buffered_single_thread, sync_threads);
criterion_main!(benches);
