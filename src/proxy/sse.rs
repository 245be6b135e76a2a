//! Server-Sent Events pass-through that reads usage on the way.
//!
//! Bytes are forwarded event by event as they arrive; only an incomplete
//! event's tail waits for the rest of it. When the gateway asked upstream for
//! `stream_options.include_usage` on the client's behalf, the usage-only chunk
//! (empty `choices`) is removed so the client sees what it asked for.

use bytes::{Bytes, BytesMut};
use serde::Deserialize;

use super::usage::{contains, Usage};

/// The default bound on one event still waiting for its blank line.
pub const MAX_PENDING_EVENT: usize = 4 * 1024 * 1024;

#[derive(Debug, Default)]
pub struct SseFilter {
    strip_usage_chunk: bool,
    partial: BytesMut,
    /// How far `partial` has been searched for an event's end: new bytes
    /// only are scanned, never the whole buffer again.
    scanned: usize,
    max_pending: usize,
    pub usage: Option<Usage>,
    pub saw_done: bool,
    /// The stream said it was done in its own words: a choice with a
    /// `finish_reason`, or a Responses-API terminal event. A clean close
    /// after that is a complete stream, `[DONE]` or not.
    pub saw_end: bool,
    /// Read the stream's object id (a stored response or completion).
    want_id: bool,
    /// `id` of the first event that has one (`response.id` in the Responses API).
    pub id: Option<String>,
}

/// What ends a stream besides `[DONE]`: a finish reason (chat and text
/// completions), or the Responses API's terminal events.
fn says_it_ended(bytes: &[u8]) -> bool {
    const ENDS: [&[u8]; 5] = [
        b"\"finish_reason\":\"",
        b"\"finish_reason\": \"",
        b"response.completed",
        b"response.failed",
        b"response.incomplete",
    ];
    ENDS.iter().any(|e| contains(bytes, e))
}

/// An event grew past the bound without ending: the stream is broken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("an upstream event grew past {0} bytes without ending")]
pub struct EventTooLarge(pub usize);

#[derive(Deserialize)]
struct Chunk {
    #[serde(default)]
    choices: Option<Vec<serde_json::Value>>,
    #[serde(default)]
    usage: Option<Usage>,
    /// The Responses API carries usage in its terminal event's `response`.
    #[serde(default)]
    response: Option<Nested>,
}

#[derive(Deserialize)]
struct Nested {
    #[serde(default)]
    usage: Option<Usage>,
}

fn ends_an_event(chunk: &[u8]) -> bool {
    chunk.ends_with(b"\n\n") || chunk.ends_with(b"\r\n\r\n")
}

/// Finds the end of the first complete event at or after `from`: the index
/// just past its blank line.
fn event_end(buf: &[u8], from: usize) -> Option<usize> {
    let mut i = from;
    while i + 1 < buf.len() {
        if buf[i] == b'\n' {
            if buf[i + 1] == b'\n' {
                return Some(i + 2);
            }
            if buf[i + 1] == b'\r' && i + 2 < buf.len() && buf[i + 2] == b'\n' {
                return Some(i + 3);
            }
        }
        i += 1;
    }
    None
}

impl SseFilter {
    pub fn new(strip_usage_chunk: bool) -> Self {
        Self::bounded(strip_usage_chunk, MAX_PENDING_EVENT)
    }

    /// An incomplete event may hold at most `max_pending` bytes.
    pub fn bounded(strip_usage_chunk: bool, max_pending: usize) -> Self {
        Self {
            strip_usage_chunk,
            max_pending: max_pending.max(1024),
            ..Default::default()
        }
    }

    /// Takes one upstream chunk; returns the bytes to send to the client now.
    pub fn push(&mut self, chunk: Bytes) -> Result<Bytes, EventTooLarge> {
        // The common case: whole events with nothing to read or remove pass
        // through as they are, without a copy.
        if self.partial.is_empty()
            && ends_an_event(&chunk)
            && !contains(&chunk, b"\"usage\"")
            && !self.wants_id()
        {
            if contains(&chunk, b"[DONE]") {
                self.saw_done = true;
            }
            if !self.saw_end && says_it_ended(&chunk) {
                self.saw_end = true;
            }
            return Ok(chunk);
        }
        self.partial.extend_from_slice(&chunk);
        let mut out = BytesMut::new();
        // A blank line may straddle the old and new bytes: back up two.
        let mut from = self.scanned.saturating_sub(2);
        while let Some(end) = event_end(&self.partial, from) {
            let event = self.partial.split_to(end);
            if self.keep(&event) {
                out.extend_from_slice(&event);
            }
            from = 0;
        }
        self.scanned = self.partial.len();
        if self.partial.len() > self.max_pending {
            self.partial.clear();
            self.scanned = 0;
            return Err(EventTooLarge(self.max_pending));
        }
        Ok(out.freeze())
    }

