//! JWT bearer authentication: `Authorization: Bearer <JWT>`, HS256 with a shared secret or
//! RS256 with a public key; `exp`, `nbf` and, when configured, `iss` and `aud` are required and
//! checked. Claims: `sub` (customer or user id, not blank) and `roles` (any of customer,
//! warehouse, admin; a token with none of them reads and writes nothing but public data).

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::EdgeError;

/// Clock skew tolerated on `exp` and `nbf`, between this service and whoever issued the token.
const LEEWAY_SECONDS: u64 = 5;
/// The latest expiry a token may carry, the last second of the year 9999 (as far as dates go
/// in the service: PostgreSQL's, chrono's and RFC 3339's range): a later one is refused as
/// invalid, where the clock arithmetic of its end would overflow.
const LATEST_EXPIRY: u64 = 253_402_300_799;

/// A role from the `roles` claim. Unknown role names are ignored, so an issuer may add roles
/// for other services without locking users out here.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Customer,
    Warehouse,
    Admin,
}

impl Role {
    pub fn parse(name: &str) -> Option<Role> {
        match name {
            "customer" => Some(Role::Customer),
            "warehouse" => Some(Role::Warehouse),
            "admin" => Some(Role::Admin),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Customer => "customer",
            Role::Warehouse => "warehouse",
            Role::Admin => "admin",
        }
    }
}

/// Who is calling: the token's subject and roles.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Actor {
    pub sub: String,
    pub roles: Vec<Role>,
}

impl Actor {
    pub fn has(&self, role: Role) -> bool {
        self.roles.contains(&role)
    }

    pub fn is_admin(&self) -> bool {
        self.has(Role::Admin)
    }
}

/// Key material and expected claims, as the settings give them. Secrets never reach `Debug`.
#[derive(Clone, Default)]
pub struct JwtConfig {
    /// HS256 shared secret; wins over the RS256 keys when both are set.
    pub secret: Option<String>,
    /// RS256 public key (PEM) to verify tokens.
    pub public_key: Option<String>,
    /// RS256 private key (PEM), only to issue tokens from the CLI.
    pub private_key: Option<String>,
    pub issuer: Option<String>,
    pub audience: Option<String>,
}

impl fmt::Debug for JwtConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let set = |v: &Option<String>| if v.is_some() { "<set>" } else { "<unset>" };
        f.debug_struct("JwtConfig")
            .field("secret", &set(&self.secret))
            .field("public_key", &set(&self.public_key))
            .field("private_key", &set(&self.private_key))
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .finish()
    }
}

/// Why a bearer token was refused; the API answers all of them with UNAUTHENTICATED.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthFailure {
    MalformedHeader,
    InvalidToken(String),
    NotConfigured,
}

impl fmt::Display for AuthFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::MalformedHeader => f.write_str("the Authorization header must be `Bearer <JWT>`"),
            Self::InvalidToken(why) => write!(f, "invalid token: {why}"),
            Self::NotConfigured => {
                f.write_str("this service accepts no tokens (no key configured)")
            }
        }
    }
}

/// The claims read from a token; the registered ones are checked by `jsonwebtoken` itself.
#[derive(Deserialize)]
struct VerifiedClaims {
    sub: String,
    /// Seconds since the epoch; required (see `Authenticator::new`).
    exp: u64,
    #[serde(default)]
    roles: Vec<String>,
}

/// Checks bearer tokens. Cheap to share behind an `Arc`.
pub struct Authenticator {
    verify: Option<(DecodingKey, Validation)>,
}

impl Authenticator {
    /// Without any key the authenticator refuses every token (anonymous calls still pass).
    pub fn new(config: &JwtConfig) -> Result<Self, EdgeError> {
        let (key, algorithm) = if let Some(secret) = &config.secret {
            (
                DecodingKey::from_secret(secret.as_bytes()),
                Algorithm::HS256,
            )
        } else if let Some(pem) = &config.public_key {
            let key = DecodingKey::from_rsa_pem(pem.as_bytes()).map_err(EdgeError::InvalidKey)?;
            (key, Algorithm::RS256)
        } else {
            return Ok(Self { verify: None });
        };
        let mut validation = Validation::new(algorithm);
        validation.leeway = LEEWAY_SECONDS;
        validation.validate_nbf = true;
        // A token without an expiry would be valid forever; one without a subject names nobody.
        // jsonwebtoken checks `iss` and `aud` only when the token carries them, so configured
        // ones must also be required, or a token that leaves them out passes.
        let mut required = vec!["exp", "sub"];
        if let Some(issuer) = &config.issuer {
            validation.set_issuer(&[issuer]);
            required.push("iss");
        }
        match &config.audience {
            Some(audience) => {
                validation.set_audience(&[audience]);
                required.push("aud");
            }
            // jsonwebtoken refuses any `aud` unless told which to accept or to not check it.
            None => validation.validate_aud = false,
        }
        validation.set_required_spec_claims(&required);
        Ok(Self {
            verify: Some((key, validation)),
        })
    }

