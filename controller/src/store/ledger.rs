//! The shop-facing half of the store: accounts, API sessions, receipts, their queue places, OFD
//! confirmation and the callbacks owed to shops.
//!
//! # What is durable when
//! * A receipt is acknowledged to the shop (its `ReceiptId` returned) only after the commit that
//!   holds the receipt, its `InvoiceId` key, its job and the job's queue place is durable: the four
//!   are written by one operation, so they exist together or not at all.
//! * `InvoiceId` → receipt is checked and inserted in that same operation. Operations of one group
//!   commit run one after another inside the transaction, so two concurrent requests with one
//!   `InvoiceId` make one receipt: the second sees the first and answers with its id.
//! * CONFIRMED is written in the transaction that applies the OFD acknowledgement (or a register
//!   status proving the document left) — or, when that proof arrived before the receipt's result,
//!   in the transaction that applies the result — and the callback it owes in that same
//!   transaction; a callback row is deleted only after the shop's server answered 2xx.
//! * Sessions (API tokens) are stored by the SHA-256 of the token; the token itself exists only in
//!   the answer to the shop. Passwords are stored as PBKDF2-HMAC-SHA256 with a per-account salt.
//!
//! # Layout
//! `accounts` (id → [`Account`]), `logins` (login → account id), `orgs` (INN → account id),
//! `sessions` (token SHA-256 → [`Session`]), `receipts` (id → [`ReceiptRecord`]), `invoices`
//! ((account, InvoiceId) → receipt id), `receipts_by_time` ((account, created ms, id) → ()),
//! `fiscal` ((FN, FD) → job: every completed job), `unconfirmed` (the subset of `fiscal` the OFD
//! has not acknowledged), `confirmed` (job → ms), `callbacks` (id → [`Callback`]).

use super::{decode, encode, JobTables, Store, StoreError, META};
use crate::rules::{self, Decision, Job, JobEvent, JobState, QueuePlace};
use hmac::{Hmac, KeyInit, Mac};
use protocol::kkt::FiscalResult;
use protocol::tunnel::KktState;
use protocol::tunnel::{JobId, Work};
use redb::{
    ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition, WriteTransaction,
};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use thiserror::Error;
use tracing::info;

pub const ACCOUNTS: TableDefinition<&str, &[u8]> = TableDefinition::new("accounts");
pub const LOGINS: TableDefinition<&str, &str> = TableDefinition::new("logins");
pub const ORGS: TableDefinition<&str, &str> = TableDefinition::new("orgs");
pub const SESSIONS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("sessions");
pub const RECEIPTS: TableDefinition<&str, &[u8]> = TableDefinition::new("receipts");
pub const INVOICES: TableDefinition<(&str, &str), &str> = TableDefinition::new("invoices");
pub const BY_TIME: TableDefinition<(&str, u64, &str), ()> =
    TableDefinition::new("receipts_by_time");
pub const FISCAL: TableDefinition<(&str, u32), &str> = TableDefinition::new("fiscal");
pub const UNCONFIRMED: TableDefinition<(&str, u32), &str> = TableDefinition::new("unconfirmed");
pub const CONFIRMED: TableDefinition<&str, u64> = TableDefinition::new("confirmed");
pub const CALLBACKS: TableDefinition<u64, &[u8]> = TableDefinition::new("callbacks");

const NEXT_ORDER_KEY: &str = "next_queue_order";
const NEXT_CALLBACK_KEY: &str = "next_callback_id";

/// PBKDF2 rounds for new passwords (OWASP's 2023 figure for PBKDF2-HMAC-SHA256 is 600,000; we
/// use fewer because a login is on a shop's request path, and store the count with each hash so
/// it can be raised without invalidating old ones).
pub const PASSWORD_ROUNDS: u32 = 100_000;

pub(super) fn create_tables(txn: &WriteTransaction) -> Result<(), StoreError> {
    txn.open_table(ACCOUNTS)?;
    txn.open_table(LOGINS)?;
    txn.open_table(ORGS)?;
    txn.open_table(SESSIONS)?;
    txn.open_table(RECEIPTS)?;
    txn.open_table(INVOICES)?;
    txn.open_table(BY_TIME)?;
    txn.open_table(FISCAL)?;
    txn.open_table(UNCONFIRMED)?;
    txn.open_table(CONFIRMED)?;
    txn.open_table(CALLBACKS)?;
    Ok(())
}

