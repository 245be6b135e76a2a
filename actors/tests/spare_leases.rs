//! Spare leases through the real actors: the supervisor lends them with a
//! grant, the backend counts them, and one held across a change of its key's
//! state is never sent, even after the key is open again.

use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use futures_util::future::LocalBoxFuture;
use sidecar_actors::messages::{GetSnapshot, Priority};
use sidecar_actors::testing::spec;
use sidecar_actors::{
    Acquire, BackendSpec, Lease, Outcome, PoolSupervisor, Prefetch, ProbeOutcome, Prober, Report,
    Ticket, Tuning,
};
use tokio::time::Instant;

struct Answers;
impl Prober for Answers {
    fn probe(&self, _: &BackendSpec) -> LocalBoxFuture<'static, ProbeOutcome> {
        Box::pin(async { ProbeOutcome::Ok })
    }
}

fn start() -> Addr<PoolSupervisor> {
    let tuning = Tuning {
        cooldown_base: Duration::from_millis(200),
        cooldown_max: Duration::from_millis(200),
        // Held longer than the cooldown lasts.
        spare_ttl: Duration::from_secs(2),
        ..Tuning::default()
    };
    start_with(10_000, tuning)
}

fn start_with(rpm: u32, tuning: Tuning) -> Addr<PoolSupervisor> {
    let log = slog::Logger::root(slog::Discard, slog::o!());
    PoolSupervisor::new(
        vec![spec(1, rpm)],
        tuning,
        Arc::new(Answers),
        None,
        None,
        log,
    )
    .start()
}

/// Returns once the backend's first view has reached the supervisor: the
/// backend pushes it when it starts, before it answers the snapshot's read,
/// so it is in the supervisor's mailbox ahead of anything sent after this.
async fn started(sup: &Addr<PoolSupervisor>) {
    sup.send(GetSnapshot).await.expect("snapshot");
}

async fn acquire(sup: &Addr<PoolSupervisor>, spares: u32) -> (Lease, Vec<Lease>) {
    let ticket = sup
        .send(Acquire {
            model: Arc::from("m"),
            priority: Priority::Normal,
            exclude: Vec::new(),
            est_tokens: 0,
            deadline: None,
            pin: None,
            spares,
        })
        .await
        .expect("the supervisor answers")
        .expect("a lease");
    match ticket {
        Ticket::Ready(lease, more) => (lease, more),
        Ticket::Queued(_) => panic!("a roomy key queued"),
    }
}

async fn used_in_window(sup: &Addr<PoolSupervisor>) -> u32 {
    // The backend's counts reach the supervisor's snapshot with its push.
    tokio::time::sleep(Duration::from_millis(30)).await;
    let snap = sup.send(GetSnapshot).await.expect("snapshot");
    snap.backends.first().map_or(0, |b| b.used_in_window)
}

#[actix_rt::test]
async fn a_spare_held_across_a_cooldown_is_never_sent() {
    let sup = start();
    started(&sup).await;
    let (mut lease, mut spares) = acquire(&sup, 8).await;
    assert_eq!(spares.len(), 8, "a roomy key lends what was asked");
    assert!(lease.admitted().await);
    for s in &mut spares {
        assert!(s.admitted().await, "usable before anything changed");
    }
    assert_eq!(used_in_window(&sup).await, 9, "the spares count while held");
    // The sent lease draws a 429: the key cools for 200 ms, then opens.
    lease.mark_used();
    let limited = Outcome::RateLimited { retry_after: None };
    lease.settle(Report::new(limited, Duration::ZERO)).await;
    for s in &mut spares {
        assert!(!s.admitted().await, "void while the key cools");
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (mut fresh, _) = acquire(&sup, 0).await;
    assert!(fresh.admitted().await, "the key is open again");
    for s in &mut spares {
        assert!(
            !s.admitted().await,
            "granted before the change: void for good"
        );
    }
    // Dropped unsent, the spares give their place in the window back.
    drop(spares);
    drop(fresh);
    assert_eq!(used_in_window(&sup).await, 1, "only what was sent");
}

/// Spares' plain answers held in a worker's outbox reach the backend in one
/// message, and each counts as if it came alone: none left in flight, every
/// one a success, the window holding each once.
#[actix_rt::test]
async fn held_reports_arrive_together_and_each_counts() {
    use sidecar_actors::outbox::Outbox;

    let sup = start();
    started(&sup).await;
    let (lease, spares) = acquire(&sup, 8).await;
    drop(lease);
    let out = Outbox::default();
    let ok = || {
        let outcome = Outcome::Success {
            prompt_tokens: Some(1),
            completion_tokens: Some(1),
        };
        Report::new(outcome, Duration::from_millis(1))
    };
    let mut first = true;
    for mut s in spares {
        assert!(s.admitted().await);
        s.mark_used();
        assert_eq!(
            s.finish_into(ok(), &out),
            first,
            "held, the first arms the flush"
        );
        first = false;
    }
    out.flush();
    // The snapshot reads the backend through its mailbox: after the reports.
    let snap = sup.send(GetSnapshot).await.expect("snapshot");
    let b = snap.backends.first().expect("one backend");
    assert_eq!(b.in_flight, 0, "every report applied");
    assert_eq!(b.totals.successes, 8);
    assert_eq!(b.used_in_window, 8, "the unsent lease gave its place back");
}

async fn fetch(sup: &Addr<PoolSupervisor>) -> Vec<Lease> {
    sup.send(Prefetch {
        model: Arc::from("m"),
        est_tokens: 0,
        spares: 1,
    })
    .await
    .expect("the supervisor answers")
}

/// A quiet worker's fetch brings a spare alone, held for the idle deadline,
/// counted while held and given back unsent like any; a key with little
/// room, or a zero idle deadline, lends none.
#[actix_rt::test]
async fn a_fetch_brings_one_spare_alone_and_none_from_a_tight_key() {
    let sup = start();
    started(&sup).await;
    let ttl = Tuning::default().idle_spare_ttl;
    let before = Instant::now();
    let lent = fetch(&sup).await;
    assert_eq!(lent.len(), 1, "one spare, no lease to send now");
    let until = lent.first().and_then(Lease::held_until).expect("a spare");
    assert!(until >= before + ttl && until <= Instant::now() + ttl);
    assert_eq!(used_in_window(&sup).await, 1, "counted while held");
    drop(lent);
    assert_eq!(used_in_window(&sup).await, 0, "given back unsent");

    let tight = start_with(200, Tuning::default());
    started(&tight).await;
    assert!(fetch(&tight).await.is_empty(), "no room to lend from");
    let off = Tuning {
        idle_spare_ttl: Duration::ZERO,
        ..Tuning::default()
    };
    let off = start_with(10_000, off);
    started(&off).await;
    assert!(fetch(&off).await.is_empty(), "fetching is off");
}
