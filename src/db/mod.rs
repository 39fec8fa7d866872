//! All SQL of sked. One file per table family; functions take
//! `impl PgExecutor` (a pool or a transaction) and return domain types.
//! Queries are named Entity+Verb (`run_claim`, `binding_fire_due`) and checked
//! at compile time against `migrations/` (`.sqlx/` is committed, builds use
//! `SQLX_OFFLINE=true`).
//!
//! Every run state change is one conditional `UPDATE ... WHERE state =
//! $expected`, so a late writer can never overwrite a terminal run.

pub mod bindings;
pub mod cluster;
pub mod console;
pub mod definitions;
pub mod events;
pub mod notifications;
pub mod notify;
pub mod retention;
pub mod runs;
pub mod tenancy;

use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;

/// Largest NOTIFY payload we send; PostgreSQL's limit is 8000 bytes.
pub const MAX_NOTIFY_PAYLOAD: usize = 7900;

/// Errors of the database layer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No row matched (or it belongs to another tenant).
    #[error("not found")]
    NotFound,
    /// A unique constraint was violated (the row is a duplicate); carries
    /// the constraint name.
    #[error("duplicate ({0})")]
    Duplicate(String),
    /// The state of other rows refuses the operation (e.g. a definition
    /// still has bindings); carries the explanation.
    #[error("refused: {0}")]
    Refused(String),
    /// A tenant quota refuses the operation; carries the explanation.
    #[error("over quota: {0}")]
    OverQuota(String),
    /// A conditional update found a newer version (etag mismatch).
    #[error("conflict: the row changed")]
    Conflict,
    /// A JSON document in the database does not decode into its domain type.
    #[error("corrupt {what} in database: {source}")]
    Corrupt {
        /// Which document.
        what: &'static str,
        /// Decoder error.
        source: serde_json::Error,
    },
    /// Connection or query failure.
    #[error(transparent)]
    Sqlx(sqlx::Error),
}

impl From<sqlx::Error> for Error {
    fn from(e: sqlx::Error) -> Self {
        if let sqlx::Error::Database(db) = &e
            && db.is_unique_violation()
        {
            return Error::Duplicate(db.constraint().unwrap_or_default().to_string());
        }
        if matches!(e, sqlx::Error::RowNotFound) {
            return Error::NotFound;
        }
        Error::Sqlx(e)
    }
}

/// Decodes a JSON column into a domain type.
pub(crate) fn decode<T: serde::de::DeserializeOwned>(
    what: &'static str,
    v: serde_json::Value,
) -> Result<T, Error> {
    serde_json::from_value(v).map_err(|source| Error::Corrupt { what, source })
}

/// A run policy from its columns (`overlap_policy`, `retry_policy`,
/// `timeout_secs`, `priority`).
pub(crate) fn policy_from_cols(
    overlap: &str,
    retry: serde_json::Value,
    timeout_secs: Option<i32>,
    priority: i32,
) -> Result<crate::domain::RunPolicy, Error> {
    Ok(crate::domain::RunPolicy {
        overlap: crate::domain::OverlapPolicy::parse(overlap).ok_or_else(|| Error::Corrupt {
            what: "overlap policy",
            source: <serde_json::Error as serde::de::Error>::custom(format!(
                "unknown value {overlap:?}"
            )),
        })?,
        retry: decode("retry policy", retry)?,
        timeout_secs: timeout_secs.and_then(|t| u32::try_from(t).ok()),
        priority,
    })
}

/// Makes the rest of the caller's transaction plan each prepared statement
/// once per connection (`SET LOCAL plan_cache_mode = force_generic_plan`).
///
/// Why: PostgreSQL re-plans a prepared statement on every call when its
/// plan for the call's own parameter values looks cheaper than the generic
/// one, and it always plans the first five calls so. A statement over
/// `UNNEST` of short arrays often looks cheaper planned for its values (a
/// generic plan assumes 100 elements): on a busy `runs` table the run
/// insert of a single TriggerRun was planned anew on every call, 1.2 ms of
/// planning for 0.4 ms of execution (`pg_stat_statements`, `plans` =
/// `calls`). Costs one round trip. Without effect outside a transaction
/// block (PostgreSQL warns).
///
/// # Errors
/// [`Error::Sqlx`] on database failure.
pub async fn generic_plans(conn: &mut sqlx::PgConnection) -> Result<(), Error> {
    sqlx::raw_sql("SET LOCAL plan_cache_mode = force_generic_plan")
        .execute(conn)
        .await?;
    Ok(())
}

