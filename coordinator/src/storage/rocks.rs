use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::Arc;

use prost::Message as _;
use rocksdb::{
    ColumnFamilyDescriptor, Direction, IngestExternalFileOptions, IteratorMode, Options,
    SstFileWriter, WriteBatch, WriteOptions, DB,
};

use custody_proto::cluster::v1 as pb;

use super::engine::state_upper_bound;
use super::{Cf, Engine, Op, Pairs, Stage, StateView, StorageError};

/// Meta key of an install in progress (a [`pb::StagedInstall`]).
const KEY_INSTALLING: &[u8] = b"snapshot_install";
/// Largest SST file a stage writes before starting the next.
const STAGE_FILE_BYTES: u64 = 256 << 20;

/// RocksDB engine: one database with a column family per [`Cf`].
pub struct RocksEngine {
    db: Arc<DB>,
    /// Where received snapshot images are staged: a sibling of the database
    /// directory, on the same file system, so installing links files.
    staging: PathBuf,
}

fn engine_err(e: rocksdb::Error) -> StorageError {
    StorageError::Engine(e.into_string())
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl Fn(std::io::Error) -> StorageError + 'a {
    move |e| StorageError::Engine(format!("{what} {}: {e}", path.display()))
}

fn cf_options(cf: Cf) -> Options {
    let mut o = Options::default();
    o.set_compression_type(match cf {
        Cf::State | Cf::Meta => rocksdb::DBCompressionType::Zstd,
        // Chunks are zstd frames already, and the log is short-lived and
        // mostly evidence batches. (LZ4 is not linked: its bundled xxhash
        // clashes with libpg_query's.)
        Cf::Chunks | Cf::Log => rocksdb::DBCompressionType::None,
    });
    o
}

impl RocksEngine {
    /// Opens (or creates) the database under `dir`.
    pub fn open(dir: &Path) -> Result<Self, StorageError> {
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        opts.set_paranoid_checks(true);
        let cfs = Cf::ALL
            .iter()
            .map(|cf| ColumnFamilyDescriptor::new(cf.name(), cf_options(*cf)));
        let db = DB::open_cf_descriptors(&opts, dir, cfs).map_err(engine_err)?;
        let mut staging = dir.as_os_str().to_owned();
        staging.push(".staging");
        Ok(Self {
            db: Arc::new(db),
            staging: PathBuf::from(staging),
        })
    }

    fn cf(&self, cf: Cf) -> Result<&rocksdb::ColumnFamily, StorageError> {
        cf_handle(&self.db, cf)
    }

    /// The first install step: the durable marker. From here the install is
    /// finished even across a crash; the staged files stay until it is.
    fn mark_install(
        &self,
        mut stage: RocksStage,
        meta: Vec<Op>,
    ) -> Result<pb::StagedInstall, StorageError> {
        if !stage.finished {
            return Err(StorageError::Engine(
                "snapshot image installed before it was finished".into(),
            ));
        }
        let mut marker = pb::StagedInstall {
            dir: stage.dir.to_string_lossy().into_owned(),
            meta: Vec::new(),
        };
        for op in meta {
            match op {
                Op::Put(Cf::Meta, key, value) => marker.meta.push(pb::SnapshotPair {
                    key: key.into(),
                    value: value.into(),
                }),
                other => {
                    return Err(StorageError::Engine(format!(
                        "snapshot install takes meta puts only, not {other:?}"
                    )))
                }
            }
        }
        stage.installed = true;
        self.write(
            vec![Op::Put(
                Cf::Meta,
                KEY_INSTALLING.to_vec(),
                marker.encode_to_vec(),
            )],
            true,
        )?;
        Ok(marker)
    }

