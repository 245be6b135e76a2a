//! The subcommands a user runs besides `serve`.

pub mod demo;
pub mod import;