    pub fn is_configured(&self) -> bool {
        self.verify.is_some()
    }

    /// `Ok(None)` for a request without an Authorization header (anonymous).
    pub fn authenticate(&self, header: Option<&str>) -> Result<Option<Actor>, AuthFailure> {
        Ok(self.session(header)?.map(|session| session.actor))
    }

    /// As [`Authenticator::authenticate`], with the moment the token stops being accepted, for
    /// connections that outlive a request (a WebSocket is closed then).
    pub fn session(&self, header: Option<&str>) -> Result<Option<Session>, AuthFailure> {
        let Some(header) = header else {
            return Ok(None);
        };
        // The scheme's name is case-insensitive (RFC 9110, section 11.1).
        let token = header
            .split_once(' ')
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, token)| token.trim())
            .filter(|t| !t.is_empty())
            .ok_or(AuthFailure::MalformedHeader)?;
        let (key, validation) = self.verify.as_ref().ok_or(AuthFailure::NotConfigured)?;
        let data = jsonwebtoken::decode::<VerifiedClaims>(token, key, validation)
            .map_err(|e| AuthFailure::InvalidToken(describe(&e)))?;
        // The subject becomes a customer id, a rate-limit key and a log field: it must name
        // someone, in plain text.
        let sub = &data.claims.sub;
        if sub.trim().is_empty() || crate::plain_text::has_control(sub) {
            return Err(AuthFailure::InvalidToken(
                "blank or unprintable subject".into(),
            ));
        }
        let roles = data
            .claims
            .roles
            .iter()
            .filter_map(|r| Role::parse(r))
            .collect();
        if data.claims.exp > LATEST_EXPIRY {
            return Err(AuthFailure::InvalidToken(
                "expires after the year 9999".into(),
            ));
        }
        // The first whole second the check above refuses (it accepts `now <= exp + leeway`),
        // so a token ends at the same moment on every transport.
        let expires_at = UNIX_EPOCH + Duration::from_secs(data.claims.exp + LEEWAY_SECONDS + 1);
        Ok(Some(Session {
            actor: Actor {
                sub: data.claims.sub,
                roles,
            },
            expires_at,
        }))
    }
}

/// A verified token: who it names and until when it is accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    pub actor: Actor,
    /// Just past `exp` plus the tolerated clock skew: from then on the token is refused.
    pub expires_at: SystemTime,
}

/// A short, safe description: which check failed, never the key or the token.
fn describe(error: &jsonwebtoken::errors::Error) -> String {
    use jsonwebtoken::errors::ErrorKind;
    match error.kind() {
        ErrorKind::ExpiredSignature => "expired".into(),
        ErrorKind::ImmatureSignature => "not valid yet (nbf)".into(),
        ErrorKind::InvalidIssuer => "wrong issuer".into(),
        ErrorKind::InvalidAudience => "wrong audience".into(),
        ErrorKind::InvalidSignature => "bad signature".into(),
        ErrorKind::InvalidAlgorithm => "wrong algorithm".into(),
        ErrorKind::MissingRequiredClaim(claim) => format!("missing claim {claim}"),
        _ => "malformed".into(),
    }
}

#[derive(Serialize)]
struct IssuedClaims<'a> {
    sub: &'a str,
    roles: Vec<&'static str>,
    iat: u64,
    nbf: u64,
    exp: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    iss: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    aud: Option<&'a str>,
}

/// Signs tokens with the configured key, for `orderly token` and for tests.
pub struct TokenIssuer {
    key: EncodingKey,
    algorithm: Algorithm,
    issuer: Option<String>,
    audience: Option<String>,
}