/// A password as stored: never the password itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PasswordHash {
    pub salt: [u8; 16],
    pub rounds: u32,
    pub hash: [u8; 32],
}

impl PasswordHash {
    pub fn new(password: &str, rounds: u32) -> PasswordHash {
        let mut salt = [0u8; 16];
        rand::fill(&mut salt);
        PasswordHash {
            salt,
            rounds,
            hash: derive(password, &salt, rounds),
        }
    }

    pub fn verify(&self, password: &str) -> bool {
        // Constant time: a timing difference must not tell how many bytes matched.
        crate::auth::same_digest(&derive(password, &self.salt, self.rounds), &self.hash)
    }
}

fn derive(password: &str, salt: &[u8], rounds: u32) -> [u8; 32] {
    let mut out = [0u8; 32];
    pbkdf2::pbkdf2_hmac::<Sha256>(password.as_bytes(), salt, rounds.max(1), &mut out);
    out
}

/// SHA-256 of a secret (API token), the only form in which it is stored.
pub fn secret_hash(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

/// Receipts by Ferma status at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReceiptCounts {
    pub new: usize,
    pub processed: usize,
    pub confirmed: usize,
    pub kkt_error: usize,
}

/// HMAC-SHA256 of a callback body with the account's callback secret, hex.
pub fn sign_callback(secret: &str, body: &[u8]) -> String {
    let mut mac = match <Hmac<Sha256> as KeyInit>::new_from_slice(secret.as_bytes()) {
        Ok(m) => m,
        // HMAC takes keys of any length; this arm cannot be reached.
        Err(_) => return String::new(),
    };
    mac.update(body);
    protocol::tunnel::hex(&mac.finalize().into_bytes())
}

/// A customer of the service: its users log in with `login`, and it owns the organisations
/// (INNs) whose registers and receipts it may see and drive.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Account {
    pub id: String,
    pub login: String,
    pub password: PasswordHash,
    pub inns: Vec<String>,
    /// Key of the HMAC that signs this account's callbacks. Kept in clear because the controller
    /// must sign with it; it opens nothing (it cannot be used to log in).
    pub callback_secret: String,
    pub created_at: u64,
}

impl Account {
    pub fn owns(&self, inn: &str) -> bool {
        self.inns.iter().any(|i| i == inn)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum AccountRefusal {
    #[error("login {0:?} is taken; choose another")]
    LoginTaken(String),
    #[error("INN {inn} already belongs to account {account}; an organisation has one owner")]
    InnTaken { inn: String, account: String },
}

/// An API session (Ferma `AuthToken`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Session {
    pub account: String,
    pub created_at: u64,
    pub expires_at: u64,
}

/// What the shop sent, as accepted. Immutable once written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReceiptRecord {
    pub id: String,
    pub account: String,
    pub inn: String,
    pub invoice_id: String,
    pub callback_url: Option<String>,
    /// The `Request` object as received, echoed back by `list`/`list2`.
    pub request_json: String,
    pub created_at: u64,
}

/// A new receipt for [`Store::create_receipt`].
#[derive(Debug, Clone)]
pub struct NewReceipt {
    pub record: ReceiptRecord,
    pub work: Work,
}

/// Outcome of [`Store::create_receipt`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Created {
    /// Durable and queued at `place`.
    New(QueuePlace),
    /// The account already used this InvoiceId: the existing receipt's id.
    Existing(String),
}

pub use protocol::ferma::ReceiptStatus;

/// A receipt with its job and confirmation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceiptView {
    pub record: ReceiptRecord,
    pub job: Job,
    pub confirmed_at: Option<u64>,
}

impl ReceiptView {
    pub fn status(&self) -> ReceiptStatus {
        match (&self.job.state, self.confirmed_at) {
            (JobState::Completed { .. }, Some(_)) => ReceiptStatus::Confirmed,
            (JobState::Completed { .. }, None) => ReceiptStatus::Processed,
            (JobState::Failed { .. }, _) => ReceiptStatus::KktError,
            _ => ReceiptStatus::New,
        }
    }

    pub fn result(&self) -> Option<(&str, &FiscalResult)> {
        match &self.job.state {
            JobState::Completed { kkt, result, .. } => Some((kkt, result)),
            _ => None,
        }
    }

