//! The store: connection pool, embedded migrations, and one `async fn` per query, on SQLite (the
//! embedded default) or PostgreSQL (shared by several hosts).
//!
//! Used by the bot and the job scheduler; never by the engine. Both backends run the same SQL
//! text through sqlx's `Any` driver: `$N` placeholders (SQLite reads them too), integers as
//! 64-bit, flags as 0/1 integers, times as integer milliseconds. The schema lives in
//! `migrations/sqlite` and `migrations/postgres` (same versions, same tables and constraints,
//! each in its own dialect), embedded at build time. What differs between the backends is named
//! in [`Backend`] and kept small: connection settings, the migration table lookup, the clock, and
//! the row lock of the job claim. The integration tests run every query on both.
//!
//! Two mappings hold throughout:
//! - **u64 ↔ 64-bit INTEGER.** Seeds and Discord ids are `u64`; both databases store signed
//!   64-bit integers. They are stored bit-for-bit ([`u64_to_sql`], [`u64_from_sql`]): `u64::MAX`
//!   is `-1` in the database and comes back as `u64::MAX`. Ordering in SQL is therefore not
//!   numeric above 2^63, which no query relies on (snowflakes stay below 2^63 anyway).
//! - **Times** are [`Timestamp`]s: milliseconds since the Unix epoch, UTC.

/// Stores a text enumeration (one with `as_str` and `FromStr`) in a TEXT column on either
/// backend; sqlx's derive only covers one database at a time.
macro_rules! text_column {
    ($t:ty) => {
        impl sqlx::Type<sqlx::Any> for $t {
            fn type_info() -> sqlx::any::AnyTypeInfo {
                <&str as sqlx::Type<sqlx::Any>>::type_info()
            }

            fn compatible(ty: &sqlx::any::AnyTypeInfo) -> bool {
                <&str as sqlx::Type<sqlx::Any>>::compatible(ty)
            }
        }

        impl<'q> sqlx::Encode<'q, sqlx::Any> for $t {
            fn encode_by_ref(
                &self,
                buf: &mut <sqlx::Any as sqlx::Database>::ArgumentBuffer,
            ) -> Result<sqlx::encode::IsNull, sqlx::error::BoxDynError> {
                <&str as sqlx::Encode<'q, sqlx::Any>>::encode_by_ref(&self.as_str(), buf)
            }
        }

        impl<'r> sqlx::Decode<'r, sqlx::Any> for $t {
            fn decode(value: sqlx::any::AnyValueRef<'r>) -> Result<Self, sqlx::error::BoxDynError> {
                let text = <&str as sqlx::Decode<'r, sqlx::Any>>::decode(value)?;
                Ok(text.parse::<$t>()?)
            }
        }
    };
}
pub(crate) use text_column;

pub mod events;
pub mod gallery;
pub mod guilds;
pub mod jobs;
pub mod names;
pub mod public;
pub mod safety;
pub mod users;
pub mod workers;

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::migrate::Migrator;
use sqlx::{AnyPool, Connection as _};

/// The SQLite migrations in `migrations/sqlite`, embedded in the binary.
pub static SQLITE_MIGRATOR: Migrator = sqlx::migrate!("migrations/sqlite");

/// The PostgreSQL migrations in `migrations/postgres`, embedded in the binary.
pub(crate) static POSTGRES_MIGRATOR: Migrator = sqlx::migrate!("migrations/postgres");

/// How long an SQLite connection waits for another writer before giving up with "database is
/// locked".
const SQLITE_BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// Connections in the pool. SQLite serialises writers anyway, WAL lets readers run beside them;
/// a PostgreSQL server is shared by every host, so each keeps a modest pool.
const MAX_CONNECTIONS: u32 = 8;

/// How long to wait for a connection (a PostgreSQL server that does not answer, a full pool).
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(20);

/// How long [`Store::describe`] tries to connect to find out why the pool could not.
pub(crate) const PROBE_WAIT: Duration = Duration::from_secs(5);

/// The database engine behind a [`Store`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Backend {
    /// One file, one host (several processes on that host may share it).
    Sqlite,
    /// A server that bots and workers on many hosts share.
    Postgres,
}

