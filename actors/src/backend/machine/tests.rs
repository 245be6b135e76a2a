use super::*;
use crate::supervisor::chooser::Slot;

fn machine(rpm: u32, now: Instant) -> KeyMachine {
    let spec = crate::testing::spec(1, rpm);
    let t = Tuning {
        window: Duration::from_secs(10),
        window_margin: Duration::ZERO,
        ..Tuning::default()
    };
    let mut m = KeyMachine::new(Arc::new(spec), Arc::new(t), now);
    m.keep_shared_log();
    m
}

#[test]
fn an_unknown_replica_count_serves_nothing_while_degraded() {
    let t0 = Instant::now();
    let mut m = machine(10, t0);
    m.set_degraded(Some(0), t0, t0);
    let later = t0 + Duration::from_secs(30);
    assert!(m.exhausted(later));
    assert_eq!(m.view(later).remaining, 0);
    assert!(!m.within_share(later));
}

#[test]
fn degraded_shares_round_down_after_a_spent_window() {
    let t0 = Instant::now();
    let mut m = machine(10, t0);
    m.take_lease(1, t0, None, false, 0, t0);
    let fill_at = t0 + Duration::from_secs(4);
    m.set_degraded(Some(3), fill_at, t0);
    // The window counts as spent until it has passed the fill time.
    assert_eq!(m.view(t0 + Duration::from_secs(13)).remaining, 0);
    let after = t0 + Duration::from_secs(14);
    assert_eq!(m.view(after).remaining, 3, "10 / 3 replicas, rounded down");
    assert_eq!(m.view(after).degraded_share, Some(3));
}

#[test]
fn coming_back_removes_the_fill_and_keeps_the_real_grants() {
    let t0 = Instant::now();
    let mut m = machine(10, t0);
    m.take_lease(1, t0, None, false, 0, t0);
    m.set_degraded(Some(3), t0 + Duration::from_secs(4), t0);
    let t1 = t0 + Duration::from_secs(2);
    assert_eq!(m.view(t1).window_left, 0, "filled");
    m.set_degraded(None, t1, t1);
    let v = m.view(t1);
    assert_eq!(v.window_left, 9, "only the real grant counts");
    assert_eq!(v.degraded_share, None);
    assert_eq!(m.shared_log(t1), vec![(t0, 1)], "what a sync puts back");
}

#[test]
fn a_spare_lease_holds_the_window_until_a_window_after_its_deadline() {
    let t0 = Instant::now();
    let mut m = machine(2, t0);
    let hold = t0 + Duration::from_secs(3);
    m.take_lease(1, t0, Some(hold), false, 0, t0);
    m.take_lease(2, t0, None, false, 0, t0);
    // The spare may be sent at `hold`: the provider would count it until a
    // window after that, so its grant cannot come back with the window.
    let t12 = t0 + Duration::from_secs(12);
    assert_eq!(m.view(t12).window_left, 1, "the plain lease has aged out");
    assert_eq!(m.view(t0 + Duration::from_secs(13)).window_left, 2);
}

#[test]
fn a_spare_lease_handed_back_unsent_frees_its_place_at_once() {
    let t0 = Instant::now();
    let mut m = machine(2, t0);
    let t1 = t0 + Duration::from_secs(1);
    m.take_lease(1, t1, Some(t1 + Duration::from_secs(3)), false, 0, t1);
    let t2 = t0 + Duration::from_secs(2);
    assert_eq!(m.view(t2).window_left, 1);
    m.finish(
        1,
        &Outcome::Unused,
        Duration::ZERO,
        None,
        None,
        None,
        Strike::Now,
        t2,
    );
    assert_eq!(m.view(t2).window_left, 2);
}

fn fail(m: &mut KeyMachine, id: u64, now: Instant) -> Changes {
    let outcome = Outcome::ServerError { status: 500 };
    m.finish(
        id,
        &outcome,
        Duration::ZERO,
        None,
        None,
        None,
        Strike::Now,
        now,
    )
}

