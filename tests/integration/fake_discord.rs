//! A loopback Discord for the bot's tests: the REST routes the bot uses and a gateway that says
//! HELLO, answers IDENTIFY with READY, acknowledges heartbeats and delivers injected dispatches.
//! Every REST request is logged (method, path, JSON body or multipart parts, time) for
//! assertions.
//!
//! Discord's rules, enforced: every request body is validated against Discord's OpenAPI spec
//! ([`crate::discord_spec`]; a violation is answered 400 / 50035 and fails the test when the fake
//! is dropped); an interaction answered more than 3 s after its dispatch gets 404
//! with code 10062; a file over 10 MiB gets 413; a dispatch the IDENTIFY intents exclude is
//! never delivered. Faults on demand: [`FakeDiscord::rate_limit`] answers the next requests to
//! a path with 429 and `Retry-After`; [`FakeDiscord::expire_tokens_after`] makes interaction
//! tokens older than a (simulated 15-minute) lifetime answer 401 with code 50027.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{FromRequest, Multipart, Request, State};
use axum::http::{Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::{Value, json};
use tokio::sync::broadcast;

/// The application (and bot user) id the fake reports.
pub const APP_ID: u64 = 4_200_000_000_000_000_001;

/// One REST request as received.
#[derive(Debug, Clone)]
pub struct Request_ {
    /// GET, POST, …
    pub method: Method,
    /// Path under `/api/v10`.
    pub path: String,
    /// The JSON body (`payload_json` of a multipart body), or `Null`.
    pub json: Value,
    /// Names of uploaded files with their sizes.
    pub files: Vec<(String, usize)>,
    /// The uploaded files' bytes, in the order of `files`.
    pub file_bytes: Vec<Bytes>,
    /// When it arrived.
    pub at: Instant,
    /// The status it was answered with.
    pub status: u16,
}

/// Pending 429s: path fragment, how many left, Retry-After seconds.
type RateLimits = Vec<(String, usize, f64)>;

struct Shared {
    log: Mutex<Vec<Request_>>,
    dispatches: broadcast::Sender<Value>,
    identified: Mutex<Option<Value>>,
    next_id: AtomicU64,
    url: String,
    /// Interaction token → (message id of its original response, when it was answered).
    originals: Mutex<HashMap<String, (u64, Instant)>>,
    rate_limits: Mutex<RateLimits>,
    token_lifetime: Mutex<Option<Duration>>,
    /// Files served under `/attachments/<name>`.
    attachments: Mutex<HashMap<String, Vec<u8>>>,
    /// Interaction id → when it was dispatched.
    dispatched: Mutex<HashMap<String, Instant>>,
    /// Requests whose body broke Discord's OpenAPI spec, with how.
    violations: Mutex<Vec<String>>,
    /// Time from each interaction's dispatch to its first response.
    ack_latencies: Mutex<Vec<Duration>>,
    /// Channels marked age-restricted (NSFW).
    age_restricted: Mutex<Vec<String>>,
}

/// Discord's upload limit per file.
const UPLOAD_LIMIT: usize = 10 * 1024 * 1024;

/// Time Discord waits for an interaction's first response.
const ACK_WINDOW: Duration = Duration::from_secs(3);

/// Whether a connection that identified with `intents` receives `event`.
fn wanted(intents: u64, event: &Value) -> bool {
    const GUILD_MESSAGE_REACTIONS: u64 = 1 << 10;
    const DIRECT_MESSAGE_REACTIONS: u64 = 1 << 13;
    match event["t"].as_str() {
        Some(t) if t.starts_with("MESSAGE_REACTION_") => {
            let needed = if event["d"]["guild_id"].is_null() {
                DIRECT_MESSAGE_REACTIONS
            } else {
                GUILD_MESSAGE_REACTIONS
            };
            intents & needed != 0
        }
        _ => true,
    }
}

/// A running fake Discord.
#[derive(Clone)]
pub struct FakeDiscord {
    /// Base URL, e.g. `http://127.0.0.1:PORT` (what `discord.api_base` points at).
    pub url: String,
    shared: Arc<Shared>,
}

impl FakeDiscord {
    /// Starts serving on an ephemeral loopback port.
    pub async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let shared = Arc::new(Shared {
            log: Mutex::default(),
            // Room for a burst of interactions (the load test sends 200 at once).
            dispatches: broadcast::channel(4096).0,
            identified: Mutex::default(),
            next_id: AtomicU64::new(1_300_000_000_000_000_000),
            url: url.clone(),
            originals: Mutex::default(),
            rate_limits: Mutex::default(),
            token_lifetime: Mutex::default(),
            attachments: Mutex::default(),
            dispatched: Mutex::default(),
            violations: Mutex::default(),
            ack_latencies: Mutex::default(),
            age_restricted: Mutex::default(),
        });
        let app = Router::new()
            .route("/ws", get(gateway))
            .fallback(rest)
            .with_state(shared.clone());
        tokio::spawn(async move { axum::serve(listener, app).await });
        Self { url, shared }
    }

    /// Every REST request so far.
    pub fn log(&self) -> Vec<Request_> {
        self.shared.log.lock().unwrap().clone()
    }

    /// The IDENTIFY payload, once the bot has connected.
    pub fn identified(&self) -> Option<Value> {
        self.shared.identified.lock().unwrap().clone()
    }

    /// Sends a gateway dispatch (`t`, `d`) to connected clients.
    pub fn dispatch(&self, event: &str, data: Value) {
        if event == "INTERACTION_CREATE"
            && let Some(id) = data["id"].as_str()
        {
            self.shared
                .dispatched
                .lock()
                .unwrap()
                .insert(id.to_owned(), Instant::now());
        }
        let _ = self
            .shared
            .dispatches
            .send(json!({ "op": 0, "t": event, "s": 2, "d": data }));
    }

    /// Time from each interaction's dispatch to its first response, in answer order.
    pub fn ack_latencies(&self) -> Vec<Duration> {
        self.shared.ack_latencies.lock().unwrap().clone()
    }

    /// A fresh snowflake.
    pub fn id(&self) -> u64 {
        self.shared.next_id.fetch_add(1, Ordering::SeqCst)
    }

    /// Answers the next `count` requests whose path contains `path` with 429 Too Many Requests
    /// and `Retry-After: retry_after` (seconds), as Discord does.
    pub fn rate_limit(&self, path: &str, count: usize, retry_after: f64) {
        self.shared
            .rate_limits
            .lock()
            .unwrap()
            .push((path.to_owned(), count, retry_after));
    }

    /// From now on, interaction tokens answered longer ago than `lifetime` are refused with
    /// 401 / 50027 (Discord's 15 minutes, shortened).
    pub fn expire_tokens_after(&self, lifetime: Duration) {
        *self.shared.token_lifetime.lock().unwrap() = Some(lifetime);
    }

    /// Marks channel `id` age-restricted: `GET /channels/{id}` says `nsfw: true`.
    pub fn age_restrict(&self, id: &str) {
        self.shared
            .age_restricted
            .lock()
            .unwrap()
            .push(id.to_owned());
    }

    /// Serves `bytes` as an attachment; returns its URL.
    pub fn attach(&self, name: &str, bytes: Vec<u8>) -> String {
        self.shared
            .attachments
            .lock()
            .unwrap()
            .insert(name.to_owned(), bytes);
        format!("{}/attachments/{name}", self.url)
    }
}

