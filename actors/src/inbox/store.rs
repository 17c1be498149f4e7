//! The inbox's SQLite file: the schema and every statement, synchronous, on one connection
//! owned by the writer thread (`mod.rs`).
//!
//! ```text
//! messages  (cursor PK AUTOINCREMENT, account, room_id, event_id, sender, body, thread_root,
//!            origin_ts_ms, stored_ms, is_direct, mentioned)   UNIQUE (account, event_id)
//! positions (account PK, token)             the sync position whose messages are all above
//! trimmed   (account PK, through)           the highest cursor of the account trimmed away
//! consumers (name PK, cursor, updated_ms)   what each durable consumer acknowledged
//! sends     (account, txn_id PK, room_id, event_id, sent_ms)   idempotent chat.send
//! ```
//!
//! `AUTOINCREMENT` makes a cursor never come back, even after the newest rows were trimmed;
//! the file is in WAL mode with `synchronous = FULL`, so a commit that returned survives a
//! crash of the process and of the machine.

use std::collections::BTreeMap;
use std::path::Path;

use rusqlite::{Connection, OptionalExtension, Transaction, params};

use super::{Gap, NewMessage, Stored};

/// Schema version in `PRAGMA user_version`: 2 added `is_direct` and `mentioned`.
const VERSION: i64 = 2;

