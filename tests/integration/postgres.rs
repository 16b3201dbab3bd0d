//! A real PostgreSQL server on loopback for the tests, one per test process.
//!
//! `VQCLIP_TEST_POSTGRES_URL` (an administrator's URL, e.g. `postgres://postgres@127.0.0.1/postgres`)
//! points the tests at a running server. Without it the first test that needs one starts a
//! private server from the installed binaries (`initdb`, `postgres`; Debian's `postgresql`
//! package) in a temporary data directory on a free port, with `fsync` off. The server lives as
//! long as the test process: a shell holds it and stops it (and removes the directory) when the
//! test process's end of a pipe closes, so nothing outlives the run, even a killed one.
//!
//! Each test gets its own freshly created database on that server.

use std::io::{BufRead as _, BufReader, Write as _};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use sqlx::Connection as _;

/// The environment variable naming a server to use instead of starting one.
pub const URL_VAR: &str = "VQCLIP_TEST_POSTGRES_URL";

/// The server every test in this process shares.
struct Server {
    /// An administrator's URL, ending in the `postgres` database.
    admin_url: url::Url,
    /// The shell that owns a private server; kept so its stdin stays open.
    _keeper: Option<Mutex<Child>>,
}

static SERVER: OnceLock<Result<Server, String>> = OnceLock::new();
static DATABASES: AtomicU32 = AtomicU32::new(0);

/// The URL of a new, empty database on the shared server.
pub async fn new_database() -> url::Url {
    let server = SERVER
        .get_or_init(|| start().map_err(|e| format!("{e:#}")))
        .as_ref()
        .unwrap_or_else(|e| panic!("no PostgreSQL server for the tests: {e}"));
    create_database(&server.admin_url).await
}

/// Creates a database with a name of its own on the server of `admin_url`; returns its URL.
async fn create_database(admin_url: &url::Url) -> url::Url {
    let name = format!(
        "vqclip_test_{}_{}",
        std::process::id(),
        DATABASES.fetch_add(1, Ordering::SeqCst)
    );
    let mut admin = connect_retrying(admin_url, Duration::from_secs(30))
        .await
        .expect("connect to the test server");
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut admin)
        .await
        .expect("create a test database");
    admin.close().await.ok();
    let mut url = admin_url.clone();
    url.set_path(&name);
    url
}

