//! Bearer tokens (`tokens`): only each token's SHA-256 is stored, never the token. Tokens are
//! revoked, never deleted. What a role may do is [`crate::auth`]'s business; here a role is the
//! stored text.

use super::{Store, StoreError};
use chrono::{DateTime, Utc};
use uuid::Uuid;

#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct TokenRecord {
    pub id: Uuid,
    pub name: String,
    pub role: String,
    pub created_at: DateTime<Utc>,
    pub revoked_at: Option<DateTime<Utc>>,
    pub last_used_at: Option<DateTime<Utc>>,
    /// A worker token bound to this host (None: any host).
    pub host: Option<String>,
    /// Who the token speaks for, and its team.
    pub principal: String,
    pub team: String,
}

/// What a new token is: its label, role, owner and binding.
#[derive(Debug, Clone, Copy)]
pub struct NewToken<'a> {
    pub name: &'a str,
    pub role: &'a str,
    pub principal: &'a str,
    pub team: &'a str,
    /// The host a worker token is bound to.
    pub host: Option<&'a str>,
}

/// A token row and whether it is valid (not revoked).
#[derive(sqlx::FromRow)]
struct CheckedToken {
    #[sqlx(flatten)]
    token: TokenRecord,
    valid: bool,
}

/// What the database says about a presented token.
#[derive(Debug, Clone, PartialEq)]
pub enum TokenCheck {
    Valid(TokenRecord),
    Revoked(TokenRecord),
    Unknown,
}

const COLUMNS: &str = "id, name, role, created_at, revoked_at, last_used_at, host, principal, team";

impl Store {
    /// Stores a new token by its hash.
    pub async fn create_token(
        &self,
        t: &NewToken<'_>,
        sha256: &[u8; 32],
    ) -> Result<TokenRecord, StoreError> {
        let sql = format!(
            "INSERT INTO tokens (id, name, role, sha256, host, principal, team) \
             VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING {COLUMNS}"
        );
        Ok(sqlx::query_as::<_, TokenRecord>(&sql)
            .bind(Uuid::now_v7())
            .bind(t.name)
            .bind(t.role)
            .bind(&sha256[..])
            .bind(t.host)
            .bind(t.principal)
            .bind(t.team)
            .fetch_one(&self.pool)
            .await?)
    }

    /// Every token, oldest first (revoked ones only with `include_revoked`).
    pub async fn list_tokens(&self, include_revoked: bool) -> Result<Vec<TokenRecord>, StoreError> {
        let sql = format!(
            "SELECT {COLUMNS} FROM tokens WHERE $1 OR revoked_at IS NULL ORDER BY created_at, id"
        );
        Ok(sqlx::query_as::<_, TokenRecord>(&sql)
            .bind(include_revoked)
            .fetch_all(&self.pool)
            .await?)
    }

    /// Revokes a token (a revoked one stays as it was).
    pub async fn revoke_token(&self, id: Uuid) -> Result<TokenRecord, StoreError> {
        let sql = format!(
            "UPDATE tokens SET revoked_at = coalesce(revoked_at, now()) WHERE id = $1 RETURNING {COLUMNS}"
        );
        sqlx::query_as::<_, TokenRecord>(&sql)
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
            .ok_or(StoreError::NotFound {
                what: "token",
                id: id.to_string(),
            })
    }

    /// Looks a presented token up by its hash, in one statement on the token connections (see
    /// `auth::verifier`); a valid one gets `last_used_at` set.
    pub async fn check_token(&self, sha256: &[u8; 32]) -> Result<TokenCheck, StoreError> {
        let sql = format!(
            "WITH used AS (
                 UPDATE tokens SET last_used_at = now()
                 WHERE sha256 = $1 AND revoked_at IS NULL RETURNING {COLUMNS})
             SELECT {COLUMNS}, true AS valid FROM used
             UNION ALL
             SELECT {COLUMNS}, false AS valid FROM tokens
             WHERE sha256 = $1 AND revoked_at IS NOT NULL"
        );
        let row: Option<CheckedToken> = sqlx::query_as(&sql)
            .bind(&sha256[..])
            .fetch_optional(&self.token_pool)
            .await?;
        Ok(match row {
            Some(CheckedToken { token, valid: true }) => TokenCheck::Valid(token),
            Some(CheckedToken { token, .. }) => TokenCheck::Revoked(token),
            None => TokenCheck::Unknown,
        })
    }
}