    /// Last change, Unix ms.
    pub fn modified_at(&self) -> u64 {
        self.job.updated_at.max(self.confirmed_at.unwrap_or(0))
    }
}

/// A status POST owed to a shop.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Callback {
    pub receipt: String,
    pub account: String,
    pub url: String,
    pub attempts: u32,
    pub next_at: u64,
    pub last_error: Option<String>,
    pub created_at: u64,
}

fn next_counter(txn: &WriteTransaction, key: &str) -> Result<u64, StoreError> {
    let mut meta = txn.open_table(META)?;
    let current = match meta.get(key)? {
        Some(v) => {
            let bytes: [u8; 8] = v
                .value()
                .try_into()
                .map_err(|_| StoreError::Corrupt(format!("meta {key} is not a counter")))?;
            u64::from_be_bytes(bytes)
        }
        None => 1,
    };
    meta.insert(key, (current + 1).to_be_bytes().as_slice())?;
    Ok(current)
}

/// Queues the callback a receipt owes now that it is final, if it asked for one.
fn owe_callback(txn: &WriteTransaction, job: &str, now_ms: u64) -> Result<bool, StoreError> {
    let record: Option<ReceiptRecord> = {
        let receipts = txn.open_table(RECEIPTS)?;
        let v = receipts.get(job)?;
        v.map(|v| decode(v.value())).transpose()?
    };
    let Some(record) = record else {
        return Ok(false);
    };
    let Some(url) = record.callback_url else {
        return Ok(false);
    };
    let id = next_counter(txn, NEXT_CALLBACK_KEY)?;
    let cb = Callback {
        receipt: record.id,
        account: record.account,
        url,
        attempts: 0,
        next_at: now_ms,
        last_error: None,
        created_at: now_ms,
    };
    txn.open_table(CALLBACKS)?
        .insert(id, encode(&cb)?.as_slice())?;
    Ok(true)
}

/// A job completed: index its document so the OFD's acknowledgement can find it.
pub(super) fn on_completed(
    txn: &WriteTransaction,
    job: &str,
    result: &FiscalResult,
) -> Result<(), StoreError> {
    let key = (result.fn_number.as_str(), result.fd_number);
    txn.open_table(FISCAL)?.insert(key, job)?;
    txn.open_table(UNCONFIRMED)?.insert(key, job)?;
    Ok(())
}

/// The OFD has every document of `fn_number` up to and including `upto_fd`: confirm the
/// receipts among them. Cumulative on purpose: the FN sends in order, so an acknowledgement (or
/// a status whose first unsent document is later) proves every earlier one delivered, and a lost
/// event is made up by the next one. Returns the receipts confirmed.
pub(super) fn on_delivered(
    txn: &WriteTransaction,
    fn_number: &str,
    upto_fd: u32,
    now_ms: u64,
) -> Result<Vec<JobId>, StoreError> {
    let jobs: Vec<(u32, String)> = {
        let unconfirmed = txn.open_table(UNCONFIRMED)?;
        let mut out = Vec::new();
        for row in unconfirmed.range((fn_number, 0)..=(fn_number, upto_fd))? {
            let (k, v) = row?;
            out.push((k.value().1, v.value().to_owned()));
        }
        out
    };
    if jobs.is_empty() {
        return Ok(Vec::new());
    }
    let mut unconfirmed = txn.open_table(UNCONFIRMED)?;
    let mut confirmed = txn.open_table(CONFIRMED)?;
    let mut done = Vec::with_capacity(jobs.len());
    for (fd, job) in jobs {
        unconfirmed.remove((fn_number, fd))?;
        if confirmed.get(job.as_str())?.is_none() {
            confirmed.insert(job.as_str(), now_ms)?;
            done.push(job);
        }
    }
    drop((unconfirmed, confirmed));
    for job in &done {
        owe_callback(txn, job, now_ms)?;
    }
    Ok(done)
}

/// What a register's status proves delivered: everything before its first unsent document, or
/// everything when nothing is unsent.
pub(super) fn delivered_upto(state: &KktState) -> Option<(String, u32)> {
    let fn_number = state.fn_info.fn_number.clone();
    match state.ofd.first_unsent_fd {
        Some(first) => first.checked_sub(1).map(|n| (fn_number, n)),
        None if state.ofd.unsent_count == 0 => Some((fn_number, state.fn_info.last_fd_number)),
        None => None,
    }
}

