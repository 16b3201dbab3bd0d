//! The long-running processes: `vqclip serve` (the scheduler and the bot in front of it) and
//! `vqclip worker` (a host's devices on the shared queue). Startup, the intake loop that feeds the
//! scheduler from the database (jobs and cancels other processes put there), and a shutdown that
//! ends within the grace period plus a few seconds whatever the database does.
//!
//! Knows the scheduler, the store and the bot; not the command line, which parses arguments and
//! loads the configuration before calling in.

use std::time::Duration;

use crate::config::Settings;
use crate::jobs::scheduler::{ClaimOptions, SchedulerOptions};
use crate::jobs::{Scheduler, devices};
use crate::models::ModelKind;
use crate::store::{self, Store, Timestamp};

/// The configured database, created and migrated when `create`, else required to exist.
pub(crate) async fn open_database(settings: &Settings, create: bool) -> anyhow::Result<Store> {
    let location = &settings.storage.database;
    // Reading must not conjure an empty database in the wrong directory.
    if let Some(path) = location.sqlite_path()
        && !create
        && !path.exists()
    {
        anyhow::bail!(
            "no database at {} (storage.database); run `vqclip db migrate` to create one",
            path.display()
        );
    }
    let pool = store::connect(location).await?;
    store::migrate(&pool).await?;
    Ok(pool)
}

/// Until `stop` resolves: picks up jobs and cancels other processes put in the database, and
/// logs a status line when jobs move.
///
/// `stop` ends it even in the middle of a database call: with the database unreachable each
/// call waits for the pool's acquire timeout, and SIGTERM must not wait behind them.
async fn poll_store(
    scheduler: &Scheduler,
    pool: &Store,
    settings: &Settings,
    stop: impl std::future::Future<Output = ()>,
) {
    tokio::select! {
        () = stop => {}
        () = poll_forever(scheduler, pool, settings) => {}
    }
}

/// The loop of [`poll_store`].
async fn poll_forever(scheduler: &Scheduler, pool: &Store, settings: &Settings) {
    // On PostgreSQL new work is announced: claim it at once rather than at the next tick.
    let mut queued =
        match store::events::Listener::connect(pool, store::events::QUEUE_CHANNEL).await {
            Ok(listener) => Some(listener),
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for queued jobs; polling only");
                None
            }
        };
    let poll = Duration::from_millis(settings.scheduler.poll_interval_ms);
    let mut tick = tokio::time::interval(poll);
    // After a slow round (an unreachable database) one poll follows, not a burst of them.
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut since = Timestamp::now();
    let mut last_shape = String::new();
    let mut last_log = std::time::Instant::now();
    loop {
        let announced = async {
            match queued.as_mut() {
                Some(listener) => listener.next().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = announced => {
                if let Err(e) = scheduler.load_queued().await {
                    let described = pool.describe(e.as_ref()).await;
                    tracing::error!(error = %described, "cannot claim queued jobs");
                }
            }
            _ = tick.tick() => {
                // Jobs and cancels may come from other processes (`jobs submit`, the bot).
                let now = Timestamp::now();
                if let Err(e) = scheduler.load_queued().await {
                    let described = pool.describe(e.as_ref()).await;
                    tracing::error!(error = %described, "cannot read queued jobs");
                }
                if let Err(e) = scheduler.apply_cancels_since(since.minus(Duration::from_secs(1))).await {
                    let described = pool.describe(e.as_ref()).await;
                    tracing::error!(error = %described, "cannot read cancelled jobs");
                }
                since = now;
                // A line when jobs move, else at most every half minute while busy.
                let snapshot = scheduler.snapshot();
                let shape = format!("{:?}", snapshot.waiting)
                    + &snapshot.devices.iter().map(|d| match &d.state {
                        crate::jobs::scheduler::DeviceState::Busy { job, .. } => job.to_string(),
                        other => format!("{other:?}"),
                    }).collect::<String>();
                let busy = !snapshot.waiting.is_empty()
                    || snapshot.devices.iter().any(|d| d.state != crate::jobs::scheduler::DeviceState::Idle);
                if shape != last_shape || (busy && last_log.elapsed() >= Duration::from_secs(30)) {
                    tracing::info!(status = %status_line(&snapshot), "scheduler");
                    last_shape = shape;
                    last_log = std::time::Instant::now();
                }
            }
        }
    }
}

