//! The agent's redb store with one writer thread that commits every queued batch of journal
//! writes in one transaction (group commit): an fsync costs milliseconds, and a shelf of
//! registers produces many small writes at once.
//!
//! Callers queue writes while holding the journal lock (so the disk applies them in decision
//! order) and await [`Pending::durable`] after releasing it, before telling anyone.

use crate::journal::{self, JournalError, Write};
use redb::Database;
use std::path::Path;
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot};

struct Job {
    writes: Vec<Write>,
    done: Option<oneshot::Sender<Result<(), String>>>,
}

#[derive(Clone)]
pub struct Store {
    db: Arc<Database>,
    tx: mpsc::UnboundedSender<Job>,
}

/// A queued batch of writes.
pub struct Pending(Option<oneshot::Receiver<Result<(), String>>>);

impl Pending {
    /// Resolves once the commit that holds these writes is on disk.
    pub async fn durable(self) -> Result<(), StoreError> {
        match self.0 {
            None => Err(StoreError::Closed),
            Some(rx) => match rx.await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(StoreError::Commit(e)),
                Err(_) => Err(StoreError::Closed),
            },
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open the journal at {path}: {source}; is another agent running on this data directory?")]
    Open {
        path: String,
        source: redb::DatabaseError,
    },
    #[error(transparent)]
    Journal(#[from] JournalError),
    #[error("journal commit failed: {0}")]
    Commit(String),
    #[error("the journal writer has stopped")]
    Closed,
}

/// Most writes one transaction takes, so a huge backlog does not hold its first caller long.
const MAX_BATCH: usize = 4096;

impl Store {
    pub fn open(path: &Path, new_epoch: u64) -> Result<Store, StoreError> {
        let db = Database::create(path).map_err(|source| StoreError::Open {
            path: path.display().to_string(),
            source,
        })?;
        {
            let txn = db.begin_write().map_err(JournalError::from)?;
            journal::init(&txn, new_epoch)?;
            txn.commit().map_err(JournalError::from)?;
        }
        let db = Arc::new(db);
        let (tx, rx) = mpsc::unbounded_channel();
        let writer_db = db.clone();
        std::thread::Builder::new()
            .name("journal-writer".into())
            .spawn(move || writer(writer_db, rx))
            .map_err(|e| StoreError::Commit(format!("cannot start the writer thread: {e}")))?;
        Ok(Store { db, tx })
    }

    pub fn db(&self) -> &Database {
        &self.db
    }

    pub fn enqueue(&self, writes: Vec<Write>) -> Pending {
        let (done, rx) = oneshot::channel();
        let sent = self.tx.send(Job {
            writes,
            done: Some(done),
        });
        Pending(sent.is_ok().then_some(rx))
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
        let outcome = commit(&db, &batch).map_err(|e| e.to_string());
        if let Err(e) = &outcome {
            tracing::error!(error = %e, "journal commit failed");
        }
        for job in batch {
            if let Some(done) = job.done {
                let _ = done.send(outcome.clone());
            }
        }
    }
}

fn commit(db: &Database, batch: &[Job]) -> Result<(), JournalError> {
    let txn = db.begin_write()?;
    for job in batch {
        journal::apply(&txn, &job.writes)?;
    }
    txn.commit()?;
    Ok(())
}