impl Store {
    // ---- accounts and sessions -----------------------------------------------------------

    pub async fn create_account(
        &self,
        account: Account,
    ) -> Result<Result<Account, AccountRefusal>, StoreError> {
        self.transact(move |txn| {
            let mut logins = txn.open_table(LOGINS)?;
            if logins.get(account.login.as_str())?.is_some() {
                return Ok(Err(AccountRefusal::LoginTaken(account.login)));
            }
            let mut orgs = txn.open_table(ORGS)?;
            for inn in &account.inns {
                if let Some(owner) = orgs.get(inn.as_str())? {
                    return Ok(Err(AccountRefusal::InnTaken {
                        inn: inn.clone(),
                        account: owner.value().to_owned(),
                    }));
                }
            }
            for inn in &account.inns {
                orgs.insert(inn.as_str(), account.id.as_str())?;
            }
            logins.insert(account.login.as_str(), account.id.as_str())?;
            txn.open_table(ACCOUNTS)?
                .insert(account.id.as_str(), encode(&account)?.as_slice())?;
            info!(account = account.id, login = account.login, inns = ?account.inns, "account created");
            Ok(Ok(account))
        })
        .await
    }

    pub fn account(&self, id: &str) -> Result<Option<Account>, StoreError> {
        self.record(ACCOUNTS, id)
    }

    pub fn accounts(&self) -> Result<Vec<Account>, StoreError> {
        self.records(ACCOUNTS)
    }

    pub fn account_by_login(&self, login: &str) -> Result<Option<Account>, StoreError> {
        let txn = self.db.begin_read()?;
        let id = {
            let logins = txn.open_table(LOGINS)?;
            let v = logins.get(login)?;
            v.map(|v| v.value().to_owned())
        };
        match id {
            Some(id) => self.account(&id),
            None => Ok(None),
        }
    }

    /// The account owning `inn`, if any.
    pub fn inn_owner(&self, inn: &str) -> Result<Option<String>, StoreError> {
        let txn = self.db.begin_read()?;
        let orgs = txn.open_table(ORGS)?;
        let v = orgs.get(inn)?;
        Ok(v.map(|v| v.value().to_owned()))
    }

    /// Stores a session by the hash of its token; expired sessions are swept in the same
    /// transaction (a few at a time) so the table does not grow with every login.
    pub async fn create_session(
        &self,
        token_hash: [u8; 32],
        session: Session,
    ) -> Result<(), StoreError> {
        let value = encode(&session)?;
        let now = session.created_at;
        self.transact(move |txn| {
            let mut t = txn.open_table(SESSIONS)?;
            // A bounded look (keys are hashes, so the rows looked at are a random sample): a
            // login costs the same however many sessions exist, and expired ones still go.
            let mut expired = Vec::new();
            for row in t.iter()?.take(64) {
                let (k, v) = row?;
                let s: Session = decode(v.value())?;
                if s.expires_at <= now {
                    expired.push(k.value().to_vec());
                }
            }
            for k in expired {
                t.remove(k.as_slice())?;
            }
            t.insert(token_hash.as_slice(), value.as_slice())?;
            Ok(())
        })
        .await
    }

