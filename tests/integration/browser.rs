//! A headless Chromium driven over the DevTools protocol (a WebSocket of JSON commands): load a
//! page, click an element as a mouse would, read the page with JavaScript, take a screenshot.
//!
//! Chromium is Debian's `chromium` package (`.ci/run` installs it), or the program
//! `VQCLIP_CHROMIUM` names.

use std::process::Stdio;
use std::time::{Duration, Instant};

use base64::Engine as _;
use futures_util::{SinkExt as _, StreamExt as _};
use serde_json::{Value, json};
use tokio::io::AsyncBufReadExt as _;
use tokio_tungstenite::tungstenite::Message;

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// How long a page may take to load, or Chromium to start.
const WAIT: Duration = Duration::from_secs(60);

/// A running headless Chromium with one page.
pub struct Browser {
    _process: tokio::process::Child,
    _profile: tempfile::TempDir,
    socket: Socket,
    next_id: u64,
    /// The page's session, once attached: commands without one go to the browser.
    session: Option<String>,
}

fn program() -> String {
    if let Ok(path) = std::env::var("VQCLIP_CHROMIUM") {
        return path;
    }
    for name in ["chromium", "chromium-browser", "google-chrome"] {
        let found = std::process::Command::new("sh")
            .args(["-c", &format!("command -v {name}")])
            .output()
            .is_ok_and(|o| o.status.success());
        if found {
            return name.to_owned();
        }
    }
    panic!(
        "the browser test needs Chromium: install Debian's `chromium` package (.ci/run does) \
         or set VQCLIP_CHROMIUM to a Chromium or Chrome program"
    );
}

impl Browser {
    /// Starts Chromium headless, `width`×`height` CSS pixels, and connects to its page.
    pub async fn launch(width: u32, height: u32) -> Self {
        let profile = tempfile::tempdir().unwrap();
        let mut process = tokio::process::Command::new(program())
            .args([
                "--headless=new",
                // Tests may run as root (CI containers), where the sandbox cannot start; the
                // pages are the test's own, on loopback.
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--hide-scrollbars",
                "--remote-debugging-port=0",
                &format!("--window-size={width},{height}"),
                &format!("--user-data-dir={}", profile.path().display()),
                "about:blank",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("start Chromium");
        let mut lines = tokio::io::BufReader::new(process.stderr.take().unwrap()).lines();
        let endpoint = tokio::time::timeout(WAIT, async {
            while let Some(line) = lines.next_line().await.unwrap() {
                if let Some(url) = line.strip_prefix("DevTools listening on ") {
                    return url.trim().to_owned();
                }
            }
            panic!("Chromium exited before listening for DevTools");
        })
        .await
        .expect("Chromium listening for DevTools within a minute");
        // Keep draining its log so it never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        let (socket, _) = tokio_tungstenite::connect_async(endpoint.as_str())
            .await
            .expect("connect to Chromium");
        let mut browser = Self {
            _process: process,
            _profile: profile,
            socket,
            next_id: 1,
            session: None,
        };
        let targets = browser.call("Target.getTargets", json!({})).await;
        let page = targets["targetInfos"]
            .as_array()
            .and_then(|t| t.iter().find(|t| t["type"] == "page"))
            .and_then(|t| t["targetId"].as_str())
            .expect("a page target")
            .to_owned();
        let attached = browser
            .call(
                "Target.attachToTarget",
                json!({ "targetId": page, "flatten": true }),
            )
            .await;
        browser.session = attached["sessionId"].as_str().map(str::to_owned);
        browser.call("Page.enable", json!({})).await;
        browser.call("Runtime.enable", json!({})).await;
        browser
    }

    /// Sends one command (to the page once attached) and waits for its result (events in between are skipped).
    pub async fn call(&mut self, method: &str, params: Value) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        let mut command = json!({ "id": id, "method": method, "params": params });
        if let Some(session) = &self.session {
            command["sessionId"] = json!(session);
        }
        self.socket
            .send(Message::text(command.to_string()))
            .await
            .unwrap();
        let answer = tokio::time::timeout(WAIT, async {
            loop {
                let message = self.socket.next().await.expect("open").expect("a message");
                let Message::Text(text) = message else {
                    continue;
                };
                let value: Value = serde_json::from_str(&text).unwrap();
                if value["id"] == id {
                    return value;
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("{method}: no answer within a minute"));
        assert!(answer["error"].is_null(), "{method}: {answer}");
        answer["result"].clone()
    }

    /// The value of a JavaScript expression (awaited if it is a promise), as JSON.
    pub async fn eval(&mut self, expression: &str) -> Value {
        let result = self
            .call(
                "Runtime.evaluate",
                json!({ "expression": expression, "returnByValue": true, "awaitPromise": true }),
            )
            .await;
        assert!(
            result["exceptionDetails"].is_null(),
            "{expression}: {result}"
        );
        result["result"]["value"].clone()
    }

    /// Waits until the page at an address containing `url_part` has loaded, with the pictures
    /// on screen (those below wait for a scroll: the gallery loads them lazily).
    pub async fn wait_for(&mut self, url_part: &str) {
        let check = format!(
            "location.href.includes({}) && document.readyState === 'complete' \
             && Array.from(document.images).filter(i => i.getBoundingClientRect().top < innerHeight) \
                    .every(i => i.complete)",
            json!(url_part)
        );
        let start = Instant::now();
        while self.eval(&check).await != json!(true) {
            if start.elapsed() > WAIT {
                let seen = self
                    .eval("[location.href, document.readyState, Array.from(document.images).map(i => [i.src, i.complete])]")
                    .await;
                panic!("{url_part} did not load within a minute: {seen}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Opens `url` and waits for it.
    pub async fn open(&mut self, url: &str) {
        self.call("Page.navigate", json!({ "url": url })).await;
        self.wait_for(url).await;
    }

    /// Clicks the middle of the first element matching `selector` with the mouse (scrolled into
    /// view first).
    pub async fn click(&mut self, selector: &str) {
        let rect = self
            .eval(&format!(
                "(() => {{ const e = document.querySelector({}); if (!e) return null; \
                 e.scrollIntoView({{block: 'center'}}); const r = e.getBoundingClientRect(); \
                 return [r.x + r.width / 2, r.y + r.height / 2]; }})()",
                json!(selector)
            ))
            .await;
        let [x, y] =
            [&rect[0], &rect[1]].map(|v| v.as_f64().unwrap_or_else(|| panic!("no {selector}")));
        for kind in ["mousePressed", "mouseReleased"] {
            self.call(
                "Input.dispatchMouseEvent",
                json!({ "type": kind, "x": x, "y": y, "button": "left", "clickCount": 1 }),
            )
            .await;
        }
    }

    /// A screenshot of the viewport.
    pub async fn screenshot(&mut self) -> image::RgbImage {
        let shot = self
            .call("Page.captureScreenshot", json!({ "format": "png" }))
            .await;
        let png = base64::engine::general_purpose::STANDARD
            .decode(shot["data"].as_str().expect("screenshot data"))
            .unwrap();
        image::load_from_memory(&png).unwrap().to_rgb8()
    }
}
