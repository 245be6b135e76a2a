//! sidecar: an OpenAI-compatible gateway that pools many rate-limited LLM API
//! keys behind one endpoint. The actors live in the `sidecar-actors` crate;
//! this crate is the HTTP edge, configuration, the simulated upstream and the CLI.

pub mod admin;
pub mod client_keys;
pub mod configuration;
pub mod dashboard;
pub mod demo;
pub mod error;
pub mod events;
pub mod guard;
pub mod import;
pub mod keys;
pub mod metrics;
pub mod metrics_server;
pub mod mock_upstream;
pub mod notify;
pub mod persistence;
pub mod routes;
pub mod secrets;
pub mod startup;
pub mod telemetry;
pub mod upstream;
