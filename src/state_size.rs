//! `recstream state-size`: the live keys and bytes of every RocksDB database
//! under a directory, per column family.
//!
//! What a state directory holds on disk depends on when the memtables were
//! last flushed, on the write-ahead log and on compaction; the live key and
//! value bytes do not. They size a deployment, and they compare the engine's
//! state with any other RocksDB-backed processor's (the Kafka Streams peer's
//! state directory is read the same way).

use std::path::{Path, PathBuf};

use rocksdb::{Options, DB};
use serde::Serialize;

#[derive(Debug, thiserror::Error)]
pub enum StateSizeError {
    #[error("reading {path}: {source}")]
    Walk {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("opening the RocksDB database {path} read-only: {source}")]
    Open {
        path: PathBuf,
        source: rocksdb::Error,
    },
    #[error("reading column family {cf} of {path}: {source}")]
    Read {
        path: PathBuf,
        cf: String,
        source: rocksdb::Error,
    },
}

/// One column family's live entries.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct FamilySize {
    pub name: String,
    pub keys: u64,
    pub key_bytes: u64,
    pub value_bytes: u64,
}

/// One database (a directory with a `CURRENT` file).
#[derive(Debug, Clone, Serialize)]
pub struct DatabaseSize {
    pub path: PathBuf,
    pub column_families: Vec<FamilySize>,
}

/// Every database under a directory, and their sums.
#[derive(Debug, Clone, Serialize)]
pub struct StateSize {
    pub databases: Vec<DatabaseSize>,
    pub keys: u64,
    /// Key plus value bytes of every live entry.
    pub bytes: u64,
}

/// Reads every RocksDB database at or below `root`, read-only (the write-ahead
/// log is replayed in memory, nothing is written). Stop the process that owns
/// a database first: RocksDB lets a read-only reader in beside a writer, but
/// it then sees the state as of its opening.
pub fn measure(root: &Path) -> Result<StateSize, StateSizeError> {
    let mut dirs = Vec::new();
    find_databases(root, &mut dirs)?;
    dirs.sort();
    let mut databases = Vec::new();
    for path in dirs {
        databases.push(database(&path)?);
    }
    let families = || databases.iter().flat_map(|d| &d.column_families);
    Ok(StateSize {
        keys: families().map(|f| f.keys).sum(),
        bytes: families().map(|f| f.key_bytes + f.value_bytes).sum(),
        databases,
    })
}

fn find_databases(dir: &Path, out: &mut Vec<PathBuf>) -> Result<(), StateSizeError> {
    let walk = |source| StateSizeError::Walk {
        path: dir.to_path_buf(),
        source,
    };
    if dir.join("CURRENT").is_file() {
        out.push(dir.to_path_buf());
        return Ok(());
    }
    for entry in std::fs::read_dir(dir).map_err(walk)? {
        let entry = entry.map_err(walk)?;
        if entry.file_type().map_err(walk)?.is_dir() {
            find_databases(&entry.path(), out)?;
        }
    }
    Ok(())
}

fn database(path: &Path) -> Result<DatabaseSize, StateSizeError> {
    let open = |source| StateSizeError::Open {
        path: path.to_path_buf(),
        source,
    };
    let opts = Options::default();
    let names = DB::list_cf(&opts, path).map_err(open)?;
    let db = DB::open_cf_for_read_only(&opts, path, &names, false).map_err(open)?;
    let mut column_families = Vec::new();
    for name in names {
        let cf = db.cf_handle(&name).expect("opened with this column family");
        let mut size = FamilySize {
            name: name.clone(),
            keys: 0,
            key_bytes: 0,
            value_bytes: 0,
        };
        for entry in db.iterator_cf(cf, rocksdb::IteratorMode::Start) {
            let (key, value) = entry.map_err(|source| StateSizeError::Read {
                path: path.to_path_buf(),
                cf: name.clone(),
                source,
            })?;
            size.keys += 1;
            size.key_bytes += key.len() as u64;
            size.value_bytes += value.len() as u64;
        }
        column_families.push(size);
    }
    Ok(DatabaseSize {
        path: path.to_path_buf(),
        column_families,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_the_live_entries_of_every_database_and_family() {
        let dir = tempfile::tempdir().unwrap();
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        {
            let a = DB::open_cf(&opts, dir.path().join("a"), ["users"]).unwrap();
            a.put(b"k1", b"value").unwrap();
            let users = a.cf_handle("users").unwrap();
            a.put_cf(users, b"alice", b"0123456789").unwrap();
            a.put_cf(users, b"bob", b"01").unwrap();
            // Overwritten and deleted entries are not live.
            a.put_cf(users, b"bob", b"012").unwrap();
            a.put_cf(users, b"carol", b"x").unwrap();
            a.delete_cf(users, b"carol").unwrap();
            let b = DB::open(&opts, dir.path().join("nested/b")).unwrap();
            b.put(b"key", b"v").unwrap();
        }
        let size = measure(dir.path()).unwrap();
        assert_eq!(size.databases.len(), 2);
        let a = &size.databases[0];
        assert!(a.path.ends_with("a"));
        let users = a
            .column_families
            .iter()
            .find(|f| f.name == "users")
            .unwrap();
        assert_eq!(
            users,
            &FamilySize {
                name: "users".into(),
                keys: 2,
                key_bytes: 5 + 3,
                value_bytes: 10 + 3,
            }
        );
        assert_eq!(size.keys, 4);
        assert_eq!(size.bytes, (2 + 5) + (5 + 3 + 10 + 3) + (3 + 1));
    }
}