/// From version 1 to 2.
const MIGRATE_1_TO_2: &str = "
ALTER TABLE messages ADD COLUMN is_direct INTEGER NOT NULL DEFAULT 0;
ALTER TABLE messages ADD COLUMN mentioned INTEGER NOT NULL DEFAULT 0;
";

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS messages (
    cursor INTEGER PRIMARY KEY AUTOINCREMENT,
    account TEXT NOT NULL,
    room_id TEXT NOT NULL,
    event_id TEXT NOT NULL,
    sender TEXT NOT NULL,
    body TEXT NOT NULL,
    thread_root TEXT,
    origin_ts_ms INTEGER NOT NULL,
    stored_ms INTEGER NOT NULL,
    is_direct INTEGER NOT NULL DEFAULT 0,
    mentioned INTEGER NOT NULL DEFAULT 0,
    UNIQUE (account, event_id)
);
CREATE INDEX IF NOT EXISTS messages_by_account ON messages (account, cursor);
CREATE INDEX IF NOT EXISTS messages_by_age ON messages (stored_ms);
CREATE TABLE IF NOT EXISTS positions (account TEXT PRIMARY KEY, token TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS trimmed (account TEXT PRIMARY KEY, through INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS consumers (
    name TEXT PRIMARY KEY,
    cursor INTEGER NOT NULL,
    updated_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS sends (
    account TEXT NOT NULL,
    txn_id TEXT NOT NULL,
    room_id TEXT NOT NULL,
    event_id TEXT NOT NULL,
    sent_ms INTEGER NOT NULL,
    PRIMARY KEY (account, txn_id)
);
CREATE INDEX IF NOT EXISTS sends_by_age ON sends (sent_ms);
";

/// The open file and what is kept in memory beside it.
pub(super) struct Store {
    conn: Connection,
    /// Messages stored per account (loaded at open, kept up to date).
    counts: BTreeMap<String, u64>,
}

/// A SQLite error, as text (the path is added by the caller).
pub(super) type Result<T> = std::result::Result<T, rusqlite::Error>;

impl Store {
    /// Opens (creating) the file at `path`.
    pub fn open(path: &Path) -> Result<Self> {
        let conn = Connection::open(path)?;
        Self::init(conn)
    }

    /// An in-memory store, for tests.
    #[cfg(test)]
    pub fn memory() -> Result<Self> {
        Self::init(Connection::open_in_memory()?)
    }

    fn init(conn: Connection) -> Result<Self> {
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
        if version > VERSION {
            return Err(rusqlite::Error::InvalidParameterName(format!(
                "the inbox file has schema version {version}, newer than this warden's {VERSION}"
            )));
        }
        if version == 1 {
            conn.execute_batch(MIGRATE_1_TO_2)?;
        }
        conn.execute_batch(SCHEMA)?;
        conn.pragma_update(None, "user_version", VERSION)?;
        let mut counts = BTreeMap::new();
        {
            let mut stmt =
                conn.prepare("SELECT account, COUNT(*) FROM messages GROUP BY account")?;
            let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?;
            for row in rows {
                let (account, n) = row?;
                counts.insert(account, n as u64);
            }
        }
        Ok(Self { conn, counts })
    }

    /// A transaction for one batch of writes.
    pub fn transaction(&mut self) -> Result<Batch<'_>> {
        Ok(Batch {
            tx: self.conn.transaction()?,
            counts: &mut self.counts,
            added: BTreeMap::new(),
            removed: BTreeMap::new(),
        })
    }

    /// The sync position stored for `account`.
    pub fn position(&self, account: &str) -> Result<Option<String>> {
        self.conn
            .query_row(
                "SELECT token FROM positions WHERE account = ?1",
                [account],
                |r| r.get(0),
            )
            .optional()
    }

    /// The newest cursor ever given (0 before the first message).
    pub fn head(&self) -> Result<u64> {
        head(&self.conn)
    }

    /// Up to `limit` messages after `after`, oldest first.
    pub fn page(&self, after: u64, limit: usize) -> Result<Vec<Stored>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT cursor, account, room_id, event_id, sender, body, thread_root, origin_ts_ms,
                    stored_ms, is_direct, mentioned
             FROM messages WHERE cursor > ?1 ORDER BY cursor LIMIT ?2",
        )?;
        let rows = stmt.query_map(params![after as i64, limit as i64], |r| {
            Ok(Stored {
                cursor: r.get::<_, i64>(0)? as u64,
                message: NewMessage {
                    account: r.get(1)?,
                    room_id: r.get(2)?,
                    event_id: r.get(3)?,
                    sender: r.get(4)?,
                    body: r.get(5)?,
                    thread_root: r.get(6)?,
                    origin_ts_ms: r.get::<_, i64>(7)? as u64,
                    is_direct: r.get(9)?,
                    mentioned: r.get(10)?,
                },
                stored_ms: r.get::<_, i64>(8)? as u64,
            })
        })?;
        rows.collect()
    }

    /// What was trimmed above `after`: one gap per account, `from` = `after + 1`.
    pub fn gaps(&self, after: u64) -> Result<Vec<Gap>> {
        gaps(&self.conn, after)
    }

    /// Every account's trimmed-through cursor.
    pub fn trimmed(&self) -> Result<BTreeMap<String, u64>> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT account, through FROM trimmed")?;
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get::<_, i64>(1)? as u64)))?;
        rows.collect()
    }

    /// Every consumer and its cursor.
    pub fn consumers(&self) -> Result<BTreeMap<String, u64>> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT name, cursor FROM consumers")?;
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get::<_, i64>(1)? as u64)))?;
        rows.collect()
    }

    /// The event ID a `chat.send` with `txn_id` got on `account`, if it was sent.
    pub fn sent(&self, account: &str, txn_id: &str) -> Result<Option<String>> {
        self.conn
            .query_row(
                "SELECT event_id FROM sends WHERE account = ?1 AND txn_id = ?2",
                [account, txn_id],
                |r| r.get(0),
            )
            .optional()
    }

    /// Messages stored per account.
    pub fn counts(&self) -> &BTreeMap<String, u64> {
        &self.counts
    }

    /// Messages of `account` above `after`: how many, and when the oldest was stored.
    pub fn above(&self, account: &str, after: u64) -> Result<(u64, Option<u64>)> {
        self.conn.query_row(
            "SELECT COUNT(*), MIN(stored_ms) FROM messages WHERE account = ?1 AND cursor > ?2",
            params![account, after as i64],
            |r| {
                Ok((
                    r.get::<_, i64>(0)? as u64,
                    r.get::<_, Option<i64>>(1)?.map(|t| t as u64),
                ))
            },
        )
    }
}

fn gaps(conn: &Connection, after: u64) -> Result<Vec<Gap>> {
    let mut stmt = conn.prepare_cached(
        "SELECT account, through FROM trimmed WHERE through > ?1 ORDER BY account",
    )?;
    let rows = stmt.query_map([after as i64], |r| {
        Ok(Gap {
            account: r.get(0)?,
            from: after + 1,
            to: r.get::<_, i64>(1)? as u64,
        })
    })?;
    rows.collect()
}

fn head(conn: &Connection) -> Result<u64> {
    let seq: Option<i64> = conn
        .query_row(
            "SELECT seq FROM sqlite_sequence WHERE name = 'messages'",
            [],
            |r| r.get(0),
        )
        .optional()?;
    Ok(seq.unwrap_or(0) as u64)
}