/// The `BEGIN` of a transaction planned as by [`generic_plans`], in the
/// same round trip (one simple query).
pub const BEGIN_GENERIC: &str = "BEGIN; SET LOCAL plan_cache_mode = force_generic_plan";

/// Begins a transaction on `pool` whose statements are planned once per
/// connection ([`generic_plans`]), without the round trip of its own.
///
/// # Errors
/// [`Error::Sqlx`] on database failure.
pub async fn begin_generic(
    pool: &sqlx::PgPool,
) -> Result<sqlx::Transaction<'static, sqlx::Postgres>, Error> {
    Ok(pool.begin_with(BEGIN_GENERIC).await?)
}

/// Takes the session-level advisory lock `key` on `conn`, waiting for it.
/// Held until [`advisory_unlock`] or the connection closes.
///
/// # Errors
/// [`Error::Sqlx`] on database failure.
pub async fn advisory_lock(conn: &mut sqlx::PgConnection, key: i64) -> Result<(), Error> {
    sqlx::query_scalar!(
        r#"SELECT 1 AS "x!" FROM (SELECT pg_advisory_lock($1)) l"#,
        key
    )
    .fetch_one(conn)
    .await?;
    Ok(())
}

/// Releases the advisory lock `key` taken with [`advisory_lock`].
///
/// # Errors
/// [`Error::Sqlx`] on database failure.
pub async fn advisory_unlock(conn: &mut sqlx::PgConnection, key: i64) -> Result<(), Error> {
    sqlx::query_scalar!(r#"SELECT pg_advisory_unlock($1) AS "x!""#, key)
        .fetch_one(conn)
        .await?;
    Ok(())
}

/// A `timestamptz` column read without trusting its range.
///
/// PostgreSQL stores instants from 4713 BC to 294276 AD (and `±infinity`),
/// while chrono ends at ±262143 and sqlx's own `DateTime` decoding panics past
/// it; the protobuf `Timestamp` of the API, the RFC 3339 text in stored
/// schedules and the schedule arithmetic only work within years 1 to 9999.
/// Columns that stored data could have put out of that range (planted rows,
/// rows written before input validation) are read as this type, so one bad
/// row is a per-row error ([`DbTime::get`]), never a failed query or a panic
/// that stops the scheduler for every tenant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct DbTime(
    /// Microseconds since 2000-01-01 00:00:00 UTC (PostgreSQL's epoch), as
    /// stored; `i64::MAX`/`i64::MIN` are `infinity`/`-infinity`.
    pub i64,
);

/// Microseconds from the Unix epoch to PostgreSQL's (2000-01-01).
const PG_EPOCH_UNIX_MICROS: i64 = 946_684_800_000_000;

/// First instant the engine computes with: 0001-01-01T00:00:00Z, the protobuf
/// `Timestamp` minimum (Unix microseconds).
pub const MIN_TIME_UNIX_MICROS: i64 = -62_135_596_800_000_000;
/// Last instant the engine computes with: 9999-12-31T23:59:59.999999Z, the
/// protobuf `Timestamp` maximum at microsecond precision (Unix microseconds).
pub const MAX_TIME_UNIX_MICROS: i64 = 253_402_300_799_999_999;