    /// The live session for a token hash (None when unknown or expired).
    pub fn session(
        &self,
        token_hash: &[u8; 32],
        now_ms: u64,
    ) -> Result<Option<Session>, StoreError> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(SESSIONS)?;
        let v = t.get(token_hash.as_slice())?;
        let s: Option<Session> = v.map(|v| decode(v.value())).transpose()?;
        Ok(s.filter(|s| s.expires_at > now_ms))
    }

    // ---- receipts --------------------------------------------------------------------------

    /// Accepts a receipt: durable and queued when this returns [`Created::New`].
    pub async fn create_receipt(
        &self,
        receipt: NewReceipt,
        now_ms: u64,
    ) -> Result<Created, StoreError> {
        self.transact(move |txn| {
            let rec = receipt.record;
            {
                let invoices = txn.open_table(INVOICES)?;
                let existing = invoices.get((rec.account.as_str(), rec.invoice_id.as_str()))?;
                if let Some(id) = existing {
                    return Ok(Created::Existing(id.value().to_owned()));
                }
            }
            let place = QueuePlace {
                inn: rec.inn.clone(),
                order: next_counter(txn, NEXT_ORDER_KEY)?,
            };
            txn.open_table(INVOICES)?.insert(
                (rec.account.as_str(), rec.invoice_id.as_str()),
                rec.id.as_str(),
            )?;
            txn.open_table(BY_TIME)?
                .insert((rec.account.as_str(), rec.created_at, rec.id.as_str()), ())?;
            txn.open_table(RECEIPTS)?
                .insert(rec.id.as_str(), encode(&rec)?.as_slice())?;
            let job = Job::queued(rec.id.clone(), receipt.work, place.clone(), now_ms);
            let mut jt = JobTables::open(txn)?;
            if jt.get(&rec.id)?.is_some() {
                return Err(StoreError::Corrupt(format!(
                    "receipt id {} collides with an existing job",
                    rec.id
                )));
            }
            jt.put(&job, &job)?;
            Ok(Created::New(place))
        })
        .await
    }

    pub fn receipt(&self, id: &str) -> Result<Option<ReceiptView>, StoreError> {
        let txn = self.db.begin_read()?;
        view(&txn, id)
    }

    pub fn receipt_by_invoice(
        &self,
        account: &str,
        invoice_id: &str,
    ) -> Result<Option<ReceiptView>, StoreError> {
        let txn = self.db.begin_read()?;
        let id = {
            let t = txn.open_table(INVOICES)?;
            let v = t.get((account, invoice_id))?;
            v.map(|v| v.value().to_owned())
        };
        match id {
            Some(id) => view(&txn, &id),
            None => Ok(None),
        }
    }

    /// The account's receipts accepted in `[from_ms, to_ms]`, oldest first, at most `limit`.
    pub fn receipts_between(
        &self,
        account: &str,
        from_ms: u64,
        to_ms: u64,
        limit: usize,
    ) -> Result<Vec<ReceiptView>, StoreError> {
        let txn = self.db.begin_read()?;
        let ids: Vec<String> = {
            let t = txn.open_table(BY_TIME)?;
            let mut ids = Vec::new();
            for row in t.range((account, from_ms, "")..)? {
                let (k, _) = row?;
                let (a, at, id) = k.value();
                if a != account || at > to_ms || ids.len() >= limit {
                    break;
                }
                ids.push(id.to_owned());
            }
            ids
        };
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            if let Some(v) = view(&txn, &id)? {
                out.push(v);
            }
        }
        Ok(out)
    }

    /// Every queued job with a queue place, in queue order per INN (startup load of the
    /// dispatcher).
    pub fn queued(&self) -> Result<Vec<(QueuePlace, JobId)>, StoreError> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(super::QUEUE)?;
        let mut out = Vec::new();
        for row in t.iter()? {
            let (k, v) = row?;
            let (inn, order) = k.value();
            out.push((
                QueuePlace {
                    inn: inn.to_owned(),
                    order,
                },
                v.value().to_owned(),
            ));
        }
        Ok(out)
    }

    /// Gives up on a queued job: it becomes KKT_ERROR with `reason`, and its callback is owed.
    /// False when the job is not queued (someone holds it, or it is final).
    pub async fn fail_job(
        &self,
        job_id: &str,
        reason: String,
        now_ms: u64,
    ) -> Result<bool, StoreError> {
        let job_id = job_id.to_owned();
        let applied = self
            .transact(move |txn| {
                let applied = {
                    let mut jt = JobTables::open(txn)?;
                    let Some(job) = jt.get(&job_id)? else {
                        return Ok(false);
                    };
                    match rules::apply(&job, JobEvent::Fail { reason }, now_ms) {
                        Decision::Apply(next) => {
                            jt.put(&job, &next)?;
                            true
                        }
                        _ => false,
                    }
                };
                if applied {
                    owe_callback(txn, &job_id, now_ms)?;
                }
                Ok(applied)
            })
            .await?;
        if applied {
            self.callbacks_owed().notify_one();
        }
        Ok(applied)
    }

    // ---- callbacks -------------------------------------------------------------------------

    /// Callbacks due at `now_ms` that `take` accepts, at most `limit`, with their ids (see
    /// [`Ledger::due_callbacks`]).
    pub fn due_callbacks(
        &self,
        now_ms: u64,
        limit: usize,
        take: &mut dyn FnMut(u64, &Callback) -> bool,
    ) -> Result<Vec<(u64, Callback)>, StoreError> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(CALLBACKS)?;
        let mut due = Vec::new();
        for row in t.iter()? {
            let (k, v) = row?;
            let cb: Callback = decode(v.value())?;
            if cb.next_at <= now_ms && take(k.value(), &cb) {
                due.push((k.value(), cb));
                if due.len() >= limit {
                    break;
                }
            }
        }
        Ok(due)
    }

    pub fn callbacks(&self) -> Result<Vec<Callback>, StoreError> {
        self.records(CALLBACKS)
    }

    /// The shop's server took the callback: forget it.
    pub async fn callback_delivered(&self, id: u64) -> Result<(), StoreError> {
        self.transact(move |txn| {
            txn.open_table(CALLBACKS)?.remove(id)?;
            Ok(())
        })
        .await
    }

    /// The attempt failed: try again at `next_at`.
    pub async fn callback_failed(
        &self,
        id: u64,
        next_at: u64,
        error: String,
    ) -> Result<(), StoreError> {
        self.transact(move |txn| {
            let mut t = txn.open_table(CALLBACKS)?;
            let cb: Option<Callback> = {
                let v = t.get(id)?;
                v.map(|v| decode(v.value())).transpose()?
            };
            if let Some(mut cb) = cb {
                cb.attempts += 1;
                cb.next_at = next_at;
                cb.last_error = Some(error);
                t.insert(id, encode(&cb)?.as_slice())?;
            }
            Ok(())
        })
        .await
    }
}

