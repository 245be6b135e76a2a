//! The floor of the HTTP stack sidecar is built on, for `benches/run.sh`: an
//! actix-web server whose one handler forwards the body with awc to a fixed
//! upstream and returns its answer — no key choice, no actors, no limits,
//! no log line, no stats. What sidecar adds is measured against this.
//!
//!   floor --port P --upstream http://127.0.0.1:18080/v1/chat/completions

use actix_web::{web, App, HttpResponse, HttpServer};

// The same allocator as the gateway's binary.
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;
use bytes::Bytes;

async fn forward(
    body: Bytes,
    up: web::Data<String>,
    client: web::Data<awc::Client>,
) -> HttpResponse {
    match client
        .post(up.as_str())
        .insert_header(("content-type", "application/json"))
        .send_body(body)
        .await
    {
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
    let upstream =
        arg("--upstream").unwrap_or_else(|| "http://127.0.0.1:18080/v1/chat/completions".into());
    actix_web::rt::System::new().block_on(async move {
        HttpServer::new(move || {
            App::new()
                .app_data(web::Data::new(upstream.clone()))
                .app_data(web::Data::new(awc::Client::default()))
                .route("/v1/chat/completions", web::post().to(forward))
        })
        .bind(("127.0.0.1", port))?
        .run()
        .await
    })
}