impl DbTime {
    /// The instant, if within years 1 to 9999 ([`MIN_TIME_UNIX_MICROS`] ..=
    /// [`MAX_TIME_UNIX_MICROS`]).
    ///
    /// # Errors
    /// [`Error::Corrupt`] naming `what` and the stored value's year when it is
    /// outside that range.
    pub fn get(self, what: &'static str) -> Result<chrono::DateTime<chrono::Utc>, Error> {
        self.0
            .checked_add(PG_EPOCH_UNIX_MICROS)
            .filter(|us| (MIN_TIME_UNIX_MICROS..=MAX_TIME_UNIX_MICROS).contains(us))
            .and_then(chrono::DateTime::from_timestamp_micros)
            .ok_or_else(|| Error::Corrupt {
                what,
                source: <serde_json::Error as serde::de::Error>::custom(format!(
                    "timestamp {} is outside years 1 to 9999",
                    self.describe()
                )),
            })
    }

    /// A short description of the stored value for error messages: the
    /// approximate year, or `infinity`.
    fn describe(self) -> String {
        match self.0 {
            i64::MAX => "infinity".into(),
            i64::MIN => "-infinity".into(),
            us => {
                // Good enough to name the culprit (mean Gregorian year).
                const MICROS_PER_YEAR: i128 = 31_556_952_000_000;
                let year = 2000 + i128::from(us).div_euclid(MICROS_PER_YEAR);
                format!("in year ~{year}")
            }
        }
    }
}

impl sqlx::Type<sqlx::Postgres> for DbTime {
    fn type_info() -> sqlx::postgres::PgTypeInfo {
        <chrono::DateTime<chrono::Utc> as sqlx::Type<sqlx::Postgres>>::type_info()
    }
    fn compatible(ty: &sqlx::postgres::PgTypeInfo) -> bool {
        <chrono::DateTime<chrono::Utc> as sqlx::Type<sqlx::Postgres>>::compatible(ty)
    }
}

impl<'r> sqlx::Decode<'r, sqlx::Postgres> for DbTime {
    fn decode(value: sqlx::postgres::PgValueRef<'r>) -> Result<Self, sqlx::error::BoxDynError> {
        match value.format() {
            // The binary form is the raw microsecond count: no range to trust.
            sqlx::postgres::PgValueFormat::Binary => Ok(DbTime(<i64 as sqlx::Decode<
                sqlx::Postgres,
            >>::decode(value)?)),
            // Text only appears outside prepared statements; chrono's parser
            // errors (does not panic) on what it cannot hold.
            sqlx::postgres::PgValueFormat::Text => {
                let t =
                    <chrono::DateTime<chrono::Utc> as sqlx::Decode<sqlx::Postgres>>::decode(value)?;
                Ok(DbTime(
                    t.timestamp_micros().saturating_sub(PG_EPOCH_UNIX_MICROS),
                ))
            }
        }
    }
}

/// Truncates `s` to at most `max` characters (a stored reason that quotes
/// data stays short).
pub(crate) fn clip(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}

/// Encodes a domain value as a JSON column.
pub(crate) fn encode<T: serde::Serialize>(v: &T) -> serde_json::Value {
    // Serialising our own plain data types cannot fail (no maps with non-string keys).
    serde_json::to_value(v).unwrap_or(serde_json::Value::Null)
}

/// Opens a pool to `url` with up to `max_connections` connections.
///
/// # Errors
/// [`Error::Sqlx`] when the database cannot be reached.
pub async fn connect(url: &str, max_connections: u32) -> Result<PgPool, Error> {
    // JIT off for every session: sked's statements are short OLTP ones over
    // indexes, and once a batch statement's estimate passes
    // `jit_above_cost` PostgreSQL compiles it anew on every execution —
    // measured at about 1 s of a 1.6 s claim over 130 000 queued runs.
    let options = url
        .parse::<sqlx::postgres::PgConnectOptions>()?
        .options([("jit", "off")]);
    Ok(PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(std::time::Duration::from_secs(10))
        .connect_with(options)
        .await?)
}

/// Applies the embedded migrations (`migrations/`), idempotently.
///
/// # Errors
/// [`sqlx::migrate::MigrateError`] when a migration fails or the database
/// has a migration this binary does not know.
pub async fn migrate(pool: &PgPool) -> Result<(), sqlx::migrate::MigrateError> {
    sqlx::migrate!("./migrations").run(pool).await
}

