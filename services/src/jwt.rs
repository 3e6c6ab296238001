//! A development signing key (Ed25519) and the bearer tokens it signs: what `make run`'s
//! Envoy accepts (its public half is the JWKS file Envoy's `jwt_authn` reads), what
//! `plan-limits token` prints, and what the tests send. The key is made on first use and kept
//! in the run's directory (`.gateway/` for `make run`), never committed.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use base64::Engine;
use ed25519_dalek::pkcs8::{DecodePrivateKey, EncodePrivateKey};
use ed25519_dalek::SigningKey;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use plan_limits_core::JwtClaims;
use serde_json::{json, Value};

const KEY_ID: &str = "plan-limits-dev";

pub struct DevKey {
    signing: EncodingKey,
    verifying: DecodingKey,
    /// The public key as a JWK (`OKP`, `Ed25519`).
    jwk: Value,
    dir: PathBuf,
}

/// What a token says about its bearer.
#[derive(Debug, Clone)]
pub struct TokenClaims<'a> {
    pub user: &'a str,
    pub plan: Option<&'a str>,
    pub org: Option<&'a str>,
    /// The subscription's anchor day (1 to 31), if the token carries one.
    pub anchor_day: Option<u32>,
    pub ttl_secs: u64,
}

impl DevKey {
    /// The key kept in `dir` (`jwt-signing-key.pem`), made there if missing, with its public
    /// half written next to it as `jwks.json`.
    pub fn load_or_create(dir: &Path) -> Self {
        std::fs::create_dir_all(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        let path = dir.join("jwt-signing-key.pem");
        let key = match std::fs::read_to_string(&path) {
            Ok(pem) => SigningKey::from_pkcs8_pem(&pem)
                .unwrap_or_else(|e| panic!("{}: not an Ed25519 key: {e}", path.display())),
            Err(_) => {
                let key = SigningKey::generate(&mut rand_core::OsRng);
                let pem = key
                    .to_pkcs8_pem(Default::default())
                    .unwrap_or_else(|e| panic!("encode the signing key: {e}"));
                write_private(&path, pem.as_bytes());
                key
            }
        };
        let pem = key
            .to_pkcs8_pem(Default::default())
            .unwrap_or_else(|e| panic!("encode the signing key: {e}"));
        let x = key.verifying_key().to_bytes();
        let jwk = json!({
            "kty": "OKP",
            "crv": "Ed25519",
            "x": base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(x),
            "alg": "EdDSA",
            "use": "sig",
            "kid": KEY_ID,
        });
        let dev = Self {
            signing: EncodingKey::from_ed_pem(pem.as_bytes())
                .unwrap_or_else(|e| panic!("signing key: {e}")),
            verifying: DecodingKey::from_ed_der(&x),
            jwk,
            dir: dir.to_path_buf(),
        };
        let jwks = dev.jwks_path();
        std::fs::write(&jwks, dev.jwks().to_string())
            .unwrap_or_else(|e| panic!("{}: {e}", jwks.display()));
        dev
    }

    /// One key for every test of this process.
    pub fn for_tests() -> Arc<DevKey> {
        static KEY: OnceLock<Arc<DevKey>> = OnceLock::new();
        KEY.get_or_init(|| {
            let dir = std::env::temp_dir().join(format!("plan-limits-jwt-{}", std::process::id()));
            Arc::new(DevKey::load_or_create(&dir))
        })
        .clone()
    }

    /// The JSON Web Key Set Envoy's `jwt_authn` verifies tokens with.
    pub fn jwks(&self) -> Value {
        json!({ "keys": [self.jwk] })
    }

    pub fn jwks_path(&self) -> PathBuf {
        self.dir.join("jwks.json")
    }

    /// A token for `claims`, issued now, with the issuer and audience `jwt` names.
    pub fn token(&self, jwt: &JwtClaims, claims: &TokenClaims) -> String {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let mut payload = json!({
            "iss": jwt.issuer,
            "aud": jwt.audience,
            "iat": now,
            "exp": now + claims.ttl_secs,
        });
        payload[&jwt.user_claim] = claims.user.into();
        if let Some(plan) = claims.plan {
            payload[&jwt.plan_claim] = plan.into();
        }
        if let Some(org) = claims.org {
            payload[&jwt.org_claim] = org.into();
        }
        if let Some(day) = claims.anchor_day {
            payload[&jwt.anchor_claim] = day.into();
        }
        self.sign(&payload)
    }

    /// A token with exactly `payload` (its issuer, audience and expiry included).
    pub fn sign(&self, payload: &Value) -> String {
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some(KEY_ID.into());
        jsonwebtoken::encode(&header, payload, &self.signing)
            .unwrap_or_else(|e| panic!("sign a token: {e}"))
    }

    /// The payload of `token` if this key signed it and it is valid for `jwt`'s issuer and
    /// audience now (as Envoy's `jwt_authn` checks it).
    pub fn verify(&self, jwt: &JwtClaims, token: &str) -> Option<Value> {
        let mut validation = Validation::new(Algorithm::EdDSA);
        validation.set_issuer(&[&jwt.issuer]);
        validation.set_audience(&[&jwt.audience]);
        jsonwebtoken::decode::<Value>(token, &self.verifying, &validation)
            .ok()
            .map(|data| data.claims)
    }
}

/// Writes a private key readable by its owner only.
fn write_private(path: &Path, bytes: &[u8]) {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    file.write_all(bytes)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_verifies_with_its_key_only_and_names_the_claims() {
        let jwt = JwtClaims::default();
        let key = DevKey::for_tests();
        let token = key.token(
            &jwt,
            &TokenClaims {
                user: "alice",
                plan: Some("free"),
                org: Some("acme"),
                anchor_day: None,
                ttl_secs: 60,
            },
        );
        let payload = key.verify(&jwt, &token).unwrap();
        assert_eq!(
            (&payload["sub"], &payload["plan"], &payload["org"]),
            (&json!("alice"), &json!("free"), &json!("acme"))
        );
        let other = DevKey::load_or_create(&crate::process::scratch_dir("jwt-other"));
        assert!(other.verify(&jwt, &token).is_none(), "another key");
        let wrong_audience = JwtClaims {
            audience: "someone-else".into(),
            ..JwtClaims::default()
        };
        assert!(key.verify(&wrong_audience, &token).is_none());
        let jwks = key.jwks();
        assert_eq!(jwks["keys"][0]["crv"], "Ed25519");
    }

    #[test]
    fn the_key_is_kept_between_runs() {
        let dir = crate::process::scratch_dir("jwt-kept");
        let first = DevKey::load_or_create(&dir);
        let jwt = JwtClaims::default();
        let claims = TokenClaims {
            user: "u",
            plan: None,
            org: None,
            anchor_day: None,
            ttl_secs: 60,
        };
        let token = first.token(&jwt, &claims);
        let again = DevKey::load_or_create(&dir);
        assert!(again.verify(&jwt, &token).is_some());
        assert_eq!(first.jwks(), again.jwks());
    }
}
