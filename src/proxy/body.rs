//! A pooled request's body, read without rebuilding it: one pass finds the
//! fields the gateway needs and where `model`'s value lies, and each attempt
//! sends the client's bytes with only that value replaced by the backend's
//! model name. Parsing a whole chat history into a map and serialising it
//! again, per request, cost more than everything else the gateway does with
//! the body; this keeps the cost to one validating scan, whatever the size.

use std::ops::Range;
use std::sync::Arc;

use serde::Deserialize;
use serde_json::value::RawValue;

use crate::web::error::ApiError;

/// What the gateway reads in a pooled request's body.
#[derive(Debug)]
pub(crate) struct Peeked {
    pub(crate) model: Arc<str>,
    /// The byte range of `model`'s value (its quotes included).
    pub(crate) model_at: Range<usize>,
    /// Where the object's `{` is.
    pub(crate) open: usize,
    pub(crate) stream: bool,
    pub(crate) stream_usage: StreamUsage,
    pub(crate) completion_budget: Option<u64>,
    pub(crate) store: Option<bool>,
    pub(crate) previous_response_id: Option<String>,
}

/// What the client said about usage in its stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StreamUsage {
    /// No `stream_options`: the gateway may add them.
    Absent,
    /// `stream_options.include_usage` is already `true`.
    Asked,
    /// `stream_options` is there without asking for usage.
    Other,
}

#[derive(Deserialize)]
struct Fields<'a> {
    #[serde(borrow, default)]
    model: Option<&'a RawValue>,
    #[serde(borrow, default)]
    stream: Option<&'a RawValue>,
    /// `Some` even for `null`: an explicit member must not get a twin.
    #[serde(borrow, default, deserialize_with = "present")]
    stream_options: Option<&'a RawValue>,
    #[serde(borrow, default)]
    max_completion_tokens: Option<&'a RawValue>,
    #[serde(borrow, default)]
    max_tokens: Option<&'a RawValue>,
    #[serde(borrow, default)]
    store: Option<&'a RawValue>,
    #[serde(borrow, default)]
    previous_response_id: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct UsageOption {
    #[serde(default)]
    include_usage: Option<serde_json::Value>,
}

fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<&'de RawValue>, D::Error> {
    <&RawValue>::deserialize(d).map(Some)
}

fn read<'a, T: Deserialize<'a>>(raw: Option<&'a RawValue>) -> Option<T> {
    raw.and_then(|r| serde_json::from_str(r.get()).ok())
}

/// The fields and the place of `model`; the whole body is checked as JSON.
pub(crate) fn peek(body: &[u8]) -> Result<Peeked, ApiError> {
    let text = std::str::from_utf8(body)
        .map_err(|e| ApiError::MalformedJson(format!("the body is not UTF-8: {e}")))?;
    let open = text
        .bytes()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(text.len());
    // A struct also reads from an array: only an object is a request (and
    // anything else is still told apart as JSON or not).
    if text.as_bytes().get(open) != Some(&b'{') {
        return match serde_json::from_str::<serde::de::IgnoredAny>(text) {
            Ok(_) => Err(ApiError::MissingModel),
            Err(e) => Err(ApiError::MalformedJson(e.to_string())),
        };
    }
    let fields: Fields<'_> =
        serde_json::from_str(text).map_err(|e| ApiError::MalformedJson(e.to_string()))?;
    let raw = fields.model.ok_or(ApiError::MissingModel)?;
    let model: String = serde_json::from_str(raw.get()).map_err(|_| ApiError::MissingModel)?;
    if model.trim().is_empty() {
        return Err(ApiError::MissingModel);
    }
    // The raw value borrows from `text`: its offset is where it lies.
    let start = (raw.get().as_ptr() as usize).wrapping_sub(text.as_ptr() as usize);
    let model_at = start..start.saturating_add(raw.get().len());
    if model_at.end > text.len() {
        return Err(ApiError::Internal("model value outside the body".into()));
    }
    let stream_usage = match fields.stream_options {
        None => StreamUsage::Absent,
        Some(raw) => match serde_json::from_str::<UsageOption>(raw.get()) {
            Ok(UsageOption {
                include_usage: Some(serde_json::Value::Bool(true)),
            }) => StreamUsage::Asked,
            _ => StreamUsage::Other,
        },
    };
    Ok(Peeked {
        model: Arc::from(model),
        model_at,
        open,
        stream: read::<bool>(fields.stream) == Some(true),
        stream_usage,
        completion_budget: read::<u64>(fields.max_completion_tokens)
            .or_else(|| read::<u64>(fields.max_tokens)),
        store: read(fields.store),
        previous_response_id: read::<String>(fields.previous_response_id).filter(|s| !s.is_empty()),
    })
}

/// What the gateway adds to a stream request that did not ask for usage.
pub(crate) const ASK_USAGE: &str = "\"stream_options\":{\"include_usage\":true},";

/// The client's body with `model` set to `native`, and `insert` (a member
/// with its comma, or nothing) placed first in the object.
pub(crate) fn splice(body: &[u8], p: &Spliced, native: &str) -> Result<Vec<u8>, ApiError> {
    let quoted = serde_json::to_string(native).map_err(|e| ApiError::Internal(e.to_string()))?;
    let (Some(head), Some(rest)) = (body.get(..p.model_at.start), body.get(p.model_at.end..))
    else {
        return Err(ApiError::Internal("model value outside the body".into()));
    };
    let mut out = Vec::with_capacity(body.len() + quoted.len() + p.insert.len());
    let open = p.open.saturating_add(1).min(head.len());
    out.extend_from_slice(&head[..open]);
    out.extend_from_slice(p.insert.as_bytes());
    out.extend_from_slice(&head[open..]);
    out.extend_from_slice(quoted.as_bytes());
    out.extend_from_slice(rest);
    Ok(out)
}