/// Checks the database answers (health).
///
/// # Errors
/// [`Error::Sqlx`] when it does not.
pub async fn ping(pool: &PgPool) -> Result<(), Error> {
    sqlx::query!("SELECT 1 AS one").fetch_one(pool).await?;
    Ok(())
}

/// Splits `items` into NOTIFY payloads `<prefix><item>,<item>...` each at
/// most [`MAX_NOTIFY_PAYLOAD`] bytes.
pub(crate) fn notify_payloads(
    prefix: &str,
    items: impl IntoIterator<Item = String>,
) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::from(prefix);
    for item in items {
        if cur.len() > prefix.len() && cur.len() + 1 + item.len() > MAX_NOTIFY_PAYLOAD {
            out.push(std::mem::replace(&mut cur, String::from(prefix)));
        }
        if cur.len() > prefix.len() {
            cur.push(',');
        }
        cur.push_str(&item);
    }
    if cur.len() > prefix.len() {
        out.push(cur);
    }
    out
}

/// Creates database `name` through the server at `admin_url` unless it
/// exists (used for the embedded cluster and by the test harness).
///
/// # Errors
/// [`Error::Sqlx`] when the server cannot be reached or refuses.
pub async fn ensure_database(admin_url: &str, name: &str) -> Result<(), Error> {
    use sqlx::Connection;
    let mut conn = sqlx::PgConnection::connect(admin_url).await?;
    let exists = sqlx::query_scalar!(
        "SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)",
        name
    )
    .fetch_one(&mut conn)
    .await?;
    if exists != Some(true) {
        let sql = format!("CREATE DATABASE \"{}\"", name.replace('"', "\"\""));
        match sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
            .execute(&mut conn)
            .await
        {
            // Lost a race with another creator: fine.
            Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("42P04") => {}
            r => {
                r?;
            }
        }
    }
    conn.close().await?;
    Ok(())
}

/// Drops database `name` (terminating its connections) through `admin_url`.
///
/// # Errors
/// [`Error::Sqlx`] when the server cannot be reached or refuses.
pub async fn drop_database(admin_url: &str, name: &str) -> Result<(), Error> {
    use sqlx::Connection;
    let mut conn = sqlx::PgConnection::connect(admin_url).await?;
    let sql = format!(
        "DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)",
        name.replace('"', "\"\"")
    );
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
        .execute(&mut conn)
        .await?;
    conn.close().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at_unix_micros(us: i64) -> DbTime {
        DbTime(us - PG_EPOCH_UNIX_MICROS)
    }

    #[test]
    fn db_time_accepts_years_1_to_9999_only() {
        let t = DbTime(0).get("t").unwrap();
        assert_eq!(t.to_rfc3339(), "2000-01-01T00:00:00+00:00");
        let max = at_unix_micros(MAX_TIME_UNIX_MICROS).get("t").unwrap();
        assert_eq!(max.to_rfc3339(), "9999-12-31T23:59:59.999999+00:00");
        let min = at_unix_micros(MIN_TIME_UNIX_MICROS).get("t").unwrap();
        assert_eq!(min.to_rfc3339(), "0001-01-01T00:00:00+00:00");
        for bad in [
            at_unix_micros(MAX_TIME_UNIX_MICROS + 1),
            at_unix_micros(MIN_TIME_UNIX_MICROS - 1),
            DbTime(i64::MAX - 1),
            DbTime(i64::MIN + 1),
        ] {
            let e = bad.get("binding next_run_time").unwrap_err().to_string();
            assert!(e.contains("binding next_run_time"), "{e}");
            assert!(e.contains("outside years 1 to 9999"), "{e}");
        }
        let e = DbTime(i64::MAX).get("x").unwrap_err().to_string();
        assert!(e.contains("infinity"), "{e}");
        // PostgreSQL's largest timestamptz (294276 AD) names its year.
        let e = DbTime(9_223_371_331_199_999_999)
            .get("x")
            .unwrap_err()
            .to_string();
        assert!(e.contains("year ~29427"), "{e}");
    }

    #[test]
    fn clip_cuts_at_a_character_boundary() {
        assert_eq!(clip("héllo", 2), "hé…");
        assert_eq!(clip("hé", 2), "hé");
    }
}
