use std::time::Duration;

use futures_util::future::join_all;
use serde_json::{json, Value};
use sidecar::sim::{Fault, MockConfig, MockKey};
use sidecar_actors::messages::TestCrashBackend;
use sidecar_actors::Status;

use crate::helpers::{backend, chat_body, mock_keys, spawn_app, TestApp};

const TOKEN: &str = "admin-secret-token";

fn id_of(app_list: &Value, name: &str) -> u32 {
    app_list["backends"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["name"] == name)
        .and_then(|b| b["id"].as_u64())
        .unwrap_or_else(|| panic!("no backend {name}")) as u32
}

async fn admin_app() -> TestApp {
    let mock = MockConfig {
        keys: vec![
            MockKey::new("k-cfg-000001", None),
            MockKey::new("k-new-000002", None),
        ],
        latency: Duration::from_millis(5),
        ..Default::default()
    };
    let toml = format!(
        "admin_token = \"{TOKEN}\"\n{}",
        backend("cfg", "k-cfg-000001", "primary", 1000, "")
    );
    spawn_app(mock, &toml).await
}

#[actix_web::test]
async fn admin_auth() {
    let app = admin_app().await;
    let r = app.admin("GET", "/backends", None, None).await;
    assert_eq!(
        (r.status, r.error_code()),
        (401, Some("missing_admin_token"))
    );
    let r = app.admin("GET", "/backends", None, Some("wrong")).await;
    assert_eq!(
        (r.status, r.error_code()),
        (401, Some("invalid_admin_token"))
    );
    assert_eq!(
        app.admin("GET", "/backends", None, Some(TOKEN))
            .await
            .status,
        200
    );
    // A token in a URL is accepted on the event stream only (EventSource
    // cannot send headers); elsewhere it would land in histories and logs.
    assert_eq!(
        app.admin("GET", &format!("/actors?token={TOKEN}"), None, None)
            .await
            .status,
        401
    );
    app.stop().await;

    // Without a token, loopback clients are served (non-loopback: unit test).
    let mock = mock_keys(&["k-1"]);
    let app = spawn_app(mock, &backend("b", "k-1", "primary", 10, "")).await;
    assert_eq!(app.admin("GET", "/backends", None, None).await.status, 200);
    app.stop().await;
}

