//! Retention and archive: the maintenance leader's task that bounds what
//! the database keeps (`docs/operations.md`, "Retention and archive"; the
//! rules are in [`crate::domain::retention`], the SQL in
//! [`crate::db::retention`]).
//!
//! `run_events` is partitioned by the UTC day of the run id (UUIDv7: the
//! run's creation time), so a day of events goes with one `DETACH` and one
//! `DROP TABLE` instead of millions of deletes. Every pass (each
//! [`Settings::every`], and at once when the node becomes leader), while
//! this node leads:
//!
//! 1. **Partitions ahead**: today's and the next [`Settings::ahead`] days'
//!    partitions are created if missing (every node also does this once at
//!    start-up, so a fresh node writes into its day at once; the default
//!    partition catches anything else, so an insert never fails).
//! 2. **Old runs and days**, oldest first: for each day that lies wholly
//!    before the cutoff (`now − retention`), the runs of that day that ended
//!    before the cutoff (or, without an end time, were created before it)
//!    in a final state are deleted in batches of [`Settings::batch`] (one
//!    statement each, by primary key; after each batch the task pauses as
//!    long as the batch took, so it takes at most half of one connection
//!    and never keeps firing waiting), then the day is detached; the events
//!    of its runs that keep their history (not ended, or ended after the
//!    cutoff) move to the default partition in the same transaction, so a
//!    run younger than the retention never loses an event. Then the runs
//!    of the partly expired days are deleted the same way.
//! 3. **Archive and drop**: each detached day is, with `--archive-dir`,
//!    first written as `run-events-YYYY-MM-DD.jsonl.gz` (gzip JSON Lines,
//!    one event per line, [`StoredEvent`]; written to a temporary name,
//!    synced, renamed, the directory synced) and only then dropped. A
//!    failed write keeps the day's table (detached: it no longer slows
//!    any query) and is tried again at the next pass. The default
//!    partition's events of deleted runs are archived the same way, before
//!    the deleting transaction commits
//!    (`run-events-default-<first run id>.jsonl.gz`).
//! 4. **Audit**: audit events older than `--audit-retention` are deleted in
//!    batches.
//!
//! `DETACH PARTITION` takes an exclusive lock on `run_events` for a moment
//! (a default partition rules out `DETACH ... CONCURRENTLY`): it waits at
//! most [`Settings::lock_timeout`] for the writers in flight, so writers
//! queue behind it no longer than that, and a detach that timed out is
//! tried again a little later. Creating and dropping day tables never
//! blocks writers of other days. Each step that fails is logged, counted
//! (`sked_retention_errors_total{step}`) and retried at the next pass;
//! partition DDL is serialised on an advisory lock, so even two nodes that
//! both believe they lead do no harm.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use chrono::{DateTime, NaiveDate, TimeDelta, Utc};
use flate2::Compression;
use flate2::write::GzEncoder;
use sqlx::PgPool;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::cluster::Leadership;
use crate::db;
use crate::domain::Clock;
use crate::domain::retention::{
    DEFAULT_AUDIT_RETENTION_DAYS, DEFAULT_RETENTION_DAYS, StoredEvent, day_expired, day_floor_id,
    days_ahead, id_floor,
};
use crate::telemetry::metrics;

/// What retention keeps and how it paces itself.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Run history kept (`--retention`): runs and their events.
    pub runs: TimeDelta,
    /// Audit events kept (`--audit-retention`).
    pub audit: TimeDelta,
    /// Where days are archived before they are dropped (`--archive-dir`);
    /// `None`: dropped without an archive.
    pub archive_dir: Option<PathBuf>,
    /// Interval of passes.
    pub every: Duration,
    /// Days of partitions created ahead of today.
    pub ahead: u32,
    /// Rows per delete statement (runs, audit events).
    pub batch: i64,
    /// Longest wait for a lock on `run_events` (writers queue behind a
    /// waiting detach at most this long).
    pub lock_timeout: Duration,
    /// Tries of a detach per pass (lock timeouts), a second apart.
    pub detach_tries: u32,
    /// Events read per page while archiving.
    pub page: i32,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            runs: TimeDelta::days(DEFAULT_RETENTION_DAYS),
            audit: TimeDelta::days(DEFAULT_AUDIT_RETENTION_DAYS),
            archive_dir: None,
            every: Duration::from_secs(60),
            ahead: 7,
            batch: 1000,
            lock_timeout: Duration::from_millis(100),
            detach_tries: 5,
            page: 10_000,
        }
    }
}