fn view(txn: &redb::ReadTransaction, id: &str) -> Result<Option<ReceiptView>, StoreError> {
    let record: Option<ReceiptRecord> = {
        let t = txn.open_table(RECEIPTS)?;
        let v = t.get(id)?;
        v.map(|v| decode(v.value())).transpose()?
    };
    let Some(record) = record else {
        return Ok(None);
    };
    let job: Option<Job> = {
        let t = txn.open_table(super::JOBS)?;
        let v = t.get(id)?;
        v.map(|v| decode(v.value())).transpose()?
    };
    let Some(job) = job else {
        return Err(StoreError::Corrupt(format!("receipt {id} has no job")));
    };
    let confirmed_at = {
        let t = txn.open_table(CONFIRMED)?;
        let v = t.get(id)?;
        v.map(|v| v.value())
    };
    Ok(Some(ReceiptView {
        record,
        job,
        confirmed_at,
    }))
}

/// The shop-facing store as the Ferma API and the callback sender use it: narrow on purpose,
/// so that a second backend (PostgreSQL, for several controller nodes; DESIGN.md §8) has little
/// to offer. Every method is one transaction and maps onto one SQL transaction; the `async` ones
/// resolve only when their transaction is durable. [`Store`] (redb, group commit) is the default.
pub trait Ledger: Clone + Send + Sync + 'static {
    fn account(&self, id: &str) -> Result<Option<Account>, StoreError>;
    fn account_by_login(&self, login: &str) -> Result<Option<Account>, StoreError>;
    fn create_session(
        &self,
        token_hash: [u8; 32],
        session: Session,
    ) -> impl std::future::Future<Output = Result<(), StoreError>> + Send;
    /// The live session for a token hash (None when unknown or expired).
    fn session(&self, token_hash: &[u8; 32], now_ms: u64) -> Result<Option<Session>, StoreError>;
    /// The receipt, its InvoiceId key, its job and its queue place, together; see the module doc.
    fn create_receipt(
        &self,
        receipt: NewReceipt,
        now_ms: u64,
    ) -> impl std::future::Future<Output = Result<Created, StoreError>> + Send;
    fn receipt(&self, id: &str) -> Result<Option<ReceiptView>, StoreError>;
    fn receipt_by_invoice(
        &self,
        account: &str,
        invoice_id: &str,
    ) -> Result<Option<ReceiptView>, StoreError>;
    fn receipts_between(
        &self,
        account: &str,
        from_ms: u64,
        to_ms: u64,
        limit: usize,
    ) -> Result<Vec<ReceiptView>, StoreError>;
    /// Callbacks due at `now_ms` that `take` accepts, at most `limit`, oldest first. `take` sees
    /// each due callback once and decides (the sender skips those in flight and hosts at their
    /// limit), so a backlog for one host never hides another host's callbacks.
    fn due_callbacks(
        &self,
        now_ms: u64,
        limit: usize,
        take: &mut dyn FnMut(u64, &Callback) -> bool,
    ) -> Result<Vec<(u64, Callback)>, StoreError>;
    fn pending_callbacks(&self) -> Result<usize, StoreError>;
    /// Receipts in each Ferma status now, for `/metrics`.
    fn receipt_counts(&self) -> Result<ReceiptCounts, StoreError>;
    fn callback_delivered(
        &self,
        id: u64,
    ) -> impl std::future::Future<Output = Result<(), StoreError>> + Send;
    fn callback_failed(
        &self,
        id: u64,
        next_at: u64,
        error: String,
    ) -> impl std::future::Future<Output = Result<(), StoreError>> + Send;
}

