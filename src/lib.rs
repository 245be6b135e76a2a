//! sidecar: an OpenAI-compatible gateway that pools many rate-limited LLM API
//! keys behind one endpoint. The actors live in the `sidecar-actors` crate;
//! this crate is the HTTP edge around them, one room per concern (the README's
//! "How it works" walks through them).

/// The admin API under `/api/admin` and the dashboard it feeds.
pub mod admin;
/// Subcommands besides `serve`: demo, import, keys, backup and restore.
pub mod cli;
/// Metrics, health, systemd notification, logging and the events they count.
pub mod ops;
/// The OpenAI-compatible routes: prepare a request, attempt it upstream,
/// classify the answer, stream it back.
pub mod proxy;
/// The settings file and environment: raw schema, loading, validation.
pub mod settings;
/// The simulated upstream (a faithful provider with every fault we defend against).
pub mod sim;
/// Builds the HTTP servers on their listeners and wires the actors.
pub mod startup;
/// SQLite at start: migrations, the encryption key, backends loaded.
pub mod store;
/// What every route shares: the error shape and the browser guard.
pub mod web;
