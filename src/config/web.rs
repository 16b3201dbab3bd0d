//! `[web]`: the HTTP server for health checks, metrics and the web gallery (read in `raw`,
//! validated in `validate`).

use std::net::SocketAddr;

use serde::Serialize;
use url::Url;

/// `[web]`, validated.
#[derive(Debug, Clone, Default, Serialize)]
pub struct WebSettings {
    /// Where the server listens (`host:port`); `None` (the default): no server.
    pub listen: Option<SocketAddr>,
    /// The address people reach the server at (behind a reverse proxy), for links.
    pub public_url: Option<Url>,
}
