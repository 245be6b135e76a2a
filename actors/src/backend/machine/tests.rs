use super::*;
use crate::spec::{ApiKey, InitialState, ModelRoute, Pool};

fn machine(rpm: u32, now: Instant) -> KeyMachine {
    let mut models = HashMap::new();
    models.insert(
        Arc::from("m"),
        ModelRoute {
            native: Arc::from("m"),
            price_in: 0.0,
            price_out: 0.0,
        },
    );
    let spec = BackendSpec {
        id: 1,
        name: Arc::from("k"),
        base_url: Arc::from("http://x/v1"),
        api_key: ApiKey::new("fake-test-key-0001"),
        pool: Pool::Primary,
        rpm_limit: rpm,
        burst: rpm,
        tpm_limit: None,
        max_concurrency: None,
        weight: 1.0,
        timeout: Duration::from_secs(10),
        models,
        enabled: true,
        initial: InitialState::default(),
    };
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
