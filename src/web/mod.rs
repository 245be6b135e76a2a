//! What the proxy and the admin API share at the HTTP edge.

pub mod access;
pub mod error;
pub mod guard;
