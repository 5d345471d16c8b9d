//! Who may open a stream: static API keys, short-lived signed tokens minted
//! with a key, and an Origin allow-list for browsers.
//!
//! Authentication is off while no key is configured (a loopback default for
//! newcomers; the server refuses to listen beyond loopback without keys
//! unless told to). Every failure is an HTTP 401 (403 for a refused Origin)
//! before the WebSocket upgrade: never a silent accept.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::protocol::ErrorCode;

type HmacSha256 = Hmac<Sha256>;

/// Prefix of the tokens this server mints (format version 1).
const TOKEN_PREFIX: &str = "ct1.";
/// Sec-WebSocket-Protocol entries that carry a credential start with this.
pub const PROTOCOL_TOKEN_PREFIX: &str = "token.";
/// The subprotocol the server selects when the client offers it.
pub const SUBPROTOCOL: &str = "cochlea.v1";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    #[error("authentication required: present an API key or token (Authorization: Bearer, ?token=, or a Sec-WebSocket-Protocol entry token.<value>)")]
    Missing,
    #[error("unknown API key")]
    WrongKey,
    #[error("invalid token: {0}")]
    BadToken(&'static str),
    #[error("token expired")]
    Expired,
    #[error("origin {0} is not allowed")]
    Origin(String),
}

impl AuthError {
    /// Machine-readable code for the 401/403 body and the metric label.
    pub fn code(&self) -> &'static str {
        self.error_code()
            .map_or("origin_not_allowed", ErrorCode::as_str)
    }

    /// The code of the WebSocket `error` message for a credential refused
    /// after the upgrade (`/twilio`). `None` for a refused Origin: that is
    /// checked on the HTTP request only, and answered with a 403 there, so
    /// `origin_not_allowed` is an HTTP code and no `error` message code.
    pub fn error_code(&self) -> Option<ErrorCode> {
        match self {
            AuthError::Missing => Some(ErrorCode::AuthMissing),
            AuthError::WrongKey => Some(ErrorCode::AuthWrongKey),
            AuthError::BadToken(_) => Some(ErrorCode::AuthBadToken),
            AuthError::Expired => Some(ErrorCode::AuthExpired),
            AuthError::Origin(_) => None,
        }
    }

    pub fn http_status(&self) -> u16 {
        match self {
            AuthError::Origin(_) => 403,
            _ => 401,
        }
    }
}

/// Who a request is, once authenticated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// A short, non-secret id of the API key (or of the key that minted the
    /// token): what per-key limits and logs use.
    pub key_id: String,
    /// A token may shorten the session limit.
    pub max_session_ms: Option<u64>,
}

/// What a signed token says.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct TokenClaims {
    /// Key id of the API key that minted it.
    pub kid: String,
    /// Expiry, seconds since the Unix epoch.
    pub exp: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_session_ms: Option<u64>,
}

pub struct Auth {
    /// (key id, key) pairs.
    keys: Vec<(String, String)>,
    token_secret: Vec<u8>,
    allowed_origins: Vec<String>,
}

/// Constant-time equality, so timing says nothing about a secret.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A key's public id: the first 12 hex digits of its SHA-256.
pub fn key_id(key: &str) -> String {
    Sha256::digest(key.as_bytes())
        .iter()
        .take(6)
        .map(|b| format!("{b:02x}"))
        .collect()
}

impl Auth {
    /// `token_secret` empty: a random one for this process (tokens then die
    /// with it, which is the safe default).
    pub fn new(api_keys: &[String], token_secret: &str, allowed_origins: &[String]) -> Self {
        let token_secret = if token_secret.is_empty() {
            let a = uuid::Uuid::new_v4();
            let b = uuid::Uuid::new_v4();
            [a.as_bytes().as_slice(), b.as_bytes().as_slice()].concat()
        } else {
            token_secret.as_bytes().to_vec()
        };
        Self {
            keys: api_keys.iter().map(|k| (key_id(k), k.clone())).collect(),
            token_secret,
            allowed_origins: allowed_origins
                .iter()
                .map(|o| o.trim_end_matches('/').to_ascii_lowercase())
                .collect(),
        }
    }

    pub fn required(&self) -> bool {
        !self.keys.is_empty()
    }

    /// Checks the Origin header of a browser request against the allow-list
    /// (an empty list allows all; requests without Origin are not browsers).
    pub fn check_origin(&self, origin: Option<&str>) -> Result<(), AuthError> {
        match origin {
            Some(origin) if !self.allowed_origins.is_empty() => {
                let normalized = origin.trim_end_matches('/').to_ascii_lowercase();
                if self.allowed_origins.contains(&normalized) {
                    Ok(())
                } else {
                    Err(AuthError::Origin(origin.to_owned()))
                }
            }
            _ => Ok(()),
        }
    }