/// One line for the log: the queue and what each device is doing.
fn status_line(snapshot: &crate::jobs::Snapshot) -> String {
    use crate::jobs::scheduler::DeviceState;
    let devices: Vec<String> = snapshot
        .devices
        .iter()
        .map(|d| match &d.state {
            DeviceState::Idle => format!("{} idle", d.label),
            DeviceState::Busy {
                job,
                iteration,
                total,
                rate,
                ..
            } => format!("{} job {job} {iteration}/{total} ({rate:.2} it/s)", d.label),
            DeviceState::OutOfService { reason } => {
                format!("{} OUT OF SERVICE ({reason})", d.label)
            }
        })
        .collect();
    format!("{} waiting; {}", snapshot.waiting.len(), devices.join("; "))
}

/// Starts listening for a stop request (Ctrl-C, or SIGTERM on Unix) now, and returns a future
/// that resolves when one arrives.
///
/// The handlers are installed before this returns, not when the future is first polled: a
/// SIGTERM that comes while the process is still starting (its first job may already be
/// claimed) must stop it gracefully, not kill it with the default action.
fn stop_signal() -> impl std::future::Future<Output = ()> + Send + 'static {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{Signal, SignalKind, signal};
        // Installing fails only when the runtime has no signal driver, which ours always has;
        // a stream that cannot be had then never fires, and the other still can.
        let term = signal(SignalKind::terminate())
            .inspect_err(|e| tracing::warn!(error = %e, "cannot listen for SIGTERM"))
            .ok();
        let interrupt = signal(SignalKind::interrupt())
            .inspect_err(|e| tracing::warn!(error = %e, "cannot listen for Ctrl-C"))
            .ok();
        async fn next(signal: Option<Signal>) {
            match signal {
                Some(mut signal) => {
                    signal.recv().await;
                }
                None => std::future::pending().await,
            }
        }
        async move {
            tokio::select! {
                () = next(term) => {}
                () = next(interrupt) => {}
            }
        }
    }
    #[cfg(not(unix))]
    {
        // `ctrl_c` registers its handler on first poll; start it now on a task for the same
        // reason as above.
        let pressed = tokio::spawn(tokio::signal::ctrl_c());
        async move {
            let _ = pressed.await;
        }
    }
}

/// `vqclip serve`: the scheduler and its workers, and the bot in front of them.
///
/// On PostgreSQL, or with no devices of its own (`scheduler.devices = []`), the bot works on the
/// shared queue: it queues requests in the database for every worker (its own devices, if any,
/// are one more), and follows their progress there.
pub async fn serve(settings: Settings) -> anyhow::Result<()> {
    let stop = stop_signal();
    let pool = open_database(&settings, true).await?;
    let devices::EngineSlots { slots, auto } =
        devices::engine_slots(&settings, tokio::runtime::Handle::current())?;
    let mut options = SchedulerOptions::from_settings(&settings);
    options.auto = auto;
    if pool.backend() == store::Backend::Postgres || slots.is_empty() {
        let mut claims = worker_claims(&settings);
        claims.follow = Some(Duration::from_millis(settings.scheduler.poll_interval_ms));
        tracing::info!(
            backend = %pool.backend(),
            devices = slots.len(),
            worker = %claims.worker_id,
            "serving the shared queue: jobs run on any vqclip worker"
        );
        options.claims = Some(claims);
    }
    let scheduler = Scheduler::start(pool.clone(), options, slots).await?;
    let settings = std::sync::Arc::new(settings);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let poller = {
        let scheduler = scheduler.clone();
        let settings = settings.clone();
        let pool = pool.clone();
        let mut stop_rx = stop_rx.clone();
        tokio::spawn(async move {
            poll_store(&scheduler, &pool, &settings, async move {
                let _ = stop_rx.wait_for(|stop| *stop).await;
            })
            .await;
        })
    };
    let gateway = crate::bot::Gateway::default();
    let web = start_web(
        &settings,
        crate::web::WebState {
            store: pool.clone(),
            scheduler: scheduler.clone(),
            gateway: Some(gateway.clone()),
            gallery: settings.web.gallery.then(|| {
                crate::web::GallerySite::new(
                    settings.storage.images.clone(),
                    settings.web.public_url.clone(),
                )
            }),
        },
        stop_rx.clone(),
    )
    .await;
    let web = match web {
        Ok(web) => web,
        Err(e) => {
            scheduler.shutdown(Duration::ZERO).await;
            close_after_shutdown(&pool).await;
            return Err(e);
        }
    };
    let mut bot_stop = stop_rx;
    let bot = crate::bot::run(
        settings.clone(),
        pool.clone(),
        scheduler.clone(),
        gateway,
        async move {
            let _ = bot_stop.wait_for(|stop| *stop).await;
        },
    );
    tokio::pin!(bot);
    let result = tokio::select! {
        result = &mut bot => result,
        () = stop => {
            let _ = stop_tx.send(true);
            bot.await
        }
    };
    let _ = stop_tx.send(true);
    let _ = poller.await;
    let grace = Duration::from_secs(settings.scheduler.shutdown_grace_seconds);
    scheduler.shutdown(grace).await;
    if let Some(web) = web {
        let _ = web.await;
    }
    close_after_shutdown(&pool).await;
    result
}

