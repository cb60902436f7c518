//! Typed table definitions.

use std::fmt;
use std::marker::PhantomData;

use super::key::Key;
use crate::error::{Error, Result};

/// Longest table name, in bytes.
pub const MAX_TABLE_NAME: usize = 64;

/// A typed table: a name plus the key and value types, declared as a constant.
///
/// Keys use the order-preserving [`Key`] encoding, values are any serde type
/// (stored with bincode inside a CRC frame). All tables share one RocksDB
/// column family, each under the prefix `name + 0x00`, so tables need no
/// registration and can be added by a new release without a migration.
///
/// Names are 1 to 64 bytes of ASCII letters, digits, `_`, `-` and `.`; a
/// bad name is reported as [`Error::InvalidTableName`] on first use. Names
/// starting with `outboxkv.` are reserved for the store's own tables (the
/// inbox's positions and dead letters).
///
/// ```
/// use outboxkv::Table;
/// # #[derive(serde::Serialize, serde::Deserialize)] struct Order;
/// const ORDERS: Table<u64, Order> = Table::new("orders");
/// const BY_CUSTOMER: Table<(String, u64), ()> = Table::new("orders.by_customer");
/// const NAMES: Table<str, String> = Table::new("names");
/// assert_eq!(ORDERS.name(), "orders");
/// ```
pub struct Table<K: Key + ?Sized, V> {
    name: &'static str,
    /// One of the store's own tables (name under [`RESERVED_PREFIX`]).
    reserved: bool,
    _types: PhantomData<fn(&K) -> V>,
}

impl<K: Key + ?Sized, V> Table<K, V> {
    /// Declares a table. The name is checked when the table is first used.
    pub const fn new(name: &'static str) -> Self {
        Table {
            name,
            reserved: false,
            _types: PhantomData,
        }
    }

    /// One of the store's own tables; its name must start with
    /// [`RESERVED_PREFIX`].
    #[cfg_attr(not(feature = "rocksdb"), allow(dead_code))]
    pub(crate) const fn reserved(name: &'static str) -> Self {
        Table {
            name,
            reserved: true,
            _types: PhantomData,
        }
    }

    /// The table's name.
    pub const fn name(&self) -> &'static str {
        self.name
    }
}

impl<K: Key + ?Sized, V> Clone for Table<K, V> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<K: Key + ?Sized, V> Copy for Table<K, V> {}

impl<K: Key + ?Sized, V> fmt::Debug for Table<K, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Table({:?})", self.name)
    }
}

/// The prefix of the store's own table names, which user tables may not use.
pub const RESERVED_PREFIX: &str = "outboxkv.";

fn check_name(name: &str, reserved: bool) -> Result<()> {
    let reason = if name.is_empty() {
        "must not be empty"
    } else if name.len() > MAX_TABLE_NAME {
        "must be at most 64 bytes"
    } else if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
    {
        "may only contain ASCII letters, digits, '_', '-' and '.'"
    } else if name.starts_with(RESERVED_PREFIX) != reserved {
        "names starting with \"outboxkv.\" are reserved for the store's own tables"
    } else {
        return Ok(());
    };
    Err(Error::InvalidTableName {
        name: name.to_string(),
        reason,
    })
}

/// Writes the table prefix (`name` + `0x00`) into `out`, after checking the name.
pub(crate) fn table_prefix<K: Key + ?Sized, V>(
    table: &Table<K, V>,
    out: &mut Vec<u8>,
) -> Result<()> {
    let name = table.name;
    check_name(name, table.reserved)?;
    out.extend_from_slice(name.as_bytes());
    out.push(0);
    Ok(())
}

/// The full stored key of `key` in `table`: prefix then key encoding.
pub(crate) fn full_key<K: Key + ?Sized, V>(table: &Table<K, V>, key: &K) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(table.name.len() + 17);
    table_prefix(table, &mut out)?;
    key.encode_key(&mut out);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(check_name("orders.by_customer-2", false).is_ok());
        for bad in [
            "",
            "has space",
            "nul\0",
            "é",
            &"x".repeat(65),
            "outboxkv.inbox",
        ] {
            assert!(
                matches!(check_name(bad, false), Err(Error::InvalidTableName { .. })),
                "{bad:?}"
            );
        }
    }
}
