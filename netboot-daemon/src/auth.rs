//! Credentials: argon2id password hashes, random secrets for sessions and API tokens
//! (stored only as SHA-256 hashes), and the login throttle.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use argon2::Argon2;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use rand::RngCore;
use sha2::{Digest, Sha256};

/// Prefix of API token secrets, so that leaked tokens are recognisable by scanners.
pub const TOKEN_PREFIX: &str = "nbt_";

/// Shortest password accepted.
pub const MIN_PASSWORD_LEN: usize = 8;

/// Hashes a password with argon2id and a random salt, as a PHC string.
pub fn hash_password(password: &str) -> Result<String, argon2::password_hash::Error> {
    let mut salt = [0u8; 16];
    rand::rng().fill_bytes(&mut salt);
    let salt = SaltString::encode_b64(&salt)?;
    Ok(Argon2::default()
        .hash_password(password.as_bytes(), &salt)?
        .to_string())
}

/// Checks a password against a PHC string. A malformed hash never matches.
pub fn verify_password(password: &str, phc: &str) -> bool {
    PasswordHash::new(phc).is_ok_and(|h| {
        Argon2::default()
            .verify_password(password.as_bytes(), &h)
            .is_ok()
    })
}

/// A hash to verify against when the user does not exist, so that the response time
/// does not reveal which user names exist.
pub fn dummy_hash() -> &'static str {
    static DUMMY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    DUMMY.get_or_init(|| hash_password("netboot-dummy-password").unwrap_or_default())
}

/// 32 random bytes, URL-safe base64 without padding.
pub fn new_secret() -> String {
    use base64::Engine as _;
    let mut b = [0u8; 32];
    rand::rng().fill_bytes(&mut b);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

/// SHA-256 of a secret, hex: what the store keeps instead of the secret.
pub fn secret_hash(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// Checks a user name: 1 to 64 characters of letters, digits, `.`, `_`, `-`, `@`.
pub fn valid_username(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '@'))
}

#[derive(Debug, Clone, Copy)]
struct Failures {
    count: u32,
    last: Instant,
    locked_until: Option<Instant>,
}

/// Throttles failed logins per user name and per client address.
///
/// After `max_failures` failures a key is locked for `lockout`, doubling with each
/// further failure (capped at one hour). A success clears the user name's record.
/// The table is bounded: idle records are dropped first.
#[derive(Debug)]
pub struct LoginThrottle {
    max_failures: u32,
    lockout: Duration,
    entries: HashMap<String, Failures>,
}

/// How many records the throttle keeps at most.
const THROTTLE_CAPACITY: usize = 10_000;
/// Records idle this long are forgotten.
const THROTTLE_IDLE: Duration = Duration::from_secs(3600);

impl LoginThrottle {
    /// A throttle with the given policy.
    pub fn new(max_failures: u32, lockout: Duration) -> Self {
        Self {
            max_failures: max_failures.max(1),
            lockout,
            entries: HashMap::new(),
        }
    }

    /// If any of `keys` is locked at `now`, how long until it unlocks.
    pub fn check(&self, keys: &[&str], now: Instant) -> Option<Duration> {
        keys.iter()
            .filter_map(|k| self.entries.get(*k)?.locked_until)
            .filter(|until| *until > now)
            .map(|until| until - now)
            .max()
    }

    /// Records a failed attempt for each key.
    pub fn fail(&mut self, keys: &[&str], now: Instant) {
        if self.entries.len() >= THROTTLE_CAPACITY {
            self.entries
                .retain(|_, f| now.duration_since(f.last) < THROTTLE_IDLE);
        }
        for k in keys {
            if self.entries.len() >= THROTTLE_CAPACITY && !self.entries.contains_key(*k) {
                // Full of recent failures: an attack in progress. Keep the oldest records.
                continue;
            }
            let f = self.entries.entry((*k).to_owned()).or_insert(Failures {
                count: 0,
                last: now,
                locked_until: None,
            });
            f.count = f.count.saturating_add(1);
            f.last = now;
            if f.count >= self.max_failures {
                let doublings = (f.count - self.max_failures).min(12);
                let lock = (self.lockout * (1u32 << doublings)).min(Duration::from_secs(3600));
                f.locked_until = Some(now + lock);
            }
        }
    }

    /// Clears the record of `key` after a success.
    pub fn succeed(&mut self, key: &str) {
        self.entries.remove(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn password_hashes_verify_and_are_salted() {
        let a = hash_password("correct horse").expect("hash");
        let b = hash_password("correct horse").expect("hash");
        assert_ne!(a, b, "salted");
        assert!(a.starts_with("$argon2id$"));
        assert!(verify_password("correct horse", &a));
        assert!(!verify_password("correct horsE", &a));
        assert!(!verify_password("x", "not a phc string"));
    }

    #[test]
    fn secrets_are_random_and_hashed() {
        let s = new_secret();
        assert_eq!(s.len(), 43);
        assert_ne!(s, new_secret());
        assert_eq!(
            secret_hash("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn throttle_locks_after_max_failures_and_doubles() {
        let t0 = Instant::now();
        let mut t = LoginThrottle::new(3, Duration::from_secs(10));
        let keys = ["user:bob", "ip:10.0.0.1"];
        for _ in 0..2 {
            t.fail(&keys, t0);
        }
        assert_eq!(t.check(&keys, t0), None);
        t.fail(&keys, t0);
        assert_eq!(t.check(&keys, t0), Some(Duration::from_secs(10)));
        assert_eq!(
            t.check(&["ip:10.0.0.1"], t0 + Duration::from_secs(11)),
            None
        );
        t.fail(&keys, t0 + Duration::from_secs(11));
        assert_eq!(
            t.check(&keys, t0 + Duration::from_secs(11)),
            Some(Duration::from_secs(20))
        );
        t.succeed("user:bob");
        assert_eq!(t.check(&["user:bob"], t0 + Duration::from_secs(11)), None);
        assert!(
            t.check(&["ip:10.0.0.1"], t0 + Duration::from_secs(11))
                .is_some(),
            "the address stays locked"
        );
    }

    #[test]
    fn usernames() {
        assert!(valid_username("alice.o-k_1@lab"));
        assert!(!valid_username(""));
        assert!(!valid_username("a b"));
        assert!(!valid_username(&"a".repeat(65)));
    }
}
