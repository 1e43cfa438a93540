//! Teams (`teams`): the limits an operator sets per team, and what each team's jobs hold now.
//! What the limits mean is [`crate::teams`]' business; here they are rows.

use super::{u32_of, Store, StoreError};
use crate::teams::TeamLimits;
use sqlx::{Postgres, Transaction};
use std::collections::BTreeMap;

/// A team as listed: its limits and the GPUs (workers) its jobs hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TeamRecord {
    pub name: String,
    pub limits: TeamLimits,
    pub held_gpus: u32,
}

#[derive(sqlx::FromRow)]
struct TeamRow {
    name: String,
    max_priority: Option<i32>,
    max_gpus: Option<i32>,
    allowed_roots: Option<Vec<String>>,
    held_gpus: i64,
}

impl TryFrom<TeamRow> for TeamRecord {
    type Error = StoreError;

    fn try_from(r: TeamRow) -> Result<TeamRecord, StoreError> {
        Ok(TeamRecord {
            limits: TeamLimits {
                max_priority: r.max_priority,
                max_gpus: r
                    .max_gpus
                    .map(|g| u32_of(g, "teams.max_gpus"))
                    .transpose()?,
                allowed_roots: r.allowed_roots.unwrap_or_default(),
            },
            held_gpus: u32::try_from(r.held_gpus).map_err(|_| {
                StoreError::Corrupt(format!("team {} holds {}", r.name, r.held_gpus))
            })?,
            name: r.name,
        })
    }
}

/// GPUs held per team: the open ranks of its jobs.
const HELD: &str = "SELECT j.team, count(*) AS held FROM attempt_ranks ar
                    JOIN jobs j ON j.id = ar.job_id
                    WHERE ar.finished_at IS NULL GROUP BY j.team";

impl Store {
    /// Sets a team's limits (replacing the ones it had; `None` or empty removes a limit).
    pub async fn set_team(&self, name: &str, limits: TeamLimits) -> Result<TeamRecord, StoreError> {
        let max_gpus = limits
            .max_gpus
            .map(|g| i32::try_from(g).unwrap_or(i32::MAX));
        sqlx::query(
            "INSERT INTO teams (name, max_priority, max_gpus, allowed_roots)
             VALUES ($1, $2, $3, $4)
             ON CONFLICT (name) DO UPDATE
                 SET max_priority = EXCLUDED.max_priority, max_gpus = EXCLUDED.max_gpus,
                     allowed_roots = EXCLUDED.allowed_roots, updated_at = now()",
        )
        .bind(name)
        .bind(limits.max_priority)
        .bind(max_gpus)
        .bind(&limits.allowed_roots)
        .execute(&self.pool)
        .await?;
        self.list_teams()
            .await?
            .into_iter()
            .find(|t| t.name == name)
            .ok_or_else(|| StoreError::Corrupt(format!("team {name} vanished")))
    }

    /// Every team with limits or with jobs, by name, with the GPUs it holds.
    pub async fn list_teams(&self) -> Result<Vec<TeamRecord>, StoreError> {
        let rows: Vec<TeamRow> = sqlx::query_as(&format!(
            "WITH held AS ({HELD}),
                  names AS (SELECT name FROM teams UNION SELECT DISTINCT team FROM jobs)
             SELECT n.name, t.max_priority, t.max_gpus, t.allowed_roots,
                    coalesce(h.held, 0) AS held_gpus
             FROM names n LEFT JOIN teams t ON t.name = n.name LEFT JOIN held h ON h.team = n.name
             ORDER BY n.name"
        ))
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter().map(TeamRecord::try_from).collect()
    }

    /// A team's limits (none set: no limits).
    pub async fn team_limits(&self, name: &str) -> Result<TeamLimits, StoreError> {
        let row: Option<(Option<i32>, Option<i32>, Vec<String>)> = sqlx::query_as(
            "SELECT max_priority, max_gpus, allowed_roots FROM teams WHERE name = $1",
        )
        .bind(name)
        .fetch_optional(&self.pool)
        .await?;
        let (max_priority, max_gpus, allowed_roots) = row.unwrap_or_default();
        Ok(TeamLimits {
            max_priority,
            max_gpus: max_gpus.map(|g| u32_of(g, "teams.max_gpus")).transpose()?,
            allowed_roots,
        })
    }

    /// The teams with a GPU limit, with what they hold: what placement and a queued job's reason
    /// are decided from.
    pub async fn gpu_limited_teams(&self) -> Result<BTreeMap<String, TeamRecord>, StoreError> {
        let mut tx = self.pool.begin().await?;
        let teams = gpu_limited_teams(&mut tx).await?;
        tx.rollback().await?;
        Ok(teams)
    }
}

/// [`Store::gpu_limited_teams`] inside a transaction.
pub(super) async fn gpu_limited_teams(
    tx: &mut Transaction<'_, Postgres>,
) -> Result<BTreeMap<String, TeamRecord>, StoreError> {
    let rows: Vec<TeamRow> = sqlx::query_as(&format!(
        "WITH held AS ({HELD})
         SELECT t.name, t.max_priority, t.max_gpus, t.allowed_roots,
                coalesce(h.held, 0) AS held_gpus
         FROM teams t LEFT JOIN held h ON h.team = t.name WHERE t.max_gpus IS NOT NULL"
    ))
    .fetch_all(&mut **tx)
    .await?;
    rows.into_iter()
        .map(|r| TeamRecord::try_from(r).map(|t| (t.name.clone(), t)))
        .collect()
}
