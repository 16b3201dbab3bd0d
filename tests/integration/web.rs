//! The web server (`[web] listen`): health, readiness and metrics over real HTTP, with a real
//! scheduler (fake runners) on both database backends; the metrics parsed by a Prometheus text
//! parser; readiness as a PostgreSQL server goes down and comes back.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use vqclip::jobs::Scheduler;
use vqclip::store::Store;
use vqclip::store::jobs::JobStatus;
use vqclip::web::{WebState, start};

use crate::scheduler::{FakeRunner, finished, options, slots, submit};
use crate::support::on_both_backends;

/// One HTTP/1.1 request: the status code, the head and the body's bytes.
pub(crate) async fn fetch(
    address: SocketAddr,
    method: &str,
    path: &str,
    extra_headers: &str,
) -> (u16, String, Vec<u8>) {
    let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {address}\r\n{extra_headers}Connection: close\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), stream.read_to_end(&mut raw))
        .await
        .expect("an answer within 30 s")
        .unwrap();
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a head and a body");
    let headers = String::from_utf8_lossy(&raw[..split]).into_owned();
    let status = headers[9..12].parse().unwrap();
    (status, headers, raw[split + 4..].to_vec())
}

/// One HTTP/1.1 request: the status code, the head and the body as text.
pub(crate) async fn request(
    address: SocketAddr,
    method: &str,
    path: &str,
) -> (u16, String, String) {
    let (status, headers, body) = fetch(address, method, path, "").await;
    (status, headers, String::from_utf8_lossy(&body).into_owned())
}

/// The value of the sample `name` with every label of `labels`, from a scrape.
fn sample(scrape: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let lines = scrape.lines().map(|l| Ok(l.to_owned()));
    let parsed = prometheus_parse::Scrape::parse(lines).expect("a valid exposition");
    parsed
        .samples
        .iter()
        .find(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            ref other => panic!("{name}: unexpected {other:?}"),
        })
}

async fn serve(
    db: &Store,
    scheduler: &Scheduler,
) -> (SocketAddr, tokio::sync::oneshot::Sender<()>) {
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let state = WebState {
        store: db.clone(),
        scheduler: scheduler.clone(),
        gateway: None,
        gallery: None,
    };
    let (address, _task) = start("127.0.0.1:0".parse().unwrap(), state, async move {
        let _ = stop_rx.await;
    })
    .await
    .unwrap();
    (address, stop_tx)
}

on_both_backends! {
    async fn health_readiness_and_metrics_follow_a_job(db) {
        let dir = tempfile::tempdir().unwrap();
        let runner = FakeRunner::new(5);
        let scheduler = Scheduler::start(db.clone(), options(&dir), slots(&[&runner]))
            .await
            .unwrap();
        let (address, _stop) = serve(&db, &scheduler).await;

        let (status, _, body) = request(address, "GET", "/healthz").await;
        assert_eq!((status, body.as_str()), (200, "ok\n"));
        let (status, _, body) = request(address, "GET", "/readyz").await;
        assert_eq!(status, 200, "{body}");
        assert!(body.starts_with("ready\n") && body.contains("devices: ok (1 of 1 in service)"), "{body}");

        let (status, headers, before) = request(address, "GET", "/metrics").await;
        assert_eq!(status, 200);
        assert!(headers.to_ascii_lowercase().contains("content-type: application/openmetrics-text"), "{headers}");
        let ended = |scrape: &str| {
            sample(scrape, "vqclip_jobs_ended_total", &[("status", "succeeded")]).unwrap_or(0.0)
        };
        let timed = |scrape: &str| {
            sample(scrape, "vqclip_job_duration_seconds_count", &[("status", "succeeded")])
                .unwrap_or(0.0)
        };

        let id = submit(&scheduler, 41, "a lighthouse", 3).await;
        assert_eq!(finished(&db, id).await, JobStatus::Succeeded);
        let (_, _, after) = request(address, "GET", "/metrics").await;
        // Counters are the process's: other tests may move them too, never back.
        assert!(ended(&after) >= ended(&before) + 1.0, "{after}");
        assert!(timed(&after) >= timed(&before) + 1.0, "{after}");
        assert_eq!(
            sample(&after, "vqclip_jobs", &[("status", "succeeded"), ("kind", "imagine")]),
            Some(1.0),
            "{after}"
        );
        assert_eq!(sample(&after, "vqclip_device_state", &[("device", "cpu#0"), ("state", "idle")]), Some(1.0));
        assert_eq!(sample(&after, "vqclip_queue_waiting_jobs", &[]), Some(0.0));

        // Nothing else is served; nothing reads a body.
        assert_eq!(request(address, "GET", "/../../etc/passwd").await.0, 404);
        assert_eq!(request(address, "POST", "/metrics").await.0, 405);
        assert_eq!(request(address, "GET", "/metrics?x=%00%ff&&=").await.0, 200);

        // The database stops answering: not ready (503, saying why), metrics still served.
        db.close().await;
        let (status, _, body) = request(address, "GET", "/readyz").await;
        assert_eq!(status, 503, "{body}");
        assert!(body.starts_with("not ready\n") && body.contains("database: FAIL"), "{body}");
        let (status, _, scrape) = request(address, "GET", "/metrics").await;
        assert_eq!(status, 200);
        assert!(sample(&scrape, "vqclip_database_errors_total", &[]).unwrap() >= 1.0);
        assert_eq!(sample(&scrape, "vqclip_jobs", &[("status", "succeeded"), ("kind", "imagine")]), None);
        scheduler.shutdown(Duration::from_secs(1)).await;
    }
}