async fn connect_retrying(
    url: &url::Url,
    patience: Duration,
) -> anyhow::Result<sqlx::PgConnection> {
    let deadline = Instant::now() + patience;
    loop {
        match sqlx::PgConnection::connect(url.as_str()).await {
            Ok(conn) => return Ok(conn),
            Err(e) if Instant::now() < deadline => {
                tracing::debug!(error = %e, "test server not ready yet");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

fn start() -> anyhow::Result<Server> {
    use anyhow::Context as _;
    if let Ok(url) = std::env::var(URL_VAR) {
        let admin_url = url::Url::parse(&url).with_context(|| format!("{URL_VAR} is not a URL"))?;
        return Ok(Server {
            admin_url,
            _keeper: None,
        });
    }
    let cluster = Cluster::init(&std::process::id().to_string())?;
    // The shell starts the server, waits for its stdin to close (this process ending), then
    // stops the server and removes the directory.
    let script = format!(
        "'{postgres}' -D '{data}' {options} >'{dir}/server.log' 2>&1 & pid=$!; \
         echo started; read _ignored; kill -INT $pid; wait $pid; rm -rf '{dir}'",
        postgres = cluster.bin.join("postgres").display(),
        data = cluster.data.display(),
        options = cluster.server_options(),
        dir = cluster.dir.display(),
    );
    let mut keeper = command(cluster.as_user, Path::new("sh"))
        .args(["-c", &script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("start the test server")?;
    let mut line = String::new();
    BufReader::new(keeper.stdout.take().context("keeper stdout")?)
        .read_line(&mut line)
        .context("wait for the test server to start")?;
    anyhow::ensure!(line.trim() == "started", "the test server did not start");
    // Keep our end of the pipe open for as long as the process lives.
    if let Some(stdin) = keeper.stdin.as_mut() {
        stdin.flush().ok();
    }
    Ok(Server {
        admin_url: cluster.admin_url()?,
        _keeper: Some(Mutex::new(keeper)),
    })
}

/// A data directory made by `initdb` in a temporary directory of its own, and the loopback port
/// its server listens on.
struct Cluster {
    /// Where `initdb`, `postgres` and `pg_ctl` are.
    bin: PathBuf,
    /// The user the server runs as (`postgres` when the tests run as root: the server refuses
    /// root).
    as_user: Option<&'static str>,
    /// The temporary directory: the data directory, the socket and the log.
    dir: PathBuf,
    data: PathBuf,
    port: u16,
}

impl Cluster {
    fn init(name: &str) -> anyhow::Result<Self> {
        use anyhow::Context as _;
        let bin = find_binaries().ok_or_else(|| {
            anyhow::anyhow!(
                "PostgreSQL's server programs (initdb, postgres) are not installed; install them \
                 (Debian: apt-get install postgresql) or set {URL_VAR} to a running server"
            )
        })?;
        let as_user = running_as_root().then_some("postgres");
        let dir = std::env::temp_dir().join(format!("vqclip-test-pg-{name}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).context("create the test server's directory")?;
        if let Some(user) = as_user {
            let status = Command::new("chown")
                .args([user, dir.to_str().unwrap_or_default()])
                .status()
                .context("chown the test server's directory")?;
            anyhow::ensure!(status.success(), "chown {user} {} failed", dir.display());
        }
        let data = dir.join("data");
        let output = command(as_user, &bin.join("initdb"))
            .args([
                "-D",
                path_str(&data)?,
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
            ])
            .arg("--no-sync")
            .output()
            .context("run initdb")?;
        anyhow::ensure!(
            output.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        Ok(Self {
            bin,
            as_user,
            dir,
            data,
            port: free_port()?,
        })
    }

    /// The server's command-line options: loopback only, and no durability (a test database).
    fn server_options(&self) -> String {
        format!(
            "-k '{dir}' -h 127.0.0.1 -p {port} -c fsync=off -c synchronous_commit=off \
             -c full_page_writes=off -c max_connections=300",
            dir = self.dir.display(),
            port = self.port,
        )
    }

    fn admin_url(&self) -> anyhow::Result<url::Url> {
        Ok(url::Url::parse(&format!(
            "postgres://postgres@127.0.0.1:{}/postgres",
            self.port
        ))?)
    }

    /// Runs `pg_ctl ARGS` on this cluster, waiting for it to finish.
    fn pg_ctl(&self, args: &[&str]) {
        let output = command(self.as_user, &self.bin.join("pg_ctl"))
            .arg("-D")
            .arg(&self.data)
            .args(args)
            .output()
            .expect("run pg_ctl");
        assert!(
            output.status.success(),
            "pg_ctl {args:?} failed: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

/// A PostgreSQL server of one test's own, which the test may stop and start again (on the same
/// port, with the same data) to see its clients lose the server and find it back. It stops and
/// its directory goes when it drops, or when the test process ends, killed or not.
pub struct PrivateServer {
    cluster: Cluster,
    /// A shell that stops the server and removes its directory when its stdin closes.
    _keeper: Child,
}

impl PrivateServer {
    /// Creates a cluster and starts its server.
    pub fn start() -> Self {
        static SERVERS: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "{}-private-{}",
            std::process::id(),
            SERVERS.fetch_add(1, Ordering::SeqCst)
        );
        let cluster =
            Cluster::init(&name).unwrap_or_else(|e| panic!("no PostgreSQL server: {e:#}"));
        let script = format!(
            "read _ignored; '{pg_ctl}' -D '{data}' -m immediate stop >/dev/null 2>&1; rm -rf '{dir}'",
            pg_ctl = cluster.bin.join("pg_ctl").display(),
            data = cluster.data.display(),
            dir = cluster.dir.display(),
        );
        let keeper = command(cluster.as_user, Path::new("sh"))
            .args(["-c", &script])
            .stdin(Stdio::piped())
            .spawn()
            .expect("start the keeper of a private server");
        let server = Self {
            cluster,
            _keeper: keeper,
        };
        server.start_again();
        server
    }

    /// The URL of a new, empty database on this server.
    pub async fn new_database(&self) -> url::Url {
        create_database(&self.cluster.admin_url().unwrap()).await
    }

    /// Stops the server as an administrator's `pg_ctl stop` does (fast: clients are
    /// disconnected, running transactions roll back), and waits until it is down.
    pub fn stop(&self) {
        self.cluster.pg_ctl(&["-m", "fast", "-w", "stop"]);
    }

    /// Starts the stopped server again and waits until it accepts connections.
    pub fn start_again(&self) {
        let log = self.cluster.dir.join("server.log");
        let options = self.cluster.server_options();
        self.cluster.pg_ctl(&[
            "-l",
            log.to_str().expect("a UTF-8 temporary directory"),
            "-o",
            &options,
            "-w",
            "start",
        ]);
    }
}

fn command(as_user: Option<&str>, program: &Path) -> Command {
    match as_user {
        Some(user) => {
            let mut command = Command::new("runuser");
            command.args(["-u", user, "--"]).arg(program);
            command
        }
        None => Command::new(program),
    }
}

fn path_str(path: &Path) -> anyhow::Result<&str> {
    path.to_str()
        .ok_or_else(|| anyhow::anyhow!("{} is not UTF-8", path.display()))
}

fn running_as_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// `initdb` on the PATH, else the newest of Debian's `/usr/lib/postgresql/N/bin`.
fn find_binaries() -> Option<PathBuf> {
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .find(|dir| dir.join("initdb").is_file() && dir.join("postgres").is_file())
    });
    on_path.or_else(|| {
        let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
            .ok()?
            .filter_map(Result::ok)
            .filter_map(|e| {
                let version = e.file_name().to_str()?.parse().ok()?;
                let bin = e.path().join("bin");
                bin.join("initdb").is_file().then_some((version, bin))
            })
            .collect();
        versions.sort();
        versions.pop().map(|(_, bin)| bin)
    })
}

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}