impl Drop for FakeDiscord {
    /// A test whose bot sent Discord a body its spec forbids fails, even if the bot coped with
    /// the 400 it got.
    fn drop(&mut self) {
        let broken = self.shared.violations.lock().unwrap().clone();
        if !broken.is_empty() && !std::thread::panicking() {
            panic!(
                "the bot sent requests that break Discord's OpenAPI spec:\n{}",
                broken.join("\n")
            );
        }
    }
}

/// A user object.
pub fn user(id: u64, name: &str, bot: bool) -> Value {
    json!({ "id": id.to_string(), "username": name, "discriminator": "0",
            "global_name": name, "avatar": null, "bot": bot })
}

/// A message object by the bot.
pub fn message(id: u64, channel: &str, content: &Value) -> Value {
    json!({
        "id": id.to_string(), "channel_id": channel, "author": user(APP_ID, "vqclip", true),
        "content": content.as_str().unwrap_or(""), "timestamp": "2026-11-26T00:00:00.000000+00:00",
        "edited_timestamp": null, "tts": false, "mention_everyone": false, "mentions": [],
        "mention_roles": [], "attachments": [], "embeds": [], "pinned": false, "type": 0
    })
}

async fn gateway(ws: WebSocketUpgrade, State(shared): State<Arc<Shared>>) -> Response {
    ws.on_upgrade(move |socket| session(socket, shared))
}