#[tokio::test]
async fn a_device_out_of_service_makes_the_process_unready() {
    let (dir, db) = crate::support::test_pool().await;
    let runner = FakeRunner::new(5);
    let mut opts = options(&dir);
    opts.device_failure_limit = 1;
    let scheduler = Scheduler::start(db.clone(), opts, slots(&[&runner]))
        .await
        .unwrap();
    let (address, _stop) = serve(&db, &scheduler).await;
    let id = submit(&scheduler, 42, "fail", 2).await;
    assert_eq!(finished(&db, id).await, JobStatus::Failed);
    crate::scheduler::wait_until(|| {
        scheduler.snapshot().devices.iter().all(|d| {
            matches!(
                d.state,
                vqclip::jobs::scheduler::DeviceState::OutOfService { .. }
            )
        })
    })
    .await;
    let (status, _, body) = request(address, "GET", "/readyz").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("devices: FAIL (0 of 1 in service)"), "{body}");
    let (_, _, scrape) = request(address, "GET", "/metrics").await;
    assert_eq!(
        sample(
            &scrape,
            "vqclip_device_state",
            &[("device", "cpu#0"), ("state", "out_of_service")]
        ),
        Some(1.0)
    );
    scheduler.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn a_port_in_use_is_a_clear_error() {
    let (dir, db) = crate::support::test_pool().await;
    let runner = FakeRunner::new(5);
    let scheduler = Scheduler::start(db.clone(), options(&dir), slots(&[&runner]))
        .await
        .unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = taken.local_addr().unwrap();
    let state = WebState {
        store: db.clone(),
        scheduler: scheduler.clone(),
        gateway: None,
        gallery: None,
    };
    let error = start(address, state, std::future::pending())
        .await
        .unwrap_err();
    let text = format!("{error:#}");
    assert!(
        text.contains(&address.to_string()) && text.contains("web.listen"),
        "{text}"
    );
    scheduler.shutdown(Duration::from_secs(1)).await;
}

/// The done-when of the web server: a PostgreSQL server stopped by its administrator makes
/// `/readyz` unready (and the gallery say so), and started again, ready, without a restart of
/// ours.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_follows_the_database_server_down_and_up() {
    crate::support::init_test_log();
    let server = crate::postgres::PrivateServer::start();
    let location = vqclip::store::Location::Postgres(server.new_database().await);
    let db = vqclip::store::connect(&location).await.unwrap();
    vqclip::store::migrate(&db).await.unwrap();
    crate::web_gallery::open_gallery(&db).await;
    let job = crate::web_gallery::picture(
        &db,
        crate::web_gallery::GUILD,
        (7, "Ada"),
        "a lighthouse",
        true,
    )
    .await;
    let (address, scheduler, _dir, _stop) = crate::web_gallery::serve_gallery(&db, None).await;
    let page = format!("/i/{}", job.0);
    assert_eq!(request(address, "GET", "/readyz").await.0, 200);
    assert_eq!(request(address, "GET", &page).await.0, 200);

    tokio::task::block_in_place(|| server.stop());
    let (status, _, body) = request(address, "GET", "/readyz").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("database: FAIL"), "{body}");
    assert_eq!(request(address, "GET", &page).await.0, 503);
    let (status, _, _) = request(address, "GET", "/healthz").await;
    assert_eq!(status, 200, "the process itself is alive");

    tokio::task::block_in_place(|| server.start_again());
    let start = std::time::Instant::now();
    loop {
        let (status, _, body) = request(address, "GET", "/readyz").await;
        if status == 200 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "still unready: {body}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(request(address, "GET", &page).await.0, 200);
    scheduler.shutdown(Duration::from_secs(1)).await;
}