    /// Whatever is left when the upstream closes (an event without its blank line).
    pub fn finish(&mut self) -> Bytes {
        self.scanned = 0;
        let rest = self.partial.split().freeze();
        if !rest.is_empty() && self.keep(&rest) {
            rest
        } else {
            Bytes::new()
        }
    }

    /// True when what came is a whole stream: `[DONE]`, or its own end
    /// (finish reason, terminal event) with nothing left half-sent.
    pub fn complete(&self, rest: &[u8]) -> bool {
        self.saw_done || (self.saw_end && rest.is_empty())
    }

    /// Reads the stream's object id from the first event that has one.
    pub fn want_id(&mut self) {
        self.want_id = true;
    }

    fn wants_id(&self) -> bool {
        self.want_id && self.id.is_none()
    }

    fn read_id(&mut self, event: &[u8]) {
        let Some(data) = data_of(event) else { return };
        let Ok(v) = serde_json::from_slice::<serde_json::Value>(&data) else {
            return;
        };
        let id = v
            .get("response")
            .and_then(|r| r.get("id"))
            .or_else(|| v.get("id"))
            .and_then(serde_json::Value::as_str);
        if let Some(id) = id {
            self.id = Some(id.to_string());
        }
    }

    fn keep(&mut self, event: &[u8]) -> bool {
        if self.wants_id() {
            self.read_id(event);
        }
        if !self.saw_end && says_it_ended(event) {
            self.saw_end = true;
        }
        if contains(event, b"[DONE]") {
            self.saw_done = true;
            return true;
        }
        if !contains(event, b"\"usage\"") {
            return true;
        }
        let Some(data) = data_of(event) else {
            return true;
        };
        let Ok(chunk) = serde_json::from_slice::<Chunk>(&data) else {
            return true;
        };
        if let Some(u) = chunk.response.and_then(|r| r.usage) {
            self.usage = Some(u);
            return true;
        }
        if let Some(u) = chunk.usage {
            self.usage = Some(u);
            let usage_only = chunk.choices.as_ref().is_none_or(|c| c.is_empty());
            if self.strip_usage_chunk && usage_only {
                return false;
            }
        }
        true
    }
}

