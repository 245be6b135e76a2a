use std::collections::BTreeMap;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use sidecar::cli::demo::{self, DemoOptions};
use sidecar::ops::telemetry;
use sidecar::settings::{Settings, Sources};
use sidecar::sim::{MockConfig, MockKey, MockUpstream};
use sidecar::startup::Application;
use sidecar::store::keys;
use sidecar_actors::db::{self, KeyRing};

#[derive(Parser)]
#[command(
    name = "sidecar",
    version,
    about = "OpenAI-compatible gateway that pools many rate-limited LLM API keys"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway.
    Serve {
        /// TOML config file; SIDECAR_* environment variables override it.
        #[arg(long, short, env = "SIDECAR_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Run the gateway against a simulated upstream with a traffic generator.
    Demo {
        #[arg(long, default_value_t = 9190)]
        port: u16,
        /// Requests per second the built-in traffic generator sends (0: none).
        #[arg(long, default_value_t = 2.0)]
        rps: f64,
    },
    /// Run the simulated OpenAI-compatible upstream.
    MockUpstream {
        #[arg(long, default_value = "127.0.0.1")]
        host: String,
        #[arg(long, default_value_t = 9300)]
        port: u16,
        /// Keys as KEY[:LIMIT[:FAULT]] (FAULT: none, 401, 500, 429, hang, reset), comma separated.
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "mock-key-1:40,mock-key-2:40"
        )]
        keys: Vec<MockKey>,
        /// Rolling window for the per-key limits, seconds.
        #[arg(long, default_value_t = 60.0)]
        window: f64,
        #[arg(long, default_value_t = 0)]
        latency_ms: u64,
        #[arg(long, default_value_t = 5)]
        chunks: u32,
        #[arg(long, default_value_t = 10)]
        chunk_ms: u64,
        /// Model ids the upstream lists.
        #[arg(long, value_delimiter = ',', default_value = "mock-model")]
        models: Vec<String>,
    },
    /// Validate a config file (and the environment) without serving.
    CheckConfig {
        #[arg(long, short, env = "SIDECAR_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Print the SHA-256 of a client key, for `[[client_keys]] key_sha256`.
    HashKey { key: String },
    /// Print a new random encryption key (64 hex characters).
    Keygen,
    /// Re-encrypt every stored API key under a new encryption key, in one transaction.
    RotateKey {
        #[arg(long, short, env = "SIDECAR_CONFIG")]
        config: Option<PathBuf>,
        /// File holding the new key (64 hex characters; `sidecar keygen > FILE`).
        #[arg(long)]
        new_key_file: PathBuf,
    },
    /// Import the old provisioning list (providers.yaml); running it twice changes nothing.
    Import {
        file: PathBuf,
        #[arg(long, short, env = "SIDECAR_CONFIG")]
        config: Option<PathBuf>,
        /// Extra models for every imported backend, CANONICAL=NATIVE, comma separated.
        #[arg(long, value_delimiter = ',')]
        models: Vec<String>,
    },
    /// Write a checked backup of the database now.
    Backup {
        #[arg(long, short, env = "SIDECAR_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Replace the database with a backup (stop the gateway first).
    Restore {
        file: PathBuf,
        #[arg(long, short, env = "SIDECAR_CONFIG")]
        config: Option<PathBuf>,
    },
}

fn load(config: Option<PathBuf>) -> anyhow::Result<Settings> {
    let file = config.or_else(|| {
        let default = PathBuf::from("config/sidecar.toml");
        default.exists().then_some(default)
    });
    Ok(Settings::load(&Sources {
        file,
        env: true,
        inline: None,
    })?)
}

/// Opens the database with the configured key, proving it with the canary.
fn open_db(settings: &Settings) -> anyhow::Result<(diesel::SqliteConnection, KeyRing)> {
    let (ring, source) = keys::resolve(settings)?;
    let mut conn = db::open(&settings.storage.db_path)?;
    ring.check_canary(&mut conn)
        .map_err(|e| anyhow::anyhow!("{e} (key from {})", source.describe()))?;
    Ok((conn, ring))
}

fn rotate_key(config: Option<PathBuf>, new_key_file: &std::path::Path) -> anyhow::Result<()> {
    let settings = load(config)?;
    let (mut conn, old) = open_db(&settings)?;
    let text = std::fs::read_to_string(new_key_file)
        .with_context(|| format!("cannot read {}", new_key_file.display()))?;
    let new =
        KeyRing::from_hex(&text).map_err(|e| anyhow::anyhow!("{}: {e}", new_key_file.display()))?;
    let n = db::backends::rotate_key(&mut conn, &old, &new)?;
    println!(
        "re-encrypted {n} key(s) under the key in {}. Start sidecar with that key from now on \
         (SIDECAR_ENCRYPTION_KEY_FILE={} or the systemd credential); the old key no longer opens this database.",
        new_key_file.display(),
        new_key_file.display()
    );
    Ok(())
}

fn import(
    config: Option<PathBuf>,
    file: &std::path::Path,
    models: &[String],
) -> anyhow::Result<()> {
    let settings = load(config)?;
    let mut extra = BTreeMap::new();
    for m in models {
        let (c, n) = m
            .split_once('=')
            .ok_or_else(|| anyhow::anyhow!("--models takes CANONICAL=NATIVE, got {m:?}"))?;
        extra.insert(c.trim().to_string(), n.trim().to_string());
    }
    let backends = sidecar::cli::import::parse(
        file,
        settings.limits.default_rpm,
        settings.limits.default_timeout,
        &extra,
    )?;
    let (mut conn, ring) = open_db(&settings)?;
    let r = sidecar::cli::import::import(&mut conn, &ring, &backends)?;
    println!(
        "{}: {} added, {} updated, {} unchanged (database {})",
        file.display(),
        r.added,
        r.updated,
        r.unchanged,
        settings.storage.db_path.display()
    );
    Ok(())
}

fn backup(config: Option<PathBuf>) -> anyhow::Result<()> {
    let settings = load(config)?;
    let mut conn = db::open(&settings.storage.db_path)?;
    let r = db::backup::backup(
        &mut conn,
        &settings.storage.backup_dir,
        settings.storage.backup_retention_days,
    )?;
    println!(
        "backup {} ({} bytes, integrity ok, {} old copies removed)",
        r.path.display(),
        r.bytes,
        r.removed.len()
    );
    Ok(())
}

fn serve(config: Option<PathBuf>) -> anyhow::Result<()> {
    let settings = load(config)?;
    let log = telemetry::build_logger(settings.logging.level, settings.logging.json);
    actix_web::rt::System::new().block_on(async move {
        let listener = proxy_listener(&settings, &log)?;
        let app = Application::build(&settings, listener, log).await?;
        app.run_until_stopped().await?;
        Ok(())
    })
}

/// The proxy's socket: the one systemd passed (socket activation: the
/// kernel holds new connections while the gateway restarts), or our own.
fn proxy_listener(settings: &Settings, log: &slog::Logger) -> anyhow::Result<TcpListener> {
    let mut fds = listenfd::ListenFd::from_env();
    if let Some(l) = fds
        .take_tcp_listener(0)
        .context("the socket systemd passed (LISTEN_FDS) is not a TCP listener")?
    {
        slog::info!(log, "listening on the socket systemd passed";
            "address" => l.local_addr().map(|a| a.to_string()).unwrap_or_default());
        return Ok(l);
    }
    TcpListener::bind((settings.server.host, settings.server.port)).with_context(|| {
        format!(
            "cannot listen on {}:{}",
            settings.server.host, settings.server.port
        )
    })
}

/// What `check-config` shows: the effective settings after layering, keys masked.
fn print_settings(s: &Settings) {
    let t = &s.limits.tuning;
    println!(
        "{}: ok — {} backend(s), {} client key(s), listening on {}:{}",
        s.source,
        s.backends.len(),
        s.client_keys.len(),
        s.server.host,
        s.server.port
    );
    println!(
        "window {:?} (+{:?} margin), cooldown {:?}..{:?}, queue {} for up to {:?}, max_attempts {}",
        t.window,
        t.window_margin,
        t.cooldown_base,
        t.cooldown_max,
        t.queue_max,
        t.queue_timeout,
        s.limits.max_attempts
    );
    for b in &s.backends {
        let mut models: Vec<String> = b
            .models
            .iter()
            .map(|(c, r)| format!("{c}→{}", r.native))
            .collect();
        models.sort();
        println!(
            "  {} [{}] {} key {} rpm {} burst {}{} models {}",
            b.name,
            b.pool.as_str(),
            b.base_url,
            b.api_key.masked(),
            b.rpm_limit,
            b.burst,
            if b.enabled { "" } else { " (disabled)" },
            models.join(", ")
        );
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve { config } => serve(config),
        Command::CheckConfig { config } => load(config).map(|s| print_settings(&s)),
        Command::Demo { port, rps } => {
            let log = telemetry::build_logger(slog::Level::Info, false);
            actix_web::rt::System::new().block_on(demo::run(DemoOptions { port, rps }, log))
        }
        Command::MockUpstream {
            host,
            port,
            keys,
            window,
            latency_ms,
            chunks,
            chunk_ms,
            models,
        } => actix_web::rt::System::new().block_on(async move {
            let listener = TcpListener::bind((host.as_str(), port))
                .with_context(|| format!("cannot listen on {host}:{port}"))?;
            let mock = MockUpstream::start(
                MockConfig {
                    keys,
                    window: Duration::try_from_secs_f64(window.max(0.001))
                        .context("--window must be a number of seconds")?,
                    latency: Duration::from_millis(latency_ms),
                    chunks,
                    chunk_interval: Duration::from_millis(chunk_ms),
                    models,
                },
                listener,
            )?;
            println!(
                "mock upstream on {} (stats: GET /_mock/stats)",
                mock.base_url().replace("127.0.0.1", &host)
            );
            mock.run().await?;
            Ok(())
        }),
        Command::Keygen => {
            println!("{}", KeyRing::generate_hex());
            Ok(())
        }
        Command::RotateKey {
            config,
            new_key_file,
        } => rotate_key(config, &new_key_file),
        Command::Import {
            file,
            config,
            models,
        } => import(config, &file, &models),
        Command::Backup { config } => backup(config),
        Command::Restore { file, config } => load(config).and_then(|s| {
            sidecar_actors::db::backup::restore(&file, &s.storage.db_path)?;
            println!(
                "restored {} into {}",
                file.display(),
                s.storage.db_path.display()
            );
            Ok(())
        }),
        Command::HashKey { key } => {
            println!("{}", hex::encode(sidecar::proxy::client_keys::sha256(&key)));
            Ok(())
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sidecar: {e:#}");
            ExitCode::FAILURE
        }
    }
}
