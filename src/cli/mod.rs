//! The command line: `serve` and the subcommands a user runs besides it
//! (demo, import, keys, backup and restore, checks).

pub mod demo;
pub mod import;
mod ops;
mod serve;

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use sidecar_actors::db::KeyRing;

use crate::ops::telemetry;
use crate::settings::{Settings, Sources};
use crate::sim::{MockConfig, MockKey, MockUpstream};
use demo::DemoOptions;
use ops::{backup, import_file, rotate_key};
use serve::{print_settings, serve};

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

/// Parses the command line and runs the subcommand.
pub fn run() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve { config } => serve(config),
        Command::CheckConfig { config } => load(config).map(|s| print_settings(&s)),
        Command::Demo { port, rps } => {
            // Logs as `serve` does, and written out the same way at the end.
            let log = telemetry::build_logger_for_serving(slog::Level::Info, false);
            let result =
                actix_web::rt::System::new().block_on(demo::run(DemoOptions { port, rps }, log));
            telemetry::finish();
            result
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
        } => import_file(config, &file, &models),
        Command::Backup { config } => backup(config),
        Command::Restore { file, config } => load(config).and_then(|s| {
            let r = sidecar_actors::db::backup::restore(
                &file,
                &s.storage.db_path,
                &s.storage.backup_dir,
            )?;
            println!(
                "restored {} into {}",
                file.display(),
                s.storage.db_path.display()
            );
            if let Some(kept) = r.kept {
                println!("the database it replaced is kept as {}", kept.display());
            }
            Ok(())
        }),
        Command::HashKey { key } => {
            println!("{}", hex::encode(crate::proxy::client_keys::sha256(&key)));
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
