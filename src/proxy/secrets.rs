//! Keeping backend keys in: wherever upstream text can carry a key (an
//! error body that echoes it, a header, an event in a stream), the key — or
//! any long prefix of it — is masked before it goes on, to a client, a log,
//! the dashboard or the database.

use std::sync::Arc;

use bytes::Bytes;
use memchr::memmem;
use sidecar_actors::ApiKey;

/// How much of a key, from its start, counts as the key: enough to use or
/// guess it, more than a masked hint (`key-****abcd`) shows.
const PREFIX: usize = 12;

/// One masker per key, built once: building one (the masked hint, the
/// search table) cost seven allocations on every answer.
#[derive(Default)]
pub struct Maskers(std::sync::RwLock<std::collections::HashMap<ApiKey, Arc<Masker>>>);

/// Keys replaced since the start (rotations) are dropped past this many.
const MAX_MASKERS: usize = 4096;

impl Maskers {
    pub fn get(&self, key: &ApiKey) -> Arc<Masker> {
        if let Some(m) = self.0.read().ok().and_then(|m| m.get(key).cloned()) {
            return m;
        }
        let m = Arc::new(Masker::new(key));
        if let Ok(mut all) = self.0.write() {
            if all.len() >= MAX_MASKERS {
                all.clear();
            }
            all.insert(key.clone(), m.clone());
        }
        m
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