async fn session(mut socket: WebSocket, shared: Arc<Shared>) {
    let hello = json!({ "op": 10, "d": { "heartbeat_interval": 45000 } });
    if socket
        .send(Message::Text(hello.to_string().into()))
        .await
        .is_err()
    {
        return;
    }
    let mut dispatches = shared.dispatches.subscribe();
    loop {
        tokio::select! {
            incoming = socket.recv() => {
                let Some(Ok(Message::Text(text))) = incoming else { return };
                let Ok(payload) = serde_json::from_str::<Value>(&text) else { continue };
                let reply = match payload["op"].as_u64() {
                    Some(1) => json!({ "op": 11 }),
                    Some(2) => {
                        *shared.identified.lock().unwrap() = Some(payload["d"].clone());
                        json!({ "op": 0, "t": "READY", "s": 1, "d": {
                            "v": 10, "user": user(APP_ID, "vqclip", true), "guilds": [],
                            "session_id": "fake-session",
                            "resume_gateway_url": shared.url.replace("http", "ws") + "/ws",
                            "application": { "id": APP_ID.to_string(), "flags": 0 }
                        }})
                    }
                    _ => continue,
                };
                if socket.send(Message::Text(reply.to_string().into())).await.is_err() {
                    return;
                }
            }
            event = dispatches.recv() => {
                let Ok(event) = event else { return };
                let intents = shared.identified.lock().unwrap().as_ref()
                    .and_then(|i| i["intents"].as_u64()).unwrap_or(0);
                if !wanted(intents, &event) {
                    continue;
                }
                if socket.send(Message::Text(event.to_string().into())).await.is_err() {
                    return;
                }
            }
        }
    }
}

async fn rest(State(shared): State<Arc<Shared>>, request: Request) -> Response {
    // Paths arrive percent-encoded (reaction emoji); the log and routes use them decoded.
    let method = request.method().clone();
    let path = percent_decode(request.uri().path().trim_start_matches("/api/v10"));
    let is_multipart = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("multipart/"));
    let mut json = Value::Null;
    let mut files = Vec::new();
    let mut file_bytes = Vec::new();
    if is_multipart {
        let Ok(mut form) = Multipart::from_request(request, &()).await else {
            return StatusCode::BAD_REQUEST.into_response();
        };
        while let Ok(Some(field)) = form.next_field().await {
            let name = field.name().unwrap_or_default().to_owned();
            let file = field.file_name().map(str::to_owned);
            let data = field.bytes().await.unwrap_or_default();
            match file {
                Some(file) => {
                    files.push((file, data.len()));
                    file_bytes.push(data);
                }
                None if name == "payload_json" => {
                    json = serde_json::from_slice(&data).unwrap_or(Value::Null)
                }
                None => {}
            }
        }
    } else {
        let body = Bytes::from_request(request, &()).await.unwrap_or_default();
        json = serde_json::from_slice(&body).unwrap_or(Value::Null);
    }
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let broken = crate::discord_spec::violations(method.as_str(), &parts, &json);
    if !broken.is_empty() {
        shared
            .violations
            .lock()
            .unwrap()
            .push(format!("{method} {path}: {}", broken.join("; ")));
    }
    let response = if !broken.is_empty() {
        (
            StatusCode::BAD_REQUEST,
            axum::Json(json!({ "code": 50035, "message": "Invalid Form Body",
                               "errors": broken })),
        )
            .into_response()
    } else if files.iter().any(|(_, size)| *size > UPLOAD_LIMIT) {
        error(
            StatusCode::PAYLOAD_TOO_LARGE,
            40005,
            "Request entity too large",
        )
    } else {
        answer(&shared, &method, &parts, &json)
    };
    shared.log.lock().unwrap().push(Request_ {
        method: method.clone(),
        path: path.clone(),
        json: json.clone(),
        files,
        file_bytes,
        at: Instant::now(),
        status: response.status().as_u16(),
    });
    response
}

fn error(status: StatusCode, code: u64, message: &str) -> Response {
    (
        status,
        axum::Json(json!({ "code": code, "message": message })),
    )
        .into_response()
}

