use std::path::Path;

use rocksdb::{
    ColumnFamilyDescriptor, Direction, IteratorMode, Options, WriteBatch, WriteOptions, DB,
};

use super::{Cf, Engine, Op, Pairs, StorageError};

/// RocksDB engine: one database with a column family per [`Cf`].
pub struct RocksEngine {
    db: DB,
}

fn engine_err(e: rocksdb::Error) -> StorageError {
    StorageError::Engine(e.into_string())
}

impl RocksEngine {
    /// Opens (or creates) the database under `dir`.
    pub fn open(dir: &Path) -> Result<Self, StorageError> {
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        opts.set_paranoid_checks(true);
        let cfs = Cf::ALL.iter().map(|cf| {
            let mut o = Options::default();
            o.set_compression_type(match cf {
                Cf::State => rocksdb::DBCompressionType::Zstd,
                // Chunks are zstd frames already.
                Cf::Chunks => rocksdb::DBCompressionType::None,
                Cf::Log | Cf::Meta => rocksdb::DBCompressionType::Lz4,
            });
            ColumnFamilyDescriptor::new(cf.name(), o)
        });
        let db = DB::open_cf_descriptors(&opts, dir, cfs).map_err(engine_err)?;
        Ok(Self { db })
    }

    fn cf(&self, cf: Cf) -> Result<&rocksdb::ColumnFamily, StorageError> {
        self.db
            .cf_handle(cf.name())
            .ok_or_else(|| StorageError::Engine(format!("missing column family {}", cf.name())))
    }
}

impl Engine for RocksEngine {
    fn get(&self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError> {
        self.db.get_cf(self.cf(cf)?, key).map_err(engine_err)
    }

    fn write(&self, ops: Vec<Op>, sync: bool) -> Result<(), StorageError> {
        let mut batch = WriteBatch::default();
        for op in ops {
            match op {
                Op::Put(cf, k, v) => batch.put_cf(self.cf(cf)?, k, v),
                Op::Delete(cf, k) => batch.delete_cf(self.cf(cf)?, k),
                Op::DeleteRange(cf, from, to) => batch.delete_range_cf(self.cf(cf)?, from, to),
            }
        }
        let mut wo = WriteOptions::default();
        wo.set_sync(sync);
        self.db.write_opt(batch, &wo).map_err(engine_err)
    }

    fn scan(
        &self,
        cf: Cf,
        from: &[u8],
        to: Option<&[u8]>,
        limit: usize,
    ) -> Result<Pairs, StorageError> {
        let mut out = Vec::new();
        let it = self
            .db
            .iterator_cf(self.cf(cf)?, IteratorMode::From(from, Direction::Forward));
        for item in it {
            if out.len() >= limit {
                break;
            }
            let (k, v) = item.map_err(engine_err)?;
            if let Some(to) = to {
                if &k[..] >= to {
                    break;
                }
            }
            out.push((k.into_vec(), v.into_vec()));
        }
        Ok(out)
    }

    fn last_key(&self, cf: Cf, from: &[u8], to: &[u8]) -> Result<Option<Vec<u8>>, StorageError> {
        let mut it = self.db.raw_iterator_cf(self.cf(cf)?);
        it.seek_for_prev(to);
        while it.valid() {
            let Some(k) = it.key() else { break };
            if k < from {
                return Ok(None);
            }
            if k < to {
                return Ok(Some(k.to_vec()));
            }
            it.prev();
        }
        it.status().map_err(engine_err)?;
        Ok(None)
    }
}