    /// The install steps after the marker is durable; each may run again.
    fn finish_install(&self, marker: &pb::StagedInstall) -> Result<(), StorageError> {
        let dir = PathBuf::from(&marker.dir);
        let mut clear = WriteBatch::default();
        for cf in [Cf::State, Cf::Chunks] {
            clear.delete_range_cf(self.cf(cf)?, Vec::new(), state_upper_bound());
        }
        clear.delete_range_cf(self.cf(Cf::Log)?, Vec::new(), vec![0xff; 9]);
        self.db.write(clear).map_err(engine_err)?;
        let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
            .map_err(io_err("read staged snapshot", &dir))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "sst"))
            .collect();
        files.sort();
        for f in files {
            let name = f.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            let cf = if name.starts_with(Cf::Chunks.name()) {
                Cf::Chunks
            } else if name.starts_with(Cf::State.name()) {
                Cf::State
            } else {
                continue;
            };
            // RocksDB moves the file it ingests; it ingests a link, so the
            // staged file stays until the install is complete.
            let link = f.with_extension("ingest");
            let _ = std::fs::remove_file(&link);
            std::fs::hard_link(&f, &link).map_err(io_err("link staged file", &f))?;
            let mut io = IngestExternalFileOptions::default();
            io.set_move_files(true);
            self.db
                .ingest_external_file_cf_opts(self.cf(cf)?, &io, vec![&link])
                .map_err(engine_err)?;
        }
        let mut done = WriteBatch::default();
        let meta = self.cf(Cf::Meta)?;
        for p in &marker.meta {
            done.put_cf(meta, &p.key, &p.value);
        }
        done.delete_cf(meta, KEY_INSTALLING);
        let mut wo = WriteOptions::default();
        wo.set_sync(true);
        self.db.write_opt(done, &wo).map_err(engine_err)?;
        let _ = std::fs::remove_dir_all(&dir);
        Ok(())
    }
}

fn cf_handle(db: &DB, cf: Cf) -> Result<&rocksdb::ColumnFamily, StorageError> {
    db.cf_handle(cf.name())
        .ok_or_else(|| StorageError::Engine(format!("missing column family {}", cf.name())))
}

type ScanRequest = (
    Cf,
    Vec<u8>,
    usize,
    mpsc::SyncSender<Result<Pairs, StorageError>>,
);

/// A RocksDB snapshot held by a thread of its own (the snapshot borrows the
/// database, so the thread owns both); scans are requests to that thread.
/// Dropping the view ends the thread and releases the snapshot.
pub struct RocksView {
    requests: mpsc::Sender<ScanRequest>,
}

impl StateView for RocksView {
    fn scan(&self, cf: Cf, from: &[u8], max_bytes: usize) -> Result<Pairs, StorageError> {
        let (tx, rx) = mpsc::sync_channel(1);
        self.requests
            .send((cf, from.to_vec(), max_bytes, tx))
            .map_err(|_| StorageError::Engine("snapshot view thread ended".into()))?;
        rx.recv()
            .map_err(|_| StorageError::Engine("snapshot view thread ended".into()))?
    }
}

fn view_thread(db: Arc<DB>, pinned: mpsc::SyncSender<()>, requests: mpsc::Receiver<ScanRequest>) {
    let snap = db.snapshot();
    if pinned.send(()).is_err() {
        return;
    }
    while let Ok((cf, from, max_bytes, reply)) = requests.recv() {
        let scan = || -> Result<Pairs, StorageError> {
            let mut out = Vec::new();
            let mut bytes = 0;
            // A snapshot is read once: keep it out of the block cache.
            let mut ro = rocksdb::ReadOptions::default();
            ro.fill_cache(false);
            let it = snap.iterator_cf_opt(
                cf_handle(&db, cf)?,
                ro,
                IteratorMode::From(&from, Direction::Forward),
            );
            for item in it {
                if bytes >= max_bytes {
                    break;
                }
                let (k, v) = item.map_err(engine_err)?;
                bytes += k.len() + v.len();
                out.push((k.into_vec(), v.into_vec()));
            }
            Ok(out)
        };
        let _ = reply.send(scan());
    }
}

