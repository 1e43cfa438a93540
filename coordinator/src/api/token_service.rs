//! `segtrain.v1.TokenService`: create, list and revoke bearer tokens. Only admin tokens get
//! here (the [`crate::auth::AuthLayer`] refuses the rest); with `--insecure-no-auth` anyone may.

use super::{convert, status_of};
use crate::auth::{self, Caller, Role, Verifier};
use crate::store::{NewToken, Store, TokenRecord};
use segtrain_proto::v1 as pb;
use tonic::{Request, Response, Status};
use uuid::Uuid;

pub struct TokenApi {
    store: Store,
    /// Told of revocations, so that they take effect on this coordinator at once.
    verifier: Option<Verifier>,
}

impl TokenApi {
    pub fn new(store: Store, verifier: Option<Verifier>) -> TokenApi {
        TokenApi { store, verifier }
    }
}

pub(crate) fn role_to_proto(role: &str) -> pb::TokenRole {
    match Role::parse(role) {
        Some(Role::Client) => pb::TokenRole::Client,
        Some(Role::Worker) => pb::TokenRole::Worker,
        Some(Role::Admin) => pb::TokenRole::Admin,
        None => pb::TokenRole::Unspecified,
    }
}

fn role_of(r: i32) -> Result<Role, Status> {
    match pb::TokenRole::try_from(r) {
        Ok(pb::TokenRole::Client) => Ok(Role::Client),
        Ok(pb::TokenRole::Worker) => Ok(Role::Worker),
        Ok(pb::TokenRole::Admin) => Ok(Role::Admin),
        _ => Err(Status::invalid_argument(format!(
            "role: must be TOKEN_ROLE_CLIENT, TOKEN_ROLE_WORKER or TOKEN_ROLE_ADMIN, got {r}"
        ))),
    }
}

pub(crate) fn token_info(t: &TokenRecord) -> pb::TokenInfo {
    pb::TokenInfo {
        id: t.id.to_string(),
        name: t.name.clone(),
        role: role_to_proto(&t.role) as i32,
        created_at: Some(convert::timestamp(t.created_at)),
        revoked_at: t.revoked_at.map(convert::timestamp),
        last_used_at: t.last_used_at.map(convert::timestamp),
        host: t.host.clone().unwrap_or_default(),
        principal: t.principal.clone(),
        team: t.team.clone(),
    }
}

/// Who asked, for the audit log.
pub(crate) fn by<T>(req: &Request<T>) -> String {
    req.extensions()
        .get::<Caller>()
        .map(|c| format!("{} with token {:?} ({})", c.who(), c.name, c.token_id))
        .unwrap_or_else(|| "unauthenticated (--insecure-no-auth)".to_string())
}

/// `s`, or `default` when it is empty.
fn or<'a>(s: &'a str, default: &'a str) -> &'a str {
    if s.is_empty() {
        default
    } else {
        s
    }
}

#[tonic::async_trait]
impl pb::token_service_server::TokenService for TokenApi {
    async fn create_token(
        &self,
        req: Request<pb::CreateTokenRequest>,
    ) -> Result<Response<pb::CreateTokenResponse>, Status> {
        let who = by(&req);
        let req = req.into_inner();
        let role = role_of(req.role)?;
        let new = NewToken {
            name: &req.name,
            role: role.as_str(),
            principal: or(&req.principal, &req.name),
            team: or(&req.team, auth::DEFAULT_TEAM),
            host: (!req.host.is_empty()).then_some(req.host.as_str()),
        };
        auth::check_new_token(&new, role)
            .map_err(|(field, m)| Status::invalid_argument(format!("{field}: {m}")))?;
        let token = auth::new_token()
            .map_err(|e| Status::internal(format!("cannot make a random token: {e}")))?;
        let t = self
            .store
            .create_token(&new, &auth::secret_sha256(&token))
            .await
            .map_err(status_of)?;
        tracing::info!(target: "segtrain::audit", token = %t.id, name = %t.name, role = %role, principal = %t.principal, team = %t.team, host = ?t.host, by = %who, "token created");
        Ok(Response::new(pb::CreateTokenResponse {
            token,
            info: Some(token_info(&t)),
        }))
    }

    async fn list_tokens(
        &self,
        req: Request<pb::ListTokensRequest>,
    ) -> Result<Response<pb::ListTokensResponse>, Status> {
        let tokens = self
            .store
            .list_tokens(req.get_ref().include_revoked)
            .await
            .map_err(status_of)?;
        Ok(Response::new(pb::ListTokensResponse {
            tokens: tokens.iter().map(token_info).collect(),
        }))
    }

    async fn revoke_token(
        &self,
        req: Request<pb::RevokeTokenRequest>,
    ) -> Result<Response<pb::RevokeTokenResponse>, Status> {
        let who = by(&req);
        let raw = &req.get_ref().token_id;
        let id = Uuid::parse_str(raw.trim()).map_err(|_| {
            Status::invalid_argument(format!(
                "token_id: not a token id (the UUID `segtrain token list` shows), got {raw:?}"
            ))
        })?;
        let t = self.store.revoke_token(id).await.map_err(status_of)?;
        if let Some(v) = &self.verifier {
            v.forget_all();
        }
        tracing::info!(target: "segtrain::audit", token = %t.id, name = %t.name, principal = %t.principal, team = %t.team, by = %who, "token revoked");
        Ok(Response::new(pb::RevokeTokenResponse {
            token: Some(token_info(&t)),
        }))
    }
}
