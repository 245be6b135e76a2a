//! What an upstream's headers say about time and limits: `Retry-After`,
//! `retry-after-ms`, and the `x-ratelimit-*` family. Every value comes from
//! outside, so every conversion is checked and bounded.

use std::time::Duration;

use actix_web::http::header::{self, HeaderMap};
use sidecar_actors::ProviderLimits;

/// Longest duration any upstream header can make us wait (a week).
const MAX_WAIT_SECS: f64 = 7.0 * 86_400.0;

/// Seconds as a `Duration`, if finite, not negative, and capped.
pub fn secs(value: f64) -> Option<Duration> {
    if !value.is_finite() || value < 0.0 {
        return None;
    }
    let ms = (value.min(MAX_WAIT_SECS) * 1000.0).round();
    // Finite and within 0..=MAX_WAIT_SECS*1000: the cast is exact enough.
    Some(Duration::from_millis(ms as u64))
}

/// Reads `retry-after-ms` (OpenAI) or `Retry-After` (seconds or HTTP date).
pub fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    if let Some(d) = headers
        .get("retry-after-ms")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<f64>().ok())
        .and_then(|ms| secs(ms / 1000.0))
    {
        return Some(d);
    }
    let v = headers.get(header::RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(n) = v.parse::<f64>() {
        return secs(n);
    }
    let when: std::time::SystemTime = v.parse::<header::HttpDate>().ok()?.into();
    let wait = when
        .duration_since(std::time::SystemTime::now())
        .unwrap_or_default();
    secs(wait.as_secs_f64())
}

/// A reset time as providers write it: `"1s"`, `"6m0s"`, `"20ms"`,
/// `"1h2m3.5s"`, or a bare number of seconds.
pub fn parse_reset(text: &str) -> Option<Duration> {
    let t = text.trim();
    if t.is_empty() {
        return None;
    }
    if let Ok(n) = t.parse::<f64>() {
        return secs(n);
    }
    let mut total = 0.0f64;
    let mut rest = t;
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        if num_len == 0 {
            return None;
        }
        let value: f64 = rest[..num_len].parse().ok()?;
        rest = &rest[num_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let factor = match &rest[..unit_len] {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 0.001,
            "us" | "µs" => 0.000_001,
            "ns" => 0.000_000_001,
            _ => return None,
        };
        rest = &rest[unit_len..];
        total += value * factor;
        if !total.is_finite() {
            return None;
        }
    }
    secs(total)
}

fn count(value: &header::HeaderValue) -> Option<u64> {
    value.to_str().ok()?.trim().parse().ok()
}

fn reset(value: &header::HeaderValue) -> Option<Duration> {
    parse_reset(value.to_str().ok()?)
}

/// The provider's own words about its limits, when it sent any. One pass
/// over the headers (most answers carry none of these: a lookup by name
/// for each would hash six names for nothing); a name sent twice counts
/// as its first value that reads as one.
pub fn provider_limits(headers: &HeaderMap) -> Option<ProviderLimits> {
    let mut l = ProviderLimits::default();
    for (name, value) in headers {
        let Some(what) = name.as_str().strip_prefix("x-ratelimit-") else {
            continue;
        };
        match what {
            "limit-requests" => l.limit_requests = l.limit_requests.or_else(|| count(value)),
            "remaining-requests" => {
                l.remaining_requests = l.remaining_requests.or_else(|| count(value))
            }
            "reset-requests" => l.reset_requests = l.reset_requests.or_else(|| reset(value)),
            "limit-tokens" => l.limit_tokens = l.limit_tokens.or_else(|| count(value)),
            "remaining-tokens" => l.remaining_tokens = l.remaining_tokens.or_else(|| count(value)),
            "reset-tokens" => l.reset_tokens = l.reset_tokens.or_else(|| reset(value)),
            _ => {}
        }
    }
    (!l.is_empty()).then_some(l)
}