fn answer(shared: &Shared, method: &Method, parts: &[&str], json: &Value) -> Response {
    let path = parts.join("/");
    {
        let mut limits = shared.rate_limits.lock().unwrap();
        if let Some(limit) = limits
            .iter_mut()
            .find(|(fragment, left, _)| *left > 0 && path.contains(fragment.as_str()))
        {
            limit.1 -= 1;
            let retry = limit.2;
            return (
                StatusCode::TOO_MANY_REQUESTS,
                [("retry-after", format!("{}", retry.ceil() as u64))],
                axum::Json(json!({ "message": "You are being rate limited.",
                                   "retry_after": retry, "global": false })),
            )
                .into_response();
        }
    }
    if let ["webhooks", _, token, ..] = parts {
        let lifetime = *shared.token_lifetime.lock().unwrap();
        let answered = shared.originals.lock().unwrap().get(*token).map(|o| o.1);
        if let (Some(lifetime), Some(at)) = (lifetime, answered)
            && at.elapsed() > lifetime
        {
            return error(StatusCode::UNAUTHORIZED, 50027, "Invalid Webhook Token");
        }
    }
    let ws = shared.url.replace("http", "ws") + "/ws";
    let new_id = || shared.next_id.fetch_add(1, Ordering::SeqCst);
    let body = match (method.as_str(), parts) {
        ("GET", ["gateway"]) => json!({ "url": ws }),
        ("GET", ["gateway", "bot"]) => json!({ "url": ws, "shards": 1, "session_start_limit":
            { "total": 1000, "remaining": 1000, "reset_after": 0, "max_concurrency": 1 } }),
        ("PUT", ["applications", _, "commands"])
        | ("PUT", ["applications", _, "guilds", _, "commands"]) => json!([]),
        ("GET", ["attachments", name]) => {
            return match shared.attachments.lock().unwrap().get(*name) {
                Some(bytes) => bytes.clone().into_response(),
                None => StatusCode::NOT_FOUND.into_response(),
            };
        }
        ("POST", ["interactions", id, token, "callback"]) => {
            let dispatched = shared.dispatched.lock().unwrap().get(*id).copied();
            if let Some(at) = dispatched {
                shared.ack_latencies.lock().unwrap().push(at.elapsed());
            }
            if dispatched.is_some_and(|at| at.elapsed() > ACK_WINDOW) {
                return error(StatusCode::NOT_FOUND, 10062, "Unknown interaction");
            }
            // A message response becomes the interaction's original message, in the
            // interaction's channel (900 unless the test's interaction says otherwise).
            if matches!(json["type"].as_u64(), Some(4 | 5)) {
                shared
                    .originals
                    .lock()
                    .unwrap()
                    .insert((*token).to_owned(), (new_id(), Instant::now()));
            }
            return StatusCode::NO_CONTENT.into_response();
        }
        ("DELETE", ["webhooks", _, token, "messages", "@original"]) => {
            if shared.originals.lock().unwrap().remove(*token).is_none() {
                return error(StatusCode::NOT_FOUND, 10008, "Unknown Message");
            }
            return StatusCode::NO_CONTENT.into_response();
        }
        ("POST", ["webhooks", _, _token]) => message(new_id(), "900", &json["content"]),
        ("GET", ["channels", id]) => {
            let nsfw = shared
                .age_restricted
                .lock()
                .unwrap()
                .iter()
                .any(|c| c == id);
            json!({ "id": id, "type": 0, "guild_id": "1", "name": "art", "position": 0,
                    "permission_overwrites": [], "nsfw": nsfw })
        }
        (_, ["webhooks", _, token, "messages", "@original"]) => {
            let Some((id, _)) = shared.originals.lock().unwrap().get(*token).copied() else {
                return error(StatusCode::NOT_FOUND, 10008, "Unknown Message");
            };
            message(id, "900", &json["content"])
        }
        ("POST", ["channels", channel, "messages"]) => message(new_id(), channel, &json["content"]),
        ("PATCH", ["channels", channel, "messages", id]) => {
            message(id.parse().unwrap_or(0), channel, &json["content"])
        }
        ("DELETE", ["channels", _, "messages", _])
        | ("PUT", ["channels", _, "messages", _, "reactions", _, "@me"]) => {
            return StatusCode::NO_CONTENT.into_response();
        }
        _ => return error(StatusCode::NOT_FOUND, 0, "404: Not Found"),
    };
    axum::Json(body).into_response()
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}
