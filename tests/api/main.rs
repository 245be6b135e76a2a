//! Integration tests: the real gateway on 127.0.0.1:0 against the project's
//! simulated upstream. They assert behaviour at the edges: counts at the
//! upstream, status codes, headers, bodies and timing bounds.

mod admin;
mod bad_input;
mod config;
mod dashboard;
mod failover;
mod hardening;
mod helpers;
mod key_state;
mod objects;
mod persistence;
mod priority;
mod process;
mod procs;
mod rate_limits;
mod replicas;
mod routes;
mod sdk;
mod spares;
mod streaming;