impl Ledger for Store {
    fn account(&self, id: &str) -> Result<Option<Account>, StoreError> {
        Store::account(self, id)
    }
    fn account_by_login(&self, login: &str) -> Result<Option<Account>, StoreError> {
        Store::account_by_login(self, login)
    }
    fn create_session(
        &self,
        token_hash: [u8; 32],
        session: Session,
    ) -> impl std::future::Future<Output = Result<(), StoreError>> + Send {
        Store::create_session(self, token_hash, session)
    }
    fn session(&self, token_hash: &[u8; 32], now_ms: u64) -> Result<Option<Session>, StoreError> {
        Store::session(self, token_hash, now_ms)
    }
    fn create_receipt(
        &self,
        receipt: NewReceipt,
        now_ms: u64,
    ) -> impl std::future::Future<Output = Result<Created, StoreError>> + Send {
        Store::create_receipt(self, receipt, now_ms)
    }
    fn receipt(&self, id: &str) -> Result<Option<ReceiptView>, StoreError> {
        Store::receipt(self, id)
    }
    fn receipt_by_invoice(
        &self,
        account: &str,
        invoice_id: &str,
    ) -> Result<Option<ReceiptView>, StoreError> {
        Store::receipt_by_invoice(self, account, invoice_id)
    }
    fn receipts_between(
        &self,
        account: &str,
        from_ms: u64,
        to_ms: u64,
        limit: usize,
    ) -> Result<Vec<ReceiptView>, StoreError> {
        Store::receipts_between(self, account, from_ms, to_ms, limit)
    }
    fn due_callbacks(
        &self,
        now_ms: u64,
        limit: usize,
        take: &mut dyn FnMut(u64, &Callback) -> bool,
    ) -> Result<Vec<(u64, Callback)>, StoreError> {
        Store::due_callbacks(self, now_ms, limit, take)
    }
    fn pending_callbacks(&self) -> Result<usize, StoreError> {
        // A count, read from the table's metadata: a scrape must not decode every row.
        let txn = self.db.begin_read()?;
        let n = txn.open_table(CALLBACKS)?.len()?;
        Ok(usize::try_from(n).unwrap_or(usize::MAX))
    }
    fn receipt_counts(&self) -> Result<ReceiptCounts, StoreError> {
        // Table lengths only (redb keeps them in the table's metadata): a scrape must not decode
        // rows. Every receipt is in exactly one of: the queue or the in-flight index (NEW), the
        // unconfirmed index (PROCESSED), the confirmed table (CONFIRMED); the rest are final
        // failures (KKT_ERROR).
        let txn = self.db.begin_read()?;
        let len = |n: u64| usize::try_from(n).unwrap_or(usize::MAX);
        let total = len(txn.open_table(RECEIPTS)?.len()?);
        let new = len(txn.open_table(super::QUEUE)?.len()?)
            + len(txn.open_table(super::IN_FLIGHT)?.len()?);
        let processed = len(txn.open_table(UNCONFIRMED)?.len()?);
        let confirmed = len(txn.open_table(CONFIRMED)?.len()?);
        Ok(ReceiptCounts {
            new,
            processed,
            confirmed,
            kkt_error: total.saturating_sub(new + processed + confirmed),
        })
    }
    fn callback_delivered(
        &self,
        id: u64,
    ) -> impl std::future::Future<Output = Result<(), StoreError>> + Send {
        Store::callback_delivered(self, id)
    }
    fn callback_failed(
        &self,
        id: u64,
        next_at: u64,
        error: String,
    ) -> impl std::future::Future<Output = Result<(), StoreError>> + Send {
        Store::callback_failed(self, id, next_at, error)
    }
}