/// Where a spliced body's edits go.
#[derive(Debug, Clone)]
pub(crate) struct Spliced {
    pub(crate) model_at: Range<usize>,
    pub(crate) open: usize,
    pub(crate) insert: &'static str,
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::{json, Map, Value};

    fn spliced(p: &Peeked, insert: &'static str) -> Spliced {
        Spliced {
            model_at: p.model_at.clone(),
            open: p.open,
            insert,
        }
    }

    #[test]
    fn reads_the_fields_and_replaces_only_the_model() {
        let body = br#"  {"messages":[{"role":"user","content":"say \"model\""}], "model" : "m\u00e9", "stream":true, "max_tokens": 7}"#;
        let p = peek(body).expect("peeked");
        assert_eq!(&*p.model, "m\u{e9}");
        assert!(p.stream);
        assert_eq!(p.completion_budget, Some(7));
        assert_eq!(p.stream_usage, StreamUsage::Absent);
        let out = splice(body, &spliced(&p, ASK_USAGE), "native/\"x\"").expect("spliced");
        let v: Value = serde_json::from_slice(&out).expect("still JSON");
        assert_eq!(v["model"], "native/\"x\"");
        assert_eq!(v["stream_options"]["include_usage"], true);
        assert_eq!(v["messages"][0]["content"], "say \"model\"");
    }

    #[test]
    fn what_is_not_a_request_is_refused_as_before() {
        assert!(matches!(peek(b"[\"m\"]"), Err(ApiError::MissingModel)));
        assert!(matches!(peek(b"[1, 2]"), Err(ApiError::MissingModel)));
        assert!(matches!(peek(b"[1,"), Err(ApiError::MalformedJson(_))));
        assert!(matches!(peek(b""), Err(ApiError::MalformedJson(_))));
        assert!(matches!(
            peek(b"{\"model\": 3}"),
            Err(ApiError::MissingModel)
        ));
        assert!(matches!(
            peek(b"{\"model\": \"  \"}"),
            Err(ApiError::MissingModel)
        ));
        assert!(matches!(peek(b"{\"x\": 1}"), Err(ApiError::MissingModel)));
        assert!(matches!(
            peek(b"{\"model\": \"m\""),
            Err(ApiError::MalformedJson(_))
        ));
        // Two models are ambiguous (an upstream might read the other one).
        assert!(matches!(
            peek(b"{\"model\":\"a\",\"model\":\"b\"}"),
            Err(ApiError::MalformedJson(_))
        ));
        let asked = peek(br#"{"model":"m","stream_options":{"include_usage":true}}"#).expect("ok");
        assert_eq!(asked.stream_usage, StreamUsage::Asked);
        let other = peek(br#"{"model":"m","stream_options":{"include_usage":false}}"#).expect("ok");
        assert_eq!(other.stream_usage, StreamUsage::Other);
        // An explicit null is the client's member: rebuilt, never doubled.
        let null = peek(br#"{"model":"m","stream_options":null}"#).expect("ok");
        assert_eq!(null.stream_usage, StreamUsage::Other);
    }

    fn value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            any::<i64>().prop_map(Value::from),
            any::<bool>().prop_map(Value::from),
            "\\PC{0,12}".prop_map(Value::from),
            Just(Value::Null),
        ];
        leaf.prop_recursive(3, 24, 4, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
                proptest::collection::btree_map("\\PC{0,6}", inner, 0..4)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        /// Any request object, however formatted: the spliced body is the
        /// same object with only `model` (and the asked-for member) changed.
        #[test]
        fn splicing_equals_rewriting_the_parsed_object(
            fields in proptest::collection::btree_map("[a-z_]{1,8}", value(), 0..5),
            model in "\\PC{1,10}",
            native in "\\PC{1,10}",
            pretty in any::<bool>(),
        ) {
            prop_assume!(!model.trim().is_empty());
            let mut obj: Map<String, Value> = fields.into_iter()
                .filter(|(k, _)| !matches!(k.as_str(), "model" | "stream_options" | "stream"
                    | "max_tokens" | "max_completion_tokens" | "store" | "previous_response_id"))
                .collect();
            obj.insert("model".into(), json!(model));
            let body = if pretty {
                serde_json::to_vec_pretty(&Value::Object(obj.clone()))
            } else {
                serde_json::to_vec(&Value::Object(obj.clone()))
            }.unwrap_or_default();
            let p = peek(&body).expect("a request");
            prop_assert_eq!(&*p.model, model.as_str());
            for insert in ["", ASK_USAGE] {
                let out = splice(&body, &spliced(&p, insert), &native).expect("spliced");
                let got: Value = serde_json::from_slice(&out).expect("JSON");
                let mut want = obj.clone();
                want.insert("model".into(), json!(native));
                if !insert.is_empty() {
                    want.insert("stream_options".into(), json!({"include_usage": true}));
                }
                prop_assert_eq!(got, Value::Object(want));
            }
        }

        /// No input panics the scan.
        #[test]
        fn any_bytes_are_peeked_without_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = peek(&bytes);
        }
    }
}
