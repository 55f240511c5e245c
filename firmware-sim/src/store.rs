//! Durable state of the simulated registers and of the simulated OFD, in redb.
//!
//! # Durability
//! * A register's state and the document its FN formed are written **in one transaction**, and the
//!   register answers only after that transaction is durable. A real FN writes the document before
//!   the KKT prints or answers; a restarted simulator therefore never "forgets" a document whose
//!   result someone saw, and the agent's crash recovery (read the last FD, read the archive) finds
//!   every document that was ever reported.
//! * An OFD acknowledgement is applied to the register state and written without waiting: if it is
//!   lost in a crash, the register sends that document again and the OFD, which deduplicates by
//!   (FN, FD), acknowledges it again. Nothing is lost, nothing is counted twice.
//! * The OFD answers a container only after the document is durable in its own store.
//!
//! # Group commit
//! redb admits one writer and a durable commit costs an fsync (≈ 4 ms here), so one commit per
//! document would cap a process near 250 documents/s. All writes go through one writer thread that
//! takes every request waiting in its queue and commits them together; each caller is told when
//! the commit holding its write is durable.

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction};
use std::path::Path;
use std::sync::Arc;
use thiserror::Error;
use tokio::sync::{mpsc, oneshot};

/// Register state by factory number (postcard of `register::Register`).
pub const REGISTERS: TableDefinition<&str, &[u8]> = TableDefinition::new("registers");
/// FN archive: (FN number, FD number) → document TLV bytes.
pub const ARCHIVE: TableDefinition<(&str, u32), &[u8]> = TableDefinition::new("fn_archive");
/// Settings of the process that made the store (ZN base).
pub const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");

/// Why the store failed. Disk errors are not retried: a simulator that cannot persist must stop
/// answering rather than pretend a document is safe.
#[derive(Debug, Error)]
pub enum StoreError {
    #[error("cannot open the store at {path}: {source}")]
    Open {
        path: String,
        source: redb::DatabaseError,
    },
    #[error("storage error: {0}")]
    Redb(#[from] redb::Error),
    #[error("stored record is unreadable ({0}); the state directory may be damaged")]
    Corrupt(String),
    #[error("the store's writer thread has stopped")]
    Closed,
}

macro_rules! from_redb {
    ($($t:ty),*) => {$(
        impl From<$t> for StoreError {
            fn from(e: $t) -> Self {
                StoreError::Redb(e.into())
            }
        }
    )*};
}
from_redb!(
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

type WriteFn = Box<dyn FnOnce(&WriteTransaction) -> Result<(), StoreError> + Send>;

struct Job {
    write: WriteFn,
    done: Option<oneshot::Sender<Result<(), String>>>,
}

/// A queued write; [`Pending::durable`] resolves when the commit holding it is on disk. Dropping it
/// leaves the write queued (see "Durability" for the writes that need not be waited for).
pub struct Pending(Option<oneshot::Receiver<Result<(), String>>>);

impl Pending {
    pub async fn durable(self) -> Result<(), StoreError> {
        match self.0 {
            None => Err(StoreError::Closed),
            Some(rx) => match rx.await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(StoreError::Corrupt(e)),
                Err(_) => Err(StoreError::Closed),
            },
        }
    }
}

/// A redb database with a group-commit writer thread.
#[derive(Clone)]
pub struct Store {
    db: Arc<Database>,
    tx: mpsc::UnboundedSender<Job>,
}

/// At most this many writes share one transaction, so that one commit never holds a caller for
/// longer than the others need.
const MAX_BATCH: usize = 4096;

impl Store {
    /// Opens (or creates) the database and runs `init` once, to create the tables its users read,
    /// so that a reader never meets a missing table.
    pub fn open(
        path: &Path,
        init: impl FnOnce(&WriteTransaction) -> Result<(), StoreError>,
    ) -> Result<Store, StoreError> {
        let db = Database::create(path).map_err(|source| StoreError::Open {
            path: path.display().to_string(),
            source,
        })?;
        let db = Arc::new(db);
        {
            let txn = db.begin_write()?;
            init(&txn)?;
            txn.commit()?;
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let writer_db = db.clone();
        std::thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || writer(writer_db, rx))
            .map_err(|e| StoreError::Corrupt(format!("cannot start the writer thread: {e}")))?;
        Ok(Store { db, tx })
    }