/// Errors of archiving one file.
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    /// Reading the events failed.
    #[error("reading events: {0}")]
    Db(#[from] db::Error),
    /// Writing the file failed.
    #[error("writing {path}: {source}")]
    Io {
        /// The file (its final name).
        path: PathBuf,
        /// What failed.
        source: std::io::Error,
    },
}

/// Creates today's and the next `ahead` days' `run_events` partitions
/// (UTC, at `now`) where missing; returns how many it created. Every node
/// calls it at start-up; the leader at each pass.
///
/// # Errors
/// [`db::Error`] from the first partition that could not be created
/// (those before it stay created).
pub async fn ensure_partitions(
    pool: &PgPool,
    now: DateTime<Utc>,
    ahead: u32,
    lock: Duration,
) -> Result<u32, db::Error> {
    let mut created = 0;
    for day in days_ahead(now, ahead) {
        if db::retention::run_event_partition_create(pool, day, lock).await? {
            tracing::info!(%day, "run_events partition created");
            created += 1;
        }
    }
    Ok(created)
}

/// Checks at start-up that `dir` can hold archive files: creates it if
/// missing, then writes, syncs and removes a probe file.
///
/// # Errors
/// The I/O error, for a node that should refuse to start.
pub fn check_archive_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let probe = dir.join(format!(".sked-probe.{}", std::process::id()));
    let mut f = File::create(&probe)?;
    f.write_all(b"sked")?;
    f.sync_all()?;
    drop(f);
    std::fs::remove_file(&probe)
}

/// The retention task of one node (module docs).
#[derive(Debug, Clone)]
pub struct Retention {
    /// The engine's pool (one connection at a time).
    pub pool: PgPool,
    /// Source of now: the cutoffs and today's partition.
    pub clock: Clock,
    /// Passes run only while this node leads.
    pub leadership: Leadership,
    /// What to keep.
    pub settings: Settings,
}

impl Retention {
    /// Runs a pass every [`Settings::every`] while this node leads, and one
    /// at once when it becomes leader, until `stop`. Never returns before
    /// `stop`: failures are logged and retried at the next pass.
    pub async fn run(&self, stop: CancellationToken) {
        let mut lead = self.leadership.watch();
        let mut was_leader = false;
        let mut last: Option<Instant> = None;
        loop {
            let leader = self.leadership.is_leader();
            if leader && (!was_leader || last.is_none_or(|t| t.elapsed() >= self.settings.every)) {
                last = Some(Instant::now());
                self.pass(&stop).await;
            }
            was_leader = leader;
            let next = last.map_or(self.settings.every, |t| {
                self.settings.every.saturating_sub(t.elapsed())
            });
            tokio::select! {
                _ = tokio::time::sleep(next.max(Duration::from_millis(10))) => {}
                r = lead.changed() => if r.is_err() {
                    // The election is gone (the node stops): wait for stop.
                    stop.cancelled().await;
                    return;
                },
                _ = stop.cancelled() => return,
            }
        }
    }

    fn leading(&self, stop: &CancellationToken) -> bool {
        !stop.is_cancelled() && self.leadership.is_leader()
    }

    /// One pass (module docs): partitions ahead, old runs and days, archive
    /// and drop, audit. Stops early when `stop` fires or leadership is
    /// lost; a failed step is logged and counted, and the pass goes on
    /// where that is safe.
    pub async fn pass(&self, stop: &CancellationToken) {
        let s = &self.settings;
        let now = self.clock.now();
        let cutoff = now - s.runs;
        if let Err(e) = ensure_partitions(&self.pool, now, s.ahead, s.lock_timeout * 10).await {
            failed("partition_create", &e);
        }
        let days = match db::retention::run_event_days(&self.pool).await {
            Ok(d) => d,
            Err(e) => return failed("partition_list", &e),
        };
        // Runs in id order: all of an expired day's deletable runs go
        // before the day is detached (its scan of the runs left is short).
        let mut cursor = Uuid::nil();
        let mut runs_ok = true;
        for d in days
            .iter()
            .filter(|d| d.attached && day_expired(d.day, cutoff))
        {
            let Some(next) = d.day.succ_opt() else { break };
            if !self
                .delete_runs(&mut cursor, day_floor_id(next), cutoff, stop)
                .await
            {
                runs_ok = false;
                break;
            }
            if !self.leading(stop) {
                return;
            }
            self.detach(d.day, cutoff, stop).await;
        }
        if runs_ok {
            let bound = id_floor(cutoff + TimeDelta::milliseconds(1));
            self.delete_runs(&mut cursor, bound, cutoff, stop).await;
        }
        if !self.leading(stop) {
            return;
        }
        self.archive_and_drop().await;
        self.delete_audit(now - s.audit, stop).await;
        self.delete_notifications(now - s.runs, stop).await;
        if self.leading(stop) {
            ::metrics::gauge!(metrics::RETENTION_LAST_PASS)
                .set(self.clock.now().timestamp() as f64);
        }
    }

