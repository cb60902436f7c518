//! Run-time checks of the engine's internal invariants.
//!
//! [`invariant!`] is a `debug_assert!` that the `invariants` feature turns
//! on in release builds too: the test suite runs `--release` (one RocksDB
//! build for tests and benchmarks) with every feature, so the invariants
//! the code states are checked under the history checker and the crash
//! tests, not only in debug builds.

/// Reports `msg` and aborts the process: an invariant was broken (a bug
/// in outboxkv). Not a panic: unwinding out of the commit pipeline would
/// leave its other committers waiting forever, which a test would show as a
/// hang rather than a failure.
#[cold]
#[inline(never)]
pub(crate) fn violated(msg: std::fmt::Arguments<'_>) -> ! {
    tracing::error!(%msg, "outboxkv invariant violated");
    eprintln!("outboxkv invariant violated: {msg}");
    std::process::abort()
}

/// Checks `cond` in debug builds and with the `invariants` feature.
#[allow(unused_macros)]
macro_rules! invariant {
    ($cond:expr, $($msg:tt)+) => {
        if cfg!(any(debug_assertions, feature = "invariants")) && !$cond {
            $crate::invariant::violated(format_args!($($msg)+));
        }
    };
}

#[allow(unused_imports)]
pub(crate) use invariant;
