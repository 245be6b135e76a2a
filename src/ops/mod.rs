//! Operating the gateway: what it counts, logs and tells systemd.

pub mod events;
pub mod health;
pub mod metrics;
pub mod metrics_server;
pub mod notify;
pub mod recent;
pub mod request_line;
pub mod telemetry;
