//! The floor of the HTTP stack sidecar is built on, for `benches/run.sh`: an
//! actix-web server whose one handler forwards the body with awc to a fixed
//! upstream and returns its answer — no key choice, no actors, no limits,
//! no log line, no stats. What sidecar adds is measured against this.
//!
//! A streamed answer (`text/event-stream`) is passed through as it arrives, so
//! the memory run can hold the same open streams through it.
//!
//!   floor --port P --upstream http://127.0.0.1:18080/v1/chat/completions [--key K]

use actix_web::{web, App, HttpResponse, HttpServer};

// The same allocator as the gateway's binary.
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;
use bytes::Bytes;

/// Where to forward, and the `Authorization` value to send there (if any).
struct Upstream {
    url: String,
    auth: Option<String>,
}

async fn forward(
    body: Bytes,
    up: web::Data<Upstream>,
    client: web::Data<awc::Client>,
) -> HttpResponse {
    let mut req = client
        .post(up.url.as_str())
        .insert_header(("content-type", "application/json"));
    if let Some(auth) = &up.auth {
        req = req.insert_header(("authorization", auth.as_str()));
    }
    match req.send_body(body).await {
        Ok(res)
            if res
                .headers()
                .get("content-type")
                .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream")) =>
        {
            HttpResponse::build(res.status())
                .content_type("text/event-stream")
                .streaming(res)
        }
        Ok(mut res) => match res.body().await {
            Ok(b) => HttpResponse::build(res.status())
                .content_type("application/json")
                .body(b),
            Err(_) => HttpResponse::BadGateway().finish(),
        },
        Err(_) => HttpResponse::BadGateway().finish(),
    }
}

fn main() -> std::io::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let port: u16 = arg("--port").and_then(|p| p.parse().ok()).unwrap_or(19290);
    let url =
        arg("--upstream").unwrap_or_else(|| "http://127.0.0.1:18080/v1/chat/completions".into());
    let auth = arg("--key").map(|k| format!("Bearer {k}"));
    actix_web::rt::System::new().block_on(async move {
        HttpServer::new(move || {
            App::new()
                .app_data(web::Data::new(Upstream {
                    url: url.clone(),
                    auth: auth.clone(),
                }))
                // No cap on connections per host (awc's default is 100), as
                // sidecar's own client: thousands of streams each hold one.
                .app_data(web::Data::new(
                    awc::Client::builder()
                        .connector(awc::Connector::new().limit(0))
                        .finish(),
                ))
                .route("/v1/chat/completions", web::post().to(forward))
        })
        .bind(("127.0.0.1", port))?
        .run()
        .await
    })
}
