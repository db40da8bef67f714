//! Bearer tokens and roles. Tokens are random, shown once, and stored as their SHA-256.
//!
//! `viewer` reads, `operator` also changes (rollouts), `admin` also manages tokens and reads
//! the audit log; an `agent` token can only open `AgentService.Connect`.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use thiserror::Error;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Agent,
    Viewer,
    Operator,
    Admin,
}

impl Role {
    pub const ALL: [Role; 4] = [Role::Agent, Role::Viewer, Role::Operator, Role::Admin];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Agent => "agent",
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }

    pub fn parse(text: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|r| r.as_str() == text)
    }
}

/// What a route needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Access {
    /// Reads: viewer, operator, admin.
    Read,
    /// Changes: operator, admin.
    Write,
    /// Tokens and audit log: admin.
    Admin,
    /// The agent stream: agent tokens only.
    Agent,
}

impl Access {
    pub fn allows(self, role: Role) -> bool {
        match self {
            Access::Read => role >= Role::Viewer,
            Access::Write => role >= Role::Operator,
            Access::Admin => role == Role::Admin,
            Access::Agent => role == Role::Agent,
        }
    }
}

/// Who made a call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub name: String,
    pub role: Role,
}

#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum AuthError {
    #[error("missing bearer token")]
    Missing,
    #[error("unknown or revoked token")]
    Invalid,
    #[error("role {role} may not do this (needs {needed:?} access)")]
    Forbidden { role: &'static str, needed: Access },
    #[error("token store unavailable: {0}")]
    Store(String),
}

/// The SHA-256 under which a token is stored.
pub fn token_hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// A new random token: `phx_` and 32 random bytes in hex.
pub fn new_token() -> String {
    let bytes: [u8; 32] = rand::random();
    format!("phx_{}", hex::encode(bytes))
}

/// The token of an `Authorization: Bearer <token>` header value.
pub fn bearer(header: Option<&str>) -> Result<&str, AuthError> {
    let value = header.ok_or(AuthError::Missing)?;
    let token = value
        .strip_prefix("Bearer ")
        .or_else(|| value.strip_prefix("bearer "))
        .ok_or(AuthError::Missing)?
        .trim();
    if token.is_empty() {
        return Err(AuthError::Missing);
    }
    Ok(token)
}

pub fn check(principal: &Principal, needed: Access) -> Result<(), AuthError> {
    if needed.allows(principal.role) {
        Ok(())
    } else {
        Err(AuthError::Forbidden {
            role: principal.role.as_str(),
            needed,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_role_against_every_access() {
        let expected = [
            // (role, read, write, admin, agent)
            (Role::Agent, false, false, false, true),
            (Role::Viewer, true, false, false, false),
            (Role::Operator, true, true, false, false),
            (Role::Admin, true, true, true, false),
        ];
        for (role, read, write, admin, agent) in expected {
            assert_eq!(Access::Read.allows(role), read, "{role:?}");
            assert_eq!(Access::Write.allows(role), write, "{role:?}");
            assert_eq!(Access::Admin.allows(role), admin, "{role:?}");
            assert_eq!(Access::Agent.allows(role), agent, "{role:?}");
        }
    }

    #[test]
    fn tokens_are_random_and_stored_hashed() {
        let (a, b) = (new_token(), new_token());
        assert_ne!(a, b);
        assert!(a.starts_with("phx_"));
        assert_eq!(token_hash(&a).len(), 64);
        assert_ne!(token_hash(&a), a);
    }

    #[test]
    fn bearer_headers() {
        assert_eq!(bearer(Some("Bearer abc")), Ok("abc"));
        assert_eq!(bearer(None), Err(AuthError::Missing));
        assert_eq!(bearer(Some("Basic abc")), Err(AuthError::Missing));
        assert_eq!(bearer(Some("Bearer ")), Err(AuthError::Missing));
        assert_eq!(Role::parse("operator"), Some(Role::Operator));
        assert_eq!(Role::parse("root"), None);
    }
}
