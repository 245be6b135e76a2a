pub mod health;
pub mod models;
pub mod proxy;
pub mod stream;
