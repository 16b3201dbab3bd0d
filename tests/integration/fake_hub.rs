//! A Hugging Face Hub double on loopback: the file-resolve protocol `hf-hub` speaks (ranged GET
//! of `/{owner}/{name}/resolve/{revision}/{file}` answered with ETag, X-Repo-Commit and
//! Content-Range), with a request log and switchable faults.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri, header};
use axum::response::Response;
use sha2::{Digest, Sha256};

/// The commit every served revision resolves to.
pub const COMMIT: &str = "1111111111111111111111111111111111111111";

/// One request as the hub saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    /// Repository, file, and the decoded revision.
    pub repo: String,
    /// File path in the repository.
    pub file: String,
    /// Revision as decoded from the URL.
    pub revision: String,
    /// The requested byte range, inclusive, as asked (before clamping).
    pub range: Option<(u64, u64)>,
    /// The Authorization header, if any.
    pub authorization: Option<String>,
}

struct Served {
    bytes: Vec<u8>,
    /// What the hub claims the file's SHA-256 is (normally the truth).
    etag: String,
    /// Bearer token required to read it.
    token: Option<String>,
}

#[derive(Default)]
struct HubState {
    files: Mutex<HashMap<(String, String, String), Served>>,
    log: Mutex<Vec<Seen>>,
    /// Data requests (not the 0-0 probe) still answered before every later one fails with 500.
    budget: Mutex<Option<usize>>,
    answered: AtomicUsize,
}

/// A running fake hub; it stops when the test's runtime ends.
#[derive(Clone)]
pub struct FakeHub {
    /// Base URL, e.g. `http://127.0.0.1:PORT`.
    pub url: String,
    state: Arc<HubState>,
}

/// Lowercase hex SHA-256.
pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

impl FakeHub {
    /// Starts serving on an ephemeral loopback port.
    pub async fn start() -> Self {
        let state = Arc::new(HubState::default());
        let app = Router::new().fallback(serve).with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind loopback");
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        Self { url, state }
    }

    /// Publishes `bytes` as `file` of `repo` at `revision`, with its true digest.
    pub fn publish(&self, repo: &str, revision: &str, file: &str, bytes: Vec<u8>) {
        let etag = sha256_hex(&bytes);
        self.publish_as(repo, revision, file, bytes, etag, None);
    }

    /// Publishes with a chosen digest claim and an optional required token.
    pub fn publish_as(
        &self,
        repo: &str,
        revision: &str,
        file: &str,
        bytes: Vec<u8>,
        etag: String,
        token: Option<&str>,
    ) {
        self.state.files.lock().unwrap().insert(
            (repo.into(), revision.into(), file.into()),
            Served {
                bytes,
                etag,
                token: token.map(str::to_owned),
            },
        );
    }

    /// After `n` more data requests succeed, every later one fails with HTTP 500; `None` heals.
    pub fn fail_after(&self, n: Option<usize>) {
        *self.state.budget.lock().unwrap() = n;
    }

    /// Every request so far.
    pub fn log(&self) -> Vec<Seen> {
        self.state.log.lock().unwrap().clone()
    }

    /// Forgets the request log.
    pub fn clear_log(&self) {
        self.state.log.lock().unwrap().clear();
    }

    /// Data requests answered with content so far.
    pub fn answered(&self) -> usize {
        self.state.answered.load(Ordering::SeqCst)
    }
}

fn status(code: StatusCode) -> Response {
    Response::builder()
        .status(code)
        .body(Body::empty())
        .unwrap()
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let Some(Ok(b)) = text.get(i + 1..i + 3).map(|h| u8::from_str_radix(h, 16))
        {
            out.push(b);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn parse_range(headers: &HeaderMap) -> Option<(u64, u64)> {
    let text = headers.get(header::RANGE)?.to_str().ok()?;
    let (a, b) = text.strip_prefix("bytes=")?.split_once('-')?;
    Some((a.parse().ok()?, b.parse().ok()?))
}

async fn serve(State(state): State<Arc<HubState>>, uri: Uri, headers: HeaderMap) -> Response {
    // /{owner}/{name}/resolve/{revision}/{file…}; the revision arrives percent-encoded.
    let parts: Vec<&str> = uri.path().trim_start_matches('/').splitn(5, '/').collect();
    let [owner, name, "resolve", revision, file] = parts.as_slice() else {
        return status(StatusCode::NOT_FOUND);
    };
    let seen = Seen {
        repo: format!("{owner}/{name}"),
        file: percent_decode(file),
        revision: percent_decode(revision),
        range: parse_range(&headers),
        authorization: headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
    };
    state.log.lock().unwrap().push(seen.clone());
    let files = state.files.lock().unwrap();
    let Some(served) = files.get(&(seen.repo.clone(), seen.revision.clone(), seen.file.clone()))
    else {
        return status(StatusCode::NOT_FOUND);
    };
    if let Some(token) = &served.token
        && seen.authorization.as_deref() != Some(&format!("Bearer {token}"))
    {
        return status(StatusCode::UNAUTHORIZED);
    }
    let len = served.bytes.len() as u64;
    let (start, end) = seen.range.unwrap_or((0, len.saturating_sub(1)));
    let probe = seen.range == Some((0, 0));
    if !probe {
        let mut budget = state.budget.lock().unwrap();
        match budget.as_mut() {
            Some(0) => return status(StatusCode::INTERNAL_SERVER_ERROR),
            Some(n) => *n -= 1,
            None => {}
        }
        state.answered.fetch_add(1, Ordering::SeqCst);
    }
    // A range past the end is clamped, as HTTP servers do.
    let end = end.min(len.saturating_sub(1));
    if start > end {
        return status(StatusCode::RANGE_NOT_SATISFIABLE);
    }
    let body = served.bytes[start as usize..=end as usize].to_vec();
    Response::builder()
        .status(StatusCode::PARTIAL_CONTENT)
        .header(header::ETAG, format!("\"{}\"", served.etag))
        .header("x-repo-commit", COMMIT)
        .header(header::CONTENT_RANGE, format!("bytes {start}-{end}/{len}"))
        .header(header::CONTENT_LENGTH, body.len())
        .body(Body::from(body))
        .unwrap()
}
