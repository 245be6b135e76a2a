//! Server-Sent Events pass-through that reads usage on the way.
//!
//! Bytes are forwarded event by event as they arrive; only an incomplete
//! event's tail waits for the rest of it. When the gateway asked upstream for
//! `stream_options.include_usage` on the client's behalf, the usage-only chunk
//! (empty `choices`) is removed so the client sees what it asked for.

use bytes::{Bytes, BytesMut};
use serde::Deserialize;

use super::usage::{contains, Usage};

#[derive(Debug, Default)]
pub struct SseFilter {
    strip_usage_chunk: bool,
    partial: BytesMut,
    pub usage: Option<Usage>,
    pub saw_done: bool,
}

#[derive(Deserialize)]
struct Chunk {
    #[serde(default)]
    choices: Option<Vec<serde_json::Value>>,
    #[serde(default)]
    usage: Option<Usage>,
}

fn ends_an_event(chunk: &[u8]) -> bool {
    chunk.ends_with(b"\n\n") || chunk.ends_with(b"\r\n\r\n")
}

/// Finds the end of the first complete event: the index just past its blank line.
fn event_end(buf: &[u8]) -> Option<usize> {
    let mut i = 0;
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
        Self {
            strip_usage_chunk,
            ..Default::default()
        }
    }

    /// Takes one upstream chunk; returns the bytes to send to the client now.
    pub fn push(&mut self, chunk: Bytes) -> Bytes {
        // The common case: whole events with nothing to read or remove pass
        // through as they are, without a copy.
        if self.partial.is_empty() && ends_an_event(&chunk) && !contains(&chunk, b"\"usage\"") {
            if contains(&chunk, b"[DONE]") {
                self.saw_done = true;
            }
            return chunk;
        }
        self.partial.extend_from_slice(&chunk);
        let mut out = BytesMut::new();
        while let Some(end) = event_end(&self.partial) {
            let event = self.partial.split_to(end);
            if self.keep(&event) {
                out.extend_from_slice(&event);
            }
        }
        out.freeze()
    }

    /// Whatever is left when the upstream closes (an event without its blank line).
    pub fn finish(&mut self) -> Bytes {
        let rest = self.partial.split().freeze();
        if !rest.is_empty() && self.keep(&rest) {
            rest
        } else {
            Bytes::new()
        }
    }

    fn keep(&mut self, event: &[u8]) -> bool {
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

    const CONTENT: &str = "data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}\n\n";
    const USAGE: &str =
        "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":5}}\n\n";
    const DONE: &str = "data: [DONE]\n\n";

    #[test]
    fn strips_usage_only_chunk_and_records_usage() {
        let mut f = SseFilter::new(true);
        let all = format!("{CONTENT}{USAGE}{DONE}");
        let out = f.push(Bytes::from(all));
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
        let out = f.push(chunk.clone());
        assert_eq!(out, chunk);
        assert_eq!(out.as_ptr(), chunk.as_ptr(), "same buffer, not a copy");
        let done = Bytes::from_static(DONE.as_bytes());
        assert_eq!(f.push(done.clone()).as_ptr(), done.as_ptr());
        assert!(f.saw_done);
    }

    #[test]
    fn keeps_usage_chunk_when_client_asked() {
        let mut f = SseFilter::new(false);
        let out = f.push(Bytes::from_static(USAGE.as_bytes()));
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
            out.extend_from_slice(&f.push(Bytes::copy_from_slice(piece)));
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
            &f.push(Bytes::from_static(ev.as_bytes()))[..],
            ev.as_bytes()
        );
        assert_eq!(f.usage, None);
    }
}
