//! The database at start: where the encryption key comes from, and booting
//! the store with it.

pub mod boot;
pub mod keys;
pub mod shutdown;
