//! The scripts' window arithmetic at its boundaries, against a real
//! redis-server with fixed times (the scripts take `now` for tests).
use super::*;
use crate::testing::RedisServer;

const W: i64 = 1000;

async fn reserve_at(
    c: &Cluster,
    id: &str,
    limit: u32,
    member: &str,
    emergency: bool,
    now: i64,
) -> Vec<i64> {
    let (grants, trickle, state) = c.names(id);
    let mut conn = c.0.conn.clone();
    let mut inv = c.0.scripts.reserve.prepare_invoke();
    inv.key(&grants)
        .key(&trickle)
        .key(&state)
        .arg(W)
        .arg(limit)
        .arg(member)
        .arg(if emergency { "1" } else { "0" })
        .arg(1)
        .arg(now)
        .arg(0)
        .arg(1);
    inv.invoke_async(&mut conn).await.expect("script runs")
}

async fn hset(c: &Cluster, id: &str, pairs: &[(&str, i64)]) {
    let (_, _, state) = c.names(id);
    let mut conn = c.0.conn.clone();
    for (k, v) in pairs {
        let _: () = redis::cmd("HSET")
            .arg(&state)
            .arg(*k)
            .arg(*v)
            .query_async(&mut conn)
            .await
            .expect("hset");
    }
}

fn cluster(server: &RedisServer) -> Cluster {
    Cluster::new(
        &server.url(),
        "t",
        Duration::from_secs(2),
        Duration::from_millis(W as u64),
        None,
    )
    .expect("client")
}

#[actix_rt::test]
async fn exactly_the_limit_then_one_more_then_the_window_edge() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let c = cluster(&server);
    for (i, m) in ["a", "b", "c"].iter().enumerate() {
        assert_eq!(
            reserve_at(&c, "k", 3, m, false, 0).await,
            vec![1, i as i64 + 1, 0, 0]
        );
    }
    // L + 1: full until the oldest leaves.
    assert_eq!(
        reserve_at(&c, "k", 3, "d", false, 0).await,
        vec![0, 1, W, 0]
    );
    assert_eq!(
        reserve_at(&c, "k", 3, "d", false, W - 1).await,
        vec![0, 1, W, W - 1]
    );
    // At exactly one window the three have left (age >= window).
    assert_eq!(
        reserve_at(&c, "k", 3, "d", false, W).await,
        vec![1, 1, W, W]
    );
    // Grants spread over the window: each leaves exactly a window later.
    assert_eq!(reserve_at(&c, "k", 3, "e", false, W + 500).await[0], 1);
    assert_eq!(reserve_at(&c, "k", 3, "f", false, 2 * W - 1).await[0], 1);
    assert_eq!(
        reserve_at(&c, "k", 3, "g", false, 2 * W - 1).await,
        vec![0, 1, 2 * W, 2 * W - 1]
    );
    assert_eq!(
        reserve_at(&c, "k", 3, "g", false, 2 * W).await,
        vec![1, 3, 2 * W, 2 * W]
    );
    assert_eq!(
        reserve_at(&c, "k", 3, "h", false, 2 * W).await,
        vec![0, 1, W + 500 + W, 2 * W],
        "the next slot opens when the grant at 1.5 windows leaves"
    );
}

#[actix_rt::test]
async fn a_lowered_limit_counts_what_is_already_in_the_window() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let c = cluster(&server);
    for (t, m) in [(0, "a"), (100, "b"), (200, "c")] {
        assert_eq!(reserve_at(&c, "k", 3, m, false, t).await[0], 1);
    }
    hset(&c, "k", &[("effective", 2)]).await;
    // Two must leave before one fits under 2: the one at 100 is the key.
    assert_eq!(
        reserve_at(&c, "k", 3, "d", false, 300).await,
        vec![0, 1, 100 + W, 300]
    );
}

#[actix_rt::test]
async fn cooldowns_probes_trickle_and_health() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let c = cluster(&server);
    hset(&c, "k", &[("until", 5000), ("upstream_until", 2000)]).await;
    assert_eq!(
        reserve_at(&c, "k", 10, "a", false, 1000).await,
        vec![0, 2, 5000, 1000]
    );
    assert_eq!(
        reserve_at(&c, "k", 10, "p1", true, 1999).await,
        vec![0, 3, 2000, 1999]
    );
    assert_eq!(reserve_at(&c, "k", 10, "p1", true, 2000).await[0], 1);
    // The trickle allows one per window (limit 1 here).
    assert_eq!(
        reserve_at(&c, "k", 10, "p2", true, 2500).await,
        vec![0, 5, 3000, 2500]
    );
    assert_eq!(reserve_at(&c, "k", 10, "p2", true, 3000).await[0], 1);
    let (_, _, state) = c.names("k");
    let mut conn = c.0.conn.clone();
    let _: () = redis::cmd("HSET")
        .arg(&state)
        .arg("health")
        .arg("error")
        .query_async(&mut conn)
        .await
        .expect("hset");
    assert_eq!(reserve_at(&c, "k", 10, "b", false, 9000).await[..2], [0, 4]);
}

#[actix_rt::test]
async fn shared_cooldowns_merge_later_wins_and_heartbeats_count() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let c = cluster(&server);
    let far = crate::db::now_ms() + 60_000;
    for (until, up, streak) in [(far, far - 30_000, 2), (far - 10_000, far - 5_000, 1)] {
        c.share(
            "k",
            Shared::Cooldown {
                until,
                upstream_until: up,
                streak,
            },
            None,
        )
        .await
        .expect("share");
    }
    let p = c.peek("k").await.expect("peek");
    assert_eq!(
        (p.until_ms, p.upstream_until_ms, p.streak),
        (far, far - 5_000, 2)
    );
    // A probe granted before the latest escalation cannot end it.
    c.share("k", Shared::CooldownEnded, Some(0))
        .await
        .expect("end");
    assert_eq!(c.peek("k").await.expect("peek").until_ms, far);
    c.share("k", Shared::CooldownEnded, Some(far))
        .await
        .expect("end");
    assert_eq!(c.peek("k").await.expect("peek").until_ms, 0);
    assert_eq!(c.beat(Duration::from_secs(3)).await, Ok(1));
    let other = cluster(&server);
    assert_eq!(other.beat(Duration::from_secs(3)).await, Ok(2));
    assert!(!c.status().degraded());
}

#[actix_rt::test]
async fn a_dead_redis_answers_within_the_timeout() {
    let Some(mut server) = RedisServer::start() else {
        return;
    };
    let c = Cluster::new(
        &server.url(),
        "t",
        Duration::from_millis(100),
        Duration::from_secs(1),
        None,
    )
    .expect("client");
    assert!(c.beat(Duration::from_secs(3)).await.is_ok());
    server.stop();
    let started = std::time::Instant::now();
    assert!(c.reserve("k", 10, "m", false, 1).await.is_err());
    assert!(
        started.elapsed() < Duration::from_millis(600),
        "{:?}",
        started.elapsed()
    );
    assert!(c.beat(Duration::from_secs(3)).await.is_err());
    assert!(c.status().degraded());
}
