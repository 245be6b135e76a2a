//! Keeping backend keys in: wherever upstream text can carry a key (an
//! error body that echoes it, a header), it is masked before it goes on.

use std::borrow::Cow;

use bytes::Bytes;
use sidecar_actors::ApiKey;

/// `text` with every occurrence of `key` replaced by its masked form.
pub fn mask<'a>(text: &'a str, key: &ApiKey) -> Cow<'a, str> {
    let secret = key.expose();
    if secret.is_empty() || !text.contains(secret) {
        return Cow::Borrowed(text);
    }
    Cow::Owned(text.replace(secret, &key.masked()))
}

/// The same for bytes that may not be text.
pub fn mask_bytes(body: &[u8], key: &ApiKey) -> Bytes {
    let secret = key.expose().as_bytes();
    if secret.is_empty() || !body.windows(secret.len()).any(|w| w == secret) {
        return Bytes::copy_from_slice(body);
    }
    let masked = key.masked();
    let mut out = Vec::with_capacity(body.len());
    let mut i = 0;
    while i < body.len() {
        if body[i..].starts_with(secret) {
            out.extend_from_slice(masked.as_bytes());
            i += secret.len();
        } else {
            out.push(body[i]);
            i += 1;
        }
    }
    Bytes::from(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_every_occurrence() {
        let key = ApiKey::new("nvapi-secret-abcd1234");
        let body = b"Incorrect API key provided: nvapi-secret-abcd1234 (nvapi-secret-abcd1234)";
        let out = mask_bytes(body, &key);
        assert!(!out.windows(10).any(|w| w == b"secret-abc"));
        assert_eq!(
            mask("x nvapi-secret-abcd1234 y", &key),
            "x nvapi-****1234 y"
        );
    }
}
