//! Builds the key manager the config names; the rest of the server only sees the trait.

use std::sync::Arc;

use ztid_hsm::{KeyManager, SoftwareKeyManager};

use crate::config::ServerConfig;
use crate::{Error, Result};

/// The configured key manager.
pub fn key_manager(config: &ServerConfig) -> Result<Arc<dyn KeyManager>> {
    match config.key_manager.as_str() {
        "software" => Ok(Arc::new(SoftwareKeyManager::open(
            config.data_dir.join("keys"),
        )?)),
        other => Err(Error::Config(format!(
            "key_manager {other:?} is not available in this build"
        ))),
    }
}
