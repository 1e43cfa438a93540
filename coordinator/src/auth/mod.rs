//! Who may call what: bearer tokens with roles, checked for every request by [`AuthLayer`].
//!
//! - A token is `segtrain_` followed by 256 random bits (base64url). It is shown once, when it
//!   is created; PostgreSQL keeps only its SHA-256 (`tokens.sha256`).
//! - Roles: `client` may use JobService and ClusterService; `worker` only WorkerService; `admin`
//!   everything, and only `admin` may use TokenService. Health and reflection need no token
//!   (load balancers and grpcurl use them).
//! - Missing, unknown or revoked token: UNAUTHENTICATED. A valid token of the wrong role:
//!   PERMISSION_DENIED. Both messages say what is needed.
//! - [`Verifier`] checks a token: a string without the minted shape is refused before any I/O;
//!   the rest are looked up on connections of their own (never the ones heartbeats and ingest
//!   use) and the verdicts cached (see `verifier.rs`).

mod layer;
mod secrets;
mod verifier;

pub use layer::{authorize, AuthLayer};
pub use secrets::{has_token_shape, new_instance_secret, new_token, secret_sha256};
pub use verifier::{Verdict, Verifier, CACHE_TTL};

use uuid::Uuid;

/// The prefix of every token: recognisable in a leaked file or a secret scanner.
pub const TOKEN_PREFIX: &str = "segtrain_";

/// Token names: 1-64 printable characters.
pub const MAX_TOKEN_NAME: usize = 64;

/// What a token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    Client,
    Worker,
    Admin,
}

impl Role {
    pub const ALL: [Role; 3] = [Role::Client, Role::Worker, Role::Admin];

    /// The name stored in `tokens.role` and used on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Client => "client",
            Role::Worker => "worker",
            Role::Admin => "admin",
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        Role::ALL
            .into_iter()
            .find(|r| r.as_str().eq_ignore_ascii_case(s.trim()))
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Checks a token name: 1-64 characters, no control characters, not only spaces.
pub fn check_token_name(name: &str) -> Result<(), String> {
    let n = name.chars().count();
    if n == 0 || n > MAX_TOKEN_NAME || name.trim().is_empty() {
        return Err(format!(
            "must be 1-{MAX_TOKEN_NAME} characters and not blank, got {n}"
        ));
    }
    if name.chars().any(char::is_control) {
        return Err(format!("must not contain control characters, got {name:?}"));
    }
    Ok(())
}

/// Checks what a new token is made of; the refusal names the field (`name`, `principal`,
/// `team`, `host`) and what it allows.
pub fn check_new_token(
    t: &crate::store::NewToken<'_>,
    role: Role,
) -> Result<(), (&'static str, String)> {
    check_token_name(t.name).map_err(|m| ("name", m))?;
    check_token_name(t.principal).map_err(|m| ("principal", m))?;
    check_team_name(t.team).map_err(|m| ("team", m))?;
    if let Some(h) = t.host {
        check_token_host(role, h).map_err(|m| ("host", m))?;
    }
    Ok(())
}

/// The team of tokens (and jobs) from before teams existed, and of tokens made without one.
pub const DEFAULT_TEAM: &str = "default";

/// Checks a team name: 1-64 characters from `[A-Za-z0-9._-]`.
pub fn check_team_name(name: &str) -> Result<(), String> {
    let ok = (1..=64).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "must be 1-64 characters from [A-Za-z0-9._-], got {name:?}"
        ))
    }
}

impl Caller {
    /// Whether this caller sees and acts on the jobs of `team`: an admin every team's, anyone
    /// else its own.
    pub fn sees_team(&self, team: &str) -> bool {
        self.role == Role::Admin || self.team == team
    }

    /// "alice (team vision)", for logs and job notes.
    pub fn who(&self) -> String {
        format!("{} (team {})", self.principal, self.team)
    }
}

/// Checks the host a worker token is bound to: the rules of a daemon's `--host` (1-255
/// characters, no spaces or control characters), and only for a worker token.
pub fn check_token_host(role: Role, host: &str) -> Result<(), String> {
    if role != Role::Worker {
        return Err(format!(
            "only a worker token can be bound to a host, this is a {role} token"
        ));
    }
    let n = host.chars().count();
    if n == 0 || n > 255 || host.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!(
            "must be 1-255 characters without spaces or control characters, got {host:?}"
        ));
    }
    Ok(())
}

