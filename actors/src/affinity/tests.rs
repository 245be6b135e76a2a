use std::time::Duration;

use super::*;

fn owner(account: &str, created_ms: i64) -> Owner {
    Owner {
        account: account.into(),
        client: None,
        created_ms,
    }
}

impl Book {
    async fn lookup_ok(&self, id: &str) -> Option<Owner> {
        self.lookup(id).await.ok().flatten()
    }
}

fn book(retention_ms: u64, cap: usize) -> Book {
    Book::new(
        Duration::from_millis(retention_ms),
        cap,
        None,
        Logger::root(slog::Discard, slog::o!()),
    )
}

#[actix_rt::test]
async fn remembers_forgets_and_saves_each_change_once() {
    let b = book(3_600_000, 100);
    let now = now_ms();
    b.remember("resp_1", owner("a", now)).await;
    b.remember("resp_2", owner("b", now)).await;
    assert_eq!(b.lookup_ok("resp_1").await, Some(owner("a", now)));
    assert_eq!(b.lookup_ok("resp_3").await, None);
    b.forget("resp_2").await;
    assert_eq!(b.lookup_ok("resp_2").await, None);
    let pending = b.take_pending();
    assert_eq!(pending.len(), 3);
    assert!(matches!(&pending[2], Change::Forget(id) if &**id == "resp_2"));
    assert!(b.take_pending().is_empty());
    // A failed save puts its changes back before newer ones.
    b.remember("resp_4", owner("a", now)).await;
    b.restore_pending(pending);
    let again = b.take_pending();
    assert_eq!(again.len(), 4);
    assert!(matches!(&again[3], Change::Put(id, _) if &**id == "resp_4"));
}

#[actix_rt::test]
async fn the_retention_and_the_cap_hold() {
    let b = book(1_000, 3);
    let now = now_ms();
    // Loaded rows older than the retention are not served.
    b.load(vec![("old".into(), owner("a", now - 5_000))]);
    assert_eq!(b.lookup_ok("old").await, None);
    b.prune(now);
    assert_eq!(b.len(), 0);
    for i in 0..5 {
        b.remember(&format!("r{i}"), owner("a", now + i)).await;
    }
    // The cap drops the oldest first.
    assert_eq!(b.len(), 3);
    assert_eq!(b.lookup_ok("r0").await, None);
    assert!(b.lookup_ok("r4").await.is_some());
    // Remembering an id again moves it to the back of the line.
    b.remember("r2", owner("b", now + 10)).await;
    b.remember("r5", owner("a", now + 11)).await;
    assert_eq!(b.lookup_ok("r2").await, Some(owner("b", now + 10)));
    assert_eq!(b.lookup_ok("r3").await, None);
}

#[actix_rt::test]
async fn unsaved_changes_stay_bounded_while_the_database_fails() {
    let b = book(3_600_000, 10);
    let now = now_ms();
    let failed: Vec<Change> = (0..5_000)
        .map(|i| Change::Put(format!("r{i}").into(), owner("a", now)))
        .collect();
    b.restore_pending(failed);
    let kept = b.take_pending();
    assert_eq!(kept.len(), 10 + 1024);
    // The newest are kept.
    assert!(matches!(kept.last(), Some(Change::Put(id, _)) if &**id == "r4999"));
}

#[actix_rt::test]
async fn an_unreachable_redis_is_an_error_not_an_unknown_object() {
    let cluster = crate::rate_state::Cluster::new(
        "redis://127.0.0.1:1/",
        "t",
        Duration::from_millis(100),
        Duration::from_secs(60),
        None,
    )
    .expect("a lazy client");
    let b = Book::new(
        Duration::from_secs(3600),
        10,
        Some(cluster),
        Logger::root(slog::Discard, slog::o!()),
    );
    assert!(b.lookup("resp_elsewhere").await.is_err());
}
