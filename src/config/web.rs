//! `[web]`: the HTTP server for health checks, metrics and the web gallery (read in `raw`,
//! validated in `validate`).

use std::net::SocketAddr;

use serde::Serialize;
use url::Url;

/// `[web]`, validated.
#[derive(Debug, Clone, Serialize)]
pub struct WebSettings {
    /// Where the server listens (`host:port`); `None` (the default): no server.
    pub listen: Option<SocketAddr>,
    /// The address people reach the server at (behind a reverse proxy), for links.
    pub public_url: Option<Url>,
    /// `vqclip serve` serves the web gallery there too (the default); `false` keeps the server to
    /// health checks and metrics.
    pub gallery: bool,
}

/// The web gallery's page of job `job` under `public_url` (the server's address, a directory).
pub fn image_page(public_url: &Url, job: crate::jobs::JobId) -> Option<Url> {
    public_url.join(&format!("i/{}", job.0)).ok()
}

/// The web gallery's page of guild `guild` under `public_url`.
pub fn gallery_page(public_url: &Url, guild: u64) -> Option<Url> {
    public_url.join(&format!("g/{guild}")).ok()
}
