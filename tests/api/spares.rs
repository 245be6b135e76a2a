//! Spare leases: a busy worker holds leases for its next requests, so most
//! requests need no round trip to the supervisor. They must change nothing a
//! client or a provider can see: every request is counted once, an unsent
//! spare comes back, and a spare is never sent once its key's state moved.

use std::time::Duration;

use futures_util::future::join_all;
use sidecar::sim::Fault;
use tokio::time::Instant;

use crate::helpers::{backend, chat_body, mock_keys, spawn_app, TestApp};

/// `clients` callers sending back to back until `stop`; their statuses.
async fn load(app: &TestApp, clients: usize, stop: Instant) -> Vec<u16> {
    let body = chat_body("m");
    let each = join_all((0..clients).map(|_| {
        let body = &body;
        async move {
            let mut statuses = Vec::new();
            while Instant::now() < stop {
                statuses.push(app.chat(body).await.status);
            }
            statuses
        }
    }))
    .await;
    each.into_iter().flatten().collect()
}

fn counter(metrics: &str, name: &str) -> u64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or(0)
}

/// Concurrent callers on a roomy key: requests go out on spare leases, the
/// upstream sees each request once, and once the callers stop every spare
/// is back — nothing in flight, the window holds exactly what was sent.
/// Backend "one" once its held spares' deadlines have passed (`after`):
/// none still out, and each of the `sent` requests counted once.
async fn assert_spares_came_back(app: &TestApp, sent: u64, after: Duration) {
    tokio::time::sleep(after).await;
    let v = app.view("one").await;
    assert_eq!(v.in_flight, 0, "every spare came back");
    assert_eq!(u64::from(v.used_in_window), sent, "counted once each");
}

#[actix_web::test]
async fn busy_workers_send_on_spare_leases_and_give_back_the_rest() {
    let app = spawn_app(
        mock_keys(&["k-1"]),
        &backend("one", "k-1", "primary", 100_000, ""),
    )
    .await;
    let statuses = load(&app, 16, Instant::now() + Duration::from_millis(1500)).await;
    let sent = statuses.len() as u64;
    assert!(statuses.iter().all(|&s| s == 200), "{statuses:?}");
    let spare = counter(&app.scrape().await, "sidecar_spare_leases_total");
    eprintln!("spares: {spare} of {sent} requests went on spare leases");
    assert!(spare > 0, "no request went on a spare lease");
    assert!(spare < sent);
    assert_eq!(app.mock.state.key_stats("k-1").requests, sent);
    // Held spares expire after 50 ms and come back unused.
    assert_spares_came_back(&app, sent, Duration::from_millis(500)).await;
    app.stop().await;
}

/// A key that starts answering 429 while busy workers send on spare leases
/// (here held for up to a second): clients see no 429, and the key gets no
/// request once its cooldown began. That a held spare is void once its key
/// changed is shown through the actors (`actors/tests/spare_leases.rs`): here the workers'
/// hands turn over too fast to be caught holding one at the moment.
#[actix_web::test]
async fn a_spare_lease_is_never_sent_after_its_key_cooled() {
    let toml = format!(
        "window_secs = 10\nspare_lease_ms = 1000\n{}{}",
        backend("a", "k-a", "primary", 100_000, ""),
        backend("b", "k-b", "primary", 100_000, "")
    );
    let app = spawn_app(mock_keys(&["k-a", "k-b"]), &toml).await;
    let start = Instant::now();
    let cool_at = start + Duration::from_millis(500);
    let stop = start + Duration::from_millis(1800);
    let turn = async {
        tokio::time::sleep_until(cool_at).await;
        app.mock.state.set_fault("k-a", Fault::RateLimit(Some(60)));
    };
    let (statuses, ()) = futures_util::join!(load(&app, 16, stop), turn);
    assert!(statuses.iter().all(|&s| s == 200), "429s stay hidden");
    let spare = counter(&app.scrape().await, "sidecar_spare_leases_total");
    let arrivals = app.mock.state.arrivals("k-a");
    let before = arrivals.iter().filter(|&&t| t < cool_at).count();
    // What was on its way when the key turned arrives within moments.
    let late: Vec<_> = arrivals
        .iter()
        .filter(|&&t| t > cool_at + Duration::from_millis(400))
        .map(|t| t.duration_since(cool_at))
        .collect();
    let s = app.mock.state.key_stats("k-a");
    eprintln!(
        "cooled: {spare} spare sends, {before} to a before, {} 429s, late {late:?}",
        s.rate_limited
    );
    assert!(spare > 0 && before > 0);
    assert!(s.rate_limited >= 1, "the key did turn");
    assert!(late.is_empty(), "sent to a cooling key: {late:?}");
    app.stop().await;
}

/// One caller sending a request every 100 ms is no busy worker (it asks no
/// spares for its next request), yet it should not pay a round trip between
/// threads per request: its worker fetches one spare while the request is
/// upstream, held for the next one (`idle_spare_lease_ms`). Nothing a client
/// or provider sees changes: each request is counted once, and the spare
/// left when the caller stops comes back unused.
#[actix_web::test]
async fn a_quiet_caller_finds_a_spare_fetched_for_its_next_request() {
    // Held 300 ms: longer than the caller's gaps, short to wait out below.
    let toml = format!(
        "idle_spare_lease_ms = 300\n{}",
        backend("one", "k-1", "primary", 100_000, "")
    );
    let app = spawn_app(mock_keys(&["k-1"]), &toml).await;
    let body = chat_body("m");
    let sent = 8u64;
    for _ in 0..sent {
        assert_eq!(app.chat(&body).await.status, 200);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let spare = counter(&app.scrape().await, "sidecar_spare_leases_total");
    eprintln!("quiet: {spare} of {sent} requests went on spare leases");
    // Each of the two HTTP workers pays one round trip at most: the first
    // request it sees.
    assert!(spare >= sent - 2, "{spare} of {sent} went on spares");
    assert_eq!(app.mock.state.key_stats("k-1").requests, sent);
    // The last spare fetched comes back unused once its deadline passes.
    assert_spares_came_back(&app, sent, Duration::from_millis(600)).await;
    app.stop().await;
}
