//! A loopback Discord for the bot's tests: the REST routes the bot uses and a gateway that says
//! HELLO, answers IDENTIFY with READY, acknowledges heartbeats and delivers injected dispatches.
//! Every REST request is logged (method, path, JSON body or multipart parts) for assertions.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

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
}

struct Shared {
    log: Mutex<Vec<Request_>>,
    dispatches: broadcast::Sender<Value>,
    identified: Mutex<Option<Value>>,
    next_id: AtomicU64,
    url: String,
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
            dispatches: broadcast::channel(64).0,
            identified: Mutex::default(),
            next_id: AtomicU64::new(1_300_000_000_000_000_000),
            url: url.clone(),
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
        let _ = self
            .shared
            .dispatches
            .send(json!({ "op": 0, "t": event, "s": 2, "d": data }));
    }

    /// A fresh snowflake.
    pub fn id(&self) -> u64 {
        self.shared.next_id.fetch_add(1, Ordering::SeqCst)
    }
}

/// A user object.
pub fn user(id: u64, name: &str, bot: bool) -> Value {
    json!({ "id": id.to_string(), "username": name, "discriminator": "0",
            "global_name": name, "avatar": null, "bot": bot })
}

fn message(id: u64, channel: &str, content: &Value) -> Value {
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
                if socket.send(Message::Text(event.to_string().into())).await.is_err() {
                    return;
                }
            }
        }
    }
}

async fn rest(State(shared): State<Arc<Shared>>, request: Request) -> Response {
    let method = request.method().clone();
    let path = request
        .uri()
        .path()
        .trim_start_matches("/api/v10")
        .to_owned();
    let is_multipart = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("multipart/"));
    let mut json = Value::Null;
    let mut files = Vec::new();
    if is_multipart {
        let Ok(mut form) = Multipart::from_request(request, &()).await else {
            return StatusCode::BAD_REQUEST.into_response();
        };
        while let Ok(Some(field)) = form.next_field().await {
            let name = field.name().unwrap_or_default().to_owned();
            let file = field.file_name().map(str::to_owned);
            let data = field.bytes().await.unwrap_or_default();
            match file {
                Some(file) => files.push((file, data.len())),
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
    shared.log.lock().unwrap().push(Request_ {
        method: method.clone(),
        path: path.clone(),
        json: json.clone(),
        files,
    });
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let ws = shared.url.replace("http", "ws") + "/ws";
    let new_id = || shared.next_id.fetch_add(1, Ordering::SeqCst);
    let body = match (method.as_str(), parts.as_slice()) {
        ("GET", ["gateway"]) => json!({ "url": ws }),
        ("GET", ["gateway", "bot"]) => json!({ "url": ws, "shards": 1, "session_start_limit":
            { "total": 1000, "remaining": 1000, "reset_after": 0, "max_concurrency": 1 } }),
        ("PUT", ["applications", _, "commands"])
        | ("PUT", ["applications", _, "guilds", _, "commands"]) => json!([]),
        ("POST", ["interactions", _, _, "callback"]) => {
            return StatusCode::NO_CONTENT.into_response();
        }
        (_, ["webhooks", _, _, "messages", "@original"]) => {
            // The original reply lives in the DM channel 900.
            message(1_200_000_000_000_000_000, "900", &json["content"])
        }
        ("POST", ["channels", channel, "messages"]) => message(new_id(), channel, &json["content"]),
        ("PATCH", ["channels", channel, "messages", id]) => {
            message(id.parse().unwrap_or(0), channel, &json["content"])
        }
        _ => {
            return (
                StatusCode::NOT_FOUND,
                axum::Json(json!({ "code": 0, "message": "404: Not Found" })),
            )
                .into_response();
        }
    };
    axum::Json(body).into_response()
}
