use std::cell::RefCell;
use std::time::Duration;

use futures_util::future::join_all;
use tokio::time::Instant;

use crate::helpers::{backend, chat_body, mock_keys, spawn_app};

/// With capacity for one request per tick, urgent requests queued after low
/// ones still finish first; FIFO holds within a level.
#[actix_web::test]
async fn urgent_requests_overtake_queued_low_ones() {
    let mock = mock_keys(&["k-1"]);
    let toml = format!(
        "window_secs = 0.3\nwindow_margin_ms = 10\nqueue_timeout = 10\n{}",
        backend("one", "k-1", "primary", 1, "")
    );
    let app = spawn_app(mock, &toml).await;
    let body = chat_body("m");
    // Takes the only slot of the first tick.
    assert_eq!(
        app.chat_with(&body, &[("x-priority", "low")]).await.status,
        200
    );

    let order = RefCell::new(Vec::new());
    let start = Instant::now();
    let labels = [
        "low-1", "low-2", "low-3", "urgent-1", "urgent-2", "urgent-3",
    ];
    let replies = join_all(labels.iter().enumerate().map(|(i, label)| {
        let (app, body, order) = (&app, &body, &order);
        async move {
            tokio::time::sleep_until(start + Duration::from_millis(15 * i as u64)).await;
            let priority = label.split('-').next().unwrap_or("normal");
            let r = app.chat_with(body, &[("x-priority", priority)]).await;
            order.borrow_mut().push(*label);
            r.status
        }
    }))
    .await;
    assert!(replies.iter().all(|&s| s == 200), "{replies:?}");
    let order = order.into_inner();
    eprintln!("completion order: {order:?}");
    assert_eq!(
        order,
        vec!["urgent-1", "urgent-2", "urgent-3", "low-1", "low-2", "low-3"]
    );
    app.stop().await;
}