impl Backend {
    /// The backend's name, as in logs and `vqclip workers`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Sqlite => "SQLite",
            Self::Postgres => "PostgreSQL",
        }
    }

    /// The migrations for this backend.
    pub(crate) fn migrator(self) -> &'static Migrator {
        match self {
            Self::Sqlite => &SQLITE_MIGRATOR,
            Self::Postgres => &POSTGRES_MIGRATOR,
        }
    }

    /// A query returning one row when sqlx's migration table exists.
    fn migration_table_query(self) -> &'static str {
        match self {
            Self::Sqlite => {
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = '_sqlx_migrations'"
            }
            Self::Postgres => {
                "SELECT 1 FROM information_schema.tables
                 WHERE table_schema = current_schema() AND table_name = '_sqlx_migrations'"
            }
        }
    }

    /// An SQL expression for the database server's clock in Unix milliseconds. Leases are
    /// compared with this one clock, so hosts whose clocks disagree still agree on expiry.
    pub(crate) fn now_millis_sql(self) -> &'static str {
        match self {
            Self::Sqlite => "CAST((julianday('now') - 2440587.5) * 86400000.0 AS INTEGER)",
            Self::Postgres => "CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000 AS BIGINT)",
        }
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Where the database is: `[storage] database`, a file path (SQLite) or a `postgres://` URL.
#[derive(Clone, PartialEq, Eq)]
pub enum Location {
    /// An SQLite file, created with its directory when missing.
    Sqlite(PathBuf),
    /// A PostgreSQL server and database. Printed without its password.
    Postgres(url::Url),
}

impl Location {
    /// Reads `[storage] database`: `postgres://…` or `postgresql://…` is a server, `sqlite:PATH`
    /// or anything else a file path.
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        if text.is_empty() {
            return Err("is empty: give an SQLite file path or a postgres:// URL".into());
        }
        let lower = text.to_ascii_lowercase();
        if lower.starts_with("postgres://") || lower.starts_with("postgresql://") {
            let url = url::Url::parse(text)
                .map_err(|e| format!("is not a valid PostgreSQL URL ({e})"))?;
            if url.host_str().is_none_or(str::is_empty)
                && !url.query_pairs().any(|(k, _)| k == "host")
            {
                return Err(
                    "names no host: write postgres://USER:PASSWORD@HOST:PORT/DATABASE".into(),
                );
            }
            return Ok(Self::Postgres(url));
        }
        if lower.contains("://") && !lower.starts_with("sqlite://") {
            return Err(format!(
                "uses an unsupported scheme `{}`: give an SQLite file path or a postgres:// URL",
                text.split("://").next().unwrap_or_default()
            ));
        }
        let path = text
            .strip_prefix("sqlite://")
            .or_else(|| text.strip_prefix("sqlite:"))
            .unwrap_or(text);
        if path.is_empty() {
            return Err("names no SQLite file".into());
        }
        Ok(Self::Sqlite(PathBuf::from(path)))
    }

    /// Which engine it is.
    pub fn backend(&self) -> Backend {
        match self {
            Self::Sqlite(_) => Backend::Sqlite,
            Self::Postgres(_) => Backend::Postgres,
        }
    }

    /// The SQLite file, when it is one.
    pub(crate) fn sqlite_path(&self) -> Option<&Path> {
        match self {
            Self::Sqlite(path) => Some(path),
            Self::Postgres(_) => None,
        }
    }

    /// The URL sqlx connects with (secrets included: never log it).
    fn connect_url(&self) -> anyhow::Result<String> {
        match self {
            Self::Postgres(url) => Ok(url.to_string()),
            Self::Sqlite(path) => {
                let text = path.to_str().ok_or_else(|| {
                    anyhow::anyhow!("the SQLite path {} is not UTF-8", path.display())
                })?;
                // sqlx percent-decodes the file name, so these three must be escaped.
                let escaped = text
                    .replace('%', "%25")
                    .replace('?', "%3F")
                    .replace('#', "%23");
                Ok(format!("sqlite://{escaped}?mode=rwc"))
            }
        }
    }
}