#[cfg(test)]
mod tests {
    use super::*;
    use actix_web::http::header::{HeaderName, HeaderValue};
    use proptest::prelude::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(
                HeaderName::from_static(k),
                HeaderValue::from_str(v).expect("header value"),
            );
        }
        h
    }

    #[test]
    fn retry_after_forms() {
        assert_eq!(
            retry_after(&headers(&[("retry-after", "7")])),
            Some(Duration::from_secs(7))
        );
        assert_eq!(
            retry_after(&headers(&[
                ("retry-after", "7"),
                ("retry-after-ms", "1500")
            ])),
            Some(Duration::from_millis(1500))
        );
        assert_eq!(retry_after(&headers(&[("retry-after", "soon")])), None);
        // Hostile values: no panic, capped.
        assert_eq!(
            retry_after(&headers(&[("retry-after-ms", "1e300")])),
            Some(Duration::from_secs(7 * 86_400))
        );
        assert_eq!(retry_after(&headers(&[("retry-after-ms", "NaN")])), None);
        assert_eq!(retry_after(&headers(&[("retry-after", "-5")])), None);
    }

    #[test]
    fn reset_forms() {
        assert_eq!(parse_reset("1s"), Some(Duration::from_secs(1)));
        assert_eq!(parse_reset("6m0s"), Some(Duration::from_secs(360)));
        assert_eq!(parse_reset("20ms"), Some(Duration::from_millis(20)));
        assert_eq!(
            parse_reset("1h2m3.5s"),
            Some(Duration::from_millis(3_723_500))
        );
        assert_eq!(
            parse_reset("2m59.56s"),
            Some(Duration::from_millis(179_560))
        );
        assert_eq!(parse_reset("0.5"), Some(Duration::from_millis(500)));
        assert_eq!(parse_reset("soon"), None);
        assert_eq!(parse_reset("5x"), None);
        assert_eq!(parse_reset(""), None);
    }

    #[test]
    fn provider_limits_from_headers() {
        let h = headers(&[
            ("x-ratelimit-limit-requests", "20"),
            ("x-ratelimit-remaining-requests", "3"),
            ("x-ratelimit-reset-requests", "1.5s"),
            ("x-ratelimit-remaining-tokens", "not a number"),
        ]);
        let l = provider_limits(&h).expect("limits");
        assert_eq!(l.limit_requests, Some(20));
        assert_eq!(l.remaining_requests, Some(3));
        assert_eq!(l.reset_requests, Some(Duration::from_millis(1500)));
        assert_eq!(l.remaining_tokens, None);
        assert_eq!(provider_limits(&HeaderMap::new()), None);
    }

    proptest! {
        #[test]
        fn reset_parser_never_panics_and_is_bounded(s in "\\PC{0,40}") {
            if let Some(d) = parse_reset(&s) {
                prop_assert!(d <= Duration::from_secs(7 * 86_400));
            }
        }

        #[test]
        fn reset_parser_reads_what_it_writes(h in 0u64..48, m in 0u64..60, ms in 0u64..60_000) {
            let text = format!("{h}h{m}m{}.{:03}s", ms / 1000, ms % 1000);
            let want = Duration::from_millis(h * 3_600_000 + m * 60_000 + ms);
            prop_assert_eq!(parse_reset(&text), Some(want));
        }

        #[test]
        fn retry_after_never_panics(v in "\\PC{0,40}", ms in "\\PC{0,40}") {
            let mut h = HeaderMap::new();
            if let Ok(v) = HeaderValue::from_str(&v) {
                h.insert(header::RETRY_AFTER, v);
            }
            if let Ok(v) = HeaderValue::from_str(&ms) {
                h.insert(HeaderName::from_static("retry-after-ms"), v);
            }
            if let Some(d) = retry_after(&h) {
                prop_assert!(d <= Duration::from_secs(7 * 86_400));
            }
        }
    }
}