    /// Checks an API key (not a token): for minting tokens.
    pub fn check_key(&self, presented: &str) -> Result<Principal, AuthError> {
        // Compare with every key, always, so the time taken does not depend
        // on which (if any) matched.
        let mut found = None;
        for (id, key) in &self.keys {
            if constant_time_eq(presented.as_bytes(), key.as_bytes()) {
                found = Some(id.clone());
            }
        }
        found
            .map(|key_id| Principal {
                key_id,
                max_session_ms: None,
            })
            .ok_or(AuthError::WrongKey)
    }

    /// Checks a credential that is either an API key or a token.
    pub fn check(
        &self,
        presented: Option<&str>,
        now: SystemTime,
    ) -> Result<Option<Principal>, AuthError> {
        if !self.required() {
            return Ok(None);
        }
        let presented = presented.ok_or(AuthError::Missing)?;
        match presented.strip_prefix(TOKEN_PREFIX) {
            Some(token) => self.verify_token(token, now).map(Some),
            None => self.check_key(presented).map(Some),
        }
    }

    /// Mints a token for `principal`, valid for `ttl`.
    pub fn mint(
        &self,
        principal: &Principal,
        ttl: Duration,
        max_session_ms: Option<u64>,
        now: SystemTime,
    ) -> (String, TokenClaims) {
        // Rounded up: whole seconds truncated gave a token minted late in a
        // second up to a second less than its ttl (a 1 s token could be
        // expired 0.1 s after minting).
        let until = now
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .saturating_add(ttl);
        let exp = until
            .as_secs()
            .saturating_add(u64::from(until.subsec_nanos() > 0));
        let claims = TokenClaims {
            kid: principal.key_id.clone(),
            exp,
            max_session_ms,
        };
        let payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims).unwrap_or_default());
        let signature = URL_SAFE_NO_PAD.encode(self.sign(payload.as_bytes()));
        (format!("{TOKEN_PREFIX}{payload}.{signature}"), claims)
    }

    /// HMAC accepts keys of any length, so this is always `Some`; were it
    /// not, signing yields nothing and every token fails: closed, not open.
    fn mac(&self) -> Option<HmacSha256> {
        <HmacSha256 as Mac>::new_from_slice(&self.token_secret).ok()
    }

    fn sign(&self, payload: &[u8]) -> Vec<u8> {
        let Some(mut mac) = self.mac() else {
            return Vec::new();
        };
        mac.update(payload);
        mac.finalize().into_bytes().to_vec()
    }

    fn verify_token(&self, token: &str, now: SystemTime) -> Result<Principal, AuthError> {
        let (payload, signature) = token
            .split_once('.')
            .ok_or(AuthError::BadToken("not two dot-separated parts"))?;
        let signature = URL_SAFE_NO_PAD
            .decode(signature)
            .map_err(|_| AuthError::BadToken("signature is not base64url"))?;
        let mut mac = self.mac().ok_or(AuthError::BadToken("no signing key"))?;
        mac.update(payload.as_bytes());
        mac.verify_slice(&signature)
            .map_err(|_| AuthError::BadToken("signature does not match"))?;
        let claims: TokenClaims = URL_SAFE_NO_PAD
            .decode(payload)
            .ok()
            .and_then(|json| serde_json::from_slice(&json).ok())
            .ok_or(AuthError::BadToken("unreadable claims"))?;
        let now_s = now.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
        if now_s >= claims.exp {
            return Err(AuthError::Expired);
        }
        // A token outlives neither its key nor a key rotation.
        if !self.keys.iter().any(|(id, _)| *id == claims.kid) {
            return Err(AuthError::BadToken("the key that minted it is gone"));
        }
        Ok(Principal {
            key_id: claims.kid,
            max_session_ms: claims.max_session_ms,
        })
    }
}

