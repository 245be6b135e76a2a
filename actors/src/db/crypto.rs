//! API keys at rest: XChaCha20-Poly1305 with a 32-byte key, a fresh random
//! 24-byte nonce per value, stored as nonce ‖ ciphertext ‖ tag. A canary in
//! `system_config` proves at boot that the key is the one the data was
//! written with.

use chacha20poly1305::aead::{Aead, Generate, Key, KeyInit};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use diesel::sqlite::SqliteConnection;

use super::{get_config, set_config, DbError};

const NONCE_LEN: usize = 24;
const CANARY_KEY: &str = "encryption_canary";
const CANARY_PLAINTEXT: &[u8] = b"sidecar encryption canary v1";

#[derive(Debug, thiserror::Error)]
pub enum CryptoError {
    #[error("the encryption key must be 64 hexadecimal characters (32 bytes); {0}")]
    Malformed(String),
    #[error(
        "the encryption key does not match the one this database was written with: \
         every stored API key would be unreadable. Start with the original key \
         (SIDECAR_ENCRYPTION_KEY, SIDECAR_ENCRYPTION_KEY_FILE or $CREDENTIALS_DIRECTORY/encryption-key), \
         or rotate deliberately with `sidecar rotate-key`"
    )]
    WrongKey,
    #[error("a stored value could not be decrypted (damaged, or written with another key)")]
    Undecryptable,
}

#[derive(Clone)]
pub struct KeyRing {
    cipher: XChaCha20Poly1305,
}

impl std::fmt::Debug for KeyRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KeyRing(****)")
    }
}

/// What the canary check found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Canary {
    /// First start with this database: the canary was written now.
    Created,
    Verified,
}

impl KeyRing {
    pub fn from_hex(text: &str) -> Result<Self, CryptoError> {
        let text = text.trim();
        if text.len() != 64 {
            return Err(CryptoError::Malformed(format!(
                "got {} characters",
                text.len()
            )));
        }
        let bytes = hex::decode(text)
            .map_err(|_| CryptoError::Malformed("it contains non-hex characters".into()))?;
        let cipher = XChaCha20Poly1305::new_from_slice(&bytes)
            .map_err(|_| CryptoError::Malformed("wrong length".into()))?;
        Ok(Self { cipher })
    }

    /// A new random key, as 64 hex characters.
    pub fn generate_hex() -> String {
        let key = Key::<XChaCha20Poly1305>::generate();
        hex::encode(key.as_slice())
    }

    pub fn encrypt(&self, plaintext: &[u8]) -> Vec<u8> {
        let nonce = XNonce::generate();
        let mut out = nonce.as_slice().to_vec();
        // Encryption with a valid key and nonce cannot fail for in-memory data.
        let ct = self.cipher.encrypt(&nonce, plaintext).unwrap_or_default();
        out.extend_from_slice(&ct);
        out
    }

    pub fn decrypt(&self, blob: &[u8]) -> Result<Vec<u8>, CryptoError> {
        if blob.len() < NONCE_LEN + 16 {
            return Err(CryptoError::Undecryptable);
        }
        let (nonce, ct) = blob.split_at(NONCE_LEN);
        let nonce = XNonce::try_from(nonce).map_err(|_| CryptoError::Undecryptable)?;
        self.cipher
            .decrypt(&nonce, ct)
            .map_err(|_| CryptoError::Undecryptable)
    }

    pub fn decrypt_string(&self, blob: &[u8]) -> Result<String, CryptoError> {
        String::from_utf8(self.decrypt(blob)?).map_err(|_| CryptoError::Undecryptable)
    }

    /// Proves this key is the database's key, or writes the canary on first use.
    pub fn check_canary(&self, conn: &mut SqliteConnection) -> Result<Canary, DbError> {
        match get_config(conn, CANARY_KEY)? {
            Some(stored) => {
                let blob = hex::decode(stored).map_err(|_| CryptoError::WrongKey)?;
                match self.decrypt(&blob) {
                    Ok(p) if p == CANARY_PLAINTEXT => Ok(Canary::Verified),
                    _ => Err(CryptoError::WrongKey.into()),
                }
            }
            None => {
                self.write_canary(conn)?;
                Ok(Canary::Created)
            }
        }
    }

    pub(crate) fn write_canary(&self, conn: &mut SqliteConnection) -> Result<(), DbError> {
        set_config(
            conn,
            CANARY_KEY,
            &hex::encode(self.encrypt(CANARY_PLAINTEXT)),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_fresh_nonces() {
        let ring = KeyRing::from_hex(&KeyRing::generate_hex()).unwrap();
        let a = ring.encrypt(b"fake-secret");
        let b = ring.encrypt(b"fake-secret");
        assert_ne!(a, b, "a fresh nonce per value");
        assert_eq!(ring.decrypt(&a).unwrap(), b"fake-secret");
        let other = KeyRing::from_hex(&KeyRing::generate_hex()).unwrap();
        assert!(other.decrypt(&a).is_err());
        let mut tampered = a.clone();
        let last = tampered.len() - 1;
        tampered[last] ^= 1;
        assert!(ring.decrypt(&tampered).is_err());
    }

    #[test]
    fn malformed_keys_are_rejected() {
        assert!(matches!(
            KeyRing::from_hex("abc"),
            Err(CryptoError::Malformed(_))
        ));
        assert!(matches!(
            KeyRing::from_hex(&"zz".repeat(32)),
            Err(CryptoError::Malformed(_))
        ));
    }

    #[test]
    fn canary_detects_a_wrong_key() {
        let dir = tempfile::tempdir().unwrap();
        let mut conn = super::super::open(&dir.path().join("c.db")).unwrap();
        let ring = KeyRing::from_hex(&KeyRing::generate_hex()).unwrap();
        assert_eq!(ring.check_canary(&mut conn).unwrap(), Canary::Created);
        assert_eq!(ring.check_canary(&mut conn).unwrap(), Canary::Verified);
        let wrong = KeyRing::from_hex(&KeyRing::generate_hex()).unwrap();
        let err = wrong.check_canary(&mut conn).unwrap_err().to_string();
        assert!(
            err.contains("does not match") && err.contains("unreadable"),
            "{err}"
        );
    }
}