/// The event's `data:` lines joined, per the SSE rules.
fn data_of(event: &[u8]) -> Option<Vec<u8>> {
    let mut data: Vec<u8> = Vec::new();
    let mut any = false;
    for line in event.split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if let Some(rest) = line.strip_prefix(b"data:") {
            let rest = rest.strip_prefix(b" ").unwrap_or(rest);
            if any {
                data.push(b'\n');
            }
            data.extend_from_slice(rest);
            any = true;
        }
    }
    any.then_some(data)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Events and what the filter keeps of them, fed in the given pieces.
    fn run(f: &mut SseFilter, bytes: &[u8], cuts: &[usize]) -> Result<Vec<u8>, EventTooLarge> {
        let mut out = Vec::new();
        let mut last = 0;
        let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (bytes.len() + 1)).collect();
        cuts.sort_unstable();
        for c in cuts.into_iter().chain([bytes.len()]) {
            if c > last {
                out.extend_from_slice(&f.push(Bytes::copy_from_slice(&bytes[last..c]))?);
                last = c;
            }
        }
        out.extend_from_slice(&f.finish());
        Ok(out)
    }

    proptest! {
        /// However a byte stream is split, the client gets the same bytes and
        /// the same usage.
        #[test]
        fn any_split_gives_the_same_events(
            events in proptest::collection::vec(prop_oneof![
                Just(CONTENT.to_string()),
                Just(USAGE.to_string()),
                Just("data: x\r\n\r\n".to_string()),
                Just(": comment\n\n".to_string()),
                "[ -~]{0,40}\n\n",
                "[ -~\n]{0,40}",
            ], 0..12),
            cuts in proptest::collection::vec(any::<usize>(), 0..16),
            strip in any::<bool>(),
        ) {
            let all = events.concat();
            let mut whole = SseFilter::new(strip);
            let one = run(&mut whole, all.as_bytes(), &[]).unwrap();
            let mut split = SseFilter::new(strip);
            let many = run(&mut split, all.as_bytes(), &cuts).unwrap();
            prop_assert_eq!(one, many);
            prop_assert_eq!(whole.usage, split.usage);
            prop_assert_eq!(whole.saw_done, split.saw_done);
        }

        /// An event that never ends is cut at the bound; memory stays bounded.
        #[test]
        fn an_endless_event_is_bounded(piece in 1usize..4096, n in 1usize..2000) {
            let mut f = SseFilter::bounded(false, 64 * 1024);
            let mut broke = false;
            let chunk = Bytes::from(vec![b'a'; piece]);
            f.push(Bytes::from_static(b"data: ")).unwrap();
            for _ in 0..n {
                match f.push(chunk.clone()) {
                    Ok(out) => prop_assert!(out.is_empty()),
                    Err(_) => { broke = true; break; }
                }
                prop_assert!(f.partial.len() <= 64 * 1024);
            }
            prop_assert_eq!(broke, piece * n + 6 > 64 * 1024);
        }
    }

    const CONTENT: &str = "data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}\n\n";
    const USAGE: &str =
        "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":5}}\n\n";
    const DONE: &str = "data: [DONE]\n\n";

    #[test]
    fn strips_usage_only_chunk_and_records_usage() {
        let mut f = SseFilter::new(true);
        let all = format!("{CONTENT}{USAGE}{DONE}");
        let out = f.push(Bytes::from(all)).unwrap();
        assert_eq!(
            std::str::from_utf8(&out).unwrap(),
            format!("{CONTENT}{DONE}")
        );
        assert_eq!(
            f.usage,
            Some(Usage {
                prompt_tokens: Some(3),
                completion_tokens: Some(5)
            })
        );
        assert!(f.saw_done);
    }

    #[test]
    fn whole_events_without_usage_pass_through_without_a_copy() {
        let mut f = SseFilter::new(true);
        let chunk = Bytes::from(format!("{CONTENT}{CONTENT}"));
        let out = f.push(chunk.clone()).unwrap();
        assert_eq!(out, chunk);
        assert_eq!(out.as_ptr(), chunk.as_ptr(), "same buffer, not a copy");
        let done = Bytes::from_static(DONE.as_bytes());
        assert_eq!(f.push(done.clone()).unwrap().as_ptr(), done.as_ptr());
        assert!(f.saw_done);
    }

    #[test]
    fn keeps_usage_chunk_when_client_asked() {
        let mut f = SseFilter::new(false);
        let out = f.push(Bytes::from_static(USAGE.as_bytes())).unwrap();
        assert_eq!(&out[..], USAGE.as_bytes());
        assert!(f.usage.is_some());
    }

    #[test]
    fn events_split_across_chunks_are_reassembled() {
        let mut f = SseFilter::new(true);
        let all = format!("{CONTENT}{USAGE}{DONE}");
        let bytes = all.as_bytes();
        let mut out = Vec::new();
        for piece in bytes.chunks(7) {
            out.extend_from_slice(&f.push(Bytes::copy_from_slice(piece)).unwrap());
        }
        out.extend_from_slice(&f.finish());
        assert_eq!(String::from_utf8(out).unwrap(), format!("{CONTENT}{DONE}"));
        assert_eq!(f.usage.and_then(|u| u.completion_tokens), Some(5));
    }

    #[test]
    fn crlf_events_and_garbage_pass_through() {
        let mut f = SseFilter::new(true);
        let ev = "data: not json \"usage\"\r\n\r\n";
        assert_eq!(
            &f.push(Bytes::from_static(ev.as_bytes())).unwrap()[..],
            ev.as_bytes()
        );
        assert_eq!(f.usage, None);
    }
}

#[cfg(test)]
mod responses_tests {
    use super::*;

    #[test]
    fn responses_usage_and_end_are_read() {
        let mut f = SseFilter::new(false);
        let ev = "event: response.completed\ndata: {\"type\":\"response.completed\",\"response\":{\"id\":\"r\",\"usage\":{\"input_tokens\":5,\"output_tokens\":3,\"total_tokens\":8}}}\n\n";
        let out = f.push(Bytes::from(ev)).unwrap();
        assert_eq!(out.len(), ev.len());
        assert!(f.saw_end);
        assert_eq!(
            f.usage,
            Some(Usage {
                prompt_tokens: Some(5),
                completion_tokens: Some(3)
            })
        );
    }
}