/// Finds the credential of a request: `Authorization: Bearer`, then the
/// `token` query parameter, then a `token.<value>` subprotocol entry.
pub fn presented_credential<'a>(
    authorization: Option<&'a str>,
    query_token: Option<&'a str>,
    subprotocols: Option<&'a str>,
) -> Option<&'a str> {
    if let Some(bearer) = authorization.and_then(|h| {
        h.strip_prefix("Bearer ")
            .or_else(|| h.strip_prefix("bearer "))
    }) {
        return Some(bearer.trim());
    }
    if let Some(token) = query_token {
        return Some(token);
    }
    subprotocols?
        .split(',')
        .map(str::trim)
        .find_map(|p| p.strip_prefix(PROTOCOL_TOKEN_PREFIX))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth() -> Auth {
        Auth::new(
            &["k-one".into(), "k-two".into()],
            "secret",
            &["https://app.example".into()],
        )
    }

    /// The HTTP refusal body keeps its codes; the four a `/twilio` session
    /// can also be refused with after the upgrade are `ErrorCode`s.
    #[test]
    fn refusal_codes() {
        let cases = [
            (
                AuthError::Missing,
                "auth_missing",
                Some(ErrorCode::AuthMissing),
            ),
            (
                AuthError::WrongKey,
                "auth_wrong_key",
                Some(ErrorCode::AuthWrongKey),
            ),
            (
                AuthError::BadToken("x"),
                "auth_bad_token",
                Some(ErrorCode::AuthBadToken),
            ),
            (
                AuthError::Expired,
                "auth_expired",
                Some(ErrorCode::AuthExpired),
            ),
            (
                AuthError::Origin("https://evil.example".into()),
                "origin_not_allowed",
                None,
            ),
        ];
        for (error, http_code, error_code) in cases {
            assert_eq!(error.code(), http_code);
            assert_eq!(error.error_code(), error_code);
        }
    }

    #[test]
    fn keys_and_tokens() {
        let auth = auth();
        let now = SystemTime::now();
        let principal = auth.check(Some("k-two"), now).unwrap().unwrap();
        assert_eq!(principal.key_id, key_id("k-two"));
        assert_eq!(auth.check(Some("k-three"), now), Err(AuthError::WrongKey));
        assert_eq!(auth.check(None, now), Err(AuthError::Missing));

        let (token, claims) = auth.mint(&principal, Duration::from_secs(60), Some(5000), now);
        let from_token = auth.check(Some(&token), now).unwrap().unwrap();
        assert_eq!(from_token.key_id, principal.key_id);
        assert_eq!(from_token.max_session_ms, Some(5000));
        assert_eq!(
            auth.check(Some(&token), now + Duration::from_secs(61)),
            Err(AuthError::Expired)
        );
        // Any change to the payload breaks the signature.
        let tampered = token.replacen(&token[4..8], "AAAA", 1);
        assert!(matches!(
            auth.check(Some(&tampered), now),
            Err(AuthError::BadToken(_))
        ));
        // Another server's secret does not verify it.
        let other = Auth::new(&["k-two".into()], "other", &[]);
        assert!(matches!(
            other.check(Some(&token), now),
            Err(AuthError::BadToken(_))
        ));
        assert!(claims.exp > 0);
    }

    /// Regression: the expiry was truncated to whole seconds.
    #[test]
    fn a_token_lives_at_least_its_ttl() {
        let auth = auth();
        let principal = auth
            .check(Some("k-two"), SystemTime::now())
            .unwrap()
            .unwrap();
        let late_in_a_second = UNIX_EPOCH + Duration::from_millis(1_700_000_000_900);
        let ttl = Duration::from_secs(1);
        let (token, _) = auth.mint(&principal, ttl, None, late_in_a_second);
        let almost = late_in_a_second + ttl - Duration::from_millis(1);
        assert!(auth.check(Some(&token), almost).is_ok());
        // And at most a second more.
        assert_eq!(
            auth.check(
                Some(&token),
                late_in_a_second + ttl + Duration::from_secs(1)
            ),
            Err(AuthError::Expired)
        );
    }

    #[test]
    fn secrets_compare_exactly() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
        assert!(!constant_time_eq(b"", b"a"));
    }

    #[test]
    fn no_keys_means_no_auth() {
        let open = Auth::new(&[], "", &[]);
        assert_eq!(open.check(None, SystemTime::now()), Ok(None));
    }

    #[test]
    fn origins_and_credential_sources() {
        let auth = auth();
        assert!(auth.check_origin(Some("https://app.example/")).is_ok());
        assert!(auth.check_origin(None).is_ok());
        assert_eq!(
            auth.check_origin(Some("https://evil.example")),
            Err(AuthError::Origin("https://evil.example".into()))
        );
        assert_eq!(
            presented_credential(Some("Bearer abc"), Some("q"), None),
            Some("abc")
        );
        assert_eq!(presented_credential(None, Some("q"), None), Some("q"));
        assert_eq!(
            presented_credential(None, None, Some("cochlea.v1, token.xyz")),
            Some("xyz")
        );
        assert_eq!(presented_credential(None, None, Some("cochlea.v1")), None);
    }
}
