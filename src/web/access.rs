//! Who may call what: the admin token and the browser policy, both
//! changeable by a reload, shared by the browser guard, the admin guard and
//! the reload itself.

use std::sync::{Arc, RwLock};

use crate::settings::Settings;

/// The origins and hosts a browser request may come from or name.
#[derive(Debug, Clone, Default)]
pub struct BrowserPolicy {
    pub allowed_origins: Vec<String>,
    pub allowed_hosts: Vec<String>,
}

impl BrowserPolicy {
    pub fn of(settings: &Settings) -> Self {
        Self {
            allowed_origins: settings.server.allowed_origins.clone(),
            allowed_hosts: settings.server.allowed_hosts.clone(),
        }
    }
}

pub struct Access {
    admin_token: RwLock<Option<String>>,
    browser: RwLock<Arc<BrowserPolicy>>,
    /// Client keys protect the proxy (fixed at start).
    pub client_keys: bool,
}

impl Access {
    pub fn new(settings: &Settings) -> Self {
        Self {
            admin_token: RwLock::new(settings.server.admin_token.clone()),
            browser: RwLock::new(Arc::new(BrowserPolicy::of(settings))),
            client_keys: !settings.client_keys.is_empty(),
        }
    }

    /// The admin token in force (a reload may change it).
    pub fn admin_token(&self) -> Option<String> {
        match self.admin_token.read() {
            Ok(t) => t.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// Whether an admin token is set (read on every request: no copy).
    pub fn has_admin_token(&self) -> bool {
        match self.admin_token.read() {
            Ok(t) => t.is_some(),
            Err(p) => p.into_inner().is_some(),
        }
    }

    pub fn set_admin_token(&self, token: Option<String>) {
        match self.admin_token.write() {
            Ok(mut t) => *t = token,
            Err(p) => *p.into_inner() = token,
        }
    }

    /// Which browser origins and host names are allowed.
    pub fn browser(&self) -> Arc<BrowserPolicy> {
        match self.browser.read() {
            Ok(b) => b.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    pub fn set_browser(&self, policy: BrowserPolicy) {
        match self.browser.write() {
            Ok(mut b) => *b = Arc::new(policy),
            Err(p) => *p.into_inner() = Arc::new(policy),
        }
    }
}