    pub fn read(&self) -> Result<redb::ReadTransaction, StoreError> {
        Ok(self.db.begin_read()?)
    }

    /// A synchronous write outside the group commit, for start-up before any task runs.
    pub fn write_now(
        &self,
        write: impl FnOnce(&WriteTransaction) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        let txn = self.db.begin_write()?;
        write(&txn)?;
        txn.commit()?;
        Ok(())
    }

    /// Queues `write` for the next group commit and returns at once. Writes are applied in queue
    /// order, so a caller that must not be overtaken (a register's state snapshot) queues while it
    /// still holds the lock the snapshot was taken under, and awaits [`Pending::durable`] after.
    pub fn enqueue(
        &self,
        write: impl FnOnce(&WriteTransaction) -> Result<(), StoreError> + Send + 'static,
    ) -> Pending {
        let (done, rx) = oneshot::channel();
        let sent = self.tx.send(Job {
            write: Box::new(write),
            done: Some(done),
        });
        Pending(sent.is_ok().then_some(rx))
    }

    /// Runs `write` in the next group commit and returns once that commit is durable.
    pub async fn commit(
        &self,
        write: impl FnOnce(&WriteTransaction) -> Result<(), StoreError> + Send + 'static,
    ) -> Result<(), StoreError> {
        self.enqueue(write).durable().await
    }

    pub fn get(
        &self,
        table: TableDefinition<&str, &[u8]>,
        key: &str,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(table)?;
        let value = t.get(key)?.map(|v| v.value().to_vec());
        Ok(value)
    }

    pub fn all(
        &self,
        table: TableDefinition<&str, &[u8]>,
    ) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(table)?;
        let mut out = Vec::new();
        for row in t.iter()? {
            let (k, v) = row?;
            out.push((k.value().to_owned(), v.value().to_vec()));
        }
        Ok(out)
    }

    /// One document from an FN archive.
    pub fn archive_document(
        &self,
        fn_number: &str,
        fd: u32,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(ARCHIVE)?;
        let value = t.get((fn_number, fd))?.map(|v| v.value().to_vec());
        Ok(value)
    }

    /// Documents of one FN with FD numbers in `from..=to`, in FD order.
    pub fn archive_range(
        &self,
        fn_number: &str,
        from: u32,
        to: u32,
    ) -> Result<Vec<(u32, Vec<u8>)>, StoreError> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(ARCHIVE)?;
        let mut out = Vec::new();
        for row in t.range((fn_number, from)..=(fn_number, to))? {
            let (k, v) = row?;
            out.push((k.value().1, v.value().to_vec()));
        }
        Ok(out)
    }
}

fn writer(db: Arc<Database>, mut rx: mpsc::UnboundedReceiver<Job>) {
    while let Some(first) = rx.blocking_recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        let outcome = run_batch(&db, &mut batch);
        if let Err(e) = &outcome {
            tracing::error!(error = %e, writes = batch.len(), "group commit failed");
        }
        for job in batch {
            if let Some(done) = job.done {
                let _ = done.send(outcome.clone());
            }
        }
    }
}

/// Applies every write of the batch in one transaction. A write that fails fails the whole batch:
/// partial batches would make "acknowledged after commit" depend on what else was queued.
fn run_batch(db: &Database, batch: &mut [Job]) -> Result<(), String> {
    let txn = db.begin_write().map_err(|e| e.to_string())?;
    for job in batch.iter_mut() {
        let write = std::mem::replace(&mut job.write, Box::new(|_| Ok(())));
        write(&txn).map_err(|e| e.to_string())?;
    }
    txn.commit().map_err(|e| e.to_string())
}
