//! Token usage as OpenAI-compatible upstreams report it.

use serde::Deserialize;

#[derive(Debug, Clone, Copy, Default, PartialEq, Deserialize)]
pub struct Usage {
    /// `input_tokens` in the Responses API.
    #[serde(default, alias = "input_tokens")]
    pub prompt_tokens: Option<u64>,
    /// `output_tokens` in the Responses API.
    #[serde(default, alias = "output_tokens")]
    pub completion_tokens: Option<u64>,
}

impl Usage {
    pub fn cost(&self, price_in: f64, price_out: f64) -> f64 {
        (self.prompt_tokens.unwrap_or(0) as f64 * price_in
            + self.completion_tokens.unwrap_or(0) as f64 * price_out)
            / 1_000_000.0
    }
}

/// What the gateway reads in a whole JSON answer.
#[derive(Deserialize, Default)]
pub struct Read {
    #[serde(default)]
    pub usage: Option<Usage>,
    /// The object's id (kept for affinity when the upstream stores it);
    /// any JSON, so an odd id never makes a good answer unreadable.
    #[serde(default)]
    id: Option<serde_json::Value>,
}

impl Read {
    pub fn id(&self) -> Option<&str> {
        self.id.as_ref().and_then(serde_json::Value::as_str)
    }
}

/// Usage and id from a whole (non-streaming) JSON body; `Err` when the body
/// is not JSON at all (parsed once: the parse is the check).
pub fn from_json_body(body: &[u8]) -> Result<Read, serde_json::Error> {
    serde_json::from_slice::<Read>(body)
}

pub(crate) fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}