/// The verified sender of a request, put into the request's extensions for the services.
#[derive(Debug, Clone)]
pub struct Caller {
    pub token_id: Uuid,
    pub name: String,
    pub role: Role,
    /// Who the token speaks for, and its team (see [`Caller::sees_team`]).
    pub principal: String,
    pub team: String,
    /// A worker token bound to this host acts only for its workers (`token create --host`).
    pub host: Option<String>,
}

/// Who may call a gRPC service, by its full name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// No token needed.
    Open,
    /// A valid token of one of these roles.
    Roles(&'static [Role]),
}

pub const HEALTH_SERVICE: &str = "grpc.health.v1.Health";
pub const REFLECTION_V1: &str = "grpc.reflection.v1.ServerReflection";
pub const REFLECTION_V1ALPHA: &str = "grpc.reflection.v1alpha.ServerReflection";

/// The access rule of the service named in a request path `/package.Service/Method`.
pub fn access(path: &str) -> (String, Access) {
    let service = path
        .trim_start_matches('/')
        .split('/')
        .next()
        .unwrap_or_default()
        .to_string();
    // Operator levers inside a user-facing service.
    const ADMIN_METHODS: &[&str] = &[
        "/segtrain.v1.ClusterService/DrainWorker",
        "/segtrain.v1.ClusterService/UndrainWorker",
    ];
    if ADMIN_METHODS.contains(&path) {
        return (service, Access::Roles(&[Role::Admin]));
    }
    let rule = match service.as_str() {
        HEALTH_SERVICE | REFLECTION_V1 | REFLECTION_V1ALPHA => Access::Open,
        "segtrain.v1.JobService" | "segtrain.v1.ClusterService" => {
            Access::Roles(&[Role::Client, Role::Admin])
        }
        "segtrain.v1.WorkerService" => Access::Roles(&[Role::Worker, Role::Admin]),
        "segtrain.v1.TokenService" | "segtrain.v1.TeamService" => Access::Roles(&[Role::Admin]),
        // Anything else is answered UNIMPLEMENTED by the router, but only to a valid token.
        _ => Access::Roles(&Role::ALL),
    };
    (service, rule)
}

/// "a client or admin token".
fn roles_text(roles: &[Role]) -> String {
    let article = |w: &str| {
        if w.starts_with(['a', 'e', 'i', 'o', 'u']) {
            "an"
        } else {
            "a"
        }
    };
    let names: Vec<&str> = roles.iter().map(|r| r.as_str()).collect();
    match names.as_slice() {
        [] => "no token".to_string(),
        [one] => format!("{} {one} token", article(one)),
        [init @ .., last] => {
            let first = init.join(", ");
            format!("{} {first} or {last} token", article(&first))
        }
    }
}