    /// Deletes the runs with `cursor < id < before` that ended before
    /// `cutoff`, batch by batch (module docs), moving `cursor` on. Returns
    /// whether it got through (false: stopped, leadership lost, or a
    /// failure, logged).
    async fn delete_runs(
        &self,
        cursor: &mut Uuid,
        before: Uuid,
        cutoff: DateTime<Utc>,
        stop: &CancellationToken,
    ) -> bool {
        while *cursor < before {
            if !self.leading(stop) {
                return false;
            }
            let started = Instant::now();
            match self.delete_runs_batch(*cursor, before, cutoff).await {
                Ok(Some(last)) => *cursor = last,
                Ok(None) => return true,
                Err(e) => {
                    failed("run_delete", &e);
                    return false;
                }
            }
            // As long as the batch took: at most half of one connection.
            let pause = started.elapsed().max(Duration::from_millis(5));
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = stop.cancelled() => return false,
            }
        }
        true
    }

    /// One batch, in one transaction: the runs, their events in the
    /// default partition, and (with an archive directory) the archive file
    /// of those events before the commit. Returns the last run id looked
    /// at, `None` when the range is done.
    async fn delete_runs_batch(
        &self,
        after: Uuid,
        before: Uuid,
        cutoff: DateTime<Utc>,
    ) -> Result<Option<Uuid>, ArchiveError> {
        let archive = self.settings.archive_dir.as_ref();
        let mut tx = self.pool.begin().await.map_err(db::Error::from)?;
        let batch =
            db::retention::run_delete_old(&mut tx, after, before, cutoff, self.settings.batch)
                .await?;
        let (_, events) =
            db::retention::run_event_default_delete(&mut tx, &batch.deleted, archive.is_some())
                .await?;
        if let (Some(dir), Some(first)) = (archive, events.first()) {
            let name = format!("run-events-default-{}.jsonl.gz", first.run_id.simple());
            write_archive(dir.clone(), name, events).await?;
        }
        tx.commit().await.map_err(db::Error::from)?;
        if !batch.deleted.is_empty() {
            ::metrics::counter!(metrics::RETENTION_RUNS_DELETED)
                .increment(batch.deleted.len() as u64);
            tracing::debug!(runs = batch.deleted.len(), "retention deleted runs");
        }
        Ok(batch.last_scanned)
    }

    /// Detaches `day`, trying again on a lock timeout up to
    /// [`Settings::detach_tries`] times.
    async fn detach(&self, day: NaiveDate, cutoff: DateTime<Utc>, stop: &CancellationToken) {
        let s = &self.settings;
        for attempt in 1..=s.detach_tries.max(1) {
            match db::retention::run_event_partition_detach(&self.pool, day, cutoff, s.lock_timeout)
                .await
            {
                Ok(moved) => {
                    let moved = moved.unwrap_or(0);
                    ::metrics::counter!(metrics::RETENTION_EVENTS_KEPT).increment(moved as u64);
                    tracing::info!(%day, kept_events = moved, "run_events day detached by retention");
                    return;
                }
                Err(e) if attempt < s.detach_tries => {
                    tracing::debug!(%day, attempt, error = %e, "detaching a day failed; trying again");
                }
                Err(e) => return failed("partition_detach", &e),
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = stop.cancelled() => return,
            }
            if !self.leading(stop) {
                return;
            }
        }
    }

    /// Archives (with an archive directory) and drops every detached day.
    async fn archive_and_drop(&self) {
        let days = match db::retention::run_event_days(&self.pool).await {
            Ok(d) => d,
            Err(e) => return failed("partition_list", &e),
        };
        let attached = days.iter().filter(|d| d.attached).count();
        let detached: Vec<_> = days.iter().filter(|d| !d.attached).collect();
        ::metrics::gauge!(metrics::RUN_EVENT_PARTITIONS, "state" => "attached")
            .set(attached as f64);
        ::metrics::gauge!(metrics::RUN_EVENT_PARTITIONS, "state" => "detached")
            .set(detached.len() as f64);
        for d in detached {
            if let Some(dir) = &self.settings.archive_dir {
                match self.archive_day(dir, d.day).await {
                    Ok((_, 0)) => {
                        tracing::info!(day = %d.day, "run_events day empty: no archive file")
                    }
                    Ok((path, n)) => {
                        tracing::info!(day = %d.day, events = n, file = %path.display(), "run_events day archived");
                    }
                    Err(e) => {
                        ::metrics::counter!(metrics::ARCHIVE_FAILURES).increment(1);
                        tracing::error!(day = %d.day, error = %e, "archiving a run_events day failed; it is kept and tried again at the next pass");
                        continue;
                    }
                }
            }
            match db::retention::run_event_detached_drop(
                &self.pool,
                d.day,
                self.settings.lock_timeout * 10,
            )
            .await
            {
                Ok(true) => {
                    ::metrics::counter!(metrics::RETENTION_PARTITIONS_DROPPED).increment(1);
                    ::metrics::counter!(metrics::RETENTION_DROPPED_BYTES)
                        .increment(u64::try_from(d.bytes).unwrap_or(0));
                    tracing::info!(day = %d.day, bytes = d.bytes, "run_events day dropped by retention");
                }
                Ok(false) => {}
                Err(e) => failed("partition_drop", &e),
            }
        }
    }

    /// Writes the detached table of `day` to `run-events-YYYY-MM-DD.jsonl.gz`
    /// in `dir`, page by page; returns the file and its events. An empty
    /// day writes no file.
    async fn archive_day(
        &self,
        dir: &Path,
        day: NaiveDate,
    ) -> Result<(PathBuf, u64), ArchiveError> {
        let name = format!("run-events-{}.jsonl.gz", day.format("%Y-%m-%d"));
        let page_size = self.settings.page;
        let read =
            |after| db::retention::run_event_detached_page(&self.pool, day, after, page_size);
        let mut page = read((Uuid::nil(), 0)).await?;
        if page.is_empty() {
            return Ok((dir.join(name), 0));
        }
        let mut file = blocking(ArchiveFile::create(dir.to_path_buf(), name)).await?;
        let result = async move {
            loop {
                let last = page.last().map(|e| (e.run_id, e.seq));
                let full = page.len() >= page_size as usize;
                file = blocking(move || {
                    file.write(&page)?;
                    Ok(file)
                })
                .await?;
                match last {
                    Some(after) if full => page = read(after).await?,
                    _ => break,
                }
                if page.is_empty() {
                    break;
                }
            }
            blocking(move || file.finish()).await
        }
        .await;
        if result.is_err() {
            remove_temporary(dir);
        }
        result
    }

    /// Deletes audit events made before `cutoff`, batch by batch.
    async fn delete_audit(&self, cutoff: DateTime<Utc>, stop: &CancellationToken) {
        let before = id_floor(cutoff);
        loop {
            if !self.leading(stop) {
                return;
            }
            let started = Instant::now();
            match db::retention::audit_delete_old(&self.pool, before, self.settings.batch).await {
                Ok(n) => {
                    if n > 0 {
                        ::metrics::counter!(metrics::RETENTION_AUDIT_DELETED).increment(n);
                    }
                    if (n as i64) < self.settings.batch {
                        return;
                    }
                }
                Err(e) => return failed("audit_delete", &e),
            }
            let pause = started.elapsed().max(Duration::from_millis(5));
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = stop.cancelled() => return,
            }
        }
    }
}

