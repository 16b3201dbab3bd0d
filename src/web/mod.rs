//! The HTTP server of `vqclip serve` and `vqclip worker` (`[web] listen`, off by default):
//! `/healthz`, `/readyz` and `/metrics` for the people who run the bot, and in `serve` the web
//! gallery (`gallery`) for everyone.
//!
//! Built on axum (already the fake Discord's server in the tests), on the process's tokio
//! runtime; it stops with the process. Every answer is small and bounded: nothing here reads a
//! request body.

use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

mod gallery;
mod pages;

pub use gallery::{GallerySite, MAX_PAGE, MAX_SEARCH_CHARS, PAGE_SIZE};

use crate::bot::Gateway;
use crate::jobs::Scheduler;
use crate::jobs::scheduler::DeviceState;
use crate::store::Store;

/// How long `/readyz` and `/metrics` wait for the database before calling it unreachable.
const DATABASE_WAIT: Duration = Duration::from_secs(3);

/// What the handlers look at.
#[derive(Clone)]
pub struct WebState {
    /// The database.
    pub store: Store,
    /// This process's scheduler (its queue and devices).
    pub scheduler: Scheduler,
    /// The bot's gateway connection (`serve`); `None` for a worker, which has none.
    pub gateway: Option<Gateway>,
    /// The web gallery (`serve`); `None` for a worker, which serves only its health and metrics.
    pub gallery: Option<GallerySite>,
}

/// The routes.
pub fn router(state: WebState) -> Router {
    let operator = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics));
    let routes = if state.gallery.is_some() {
        operator.merge(gallery::routes())
    } else {
        operator
    };
    routes.with_state(state)
}

/// Binds `listen` (an error names the address and `web.listen`) and serves until `stop`
/// resolves; returns the bound address and the server's task.
pub async fn start(
    listen: SocketAddr,
    state: WebState,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {listen} (web.listen): {e}"))?;
    let bound = listener.local_addr()?;
    let app = router(state);
    let task = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app)
            .with_graceful_shutdown(stop)
            .await
        {
            tracing::error!(error = %e, "the web server stopped");
        }
    });
    tracing::info!(address = %bound, "web server listening");
    Ok((bound, task))
}

/// The process is up and answering.
async fn healthz() -> &'static str {
    "ok\n"
}

/// One check of `/readyz`: its name, whether it passed, and what was seen.
struct Check {
    name: &'static str,
    ok: bool,
    detail: String,
}

/// Ready when the database answers, some device can run jobs (or, with none here, the shared
/// queue — the database — is reachable) and, for `serve`, the Discord gateway is connected.
/// 200 or 503, one line per check.
async fn readyz(State(state): State<WebState>) -> Response {
    let database = database_reachable(&state.store).await;
    let mut checks = vec![Check {
        name: "database",
        ok: database.is_ok(),
        detail: match &database {
            Ok(()) => "reachable".to_owned(),
            Err(e) => e.clone(),
        },
    }];
    let devices = state.scheduler.snapshot().devices;
    let in_service = devices
        .iter()
        .filter(|d| !matches!(d.state, DeviceState::OutOfService { .. }))
        .count();
    checks.push(if devices.is_empty() {
        Check {
            name: "devices",
            ok: database.is_ok(),
            detail: "none here: jobs run on the shared queue's workers".to_owned(),
        }
    } else {
        Check {
            name: "devices",
            ok: in_service > 0,
            detail: format!("{in_service} of {} in service", devices.len()),
        }
    });
    if let Some(gateway) = &state.gateway {
        let connected = gateway.connected().await;
        checks.push(Check {
            name: "discord",
            ok: connected,
            detail: if connected {
                "gateway connected".to_owned()
            } else {
                "gateway not connected".to_owned()
            },
        });
    }
    let ready = checks.iter().all(|c| c.ok);
    let mut body = String::from(if ready { "ready\n" } else { "not ready\n" });
    for c in &checks {
        let mark = if c.ok { "ok" } else { "FAIL" };
        body.push_str(&format!("{}: {mark} ({})\n", c.name, c.detail));
    }
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, [(header::CACHE_CONTROL, "no-store")], body).into_response()
}

/// `SELECT 1` within [`DATABASE_WAIT`]; the error in words otherwise.
async fn database_reachable(store: &Store) -> Result<(), String> {
    let ping = sqlx::query("SELECT 1").execute(store.pool());
    match tokio::time::timeout(DATABASE_WAIT, ping).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => {
            crate::metrics::global().database_errors.inc();
            Err(format!("unreachable: {e}"))
        }
        Err(_) => {
            crate::metrics::global().database_errors.inc();
            Err(format!("no answer within {} s", DATABASE_WAIT.as_secs()))
        }
    }
}

/// Every metric, the scrape-time ones read now. A database that does not answer leaves the job
/// counts out (and counts an error) rather than failing the scrape.
async fn metrics(State(state): State<WebState>) -> Response {
    let m = crate::metrics::global();
    let counts = tokio::time::timeout(
        DATABASE_WAIT,
        crate::store::jobs::count_by_status_and_kind(&state.store),
    )
    .await;
    m.jobs.clear();
    match counts {
        Ok(Ok(rows)) => {
            for (status, kind, count) in rows {
                m.jobs
                    .get_or_create(&crate::metrics::JobLabels { status, kind })
                    .set(count);
            }
        }
        Ok(Err(e)) => {
            m.database_errors.inc();
            tracing::warn!(error = %e, "metrics: cannot count the jobs");
        }
        Err(_) => {
            m.database_errors.inc();
            tracing::warn!("metrics: the database did not answer");
        }
    }
    let snapshot = state.scheduler.snapshot();
    m.set_queue(snapshot.waiting.iter().map(|&(_, user)| user));
    m.device_state.clear();
    m.device_iterations_per_second.clear();
    for d in &snapshot.devices {
        let (state_name, rate) = match &d.state {
            DeviceState::Idle => ("idle", 0.0),
            DeviceState::Busy { rate, .. } => ("busy", *rate),
            DeviceState::OutOfService { .. } => ("out_of_service", 0.0),
        };
        m.device_state
            .get_or_create(&crate::metrics::DeviceStateLabels {
                device: d.label.clone(),
                state: state_name,
            })
            .set(1);
        m.device_iterations_per_second
            .get_or_create(&crate::metrics::DeviceLabels {
                device: d.label.clone(),
            })
            .set(rate);
    }
    (
        [
            (header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE),
            (header::CACHE_CONTROL, "no-store"),
        ],
        m.encode(),
    )
        .into_response()
}
