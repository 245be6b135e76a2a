//! Keeping backend keys in: wherever upstream text can carry a key (an
//! error body that echoes it, a header, an event in a stream), the key — or
//! any long prefix of it — is masked before it goes on, to a client, a log,
//! the dashboard or the database.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;

use actix_web::http::header::HeaderValue;

use bytes::Bytes;
use memchr::memmem;
use sidecar_actors::ApiKey;

/// How much of a key, from its start, counts as the key: enough to use or
/// guess it, more than a masked hint (`key-****abcd`) shows.
const PREFIX: usize = 12;

/// What an attempt needs of its backend's key, built once per key and
/// worker thread: the masker (its hint and search table were seven
/// allocations on every answer) and the `Authorization` value (a `format!`
/// and a header check on every request). Per thread, not behind a shared
/// lock: the lock and the `Arc` counts were atomic writes to cache lines
/// both workers touch on every request.
pub struct KeyUse {
    pub masker: Arc<Masker>,
    /// `Bearer <key>`, marked sensitive; `None` for a key no header can carry.
    pub auth: Option<HeaderValue>,
}

/// Keys replaced since the start (rotations) are dropped past this many.
const MAX_KEYS: usize = 4096;

impl KeyUse {
    fn new(key: &ApiKey) -> Self {
        let auth = HeaderValue::try_from(format!("Bearer {}", key.expose()))
            .ok()
            .map(|mut v| {
                v.set_sensitive(true);
                v
            });
        Self {
            masker: Arc::new(Masker::new(key)),
            auth,
        }
    }

    /// This thread's for `key`.
    pub fn of(key: &ApiKey) -> Rc<KeyUse> {
        thread_local! {
            static KEYS: RefCell<HashMap<ApiKey, Rc<KeyUse>>> = RefCell::new(HashMap::new());
        }
        KEYS.with(|keys| {
            let mut keys = keys.borrow_mut();
            if let Some(k) = keys.get(key) {
                return k.clone();
            }
            if keys.len() >= MAX_KEYS {
                keys.clear();
            }
            let k = Rc::new(KeyUse::new(key));
            keys.insert(key.clone(), k.clone());
            k
        })
    }
}

/// Finds and masks one key in any bytes.
pub struct Masker {
    key: Vec<u8>,
    masked: Vec<u8>,
    needle: memmem::Finder<'static>,
}

impl Masker {
    pub fn new(api_key: &ApiKey) -> Self {
        let masked = api_key.masked().into_bytes();
        let key = api_key.expose().as_bytes().to_vec();
        let head = key[..key.len().min(PREFIX)].to_vec();
        Self {
            needle: memmem::Finder::new(&head).into_owned(),
            key,
            masked,
        }
    }

    /// True when `hay` holds the key or a long prefix of it.
    pub fn found_in(&self, hay: &[u8]) -> bool {
        !self.key.is_empty() && self.needle.find(hay).is_some()
    }

    /// `hay` with every occurrence masked, or `None` when there is none.
    pub fn mask(&self, hay: &[u8]) -> Option<Vec<u8>> {
        if !self.found_in(hay) {
            return None;
        }
        let mut out = Vec::with_capacity(hay.len());
        let mut rest = hay;
        while let Some(i) = self.needle.find(rest) {
            out.extend_from_slice(&rest[..i]);
            // The match runs as far as it follows the key.
            let len = rest[i..]
                .iter()
                .zip(&self.key)
                .take_while(|(a, b)| a == b)
                .count();
            out.extend_from_slice(&self.masked);
            rest = &rest[i + len..];
        }
        out.extend_from_slice(rest);
        Some(out)
    }

    pub fn mask_bytes(&self, body: Bytes) -> Bytes {
        match self.mask(&body) {
            Some(m) => Bytes::from(m),
            None => body,
        }
    }

    pub fn mask_str(&self, text: &str) -> String {
        match self.mask(text.as_bytes()) {
            Some(m) => String::from_utf8_lossy(&m).to_string(),
            None => text.to_string(),
        }
    }
}

/// The same for one-off uses.
pub fn mask_bytes(body: &[u8], key: &ApiKey) -> Bytes {
    Masker::new(key).mask_bytes(Bytes::copy_from_slice(body))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn masks_the_key_and_long_prefixes() {
        let key = ApiKey::new("fake-secret-abcd1234");
        let m = Masker::new(&key);
        let out = m
            .mask(b"Incorrect API key provided: fake-secret-abcd1234 (fake-secret-abcd1234)")
            .unwrap();
        assert!(!m.found_in(&out));
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "Incorrect API key provided: fake-****1234 (fake-****1234)"
        );
        // A truncated echo is still the key's.
        assert_eq!(m.mask_str("key fake-secret-ab..."), "key fake-****1234...");
        // The masked hint itself is not.
        assert_eq!(m.mask(b"fake-****1234"), None);
    }

    #[test]
    fn a_key_is_built_once_per_thread_and_its_header_is_sensitive() {
        let key = ApiKey::new("fake-secret-abcd1234");
        let a = KeyUse::of(&key);
        let b = KeyUse::of(&ApiKey::new("fake-secret-abcd1234"));
        assert!(Rc::ptr_eq(&a, &b));
        let auth = a.auth.as_ref().unwrap();
        assert_eq!(auth.as_bytes(), b"Bearer fake-secret-abcd1234");
        assert!(auth.is_sensitive());
        // Another key, another masker.
        let other = KeyUse::of(&ApiKey::new("fake-other-key-5678"));
        assert!(!Rc::ptr_eq(&a, &other));
        assert!(other.masker.found_in(b"fake-other-key-5678"));
        assert!(!other.masker.found_in(b"fake-secret-abcd1234"));
        // A key no header can carry has no header (the attempt says so).
        assert!(KeyUse::of(&ApiKey::new("fake-bad\nkey-0000"))
            .auth
            .is_none());
    }

    proptest! {
        #[test]
        fn nothing_of_the_key_survives(
            key in "[a-zA-Z0-9_-]{16,64}",
            pre in proptest::collection::vec(any::<u8>(), 0..64),
            post in proptest::collection::vec(any::<u8>(), 0..64),
            cut in 12usize..64,
        ) {
            let k = ApiKey::new(key.clone());
            let m = Masker::new(&k);
            let part = &key.as_bytes()[..cut.min(key.len())];
            let hay = [pre.as_slice(), part, post.as_slice(), key.as_bytes()].concat();
            let out = m.mask(&hay).expect("found");
            prop_assert!(memmem::find(&out, &key.as_bytes()[..12]).is_none());
        }
    }
}