impl Retention {
    /// Deletes settled failure notifications written before `cutoff` (the
    /// runs' retention), batch by batch.
    async fn delete_notifications(&self, cutoff: DateTime<Utc>, stop: &CancellationToken) {
        loop {
            if !self.leading(stop) {
                return;
            }
            let started = Instant::now();
            match db::notifications::notification_delete_old(
                &self.pool,
                cutoff,
                self.settings.batch,
            )
            .await
            {
                Ok(n) if (n as i64) < self.settings.batch => return,
                Ok(_) => {}
                Err(e) => return failed("notification_delete", &e),
            }
            let pause = started.elapsed().max(Duration::from_millis(5));
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = stop.cancelled() => return,
            }
        }
    }
}

/// Logs and counts a failed step.
fn failed(step: &'static str, e: &dyn std::fmt::Display) {
    ::metrics::counter!(metrics::RETENTION_ERRORS, "step" => step).increment(1);
    tracing::warn!(step, error = %e, "retention step failed; tried again at the next pass");
}

/// Runs file I/O off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ArchiveError> + Send + 'static,
) -> Result<T, ArchiveError> {
    tokio::task::spawn_blocking(f).await.unwrap_or_else(|e| {
        Err(ArchiveError::Io {
            path: PathBuf::new(),
            source: std::io::Error::other(e.to_string()),
        })
    })
}