impl fmt::Display for Location {
    /// The path, or the URL with its password replaced by `***`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Sqlite(path) => write!(f, "{}", path.display()),
            Self::Postgres(url) => {
                let mut shown = url.clone();
                if shown.password().is_some() {
                    let _ = shown.set_password(Some("***"));
                }
                let pairs: Vec<(String, String)> = shown
                    .query_pairs()
                    .map(|(k, v)| {
                        let secret = k.eq_ignore_ascii_case("password");
                        (
                            k.into_owned(),
                            if secret { "***".into() } else { v.into_owned() },
                        )
                    })
                    .collect();
                if !pairs.is_empty() {
                    shown.query_pairs_mut().clear().extend_pairs(pairs);
                }
                write!(f, "{shown}")
            }
        }
    }
}

impl fmt::Debug for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Location({self})")
    }
}

impl serde::Serialize for Location {
    /// As printed: the password stays out of `vqclip config` output.
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl FromStr for Location {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

/// An open database: a connection pool and which engine it talks to. Cheap to clone (the pool is
/// shared).
#[derive(Clone)]
pub struct Store {
    pool: AnyPool,
    location: Location,
}

impl Store {
    /// The connection pool, for queries.
    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    /// Which engine it is.
    pub fn backend(&self) -> Backend {
        self.location.backend()
    }

    /// Where it is (prints without secrets).
    pub fn location(&self) -> &Location {
        &self.location
    }

    /// Closes every connection, waiting for those in use.
    pub async fn close(&self) {
        self.pool.close().await;
    }

    /// `error`, from an operation on this database, in words an operator can act on. A pool
    /// that timed out says only "pool timed out while waiting for an open connection" whatever
    /// the cause: one direct connection is tried (for at most [`PROBE_WAIT`]) so the message
    /// names it ("Connection refused" from a PostgreSQL server that is down, a failed
    /// password, a malformed SQLite file) and the database (without its password).
    pub async fn describe(
        &self,
        error: &(dyn std::error::Error + Send + Sync + 'static),
    ) -> String {
        // Every database error the process logs comes through here.
        crate::metrics::global().database_errors.inc();
        let (chain, timed_out) = error_chain(error);
        let plain = format!("{} (database {})", chain.join(": "), self.location);
        if !timed_out {
            return plain;
        }
        let Ok(Ok(options)) = self
            .location
            .connect_url()
            .map(|url| AnyConnectOptions::from_str(&url))
        else {
            return plain;
        };
        let backend = self.backend();
        match tokio::time::timeout(PROBE_WAIT, sqlx::AnyConnection::connect_with(&options)).await {
            Ok(Ok(connection)) => {
                let _ = connection.close().await;
                format!(
                    "every connection to the {backend} database {} stayed busy for {} s",
                    self.location,
                    ACQUIRE_TIMEOUT.as_secs()
                )
            }
            Ok(Err(cause)) => {
                format!(
                    "cannot reach the {backend} database {}: {cause}",
                    self.location
                )
            }
            Err(_) => format!(
                "the {backend} database {} did not answer within {} s",
                self.location,
                ACQUIRE_TIMEOUT.as_secs() + PROBE_WAIT.as_secs()
            ),
        }
    }
}

impl fmt::Debug for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Store({}: {})", self.backend(), self.location)
    }
}

/// The messages of `error` and its sources, and whether the pool timed out on the way.
fn error_chain(error: &(dyn std::error::Error + 'static)) -> (Vec<String>, bool) {
    let mut chain = Vec::new();
    let mut timed_out = false;
    let mut next = Some(error);
    while let Some(cause) = next {
        chain.push(cause.to_string());
        timed_out |= matches!(
            cause.downcast_ref::<sqlx::Error>(),
            Some(sqlx::Error::PoolTimedOut)
        );
        next = cause.source();
    }
    (chain, timed_out)
}

/// The settings of every SQLite connection. NORMAL is durable across application crashes in WAL
/// mode; only power loss can drop the last commits, and it saves an fsync per write.
fn sqlite_pragmas() -> String {
    format!(
        "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; \
         PRAGMA foreign_keys = ON; PRAGMA busy_timeout = {};",
        SQLITE_BUSY_TIMEOUT.as_millis()
    )
}

/// Opens the database at `location`: an SQLite file (created when missing, with its directory)
/// or a PostgreSQL database (which must exist).
///
/// SQLite connections run in WAL mode with foreign keys enforced and a busy timeout, so
/// concurrent writers queue instead of failing. Migrations are not applied here: call
/// [`migrate`].
pub async fn connect(location: &Location) -> anyhow::Result<Store> {
    use anyhow::Context as _;
    sqlx::any::install_default_drivers();
    if let Some(dir) = location
        .sqlite_path()
        .and_then(Path::parent)
        .filter(|d| !d.as_os_str().is_empty())
    {
        tokio::fs::create_dir_all(dir).await.with_context(|| {
            format!("Failed to create the database directory {}", dir.display())
        })?;
    }
    let options = AnyConnectOptions::from_str(&location.connect_url()?)
        .with_context(|| format!("Failed to read the database location {location}"))?;
    let mut pool_options = AnyPoolOptions::new()
        .max_connections(MAX_CONNECTIONS)
        .acquire_timeout(ACQUIRE_TIMEOUT);
    if location.backend() == Backend::Sqlite {
        // One connection first, outside the pool: a pool retries a failing connection until its
        // acquire timeout and then reports only "pool timed out", hiding "file is not a
        // database", "database disk image is malformed" or "attempt to write a readonly
        // database".
        let mut probe = sqlx::AnyConnection::connect_with(&options)
            .await
            .with_context(|| format!("Failed to open the SQLite database {location}"))?;
        let checked = async {
            sqlx::raw_sql(sqlx::AssertSqlSafe(sqlite_pragmas()))
                .execute(&mut probe)
                .await?;
            // Reads the schema: a damaged file fails here rather than at the first query.
            sqlx::query("SELECT COUNT(*) FROM sqlite_master")
                .execute(&mut probe)
                .await
        }
        .await;
        let _ = probe.close().await;
        checked.with_context(|| format!("Failed to open the SQLite database {location}"))?;
        pool_options = pool_options.after_connect(|conn, _| {
            Box::pin(async move {
                sqlx::raw_sql(sqlx::AssertSqlSafe(sqlite_pragmas()))
                    .execute(conn)
                    .await?;
                Ok(())
            })
        });
    }
    let pool = pool_options.connect_with(options).await.with_context(|| {
        format!(
            "Failed to open the {} database {location}",
            location.backend()
        )
    })?;
    tracing::debug!(backend = %location.backend(), database = %location, "opened the database");
    Ok(Store {
        pool,
        location: location.clone(),
    })
}

/// Applies every migration the database has not seen yet; returns the versions applied now.
pub async fn migrate(store: &Store) -> anyhow::Result<Vec<i64>> {
    use anyhow::Context as _;
    let before = applied_versions(store).await?;
    store
        .backend()
        .migrator()
        .run(store.pool())
        .await
        .context("Failed to apply database migrations")?;
    let after = applied_versions(store).await?;
    let applied: Vec<i64> = after.into_iter().filter(|v| !before.contains(v)).collect();
    if !applied.is_empty() {
        tracing::info!(versions = ?applied, "applied database migrations");
    }
    Ok(applied)
}

/// Versions of the migrations already applied, oldest first; empty for a new database.
pub async fn applied_versions(store: &Store) -> anyhow::Result<Vec<i64>> {
    use anyhow::Context as _;
    let exists: Option<i64> = sqlx::query_scalar(store.backend().migration_table_query())
        .fetch_optional(store.pool())
        .await
        .context("Failed to read the database's migration state")?;
    if exists.is_none() {
        return Ok(Vec::new());
    }
    sqlx::query_scalar("SELECT version FROM _sqlx_migrations WHERE success ORDER BY version")
        .fetch_all(store.pool())
        .await
        .context("Failed to read the database's migration state")
}

/// Stores a `u64` in a 64-bit INTEGER column, bit for bit (values ≥ 2^63 become negative).
pub(crate) fn u64_to_sql(value: u64) -> i64 {
    value.cast_signed()
}

/// Reads back a `u64` stored by [`u64_to_sql`].
pub(crate) fn u64_from_sql(value: i64) -> u64 {
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