/// Why a request is refused, as a gRPC status (or `Ok(caller)`).
pub(crate) fn decide(
    service: &str,
    rule: Access,
    header: Option<&[u8]>,
    verdict: impl FnOnce(&str) -> Result<Verdict, tonic::Status>,
) -> Result<Option<Caller>, tonic::Status> {
    let roles = match rule {
        Access::Open => return Ok(None),
        Access::Roles(r) => r,
    };
    let need = roles_text(roles);
    let Some(header) = header else {
        return Err(tonic::Status::unauthenticated(format!(
            "{service} needs {need}: send the header `authorization: Bearer <token>` \
             (segtrain: --token-file or SEGTRAIN_TOKEN; an admin creates tokens with `segtrain token create`)"
        )));
    };
    let text = std::str::from_utf8(header).unwrap_or_default().trim();
    let token = match text.split_once(' ') {
        Some((scheme, rest))
            if scheme.eq_ignore_ascii_case("bearer") && !rest.trim().is_empty() =>
        {
            rest.trim()
        }
        _ => {
            return Err(tonic::Status::unauthenticated(format!(
                "{service} needs {need}: the authorization header must be `Bearer <token>`"
            )))
        }
    };
    match verdict(token)? {
        Verdict::Valid(c) if roles.contains(&c.role) => Ok(Some(c)),
        Verdict::Valid(c) => Err(tonic::Status::permission_denied(format!(
            "{service} needs {need}; token {:?} ({}) is a {} token",
            c.name, c.token_id, c.role
        ))),
        Verdict::Revoked { name } => Err(tonic::Status::unauthenticated(format!(
            "the bearer token {name:?} has been revoked; {service} needs {need}"
        ))),
        Verdict::Unknown => Err(tonic::Status::unauthenticated(format!(
            "the bearer token is not valid (unknown to this coordinator); {service} needs {need}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_long_random_and_prefixed() {
        let a = new_token().expect("random");
        let b = new_token().expect("random");
        assert_ne!(a, b);
        assert!(a.starts_with(TOKEN_PREFIX));
        // 32 bytes in base64 without padding.
        assert_eq!(a.len(), TOKEN_PREFIX.len() + 43);
        assert!(a.chars().all(|c| c.is_ascii_graphic()));
        assert_ne!(secret_sha256(&a), secret_sha256(&b));
    }

    #[test]
    fn every_service_has_its_rule() {
        assert_eq!(access("/grpc.health.v1.Health/Check").1, Access::Open);
        assert_eq!(
            access("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo").1,
            Access::Open
        );
        assert_eq!(
            access("/segtrain.v1.JobService/SubmitJob").1,
            Access::Roles(&[Role::Client, Role::Admin])
        );
        assert_eq!(
            access("/segtrain.v1.ClusterService/ListWorkers").1,
            Access::Roles(&[Role::Client, Role::Admin])
        );
        // Draining is an operator's lever: admin only, though ClusterService is open to clients.
        for m in ["DrainWorker", "UndrainWorker"] {
            assert_eq!(
                access(&format!("/segtrain.v1.ClusterService/{m}")).1,
                Access::Roles(&[Role::Admin])
            );
        }
        assert_eq!(
            access("/segtrain.v1.WorkerService/Register").1,
            Access::Roles(&[Role::Worker, Role::Admin])
        );
        assert_eq!(
            access("/segtrain.v1.TokenService/CreateToken").1,
            Access::Roles(&[Role::Admin])
        );
        assert_eq!(access("/nope.Service/X").1, Access::Roles(&Role::ALL));
        assert_eq!(access("").1, Access::Roles(&Role::ALL));
    }

    fn caller(role: Role) -> Verdict {
        Verdict::Valid(Caller {
            token_id: Uuid::nil(),
            name: "t".into(),
            role,
            host: None,
            principal: "t".into(),
            team: DEFAULT_TEAM.into(),
        })
    }

    #[test]
    fn decisions() {
        let job = access("/segtrain.v1.JobService/SubmitJob");
        let code = |h: Option<&[u8]>, v: Verdict| {
            decide(&job.0, job.1, h, |_| Ok(v))
                .map(|c| c.map(|c| c.role))
                .map_err(|s| s.code())
        };
        use tonic::Code;
        assert_eq!(code(None, Verdict::Unknown), Err(Code::Unauthenticated));
        assert_eq!(
            code(Some(b"Basic abc"), caller(Role::Client)),
            Err(Code::Unauthenticated)
        );
        assert_eq!(
            code(Some(b"Bearer "), caller(Role::Client)),
            Err(Code::Unauthenticated)
        );
        assert_eq!(
            code(Some(b"Bearer x"), Verdict::Unknown),
            Err(Code::Unauthenticated)
        );
        assert_eq!(
            code(Some(b"Bearer x"), Verdict::Revoked { name: "n".into() }),
            Err(Code::Unauthenticated)
        );
        assert_eq!(
            code(Some(b"Bearer x"), caller(Role::Worker)),
            Err(Code::PermissionDenied)
        );
        assert_eq!(
            code(Some(b"bearer x"), caller(Role::Client)),
            Ok(Some(Role::Client))
        );
        assert_eq!(
            code(Some(b"Bearer x"), caller(Role::Admin)),
            Ok(Some(Role::Admin))
        );
        let health = access("/grpc.health.v1.Health/Check");
        assert!(matches!(
            decide(&health.0, health.1, None, |_| Ok(Verdict::Unknown)),
            Ok(None)
        ));
    }

    #[test]
    fn messages_name_what_is_needed() {
        assert_eq!(roles_text(&[Role::Admin]), "an admin token");
        assert_eq!(
            roles_text(&[Role::Client, Role::Admin]),
            "a client or admin token"
        );
        assert_eq!(
            roles_text(&[Role::Worker, Role::Admin]),
            "a worker or admin token"
        );
        assert_eq!(roles_text(&Role::ALL), "a client, worker or admin token");
    }

    #[test]
    fn names() {
        assert!(check_token_name("ci").is_ok());
        assert!(check_token_name("").is_err());
        assert!(check_token_name("   ").is_err());
        assert!(check_token_name(&"x".repeat(65)).is_err());
        assert!(check_token_name("a\nb").is_err());
        assert_eq!(Role::parse("Admin"), Some(Role::Admin));
        assert_eq!(Role::parse("root"), None);
    }
}