/// A snapshot image staged as SST files, one series per column family.
pub struct RocksStage {
    dir: PathBuf,
    writer: Option<(Cf, SstFileWriter<'static>)>,
    options: [(Cf, &'static Options); 2],
    files: u32,
    finished: bool,
    installed: bool,
}

/// SST writers borrow their options; the two sets used live for the process.
fn stage_options() -> [(Cf, &'static Options); 2] {
    static OPTS: std::sync::OnceLock<(Options, Options)> = std::sync::OnceLock::new();
    let (s, c) = OPTS.get_or_init(|| (cf_options(Cf::State), cf_options(Cf::Chunks)));
    [(Cf::State, s), (Cf::Chunks, c)]
}

impl RocksStage {
    fn close_writer(&mut self) -> Result<(), StorageError> {
        if let Some((_, mut w)) = self.writer.take() {
            w.finish().map_err(engine_err)?;
        }
        Ok(())
    }
}

impl Stage for RocksStage {
    fn put(&mut self, cf: Cf, key: &[u8], value: &[u8]) -> Result<(), StorageError> {
        let rotate = match &self.writer {
            Some((c, w)) => *c != cf || w.file_size() >= STAGE_FILE_BYTES,
            None => true,
        };
        if rotate {
            self.close_writer()?;
            let opts = self
                .options
                .iter()
                .find(|(c, _)| *c == cf)
                .map(|(_, o)| *o)
                .ok_or_else(|| StorageError::Engine(format!("cannot stage {}", cf.name())))?;
            let w = SstFileWriter::create(opts);
            self.files += 1;
            let path = self
                .dir
                .join(format!("{}-{:06}.sst", cf.name(), self.files));
            w.open(&path).map_err(engine_err)?;
            self.writer = Some((cf, w));
        }
        if let Some((_, w)) = &mut self.writer {
            w.put(key, value).map_err(|e| StorageError::Corrupt {
                what: "snapshot image",
                detail: e.into_string(),
            })?;
        }
        Ok(())
    }

    fn finish(&mut self) -> Result<(), StorageError> {
        self.close_writer()?;
        self.finished = true;
        Ok(())
    }
}

impl Drop for RocksStage {
    fn drop(&mut self) {
        if !self.installed {
            self.writer = None;
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

impl Engine for RocksEngine {
    type View = RocksView;
    type Stage = RocksStage;

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

    fn pin(&self) -> Result<RocksView, StorageError> {
        let (pinned_tx, pinned) = mpsc::sync_channel(1);
        let (requests, rx) = mpsc::channel();
        let db = self.db.clone();
        std::thread::Builder::new()
            .name("snapshot-view".into())
            .spawn(move || view_thread(db, pinned_tx, rx))
            .map_err(|e| StorageError::Engine(format!("start snapshot view thread: {e}")))?;
        pinned
            .recv()
            .map_err(|_| StorageError::Engine("snapshot view thread ended".into()))?;
        Ok(RocksView { requests })
    }

    fn stage(&self) -> Result<RocksStage, StorageError> {
        let dir = self.staging.join(format!("{:016x}", rand::random::<u64>()));
        std::fs::create_dir_all(&dir).map_err(io_err("create staging dir", &dir))?;
        Ok(RocksStage {
            dir,
            writer: None,
            options: stage_options(),
            files: 0,
            finished: false,
            installed: false,
        })
    }

    fn install(&self, stage: RocksStage, meta: Vec<Op>) -> Result<(), StorageError> {
        let marker = self.mark_install(stage, meta)?;
        self.finish_install(&marker)
    }

    fn recover(&self) -> Result<(), StorageError> {
        let mut keep = None;
        if let Some(b) = self.get(Cf::Meta, KEY_INSTALLING)? {
            let marker = pb::StagedInstall::decode(&b[..]).map_err(|e| StorageError::Corrupt {
                what: "snapshot install marker",
                detail: e.to_string(),
            })?;
            tracing::warn!(dir = %marker.dir, "finishing a snapshot install that a stop interrupted");
            keep = Some(PathBuf::from(&marker.dir));
            self.finish_install(&marker)?;
        }
        // Images received but never installed.
        if let Ok(rd) = std::fs::read_dir(&self.staging) {
            for e in rd.flatten() {
                if Some(e.path()) != keep {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(e: &RocksEngine, cf: Cf) -> Vec<String> {
        e.scan(cf, b"", None, usize::MAX)
            .unwrap()
            .into_iter()
            .map(|(k, _)| String::from_utf8(k).unwrap())
            .collect()
    }

    fn fill(e: &RocksEngine, tag: &str) {
        let mut ops = vec![Op::Put(
            Cf::Log,
            vec![0, 0, 0, 0, 0, 0, 0, 9],
            b"entry".to_vec(),
        )];
        for i in 0..5 {
            ops.push(Op::Put(
                Cf::State,
                format!("kv/{tag}{i}").into_bytes(),
                vec![1; 100],
            ));
            ops.push(Op::Put(
                Cf::Chunks,
                format!("ev/c/{tag}{i}").into_bytes(),
                vec![2; 100],
            ));
        }
        e.write(ops, true).unwrap();
    }

    /// Stages the view's pairs into `to`.
    fn stage_from(view: &RocksView, to: &RocksEngine) -> RocksStage {
        let mut stage = to.stage().unwrap();
        for cf in [Cf::State, Cf::Chunks] {
            for (k, v) in view.scan(cf, b"", usize::MAX).unwrap() {
                stage.put(cf, &k, &v).unwrap();
            }
        }
        stage.finish().unwrap();
        stage
    }

    /// A pinned view does not see later writes; an installed image replaces
    /// the state and chunks and empties the log; and an install cut short
    /// after its marker is finished when the engine opens again.
    #[test]
    fn views_stages_and_installs_that_survive_a_crash() {
        let dir = tempfile::tempdir().unwrap();
        let src = RocksEngine::open(&dir.path().join("a")).unwrap();
        fill(&src, "a");
        let view = src.pin().unwrap();
        fill(&src, "late");
        assert_eq!(view.scan(Cf::State, b"", usize::MAX).unwrap().len(), 5);
        assert_eq!(
            view.scan(Cf::Chunks, b"ev/c/a3", usize::MAX).unwrap().len(),
            2
        );
        // The batch limit: at least one pair, then stop past the limit.
        assert_eq!(view.scan(Cf::State, b"", 1).unwrap().len(), 1);

        let dst_dir = dir.path().join("b");
        let dst = RocksEngine::open(&dst_dir).unwrap();
        fill(&dst, "old");
        let meta = || vec![Op::Put(Cf::Meta, b"applied".to_vec(), b"42".to_vec())];
        dst.install(stage_from(&view, &dst), meta()).unwrap();
        assert_eq!(
            pairs(&dst, Cf::State),
            ["kv/a0", "kv/a1", "kv/a2", "kv/a3", "kv/a4"]
        );
        assert_eq!(pairs(&dst, Cf::Chunks).len(), 5);
        assert!(pairs(&dst, Cf::Log).is_empty());
        assert_eq!(dst.get(Cf::Meta, b"applied").unwrap(), Some(b"42".to_vec()));
        assert!(std::fs::read_dir(&dst.staging).unwrap().next().is_none());

        // A crash right after the marker: the next open finishes the install.
        fill(&dst, "old");
        let marker = dst.mark_install(stage_from(&view, &dst), meta()).unwrap();
        assert!(std::path::Path::new(&marker.dir).exists());
        drop(dst);
        let dst = RocksEngine::open(&dst_dir).unwrap();
        assert!(pairs(&dst, Cf::State).contains(&"kv/old0".to_string()));
        dst.recover().unwrap();
        assert_eq!(pairs(&dst, Cf::State).len(), 5);
        assert!(!pairs(&dst, Cf::State).contains(&"kv/old0".to_string()));
        assert!(dst.get(Cf::Meta, KEY_INSTALLING).unwrap().is_none());
        assert!(!std::path::Path::new(&marker.dir).exists());

        // An image received but never installed is dropped on open.
        let stage = stage_from(&view, &dst);
        let left = stage.dir.clone();
        std::mem::forget(stage);
        drop(dst);
        let dst = RocksEngine::open(&dst_dir).unwrap();
        dst.recover().unwrap();
        assert!(!left.exists());
        assert_eq!(pairs(&dst, Cf::State).len(), 5);

        // Keys out of order are refused while staging.
        let mut stage = dst.stage().unwrap();
        stage.put(Cf::State, b"kv/b", b"").unwrap();
        assert!(stage.put(Cf::State, b"kv/a", b"").is_err());
    }
}