#[test]
fn a_spare_sent_late_is_judged_from_its_send() {
    let t0 = Instant::now();
    let at = |ms: u64| t0 + Duration::from_millis(ms);
    let mut m = machine(1000, t0);
    m.take_lease(1, t0, Some(at(50)), false, 0, t0);
    for id in 2..=4 {
        m.take_lease(id, at(1), None, false, 0, at(1));
    }
    // Two failures, then the spare goes out and succeeds: the failures
    // were not consecutive, so a third does not take the key down.
    assert!(fail(&mut m, 2, at(2)).health_flipped.is_none());
    assert!(fail(&mut m, 3, at(3)).health_flipped.is_none());
    m.sent_at(1, at(4));
    let ok = Outcome::Success {
        prompt_tokens: None,
        completion_tokens: None,
    };
    m.finish(1, &ok, Duration::ZERO, None, None, None, Strike::Now, at(5));
    assert_eq!(fail(&mut m, 4, at(6)).health_flipped, None, "still up");
    assert_eq!(m.view(at(6)).consecutive_failures, 1);
}

fn slot(m: &mut KeyMachine, now: Instant) -> Slot {
    let view = m.view(now);
    Slot {
        spec: m.spec().clone(),
        account: Arc::from("a"),
        granted: view.seen_leases,
        view,
        granted_emergency: 0,
        granted_tokens: 0,
    }
}

#[test]
fn spares_are_lent_only_from_a_view_as_new_as_the_gate() {
    let t0 = Instant::now();
    let mut m = machine(1000, t0);
    let s = slot(&mut m, t0);
    assert_eq!(s.spares(8, m.gate().epoch()), 8);
    // A lower limit reaches the gate before the supervisor's view.
    m.gate().recall();
    assert_eq!(
        s.spares(8, m.gate().epoch()),
        0,
        "a view older than the gate"
    );
    assert_eq!(slot(&mut m, t0).spares(8, m.gate().epoch()), 8);
    // Only beyond the room kept for requests to come.
    let mut tight = machine(260, t0);
    assert_eq!(slot(&mut tight, t0).spares(8, tight.gate().epoch()), 4);
    tight.take_lease(1, t0, None, false, 0, t0);
    assert_eq!(slot(&mut tight, t0).spares(8, tight.gate().epoch()), 3);
}

#[test]
fn a_provider_budget_voids_spares_and_stops_lending() {
    let t0 = Instant::now();
    let mut m = machine(1000, t0);
    m.take_lease(1, t0, None, false, 0, t0);
    let epoch = m.gate().epoch();
    let limits = ProviderLimits {
        remaining_requests: Some(900),
        reset_requests: Some(Duration::from_secs(5)),
        ..ProviderLimits::default()
    };
    let ok = Outcome::Success {
        prompt_tokens: None,
        completion_tokens: None,
    };
    m.finish(
        1,
        &ok,
        Duration::ZERO,
        None,
        None,
        Some(&limits),
        Strike::Now,
        t0,
    );
    assert_ne!(m.gate().epoch(), epoch, "held spares are void");
    let s = slot(&mut m, t0);
    assert_eq!(
        s.spares(8, m.gate().epoch()),
        0,
        "no spares on a told budget"
    );
}

#[test]
fn a_pushed_view_sees_time_pass_and_only_the_timer_sweeps_lost_leases() {
    let t0 = Instant::now();
    let mut m = machine(100, t0);
    m.take_lease(1, t0, None, false, 0, t0);
    // Hours later the lease was never reported (it reports on drop, so this
    // is the safety net): a push leaves the sweep to the timer.
    let later = t0 + LEASE_SAFETY_NET + Duration::from_secs(1);
    assert_eq!(m.time_passed(later), Changes::default());
    assert_eq!(m.in_flight(), 1, "a push does not walk the leases");
    m.tick(later);
    assert_eq!(m.in_flight(), 0, "the timer's sweep drops it");
}