/// Writes `events` to the archive file `name` in `dir` (the default
/// partition's events of a batch of deleted runs).
async fn write_archive(
    dir: PathBuf,
    name: String,
    events: Vec<StoredEvent>,
) -> Result<(), ArchiveError> {
    let d = dir.clone();
    let r = blocking(move || {
        let mut f = ArchiveFile::create(dir, name)()?;
        f.write(&events)?;
        f.finish()
    })
    .await;
    if r.is_err() {
        remove_temporary(&d);
    }
    r.map(|_| ())
}

/// Removes this process's temporary archive files in `dir` (a write that
/// failed half way).
fn remove_temporary(dir: &Path) {
    let suffix = format!(".{}.tmp", std::process::id());
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let name = e.file_name();
            let name = name.to_string_lossy();
            if name.starts_with('.') && name.ends_with(&suffix) {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}

/// An archive file being written: gzip JSON Lines under a temporary name
/// in the archive directory, renamed to its final name once complete and
/// synced, so a file with the final name is always whole.
struct ArchiveFile {
    enc: GzEncoder<BufWriter<File>>,
    dir: PathBuf,
    tmp: PathBuf,
    path: PathBuf,
    events: u64,
}

impl ArchiveFile {
    /// A closure creating the file `name` in `dir` (for [`blocking`]).
    fn create(
        dir: PathBuf,
        name: String,
    ) -> impl FnOnce() -> Result<ArchiveFile, ArchiveError> + Send + 'static {
        move || {
            let path = dir.join(&name);
            let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
            let io = |source| ArchiveError::Io {
                path: path.clone(),
                source,
            };
            std::fs::create_dir_all(&dir).map_err(io)?;
            let file = File::create(&tmp).map_err(io)?;
            Ok(ArchiveFile {
                // Fast compression: the leader also fires; JSON compresses
                // well at any level.
                enc: GzEncoder::new(BufWriter::with_capacity(1 << 16, file), Compression::fast()),
                dir,
                tmp,
                path,
                events: 0,
            })
        }
    }

    fn io(&self, source: std::io::Error) -> ArchiveError {
        ArchiveError::Io {
            path: self.path.clone(),
            source,
        }
    }

    /// Appends one line per event.
    fn write(&mut self, events: &[StoredEvent]) -> Result<(), ArchiveError> {
        for e in events {
            serde_json::to_writer(&mut self.enc, e).map_err(|e| self.io(e.into()))?;
            self.enc.write_all(b"\n").map_err(|e| self.io(e))?;
            self.events += 1;
        }
        Ok(())
    }

    /// Completes the gzip stream, syncs the file, renames it to its final
    /// name and syncs the directory; returns the path and the events.
    fn finish(self) -> Result<(PathBuf, u64), ArchiveError> {
        let io = |source| ArchiveError::Io {
            path: self.path.clone(),
            source,
        };
        let buf = self.enc.finish().map_err(io)?;
        let file = buf.into_inner().map_err(|e| io(e.into_error()))?;
        file.sync_all().map_err(io)?;
        drop(file);
        std::fs::rename(&self.tmp, &self.path).map_err(io)?;
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io)?;
        ::metrics::counter!(metrics::ARCHIVE_FILES).increment(1);
        ::metrics::counter!(metrics::ARCHIVE_EVENTS).increment(self.events);
        Ok((self.path, self.events))
    }
}
