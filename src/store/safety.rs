//! Queries on the safety check's record of each job: its unsafe score and state (flagged by
//! the score, or a moderator's verdict).

use super::{Store, u64_from_sql, u64_to_sql};
use crate::jobs::JobId;

/// A job's safety state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Safety {
    /// The score was above the threshold when it was posted.
    Flagged,
    /// A moderator released it: shown as any picture, gallery included.
    Allowed,
    /// A moderator marked it unsafe, whatever its score.
    Unsafe,
}

impl Safety {
    fn as_sql(self) -> &'static str {
        match self {
            Self::Flagged => "flagged",
            Self::Allowed => "allowed",
            Self::Unsafe => "unsafe",
        }
    }

    fn from_sql(text: &str) -> Result<Self, sqlx::Error> {
        Ok(match text {
            "flagged" => Self::Flagged,
            "allowed" => Self::Allowed,
            "unsafe" => Self::Unsafe,
            other => return Err(super::decode_error("safety", format!("{other:?}"))),
        })
    }

    /// Whether the picture is kept out of sight (spoilered or withheld, out of the gallery).
    pub fn hidden(self) -> bool {
        self != Self::Allowed
    }
}

/// A job's safety record.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SafetyRecord {
    /// The job.
    pub job: JobId,
    /// Its unsafe score (0–1), when it was scored.
    pub score: Option<f64>,
    /// Its state, when it was flagged or judged.
    pub safety: Option<Safety>,
    /// Who asked for it.
    pub requester_id: u64,
}

/// Records a job's score; `flagged` marks it unless a moderator already judged it.
pub async fn set_unsafe_score(
    db: &Store,
    job: JobId,
    score: f32,
    flagged: bool,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE jobs SET unsafe_score = $2,
             safety = CASE WHEN safety IS NULL AND $3 = 1 THEN 'flagged' ELSE safety END
         WHERE id = $1",
    )
    .bind(job)
    .bind(f64::from(score))
    .bind(i64::from(flagged))
    .execute(db.pool())
    .await?;
    Ok(())
}

/// A moderator's verdict on a job.
pub async fn set_verdict(db: &Store, job: JobId, verdict: Safety) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE jobs SET safety = $2 WHERE id = $1")
        .bind(job)
        .bind(verdict.as_sql())
        .execute(db.pool())
        .await?;
    Ok(())
}

/// A job's safety record, if the job exists.
pub async fn get_safety(db: &Store, job: JobId) -> Result<Option<SafetyRecord>, sqlx::Error> {
    let row: Option<(Option<f64>, Option<String>, i64)> =
        sqlx::query_as("SELECT unsafe_score, safety, requester_id FROM jobs WHERE id = $1")
            .bind(job)
            .fetch_optional(db.pool())
            .await?;
    row.map(|(score, safety, requester)| record(job, score, safety.as_deref(), requester))
        .transpose()
}

/// The most recent jobs of `guild` that were flagged or judged unsafe, newest first.
pub async fn list_flagged(
    db: &Store,
    guild: u64,
    limit: u32,
) -> Result<Vec<SafetyRecord>, sqlx::Error> {
    let rows: Vec<(i64, Option<f64>, Option<String>, i64)> = sqlx::query_as(
        "SELECT id, unsafe_score, safety, requester_id FROM jobs
         WHERE guild_id = $1 AND safety IN ('flagged', 'unsafe')
         ORDER BY id DESC LIMIT $2",
    )
    .bind(u64_to_sql(guild))
    .bind(i64::from(limit))
    .fetch_all(db.pool())
    .await?;
    rows.into_iter()
        .map(|(id, score, safety, requester)| {
            record(JobId(id), score, safety.as_deref(), requester)
        })
        .collect()
}

fn record(
    job: JobId,
    score: Option<f64>,
    safety: Option<&str>,
    requester: i64,
) -> Result<SafetyRecord, sqlx::Error> {
    Ok(SafetyRecord {
        job,
        score,
        safety: safety.map(Safety::from_sql).transpose()?,
        requester_id: u64_from_sql(requester),
    })
}
