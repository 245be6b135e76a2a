//! The proxy's side of affinity: which requests create stored objects,
//! which name one, and who may reach it. The book itself (memory, SQLite,
//! Redis) is `sidecar_actors::affinity`.

use sidecar_actors::affinity::{Book, Owner};
use sidecar_actors::db::now_ms;
use sidecar_actors::Lease;

use super::Endpoint;
use crate::web::error::ApiError;

/// Whether a request's answer is an object the upstream keeps: a response
/// (stored unless `store: false`) or a chat completion with `store: true`.
pub(crate) fn stores(endpoint: Endpoint, store: Option<bool>) -> bool {
    match endpoint {
        Endpoint::Responses => store != Some(false),
        Endpoint::ChatCompletions => store == Some(true),
        _ => false,
    }
}

/// Ids as providers make them (`resp_…`, `chatcmpl-…`): anything else is
/// neither remembered nor put in an upstream path.
pub(crate) fn valid_object_id(id: &str) -> bool {
    (1..=256).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b':'))
        && id != "."
        && id != ".."
}

/// Who holds `id`, as this client may see it: an object another client
/// created is as unknown to this one as an id never seen.
pub(crate) async fn owner_for(
    book: &Book,
    id: &str,
    client: Option<&str>,
) -> Result<Owner, ApiError> {
    if !valid_object_id(id) {
        return Err(ApiError::ObjectNotFound(shown(id)));
    }
    match book.lookup(id).await {
        Ok(Some(owner)) if owner.client.as_deref() == client => Ok(owner),
        Ok(_) => Err(ApiError::ObjectNotFound(id.to_string())),
        Err(_) => Err(ApiError::AffinityUnavailable),
    }
}

/// An id as an error message may repeat it: bounded, printable.
fn shown(id: &str) -> String {
    let mut s: String = id.chars().take(64).filter(|c| !c.is_control()).collect();
    if id.chars().count() > 64 {
        s.push('…');
    }
    s
}

/// The owner of what this lease's answer creates.
pub(crate) fn owner(lease: &Lease, client: Option<&std::sync::Arc<str>>) -> Owner {
    Owner {
        account: lease.account.clone(),
        client: client.cloned(),
        created_ms: now_ms(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_provider_shaped_ids_are_kept() {
        assert!(valid_object_id(
            "resp_67ccd2bed1ec8190b14f964abc0542670bb6a6b452d3795b"
        ));
        assert!(valid_object_id("chatcmpl-abc123"));
        for bad in [
            "",
            ".",
            "..",
            "a/b",
            "a?b",
            "a b",
            "a%2Fb",
            &"x".repeat(257),
        ] {
            assert!(!valid_object_id(bad), "{bad}");
        }
    }

    #[test]
    fn responses_are_stored_unless_told_and_chat_only_when_told() {
        assert!(stores(Endpoint::Responses, None));
        assert!(!stores(Endpoint::Responses, Some(false)));
        assert!(!stores(Endpoint::ChatCompletions, None));
        assert!(stores(Endpoint::ChatCompletions, Some(true)));
        assert!(!stores(Endpoint::Embeddings, Some(true)));
    }
}
