//! A headless Chromium page driven over the DevTools protocol (Debian's `chromium`, which
//! `scripts/test` installs): navigate, run script, wait for a condition, take screenshots,
//! and every URL the page asked for.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::io::AsyncBufReadExt;
use tokio_tungstenite::tungstenite::Message;

use super::plain_get;

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// One page of a headless Chromium, driven over the DevTools protocol.
pub struct Browser {
    _child: tokio::process::Child,
    _profile: tempfile::TempDir,
    ws: Ws,
    next: AtomicU64,
    /// Every URL the page asked for (Network.requestWillBeSent).
    pub requests: Vec<String>,
}

impl Browser {
    pub async fn start() -> Browser {
        let profile = tempfile::tempdir().unwrap();
        let mut child = tokio::process::Command::new("chromium")
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--remote-debugging-port=0",
                "--window-size=1200,900",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("chromium is not installed: run scripts/test, which installs it");
        let mut lines = tokio::io::BufReader::new(child.stderr.take().unwrap()).lines();
        let browser_ws = tokio::time::timeout(Duration::from_secs(30), async {
            while let Ok(Some(line)) = lines.next_line().await {
                if let Some(at) = line.find("ws://") {
                    return line[at..].trim().to_string();
                }
            }
            panic!("chromium ended without a DevTools address");
        })
        .await
        .expect("chromium did not start in 30 s");
        // Keep reading its stderr, so it never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        let port: u16 = browser_ws["ws://127.0.0.1:".len()..]
            .split('/')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        let list = plain_get(
            format!("127.0.0.1:{port}").parse().unwrap(),
            "/json/list",
            &format!("127.0.0.1:{port}"),
        )
        .await
        .1;
        let targets: serde_json::Value = serde_json::from_str(&list).unwrap();
        let page_ws = targets
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["type"] == "page")
            .expect("a page target")["webSocketDebuggerUrl"]
            .as_str()
            .unwrap()
            .to_string();
        let (ws, _) = tokio_tungstenite::connect_async(page_ws).await.unwrap();
        let mut b = Browser {
            _child: child,
            _profile: profile,
            ws,
            next: AtomicU64::new(1),
            requests: Vec::new(),
        };
        b.call("Network.enable", serde_json::json!({})).await;
        b.call("Page.enable", serde_json::json!({})).await;
        b
    }

    /// Sends a command and waits for its answer (events on the way are kept).
    pub async fn call(&mut self, method: &str, params: serde_json::Value) -> serde_json::Value {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let msg = serde_json::json!({ "id": id, "method": method, "params": params });
        self.ws
            .send(Message::Text(msg.to_string().into()))
            .await
            .unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let frame = tokio::time::timeout_at(deadline, self.ws.next())
                .await
                .unwrap_or_else(|_| panic!("no answer to {method}"))
                .unwrap()
                .unwrap();
            let Message::Text(text) = frame else { continue };
            let v: serde_json::Value = serde_json::from_str(&text).unwrap();
            if v["method"] == "Network.requestWillBeSent" {
                if let Some(url) = v["params"]["request"]["url"].as_str() {
                    self.requests.push(url.to_string());
                }
            }
            if v["id"] == id {
                assert!(v.get("error").is_none(), "{method}: {v}");
                return v["result"].clone();
            }
        }
    }

    /// Runs `js` in the page (awaiting a promise) and returns its value.
    pub async fn eval(&mut self, js: &str) -> serde_json::Value {
        let r = self
            .call(
                "Runtime.evaluate",
                serde_json::json!({ "expression": js, "awaitPromise": true, "returnByValue": true }),
            )
            .await;
        r["result"]["value"].clone()
    }

    /// Waits until `js` is true in the page.
    pub async fn until(&mut self, js: &str) -> bool {
        for _ in 0..100 {
            if self.eval(js).await == serde_json::Value::Bool(true) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        false
    }

    pub async fn open(&mut self, url: &str) {
        self.call("Page.navigate", serde_json::json!({ "url": url }))
            .await;
        assert!(
            self.until(
                "document.readyState === 'complete' && !!document.querySelector('#signin-form')"
            )
            .await,
            "the console did not load"
        );
    }

    pub async fn text(&mut self, selector: &str) -> String {
        let js = format!("(document.querySelector({selector:?}) || {{}}).textContent || ''");
        self.eval(&js).await.as_str().unwrap_or("").to_string()
    }
}

impl Browser {
    /// Signs in to the console open in the page with `token`.
    pub async fn sign_in(&mut self, token: &str) {
        self.eval(&format!(
            "document.querySelector('#token').value = {token:?}; \
             document.querySelector('#signin-form').requestSubmit(); true"
        ))
        .await;
        assert!(
            self.until("document.querySelector('#message').textContent === 'Signed in.'")
                .await,
            "{}",
            self.text("#message").await
        );
    }
}