impl TokenIssuer {
    pub fn new(config: &JwtConfig) -> Result<Self, EdgeError> {
        let (key, algorithm) = if let Some(secret) = &config.secret {
            (
                EncodingKey::from_secret(secret.as_bytes()),
                Algorithm::HS256,
            )
        } else if let Some(pem) = &config.private_key {
            let key = EncodingKey::from_rsa_pem(pem.as_bytes()).map_err(EdgeError::InvalidKey)?;
            (key, Algorithm::RS256)
        } else {
            return Err(EdgeError::NoKey(
                "set ORDERLY_JWT_SECRET, or ORDERLY_JWT_PRIVATE_KEY for RS256",
            ));
        };
        Ok(Self {
            key,
            algorithm,
            issuer: config.issuer.clone(),
            audience: config.audience.clone(),
        })
    }

    /// A token for `sub` with `roles`, valid from now for `ttl`.
    pub fn issue(&self, sub: &str, roles: &[Role], ttl: Duration) -> Result<String, EdgeError> {
        let now = jsonwebtoken::get_current_timestamp();
        let exp = now
            .checked_add(ttl.as_secs())
            .filter(|exp| *exp <= LATEST_EXPIRY)
            .ok_or_else(|| EdgeError::InvalidSetting {
                name: "ttl",
                reason: "a token may not be valid after the year 9999".into(),
            })?;
        let claims = IssuedClaims {
            sub,
            roles: roles.iter().map(|r| r.as_str()).collect(),
            iat: now,
            nbf: now,
            exp,
            iss: self.issuer.as_deref(),
            aud: self.audience.as_deref(),
        };
        jsonwebtoken::encode(&Header::new(self.algorithm), &claims, &self.key)
            .map_err(EdgeError::Sign)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> JwtConfig {
        JwtConfig {
            secret: Some("test-secret".into()),
            issuer: Some("orderly".into()),
            audience: Some("orderly-api".into()),
            ..Default::default()
        }
    }

    #[test]
    fn an_issued_token_authenticates_with_its_subject_and_roles() {
        let token = TokenIssuer::new(&config())
            .unwrap()
            .issue("alice", &[Role::Customer], Duration::from_secs(60))
            .unwrap();
        let auth = Authenticator::new(&config()).unwrap();
        let actor = auth
            .authenticate(Some(&format!("Bearer {token}")))
            .unwrap()
            .unwrap();
        assert_eq!(actor.sub, "alice");
        assert_eq!(actor.roles, vec![Role::Customer]);
        // The scheme is named in any case.
        for scheme in ["bearer", "BEARER", "BeArEr"] {
            let spelt = auth.authenticate(Some(&format!("{scheme} {token}")));
            assert_eq!(spelt.unwrap().unwrap().sub, "alice", "{scheme}");
        }
    }

    #[test]
    fn a_token_for_another_audience_or_key_is_refused() {
        let other = JwtConfig {
            audience: Some("elsewhere".into()),
            ..config()
        };
        let token = TokenIssuer::new(&other)
            .unwrap()
            .issue("alice", &[Role::Admin], Duration::from_secs(60))
            .unwrap();
        let auth = Authenticator::new(&config()).unwrap();
        assert!(auth.authenticate(Some(&format!("Bearer {token}"))).is_err());
        let forged = JwtConfig {
            secret: Some("other".into()),
            ..config()
        };
        let token = TokenIssuer::new(&forged)
            .unwrap()
            .issue("alice", &[Role::Admin], Duration::from_secs(60))
            .unwrap();
        assert!(matches!(
            auth.authenticate(Some(&format!("Bearer {token}"))),
            Err(AuthFailure::InvalidToken(why)) if why == "bad signature"
        ));
    }

    #[test]
    fn an_expired_or_not_yet_valid_token_is_refused_and_no_header_is_anonymous() {
        let now = jsonwebtoken::get_current_timestamp();
        let sign = |nbf: u64, exp: u64| {
            let claims = IssuedClaims {
                sub: "alice",
                roles: vec!["customer"],
                iat: nbf,
                nbf,
                exp,
                iss: Some("orderly"),
                aud: Some("orderly-api"),
            };
            let key = EncodingKey::from_secret(b"test-secret");
            jsonwebtoken::encode(&Header::default(), &claims, &key).unwrap()
        };
        let auth = Authenticator::new(&config()).unwrap();
        let expired = sign(now - 600, now - 300);
        assert_eq!(
            auth.authenticate(Some(&format!("Bearer {expired}"))),
            Err(AuthFailure::InvalidToken("expired".into()))
        );
        let early = sign(now + 300, now + 600);
        assert!(auth.authenticate(Some(&format!("Bearer {early}"))).is_err());
        assert_eq!(auth.authenticate(None), Ok(None));
        assert_eq!(
            auth.authenticate(Some("Basic abc")),
            Err(AuthFailure::MalformedHeader)
        );
    }

    #[test]
    fn a_token_ending_after_the_year_9999_is_refused_and_never_issued() {
        let now = jsonwebtoken::get_current_timestamp();
        let auth = Authenticator::new(&config()).unwrap();
        let token = |exp: u64| {
            let token = signed(serde_json::json!({
                "sub": "alice", "roles": ["customer"], "exp": exp,
                "iss": "orderly", "aud": "orderly-api",
            }));
            format!("Bearer {token}")
        };
        // The largest expiry a token can write used to overflow the clock and panic.
        for exp in [u64::MAX, i64::MAX as u64, LATEST_EXPIRY + 1] {
            assert_eq!(
                auth.session(Some(&token(exp))).err(),
                Some(AuthFailure::InvalidToken(
                    "expires after the year 9999".into()
                )),
                "{exp}"
            );
        }
        let last = auth
            .session(Some(&token(LATEST_EXPIRY)))
            .expect("the last second of 9999 is a valid expiry")
            .expect("a session");
        assert_eq!(
            last.expires_at,
            UNIX_EPOCH + Duration::from_secs(LATEST_EXPIRY + LEEWAY_SECONDS + 1)
        );
        let issuer = TokenIssuer::new(&config()).unwrap();
        let too_long = Duration::from_secs(LATEST_EXPIRY - now + 1);
        assert!(matches!(
            issuer.issue("alice", &[Role::Customer], too_long),
            Err(EdgeError::InvalidSetting { name: "ttl", .. })
        ));
        assert!(matches!(
            issuer.issue("alice", &[Role::Customer], Duration::MAX),
            Err(EdgeError::InvalidSetting { name: "ttl", .. })
        ));
        let longest = issuer
            .issue(
                "alice",
                &[Role::Customer],
                too_long - Duration::from_secs(60),
            )
            .unwrap();
        assert!(auth.session(Some(&format!("Bearer {longest}"))).is_ok());
    }

    /// A token signed with the test secret holding exactly `claims`.
    fn signed(claims: serde_json::Value) -> String {
        let key = EncodingKey::from_secret(b"test-secret");
        jsonwebtoken::encode(&Header::default(), &claims, &key).unwrap()
    }

    #[test]
    fn a_configured_issuer_and_audience_are_required_not_only_checked() {
        let exp = jsonwebtoken::get_current_timestamp() + 600;
        let auth = Authenticator::new(&config()).unwrap();
        let without_both =
            signed(serde_json::json!({"sub": "root", "roles": ["admin"], "exp": exp}));
        // Which of the two is named first is the library's (unordered) choice.
        assert!(matches!(
            auth.authenticate(Some(&format!("Bearer {without_both}"))),
            Err(AuthFailure::InvalidToken(why)) if why == "missing claim iss" || why == "missing claim aud"
        ));
        let without_aud = signed(
            serde_json::json!({"sub": "root", "roles": ["admin"], "exp": exp, "iss": "orderly"}),
        );
        assert_eq!(
            auth.authenticate(Some(&format!("Bearer {without_aud}"))),
            Err(AuthFailure::InvalidToken("missing claim aud".into()))
        );
        // Unconfigured, neither is needed.
        let open = Authenticator::new(&JwtConfig {
            secret: Some("test-secret".into()),
            ..Default::default()
        })
        .unwrap();
        assert!(
            open.authenticate(Some(&format!("Bearer {without_both}")))
                .is_ok()
        );
    }

    #[test]
    fn a_blank_or_unprintable_subject_is_refused() {
        let exp = jsonwebtoken::get_current_timestamp() + 600;
        let auth = Authenticator::new(&config()).unwrap();
        for sub in ["", "  ", "al\u{0}ice", "bob\nadmin"] {
            let token = signed(serde_json::json!({
                "sub": sub, "roles": ["customer"], "exp": exp,
                "iss": "orderly", "aud": "orderly-api",
            }));
            assert_eq!(
                auth.authenticate(Some(&format!("Bearer {token}"))),
                Err(AuthFailure::InvalidToken(
                    "blank or unprintable subject".into()
                )),
                "{sub:?}"
            );
        }
    }

    #[test]
    fn secrets_never_show_in_debug_output() {
        let shown = format!("{:?}", config());
        assert!(!shown.contains("test-secret"), "{shown}");
    }
}