/// Starts the web server when `[web] listen` is set, stopping when `stop` turns true.
async fn start_web(
    settings: &Settings,
    state: crate::web::WebState,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<Option<tokio::task::JoinHandle<()>>> {
    let Some(listen) = settings.web.listen else {
        return Ok(None);
    };
    let stopped = async move {
        let _ = stop.wait_for(|stop| *stop).await;
    };
    let (_, task) = crate::web::start(listen, state, stopped).await?;
    Ok(Some(task))
}

/// Closes the pool at the end of `serve` or `worker`, waiting a few seconds at most for
/// connections in use: a database that stopped answering must not keep the process alive.
async fn close_after_shutdown(pool: &Store) {
    if tokio::time::timeout(Duration::from_secs(3), pool.close())
        .await
        .is_err()
    {
        tracing::warn!(database = %pool.location(), "database connections still busy at exit; leaving them");
    }
}

/// This process's identity and capabilities on the shared queue.
fn worker_claims(settings: &Settings) -> ClaimOptions {
    let mut claims =
        ClaimOptions::for_this_process(Duration::from_secs(settings.scheduler.lease_seconds));
    claims.vqgan_models = Some(runnable_models(settings, ModelKind::Vqgan));
    claims.clip_models = Some(runnable_models(settings, ModelKind::Clip));
    claims
}

/// The ids of the models of `kind` this host can load: those with weights configured or on the
/// Hub, and the tiny test models when allowed.
fn runnable_models(settings: &Settings, kind: ModelKind) -> Vec<String> {
    crate::models::ids_of(kind)
        .into_iter()
        .filter_map(crate::models::find)
        .filter(|m| settings.models.source(m).is_some() || (m.tiny && settings.models.allow_tiny))
        .map(|m| m.id.to_owned())
        .collect()
}

/// `vqclip worker`: this host's devices taking jobs from the shared queue until SIGTERM or
/// Ctrl-C, then a bounded shutdown.
pub async fn worker(settings: Settings) -> anyhow::Result<()> {
    let stop = stop_signal();
    let pool = open_database(&settings, true).await?;
    let slots = devices::engine_slots(&settings, tokio::runtime::Handle::current())?.slots;
    anyhow::ensure!(
        !slots.is_empty(),
        "a worker needs devices: scheduler.devices is empty (set it, e.g. [\"auto\"])"
    );
    let labels: Vec<String> = slots.iter().map(|s| s.label.clone()).collect();
    let mut options = SchedulerOptions::from_settings(&settings);
    let claims = worker_claims(&settings);
    let worker_id = claims.worker_id.clone();
    options.claims = Some(claims);
    let scheduler = Scheduler::start(pool.clone(), options, slots).await?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let state = crate::web::WebState {
        store: pool.clone(),
        scheduler: scheduler.clone(),
        gateway: None,
        gallery: None,
    };
    let web = match start_web(&settings, state, stop_rx).await {
        Ok(web) => web,
        Err(e) => {
            scheduler.shutdown(Duration::ZERO).await;
            close_after_shutdown(&pool).await;
            return Err(e);
        }
    };
    eprintln!(
        "worker {worker_id}: {} on {}, taking jobs from the {} queue at {}; images in {}. \
         Ctrl-C stops.",
        if labels.len() == 1 {
            "1 device".to_owned()
        } else {
            format!("{} devices", labels.len())
        },
        labels.join(", "),
        pool.backend(),
        pool.location(),
        settings.storage.images.display()
    );
    poll_store(&scheduler, &pool, &settings, stop).await;
    let grace = Duration::from_secs(settings.scheduler.shutdown_grace_seconds);
    eprintln!(
        "stopping: running jobs have {} s to finish, then are queued again",
        grace.as_secs()
    );
    scheduler.shutdown(grace).await;
    let _ = stop_tx.send(true);
    if let Some(web) = web {
        let _ = web.await;
    }
    close_after_shutdown(&pool).await;
    Ok(())
}