#[actix_web::test]
async fn admin_backends_crud_reaches_the_actors() {
    let app = admin_app().await;
    let t = Some(TOKEN);
    let list = app.admin("GET", "/backends", None, t).await.body;
    let cfg = &list["backends"][0];
    assert_eq!(
        (cfg["name"].as_str(), cfg["source"].as_str()),
        (Some("cfg"), Some("config"))
    );
    assert_eq!(cfg["api_key"], "k-****0001", "keys are masked");
    assert!(!list.to_string().contains("k-cfg-000001"));

    // Bad input: unknown field, invalid value, rejected key, duplicate name.
    let good = json!({"name": "added", "base_url": format!("{}", app.mock.base_url()), "api_key": "k-new-000002",
                      "rpm_limit": 1000, "weight": 10.0, "models": {"m": "native-m"}});
    let mut unknown = good.clone();
    unknown["rpm"] = json!(5);
    let r = app.admin("POST", "/backends", Some(unknown), t).await;
    assert_eq!(r.status, 400);
    assert!(
        r.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("unknown field `rpm`"),
        "{}",
        r.body
    );
    let mut zero = good.clone();
    zero["rpm_limit"] = json!(0);
    let r = app.admin("POST", "/backends", Some(zero), t).await;
    assert_eq!(r.status, 422);
    assert!(r.body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("rpm_limit"));
    let mut rejected = good.clone();
    rejected["api_key"] = json!("k-unknown-999");
    let r = app.admin("POST", "/backends", Some(rejected), t).await;
    assert_eq!((r.status, r.error_code()), (422, Some("key_rejected")));
    assert!(r.body["error"]["message"].as_str().unwrap().contains("401"));
    let mut dup = good.clone();
    dup["name"] = json!("cfg");
    assert_eq!(
        app.admin("POST", "/backends?skip_test=true", Some(dup), t)
            .await
            .status,
        409
    );

    // Create: the key is test-called, and traffic reaches the new actor.
    let r = app.admin("POST", "/backends", Some(good), t).await;
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(r.body["key_test"]["ok"], true);
    assert_eq!(r.body["api_key"], "k-****0002");
    let id = r.body["id"].as_u64().unwrap() as u32;
    assert_eq!(
        app.chat(&chat_body("m")).await.backend().as_deref(),
        Some("added")
    );

    // Config-file backends are read-only here.
    let cfg_id = id_of(&list, "cfg");
    let r = app
        .admin(
            "PATCH",
            &format!("/backends/{cfg_id}"),
            Some(json!({"rpm_limit": 5})),
            t,
        )
        .await;
    assert_eq!((r.status, r.error_code()), (409, Some("managed_by_config")));
    assert!(r.body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("config file"));
    assert_eq!(
        app.admin("DELETE", &format!("/backends/{cfg_id}"), None, t)
            .await
            .status,
        409
    );

    // Update reaches the running actor.
    let r = app
        .admin(
            "PATCH",
            &format!("/backends/{id}"),
            Some(json!({"rpm_limit": 7})),
            t,
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(app.view("added").await.configured_rpm, 7);
    let r = app
        .admin(
            "PATCH",
            &format!("/backends/{id}"),
            Some(json!({"name": "x"})),
            t,
        )
        .await;
    assert_eq!(r.status, 400, "renaming is not a field");

    // Disable → no traffic; enable → traffic again.
    assert_eq!(
        app.admin("POST", &format!("/backends/{id}/disable"), None, t)
            .await
            .status,
        200
    );
    assert_eq!(app.view("added").await.status, Status::Disabled);
    assert_eq!(
        app.chat(&chat_body("m")).await.backend().as_deref(),
        Some("cfg")
    );
    assert_eq!(
        app.admin("POST", &format!("/backends/{id}/enable"), None, t)
            .await
            .status,
        200
    );
    assert_eq!(
        app.chat(&chat_body("m")).await.backend().as_deref(),
        Some("added")
    );

    // Test call and reset-cooldown.
    let r = app
        .admin("POST", &format!("/backends/{id}/test"), None, t)
        .await;
    assert_eq!(r.body["test"]["ok"], true);
    app.mock
        .state
        .set_fault("k-new-000002", Fault::RateLimit(Some(60)));
    assert_eq!(
        app.chat(&chat_body("m")).await.backend().as_deref(),
        Some("cfg")
    );
    assert_eq!(app.view("added").await.status, Status::Cooling);
    app.mock.state.set_fault("k-new-000002", Fault::None);
    assert_eq!(
        app.admin("POST", &format!("/backends/{id}/reset-cooldown"), None, t)
            .await
            .status,
        200
    );
    assert_eq!(app.view("added").await.status, Status::Healthy);
    assert_eq!(
        app.admin("GET", &format!("/backends/{id}"), None, t)
            .await
            .body["live"]["state"],
        "healthy"
    );
    assert_eq!(app.admin("GET", "/backends/999", None, t).await.status, 404);

    // Delete mid-traffic: no client request fails.
    let body = chat_body("m");
    let traffic = join_all((0..40).map(|i| {
        let (app, body) = (&app, &body);
        async move {
            tokio::time::sleep(Duration::from_millis(i * 5)).await;
            app.chat(body).await.status
        }
    }));
    let delete = async {
        tokio::time::sleep(Duration::from_millis(60)).await;
        app.admin("DELETE", &format!("/backends/{id}"), None, t)
            .await
            .status
    };
    let (statuses, deleted) = tokio::join!(traffic, delete);
    assert_eq!(deleted, 200);
    assert!(statuses.iter().all(|&s| s == 200), "{statuses:?}");
    assert!(app
        .snapshot()
        .await
        .backends
        .iter()
        .all(|b| &*b.name != "added"));
    assert_eq!(
        app.chat(&chat_body("m")).await.backend().as_deref(),
        Some("cfg")
    );
    app.stop().await;
}

#[actix_web::test]
async fn admin_stats_config_reload_backup_actors() {
    let app = admin_app().await;
    let t = Some(TOKEN);
    for _ in 0..3 {
        assert_eq!(app.chat(&chat_body("m")).await.status, 200);
    }
    app.stats
        .send(sidecar_actors::stats::Flush)
        .await
        .unwrap()
        .unwrap();
    let r = app.admin("GET", "/stats/total", None, t).await;
    assert_eq!(r.body["requests"], 3, "{}", r.body);
    let r = app.admin("GET", "/stats/hourly?hours=2", None, t).await;
    assert_eq!(r.body["rows"][0]["requests"], 3);
    let r = app
        .admin("GET", "/stats/hourly?hours=2&backend_id=999", None, t)
        .await;
    assert_eq!(r.body["rows"].as_array().unwrap().len(), 0);
    assert_eq!(
        app.admin("GET", "/stats/hourly?hours=abc", None, t)
            .await
            .status,
        400
    );
    assert_eq!(
        app.admin("GET", "/stats/daily?days=2", None, t).await.body["rows"][0]["requests"],
        3
    );
    assert_eq!(
        app.admin("GET", "/stats/cooldowns?limit=5", None, t)
            .await
            .status,
        200
    );
    assert_eq!(
        app.admin("GET", "/stats/cooldowns?limit=5&x=1", None, t)
            .await
            .status,
        400
    );
    let pools = app.admin("GET", "/pools", None, t).await.body;
    assert_eq!(pools["live"][0]["pool"], "primary");
    assert_eq!(pools["today"][0]["requests_today"], 3);

    // Runtime config: takes effect at once, kept in the database.
    let r = app.admin("GET", "/config", None, t).await;
    assert_eq!(r.body["queue_timeout"], 30.0);
    let r = app
        .admin(
            "PATCH",
            "/config",
            Some(json!({"queue_timeout": 2.5, "cooldown_base": 1})),
            t,
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        app.admin("GET", "/config", None, t).await.body["queue_timeout"],
        2.5
    );
    let r = app
        .admin("PATCH", "/config", Some(json!({"cooldown_max": 0.5})), t)
        .await;
    assert_eq!(r.status, 422);
    let r = app
        .admin("PATCH", "/config", Some(json!({"queue_timout": 1})), t)
        .await;
    assert_eq!(r.status, 400);
    assert!(r.body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("queue_timout"));
    let saved = sidecar_actors::db::get_config(&mut app.db(), "runtime_overrides")
        .unwrap()
        .unwrap();
    assert!(saved.contains("2.5"));

    let r = app.admin("POST", "/reload", None, t).await;
    assert_eq!((r.status, r.body["backends"].as_u64()), (200, Some(1)));
    let r = app.admin("POST", "/backup", None, t).await;
    assert_eq!(r.status, 200);
    assert!(std::path::Path::new(r.body["path"].as_str().unwrap()).exists());
    let r = app.admin("GET", "/actors", None, t).await;
    assert_eq!(r.body["backends"][0]["name"], "cfg");
    assert!(r.body["stats_actor"]["flushes"].as_u64().unwrap() >= 1);
    assert!(r.body["backup_actor"]["successes"].as_u64().unwrap() >= 1);
    assert_eq!(r.body["counters"]["requests_2xx"], 3);

    // Restarted with the saved runtime setting.
    let app = app.restart().await;
    assert_eq!(
        app.admin("GET", "/config", None, t).await.body["queue_timeout"],
        2.5
    );
    app.stop().await;
}

/// A backend actor that fails is restarted with its state intact, and
/// requests keep flowing meanwhile.
#[actix_web::test]
async fn crashed_backend_actor_restarts_with_state_intact() {
    let mock = MockConfig {
        keys: vec![
            MockKey::new("k-cool", None).with_fault(Fault::RateLimit(Some(30))),
            MockKey::new("k-ok", None),
        ],
        ..Default::default()
    };
    let toml = format!(
        "{}{}",
        backend("cool", "k-cool", "primary", 100, "weight = 10.0"),
        backend("ok", "k-ok", "primary", 100, "")
    );
    let app = spawn_app(mock, &toml).await;
    assert_eq!(app.chat(&chat_body("m")).await.status, 200);
    let before = app.view("cool").await;
    assert_eq!(before.status, Status::Cooling);
    let body = chat_body("m");
    let traffic = join_all((0..20).map(|i| {
        let (app, body) = (&app, &body);
        async move {
            tokio::time::sleep(Duration::from_millis(i * 5)).await;
            app.chat(body).await.status
        }
    }));
    let crash = async {
        tokio::time::sleep(Duration::from_millis(30)).await;
        assert!(app
            .supervisor
            .send(TestCrashBackend(before.id))
            .await
            .unwrap());
        assert!(app
            .supervisor
            .send(TestCrashBackend(before.id + 1))
            .await
            .unwrap());
    };
    let (statuses, ()) = tokio::join!(traffic, crash);
    assert!(statuses.iter().all(|&s| s == 200), "{statuses:?}");
    let after = app.view("cool").await;
    assert_eq!(after.restarts, 1);
    assert_eq!(
        after.status,
        Status::Cooling,
        "state kept across the restart"
    );
    assert_eq!(after.consecutive_429, before.consecutive_429);
    assert_eq!(after.cooling_until, before.cooling_until);
    assert_eq!(app.view("ok").await.restarts, 1);
    assert_eq!(app.chat(&chat_body("m")).await.status, 200);
    app.stop().await;
}

/// Metrics: series and values after traffic; label cardinality stays bounded
/// with 1,000 distinct unknown model names.
#[actix_web::test]
async fn metrics_after_traffic_and_bounded_labels() {
    let mock = mock_keys(&["k-1"]);
    let toml = "[[backends]]\nname = \"b\"\nbase_url = \"{MOCK_URL}\"\napi_key = \"k-1\"\nrpm_limit = 100000\nmodels = { \"m\" = { native = \"native-m\", price_in = 1.0, price_out = 1.0 } }\n";
    let app = spawn_app(mock, toml).await;
    for _ in 0..5 {
        assert_eq!(app.chat(&chat_body("m")).await.status, 200);
    }
    for i in 0..1000 {
        let r = app.chat(&chat_body(&format!("unknown-model-{i}"))).await;
        assert_eq!(r.status, 404);
    }
    let text = app.scrape().await;
    let line = |prefix: &str| -> f64 {
        text.lines()
            .find(|l| l.starts_with(prefix))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no series {prefix}\n{text}"))
    };
    assert_eq!(
        line("sidecar_requests_total{backend=\"b\",pool=\"primary\",status=\"2xx\"}"),
        5.0
    );
    assert_eq!(
        line("sidecar_requests_total{backend=\"none\",pool=\"none\",status=\"4xx\"}"),
        1000.0
    );
    assert!(line("sidecar_tokens_total{backend=\"b\",kind=\"completion\",model=\"m\"}") >= 5.0);
    assert!(line("sidecar_cost_usd_total{backend=\"b\",model=\"m\"}") > 0.0);
    assert_eq!(
        line("sidecar_backend_state{backend=\"b\",state=\"healthy\"}"),
        1.0
    );
    assert_eq!(
        line("sidecar_backend_window_limit{backend=\"b\"}"),
        100000.0
    );
    // Conventions: counters end in _total, durations say so, build and
    // process metrics, requests per (known) model, client errors by code.
    assert_eq!(line("sidecar_emergency_grants_total"), 0.0);
    assert!(text.contains("sidecar_stats_last_flush_duration_seconds"));
    assert!(!text.contains("sidecar_stats_last_flush_seconds "));
    assert!(text.contains(&format!(
        "sidecar_build_info{{version=\"{}\"}} 1",
        env!("CARGO_PKG_VERSION")
    )));
    assert!(line("process_resident_memory_bytes") > 0.0);
    assert!(line("sidecar_model_requests_total{model=\"m\"}") >= 5.0);
    assert_eq!(
        line("sidecar_model_requests_total{model=\"other\"}"),
        1000.0
    );
    assert_eq!(
        line("sidecar_client_errors_total{code=\"model_not_found\"}"),
        1000.0
    );
    assert_eq!(line("sidecar_queue_depth{priority=\"urgent\"}"), 0.0);
    assert!(line("sidecar_request_duration_seconds_count{pool=\"primary\"}") >= 5.0);
    assert!(line("sidecar_db_size_bytes") > 0.0);
    assert!(text.contains("sidecar_backup_last_success"));
    let series = text.lines().filter(|l| !l.starts_with('#')).count();
    assert!(series < 400, "{series} series after 1,000 unknown models");
    assert!(
        !text.contains("unknown-model"),
        "unknown models never become label values"
    );
    app.stop().await;
}

/// `POST /reload` re-reads the config file: a backend added to the file gets
/// its actor and traffic, one removed retires.
#[actix_web::test]
async fn reload_applies_the_file_to_the_running_actors() {
    use sidecar::settings::{Settings, Sources};
    let mock = sidecar::sim::MockUpstream::spawn(mock_keys(&["k-1", "k-2"])).unwrap();
    let dir = std::sync::Arc::new(tempfile::tempdir().unwrap());
    let file = dir.path().join("sidecar.toml");
    let one = backend("first", "k-1", "primary", 100, "").replace("{MOCK_URL}", &mock.base_url());
    let two = backend("second", "k-2", "primary", 100, "weight = 10.0")
        .replace("{MOCK_URL}", &mock.base_url());
    std::fs::write(&file, &one).unwrap();
    let mut settings = Settings::load(&Sources {
        file: Some(file.clone()),
        env: false,
        inline: None,
    })
    .unwrap();
    settings.storage.db_path = dir.path().join("sidecar.db");
    settings.storage.backup_dir = dir.path().join("backups");
    settings.storage.encryption_key = Some(crate::helpers::TEST_KEY.into());
    settings.server.metrics_port = 0;
    let app = crate::helpers::start_gateway(mock, dir.clone(), settings)
        .await
        .unwrap();
    assert_eq!(
        app.chat(&chat_body("m")).await.backend().as_deref(),
        Some("first")
    );

    std::fs::write(&file, format!("{one}{two}")).unwrap();
    let r = app.admin("POST", "/reload", None, None).await;
    assert_eq!(
        (r.status, r.body["backends"].as_u64()),
        (200, Some(2)),
        "{}",
        r.body
    );
    assert_eq!(
        app.chat(&chat_body("m")).await.backend().as_deref(),
        Some("second")
    );

    std::fs::write(&file, &two).unwrap();
    let r = app.admin("POST", "/reload", None, None).await;
    assert_eq!(r.body["removed"], 1);
    assert!(app
        .snapshot()
        .await
        .backends
        .iter()
        .all(|b| &*b.name != "first"));

    std::fs::write(&file, "port = \"x\"\n").unwrap();
    let r = app.admin("POST", "/reload", None, None).await;
    assert_eq!(
        r.status, 422,
        "a broken file is refused and the running set kept"
    );
    assert!(r.body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("port"));
    assert_eq!(app.chat(&chat_body("m")).await.status, 200);
    app.stop().await;
}

/// File < env < runtime override, visible and reversible: a reload applies
/// the file's top-level values, an override wins until cleared, and
/// `GET /config` says where each value comes from.
#[actix_web::test]
async fn configuration_precedence_is_explicit_and_overrides_can_be_cleared() {
    let dir = tempfile::tempdir().unwrap();
    let mock = sidecar::sim::MockUpstream::spawn(crate::helpers::mock_keys(&["k-1"])).unwrap();
    let file = dir.path().join("sidecar.toml");
    let root = dir.path().display().to_string();
    let upstream = backend("b", "k-1", "primary", 100, "").replace("{MOCK_URL}", &mock.base_url());
    let text = move |queue_timeout: u32| {
        format!(
            "port = 0\nmetrics_port = 0\nqueue_timeout = {queue_timeout}\ndb_path = \"{root}/s.db\"\nbackup_dir = \"{root}/b\"\nencryption_key = \"{}\"\n{upstream}",
            crate::helpers::TEST_KEY,
        )
    };
    std::fs::write(&file, text(30)).unwrap();
    let sources = sidecar::settings::Sources {
        file: Some(file.clone()),
        env: false,
        inline: None,
    };
    let settings = sidecar::settings::Settings::load(&sources).unwrap();
    let app = crate::helpers::start_gateway(mock, std::sync::Arc::new(dir), settings)
        .await
        .unwrap();
    let config = || app.admin("GET", "/config", None, None);
    let c = config().await.body;
    assert_eq!(
        (
            c["queue_timeout"].as_f64(),
            c["sources"]["queue_timeout"].as_str()
        ),
        (Some(30.0), Some("file"))
    );
    assert_eq!(c["sources"]["cooldown_max"], "default");

    // SIGHUP/reload applies a top-level key (it used to be ignored).
    std::fs::write(&file, text(7)).unwrap();
    let r = app.admin("POST", "/reload", None, None).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(config().await.body["queue_timeout"], 7.0);

    // An override wins over the file, even across a reload…
    let r = app
        .admin("PATCH", "/config", Some(json!({"queue_timeout": 2})), None)
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    std::fs::write(&file, text(9)).unwrap();
    app.admin("POST", "/reload", None, None).await;
    let c = config().await.body;
    assert_eq!(c["queue_timeout"], 2.0);
    assert_eq!(c["sources"]["queue_timeout"], "override");
    assert_eq!(
        c["configured"]["queue_timeout"], 9.0,
        "what the file says is shown too"
    );
    // …until cleared: then the file's value is back.
    let r = app
        .admin(
            "PATCH",
            "/config",
            Some(json!({"queue_timeout": null})),
            None,
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let c = config().await.body;
    assert_eq!(
        (
            c["queue_timeout"].as_f64(),
            c["sources"]["queue_timeout"].as_str()
        ),
        (Some(9.0), Some("file"))
    );
    // DELETE clears every override at once.
    app.admin(
        "PATCH",
        "/config",
        Some(json!({"cooldown_base": 1, "queue_max": 9})),
        None,
    )
    .await;
    assert_eq!(config().await.body["sources"]["queue_max"], "override");
    let r = app.admin("DELETE", "/config", None, None).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let c = config().await.body;
    assert_eq!(c["overrides"], json!({}));
    assert_eq!(c["sources"]["queue_max"], "default");
    eprintln!(
        "precedence: file 30 → reload 7 → override 2 (file 9) → cleared 9; DELETE clears all"
    );
    app.stop().await;
}