/// One write transaction; dropped without [`commit`](Batch::commit), nothing of it stays.
pub(super) struct Batch<'a> {
    tx: Transaction<'a>,
    counts: &'a mut BTreeMap<String, u64>,
    /// Messages added and removed per account by this batch, applied to `counts` at commit.
    added: BTreeMap<String, u64>,
    removed: BTreeMap<String, u64>,
}

impl Batch<'_> {
    /// Appends `message` unless `(account, event_id)` is already stored; its cursor if it
    /// was appended.
    pub fn append(&mut self, message: &NewMessage, now_ms: u64) -> Result<Option<u64>> {
        // Looked up first: an ignored INSERT would still use up a cursor.
        let stored = self
            .tx
            .prepare_cached("SELECT 1 FROM messages WHERE account = ?1 AND event_id = ?2")?
            .exists([&message.account, &message.event_id])?;
        if stored {
            return Ok(None);
        }
        let mut stmt = self.tx.prepare_cached(
            "INSERT INTO messages
             (account, room_id, event_id, sender, body, thread_root, origin_ts_ms, stored_ms,
              is_direct, mentioned)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
        )?;
        let changed = stmt.execute(params![
            message.account,
            message.room_id,
            message.event_id,
            message.sender,
            message.body,
            message.thread_root,
            message.origin_ts_ms as i64,
            now_ms as i64,
            message.is_direct,
            message.mentioned,
        ])?;
        if changed == 0 {
            return Ok(None);
        }
        *self.added.entry(message.account.clone()).or_default() += 1;
        Ok(Some(self.tx.last_insert_rowid() as u64))
    }

    /// Sets `account`'s sync position.
    pub fn set_position(&mut self, account: &str, token: &str) -> Result<()> {
        self.tx
            .prepare_cached(
                "INSERT INTO positions (account, token) VALUES (?1, ?2)
                 ON CONFLICT (account) DO UPDATE SET token = excluded.token",
            )?
            .execute([account, token])?;
        Ok(())
    }

    /// Creates consumer `name` at `cursor` unless it exists; its cursor either way.
    pub fn consumer_or(&mut self, name: &str, cursor: u64, now_ms: u64) -> Result<u64> {
        self.tx
            .prepare_cached(
                "INSERT OR IGNORE INTO consumers (name, cursor, updated_ms) VALUES (?1, ?2, ?3)",
            )?
            .execute(params![name, cursor as i64, now_ms as i64])?;
        self.tx.query_row(
            "SELECT cursor FROM consumers WHERE name = ?1",
            [name],
            |r| r.get::<_, i64>(0).map(|c| c as u64),
        )
    }

    /// Sets consumer `name`'s cursor (creating it); never moves it back. The cursor after.
    pub fn ack(&mut self, name: &str, cursor: u64, now_ms: u64) -> Result<u64> {
        self.tx
            .prepare_cached(
                "INSERT INTO consumers (name, cursor, updated_ms) VALUES (?1, ?2, ?3)
                 ON CONFLICT (name) DO UPDATE SET
                   cursor = MAX(cursor, excluded.cursor), updated_ms = excluded.updated_ms",
            )?
            .execute(params![name, cursor as i64, now_ms as i64])?;
        self.tx.query_row(
            "SELECT cursor FROM consumers WHERE name = ?1",
            [name],
            |r| r.get::<_, i64>(0).map(|c| c as u64),
        )
    }

    /// Drops `account`'s sync position.
    pub fn forget_position(&mut self, account: &str) -> Result<()> {
        self.tx
            .prepare_cached("DELETE FROM positions WHERE account = ?1")?
            .execute([account])?;
        Ok(())
    }

    /// Marks consumer `name` as used now (an unused one is forgotten after the retention).
    pub fn touch_consumer(&mut self, name: &str, now_ms: u64) -> Result<()> {
        self.tx
            .prepare_cached("UPDATE consumers SET updated_ms = ?2 WHERE name = ?1")?
            .execute(params![name, now_ms as i64])?;
        Ok(())
    }

    /// [`Store::gaps`], inside the transaction.
    pub fn gaps_above(&self, after: u64) -> Result<Vec<Gap>> {
        gaps(&self.tx, after)
    }

    /// How many consumers exist.
    pub fn consumer_count(&self) -> Result<u64> {
        self.tx
            .query_row("SELECT COUNT(*) FROM consumers", [], |r| r.get::<_, i64>(0))
            .map(|n| n as u64)
    }

    /// Whether consumer `name` exists.
    pub fn consumer_exists(&self, name: &str) -> Result<bool> {
        self.tx
            .query_row(
                "SELECT 1 FROM consumers WHERE name = ?1",
                [name],
                |_| Ok(()),
            )
            .optional()
            .map(|r| r.is_some())
    }

    /// The newest cursor ever given.
    pub fn head(&self) -> Result<u64> {
        head(&self.tx)
    }

    /// Records that `chat.send` `txn_id` on `account` became `event_id` (the first record
    /// wins); the event ID recorded.
    pub fn record_send(
        &mut self,
        account: &str,
        txn_id: &str,
        room_id: &str,
        event_id: &str,
        now_ms: u64,
    ) -> Result<String> {
        self.tx
            .prepare_cached(
                "INSERT OR IGNORE INTO sends (account, txn_id, room_id, event_id, sent_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
            )?
            .execute(params![account, txn_id, room_id, event_id, now_ms as i64])?;
        self.tx.query_row(
            "SELECT event_id FROM sends WHERE account = ?1 AND txn_id = ?2",
            [account, txn_id],
            |r| r.get(0),
        )
    }

    /// Deletes the oldest messages of each account beyond `max` per account and those
    /// stored before `older_than_ms`, send records older than that or beyond `max` per
    /// account, and consumers unused since before it; records the highest trimmed cursor per account. Returns how many
    /// messages were trimmed, per account.
    pub fn trim(&mut self, max: u64, older_than_ms: Option<u64>) -> Result<BTreeMap<String, u64>> {
        let mut through: BTreeMap<String, u64> = BTreeMap::new();
        // By age (only when asked: the writer does it every few seconds). The age index
        // is named: left to itself, the planner scans every row in `account` order to
        // group them.
        if let Some(older_than_ms) = older_than_ms {
            let mut stmt = self.tx.prepare_cached(
                "SELECT account, MAX(cursor) FROM messages INDEXED BY messages_by_age
                 WHERE stored_ms < ?1 GROUP BY account",
            )?;
            let rows = stmt.query_map([older_than_ms as i64], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as u64))
            })?;
            for row in rows {
                let (account, max_cursor) = row?;
                through.insert(account, max_cursor);
            }
        }
        // By count: the cursor at and below which an account has its excess over `max`.
        let mut effective: BTreeMap<String, u64> = self.counts.clone();
        for (account, n) in &self.added {
            *effective.entry(account.clone()).or_default() += n;
        }
        for (account, n) in &self.removed {
            let count = effective.entry(account.clone()).or_default();
            *count = count.saturating_sub(*n);
        }
        for (account, n) in effective {
            if n <= max {
                continue;
            }
            let cut: i64 = self.tx.query_row(
                "SELECT cursor FROM messages WHERE account = ?1 ORDER BY cursor LIMIT 1 OFFSET ?2",
                params![account, (n - max - 1) as i64],
                |r| r.get(0),
            )?;
            let entry = through.entry(account).or_default();
            *entry = (*entry).max(cut as u64);
        }
        let mut trimmed = BTreeMap::new();
        for (account, cut) in through {
            let deleted = self
                .tx
                .prepare_cached("DELETE FROM messages WHERE account = ?1 AND cursor <= ?2")?
                .execute(params![account, cut as i64])? as u64;
            if deleted == 0 {
                continue;
            }
            self.tx
                .prepare_cached(
                    "INSERT INTO trimmed (account, through) VALUES (?1, ?2)
                     ON CONFLICT (account) DO UPDATE SET through = MAX(through, excluded.through)",
                )?
                .execute(params![account, cut as i64])?;
            *self.removed.entry(account.clone()).or_default() += deleted;
            trimmed.insert(account, deleted);
        }
        let Some(older_than_ms) = older_than_ms else {
            return Ok(trimmed);
        };
        self.tx
            .prepare_cached("DELETE FROM sends WHERE sent_ms < ?1")?
            .execute([older_than_ms as i64])?;
        // A consumer unused (no subscribe, no ack) for as long is forgotten.
        self.tx
            .prepare_cached("DELETE FROM consumers WHERE updated_ms < ?1")?
            .execute([older_than_ms as i64])?;
        // Send records are bounded like messages: the newest `max` per account.
        let over: Vec<String> = {
            let mut stmt = self.tx.prepare_cached(
                "SELECT account FROM sends GROUP BY account HAVING COUNT(*) > ?1",
            )?;
            stmt.query_map([max as i64], |r| r.get(0))?
                .collect::<Result<_>>()?
        };
        for account in over {
            self.tx
                .prepare_cached(
                    "DELETE FROM sends WHERE account = ?1 AND rowid IN (
                       SELECT rowid FROM sends WHERE account = ?1
                       ORDER BY sent_ms DESC, rowid DESC LIMIT -1 OFFSET ?2)",
                )?
                .execute(params![account, max as i64])?;
        }
        Ok(trimmed)
    }

    /// Commits the batch.
    pub fn commit(self) -> Result<()> {
        let Batch {
            tx,
            counts,
            added,
            removed,
        } = self;
        tx.commit()?;
        for (account, n) in added {
            *counts.entry(account).or_default() += n;
        }
        for (account, n) in removed {
            let count = counts.entry(account).or_default();
            *count = count.saturating_sub(n);
        }
        counts.retain(|_, n| *n > 0);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(account: &str, event: u64) -> NewMessage {
        NewMessage {
            account: account.to_string(),
            room_id: "!r:x".to_string(),
            event_id: format!("${event}"),
            sender: "@p:x".to_string(),
            body: format!("m{event}"),
            thread_root: None,
            origin_ts_ms: event,
            is_direct: false,
            mentioned: false,
        }
    }

    #[test]
    fn appends_get_rising_cursors_and_a_repeated_event_is_stored_once() {
        let mut store = Store::memory().expect("store");
        let mut batch = store.transaction().expect("tx");
        assert_eq!(batch.append(&message("a", 1), 0).expect("append"), Some(1));
        assert_eq!(batch.append(&message("b", 1), 0).expect("append"), Some(2));
        assert_eq!(batch.append(&message("a", 1), 0).expect("append"), None);
        batch.set_position("a", "s1").expect("position");
        batch.commit().expect("commit");
        assert_eq!(store.position("a").expect("read").as_deref(), Some("s1"));
        assert_eq!(store.counts().get("a"), Some(&1));
        assert_eq!(store.head().expect("head"), 2);
        let page = store.page(1, 10).expect("page");
        assert_eq!(page.len(), 1);
        assert_eq!((page[0].cursor, page[0].message.account.as_str()), (2, "b"));
    }

    #[test]
    fn a_version_1_file_is_migrated_and_keeps_its_messages() {
        // The schema of version 1, with one message in it.
        let conn = Connection::open_in_memory().expect("open");
        conn.execute_batch(
            "CREATE TABLE messages (
                 cursor INTEGER PRIMARY KEY AUTOINCREMENT, account TEXT NOT NULL,
                 room_id TEXT NOT NULL, event_id TEXT NOT NULL, sender TEXT NOT NULL,
                 body TEXT NOT NULL, thread_root TEXT, origin_ts_ms INTEGER NOT NULL,
                 stored_ms INTEGER NOT NULL, UNIQUE (account, event_id));
             INSERT INTO messages (account, room_id, event_id, sender, body, origin_ts_ms, stored_ms)
             VALUES ('a', '!r:x', '$old', '@p:x', 'before', 1, 1);
             PRAGMA user_version = 1;",
        )
        .expect("a version 1 file");
        let mut store = Store::init(conn).expect("migrated");
        let mut batch = store.transaction().expect("tx");
        let new = NewMessage {
            is_direct: true,
            mentioned: true,
            ..message("a", 2)
        };
        assert_eq!(batch.append(&new, 2).expect("append"), Some(2));
        batch.commit().expect("commit");
        let page = store.page(0, 10).expect("page");
        let flags: Vec<(&str, bool, bool)> = page
            .iter()
            .map(|m| {
                (
                    m.message.body.as_str(),
                    m.message.is_direct,
                    m.message.mentioned,
                )
            })
            .collect();
        assert_eq!(flags, [("before", false, false), ("m2", true, true)]);
        let version: i64 = store
            .conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .expect("version");
        assert_eq!(version, VERSION);
    }

    #[test]
    fn a_batch_dropped_without_commit_leaves_nothing() {
        let mut store = Store::memory().expect("store");
        {
            let mut batch = store.transaction().expect("tx");
            batch.append(&message("a", 1), 0).expect("append");
            batch.set_position("a", "s1").expect("position");
        }
        assert_eq!(store.position("a").expect("read"), None);
        assert!(store.page(0, 10).expect("page").is_empty());
        assert_eq!(store.counts().get("a"), None);
    }

    #[test]
    fn trimming_by_count_keeps_the_newest_and_records_a_gap_cursors_never_come_back() {
        let mut store = Store::memory().expect("store");
        let mut batch = store.transaction().expect("tx");
        for e in 1..=10 {
            batch.append(&message("a", e), 0).expect("append");
        }
        batch.append(&message("b", 1), 0).expect("append");
        let trimmed = batch.trim(4, None).expect("trim");
        batch.commit().expect("commit");
        assert_eq!(trimmed.get("a"), Some(&6));
        assert_eq!(trimmed.get("b"), None);
        assert_eq!(store.counts().get("a"), Some(&4));
        let cursors: Vec<u64> = store
            .page(0, 100)
            .expect("page")
            .iter()
            .map(|m| m.cursor)
            .collect();
        assert_eq!(cursors, vec![7, 8, 9, 10, 11]);
        let gaps = store.gaps(2).expect("gaps");
        assert_eq!(
            gaps,
            vec![Gap {
                account: "a".into(),
                from: 3,
                to: 6
            }]
        );
        assert!(store.gaps(6).expect("gaps").is_empty());
        // The newest row trimmed away does not give its cursor again.
        let mut batch = store.transaction().expect("tx");
        batch.trim(0, None).expect("trim all");
        assert_eq!(batch.append(&message("c", 1), 0).expect("append"), Some(12));
        batch.commit().expect("commit");
    }

    #[test]
    fn trimming_by_age_removes_what_was_stored_before_the_limit() {
        let mut store = Store::memory().expect("store");
        let mut batch = store.transaction().expect("tx");
        batch.append(&message("a", 1), 100).expect("append");
        batch.append(&message("a", 2), 100).expect("append");
        batch.append(&message("a", 3), 500).expect("append");
        batch.commit().expect("commit");
        let mut batch = store.transaction().expect("tx");
        let trimmed = batch.trim(1000, Some(200)).expect("trim");
        batch.commit().expect("commit");
        assert_eq!(trimmed.get("a"), Some(&2));
        assert_eq!(store.counts().get("a"), Some(&1));
        assert_eq!(store.trimmed().expect("trimmed").get("a"), Some(&2));
    }

    #[test]
    fn an_ack_never_moves_a_consumer_back_and_a_send_record_keeps_the_first_event() {
        let mut store = Store::memory().expect("store");
        let mut batch = store.transaction().expect("tx");
        assert_eq!(batch.consumer_or("agent", 3, 0).expect("create"), 3);
        assert_eq!(batch.consumer_or("agent", 0, 0).expect("exists"), 3);
        assert_eq!(batch.ack("agent", 7, 0).expect("ack"), 7);
        assert_eq!(batch.ack("agent", 5, 0).expect("ack"), 7);
        assert_eq!(
            batch
                .record_send("a", "t1", "!r:x", "$one", 0)
                .expect("record"),
            "$one"
        );
        assert_eq!(
            batch
                .record_send("a", "t1", "!r:x", "$two", 0)
                .expect("record"),
            "$one"
        );
        batch.commit().expect("commit");
        assert_eq!(store.consumers().expect("read").get("agent"), Some(&7));
        assert_eq!(
            store.sent("a", "t1").expect("read").as_deref(),
            Some("$one")
        );
        assert_eq!(store.sent("b", "t1").expect("read"), None);
        let mut batch = store.transaction().expect("tx");
        for t in 2..=5 {
            batch
                .record_send("a", &format!("t{t}"), "!r:x", &format!("$e{t}"), t)
                .expect("record");
        }
        batch.trim(2, Some(0)).expect("trim");
        batch.commit().expect("commit");
        let kept: Vec<bool> = (1..=5)
            .map(|t| store.sent("a", &format!("t{t}")).expect("read").is_some())
            .collect();
        assert_eq!(
            kept,
            [false, false, false, true, true],
            "the newest 2 sends are kept"
        );
    }
}
