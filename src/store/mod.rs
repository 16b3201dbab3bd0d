//! The SQLite store: connection pool, embedded migrations, and one `async fn` per query.
//!
//! Used by the bot and the job scheduler; never by the engine. The schema lives only in
//! `migrations/` (embedded at build time by [`MIGRATOR`]); queries are checked against it at
//! compile time by sqlx's macros, from the query data committed in `.sqlx/`.
//!
//! Two mappings hold throughout:
//! - **u64 ↔ INTEGER.** Seeds and Discord ids are `u64`; SQLite stores signed 64-bit integers.
//!   They are stored bit-for-bit ([`u64_to_sql`], [`u64_from_sql`]): `u64::MAX` is `-1` in the
//!   database and comes back as `u64::MAX`. Ordering in SQL is therefore not numeric above 2^63,
//!   which no query relies on (snowflakes stay below 2^63 anyway).
//! - **Times** are [`Timestamp`]s: milliseconds since the Unix epoch, UTC.

pub mod gallery;
pub mod guilds;
pub mod jobs;
pub mod users;

use std::fmt;
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use sqlx::SqlitePool;
use sqlx::migrate::Migrator;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};

/// The migrations in `migrations/`, embedded in the binary.
pub static MIGRATOR: Migrator = sqlx::migrate!();

/// How long a connection waits for another writer before giving up with "database is locked".
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// Connections in the pool; SQLite serialises writers anyway, WAL lets readers run beside them.
const MAX_CONNECTIONS: u32 = 8;

/// Opens (creating when missing, with its directory) the database at `path`.
///
/// Every connection runs in WAL mode with foreign keys enforced and a busy timeout, so concurrent
/// writers queue instead of failing. Migrations are not applied here: call [`migrate`].
pub async fn connect(path: &Path) -> anyhow::Result<SqlitePool> {
    use anyhow::Context as _;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        tokio::fs::create_dir_all(dir).await.with_context(|| {
            format!("Failed to create the database directory {}", dir.display())
        })?;
    }
    let options = SqliteConnectOptions::new()
        .filename(path)
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        // NORMAL is durable across application crashes in WAL mode; only power loss can drop the
        // last commits, and it saves an fsync per write.
        .synchronous(SqliteSynchronous::Normal)
        .foreign_keys(true)
        .busy_timeout(BUSY_TIMEOUT);
    let pool = SqlitePoolOptions::new()
        .max_connections(MAX_CONNECTIONS)
        .connect_with(options)
        .await
        .with_context(|| format!("Failed to open the database {}", path.display()))?;
    tracing::debug!(path = %path.display(), "opened the database");
    Ok(pool)
}

/// Applies every migration the database has not seen yet; returns the versions applied now.
pub async fn migrate(pool: &SqlitePool) -> anyhow::Result<Vec<i64>> {
    use anyhow::Context as _;
    let before = applied_versions(pool).await?;
    MIGRATOR
        .run(pool)
        .await
        .context("Failed to apply database migrations")?;
    let after = applied_versions(pool).await?;
    let applied: Vec<i64> = after.into_iter().filter(|v| !before.contains(v)).collect();
    if !applied.is_empty() {
        tracing::info!(versions = ?applied, "applied database migrations");
    }
    Ok(applied)
}

/// Versions of the migrations already applied, oldest first; empty for a new database.
pub async fn applied_versions(pool: &SqlitePool) -> anyhow::Result<Vec<i64>> {
    use anyhow::Context as _;
    // Before the first migration the bookkeeping table does not exist, so this query cannot be
    // checked at compile time.
    let exists: Option<i64> = sqlx::query_scalar(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = '_sqlx_migrations'",
    )
    .fetch_optional(pool)
    .await
    .context("Failed to read the database's migration state")?;
    if exists.is_none() {
        return Ok(Vec::new());
    }
    sqlx::query_scalar("SELECT version FROM _sqlx_migrations WHERE success ORDER BY version")
        .fetch_all(pool)
        .await
        .context("Failed to read the database's migration state")
}

/// Stores a `u64` in an SQLite INTEGER, bit for bit (values ≥ 2^63 become negative).
pub fn u64_to_sql(value: u64) -> i64 {
    value.cast_signed()
}

/// Reads back a `u64` stored by [`u64_to_sql`].
pub fn u64_from_sql(value: i64) -> u64 {
    value.cast_unsigned()
}

/// A moment in time, as milliseconds since the Unix epoch (UTC) — how the database stores it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, sqlx::Type)]
#[sqlx(transparent)]
pub struct Timestamp(i64);

impl Timestamp {
    /// The current time.
    pub fn now() -> Self {
        let since_epoch = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        Self(i64::try_from(since_epoch.as_millis()).unwrap_or(i64::MAX))
    }

    /// The time `millis` milliseconds after the Unix epoch.
    pub fn from_millis(millis: i64) -> Self {
        Self(millis)
    }

    /// Milliseconds since the Unix epoch.
    pub fn as_millis(self) -> i64 {
        self.0
    }

    /// This time moved back by `d` (saturating).
    pub fn minus(self, d: Duration) -> Self {
        Self(
            self.0
                .saturating_sub(i64::try_from(d.as_millis()).unwrap_or(i64::MAX)),
        )
    }
}

impl fmt::Display for Timestamp {
    /// `2026-11-26 19:32:38Z`: second precision, for people.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let format =
            time::macros::format_description!("[year]-[month]-[day] [hour]:[minute]:[second]Z");
        let nanos = i128::from(self.0) * 1_000_000;
        match time::OffsetDateTime::from_unix_timestamp_nanos(nanos)
            .ok()
            .and_then(|t| t.format(format).ok())
        {
            Some(text) => f.write_str(&text),
            None => write!(f, "{}ms", self.0),
        }
    }
}

/// A job's id: the `jobs` table's primary key, carried in button ids and shown to users.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, sqlx::Type)]
#[sqlx(transparent)]
pub struct JobId(pub i64);

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl FromStr for JobId {
    type Err = std::num::ParseIntError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        s.trim().trim_start_matches('#').parse().map(Self)
    }
}

/// Builds the error sqlx reports when a stored value cannot become its Rust type.
fn decode_error(column: &str, problem: impl fmt::Display) -> sqlx::Error {
    sqlx::Error::Decode(format!("column {column}: {problem}").into())
}

/// Reads a non-negative INTEGER column into a `u32`.
fn u32_column(column: &str, value: i64) -> Result<u32, sqlx::Error> {
    u32::try_from(value).map_err(|_| decode_error(column, format!("{value} is not a u32")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn u64_mapping_round_trips_the_extremes() {
        for v in [0, 1, i64::MAX as u64, 1 << 63, u64::MAX - 1, u64::MAX] {
            assert_eq!(u64_from_sql(u64_to_sql(v)), v);
        }
        assert_eq!(u64_to_sql(u64::MAX), -1);
    }

    #[test]
    fn timestamps_print_in_utc() {
        assert_eq!(
            Timestamp::from_millis(0).to_string(),
            "1970-01-01 00:00:00Z"
        );
        assert_eq!(
            Timestamp::from_millis(1_795_721_558_999).to_string(),
            "2026-11-26 19:32:38Z"
        );
    }

    #[test]
    fn job_ids_parse_with_or_without_hash() {
        assert_eq!("#42".parse::<JobId>(), Ok(JobId(42)));
        assert_eq!(" 7 ".parse::<JobId>(), Ok(JobId(7)));
        assert!("x".parse::<JobId>().is_err());
    }
}
