//! Real servers on 127.0.0.1 for notification tests: SMTP (tests/smtp_server.py, aiosmtpd) and a
//! webhook endpoint that records what it receives.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU16, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use super::ROOT;

/// A port for a server a test starts, from below the kernel's ephemeral range (32768 and up), so
/// that no port the kernel hands out — to another test's `bind(0)` or an outgoing connection — can
/// take it between this check and the server's own bind. Ports go up in steps of three from a start
/// that differs per process, and each is checked free together with the next two: a broker
/// (`scripts/kafka.sh`) listens on the two after its own, for its controller and for SASL (in
/// steps of two, another server of the same test process was handed the broker's SASL port).
pub fn free_port() -> u16 {
    const FIRST: u32 = 20_000;
    const SPAN: u32 = 12_000;
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    let start = FIRST + std::process::id().wrapping_mul(3 * 97) % SPAN;
    let _ = NEXT.compare_exchange(u32::MAX, start, Ordering::SeqCst, Ordering::SeqCst);
    for _ in 0..SPAN / 3 {
        let port = (FIRST + (NEXT.fetch_add(3, Ordering::SeqCst) - FIRST) % SPAN) as u16;
        if (port..port + 3).all(|p| TcpListener::bind(("127.0.0.1", p)).is_ok()) {
            return port;
        }
    }
    panic!("no three free ports in a row between {FIRST} and {}", FIRST + SPAN);
}

/// tests/smtp_server.py on `port`, storing parsed messages in `dir`.
pub struct SmtpServer {
    child: Child,
    dir: PathBuf,
}

impl SmtpServer {
    pub fn start(port: u16, dir: &Path) -> SmtpServer {
        std::fs::create_dir_all(dir).unwrap();
        let mut child = Command::new(format!("{ROOT}/.venv/bin/python"))
            .arg(format!("{ROOT}/tests/smtp_server.py"))
            .arg(port.to_string())
            .arg(dir)
            .stdout(Stdio::piped())
            .spawn()
            .expect("the test SMTP server needs .venv with aiosmtpd (scripts/test.sh installs it)");
        let mut line = String::new();
        BufReader::new(child.stdout.as_mut().unwrap()).read_line(&mut line).unwrap();
        assert_eq!(line.trim(), "ready", "SMTP server did not start");
        SmtpServer { child, dir: dir.to_path_buf() }
    }

    pub fn messages(&self) -> Vec<serde_json::Value> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(&self.dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "json"))
            .collect();
        files.sort();
        files.iter().map(|f| serde_json::from_slice(&std::fs::read(f).unwrap()).unwrap()).collect()
    }
}

impl Drop for SmtpServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A webhook receiver: records each request's headers and body, answers with `status`.
pub struct WebhookServer {
    pub port: u16,
    /// What a POST is answered; a 3xx points to `/moved`, a 4xx or 5xx says `no_service`.
    pub status: Arc<AtomicU16>,
    /// The POSTs answered 200: their head and JSON body.
    pub requests: Arc<Mutex<Vec<(String, serde_json::Value)>>>,
    /// The request lines of everything else (answered 200, as a web page would be).
    pub others: Arc<Mutex<Vec<String>>>,
}

impl WebhookServer {
    pub fn start() -> WebhookServer {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let status = Arc::new(AtomicU16::new(200));
        let requests = Arc::new(Mutex::new(Vec::new()));
        let others = Arc::new(Mutex::new(Vec::new()));
        let (answer, log, other_log) = (status.clone(), requests.clone(), others.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let mut stream = stream.unwrap();
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut head = String::new();
                loop {
                    let mut line = String::new();
                    reader.read_line(&mut line).unwrap();
                    if line == "\r\n" || line.is_empty() {
                        break;
                    }
                    head.push_str(&line);
                }
                let length = head
                    .lines()
                    .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse::<usize>().unwrap()))
                    .unwrap_or(0);
                let mut body = vec![0; length];
                reader.read_exact(&mut body).unwrap();
                if !head.starts_with("POST ") {
                    other_log.lock().unwrap().push(head.lines().next().unwrap_or_default().to_string());
                    write!(stream, "HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").unwrap();
                    continue;
                }
                let code = answer.load(Ordering::SeqCst);
                if code == 200 {
                    log.lock().unwrap().push((head, serde_json::from_slice(&body).unwrap()));
                }
                let location = if (300..400).contains(&code) { format!("Location: http://127.0.0.1:{port}/moved\r\n") } else { String::new() };
                // As Slack's webhooks say why they refuse.
                let why = if code >= 400 { "no_service\r\n" } else { "" };
                write!(stream, "HTTP/1.1 {code} X\r\n{location}Content-Length: {}\r\nConnection: close\r\n\r\n{why}", why.len()).unwrap();
            }
        });
        WebhookServer { port, status, requests, others }
    }
}


/// A real Prometheus Alertmanager (`scripts/alertmanager.sh run`, built by scripts/go-tools.sh) on
/// `port`, with its silences and notification log in `dir`. Its API needs basic auth
/// `bearwatch:am-test-password` (Alertmanager's own `--web.config.file`).
pub struct Alertmanager {
    pub port: u16,
    config: PathBuf,
    dir: PathBuf,
    child: Option<Child>,
}

pub const ALERTMANAGER_USER: &str = "bearwatch";
pub const ALERTMANAGER_PASSWORD: &str = "am-test-password";

impl Alertmanager {
    /// `config` is an alertmanager.yml; waits until the API answers.
    pub fn start(config: &str, dir: &Path) -> Alertmanager {
        std::fs::create_dir_all(dir).unwrap();
        let path = dir.join("alertmanager.yml");
        std::fs::write(&path, config).unwrap();
        // bcrypt of ALERTMANAGER_PASSWORD (cost 4: the test needs no strength, only the check).
        let web = "basic_auth_users:\n  bearwatch: $2b$04$grZkRQX7lUIn/5rq9Y5gLOg3TeVMos.1yWynTjFWpVP5HdSvKeIwC\n";
        std::fs::write(dir.join("web.yml"), web).unwrap();
        let mut am = Alertmanager { port: free_port(), config: path, dir: dir.to_path_buf(), child: None };
        am.restart();
        am
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Kills it with SIGKILL (a crash: it keeps only what it had written to `dir`).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it (again) on the same port and data, and waits until it answers.
    pub fn restart(&mut self) {
        self.kill();
        let child = Command::new("bash")
            .arg(format!("{ROOT}/scripts/alertmanager.sh"))
            .args(["run", self.config.to_str().unwrap(), &self.port.to_string(), self.dir.join("data").to_str().unwrap()])
            .arg(format!("--web.config.file={}", self.dir.join("web.yml").display()))
            .stdout(std::fs::File::create(self.dir.join("stdout")).unwrap())
            .stderr(std::fs::File::create(self.dir.join("stderr")).unwrap())
            .spawn()
            .unwrap();
        self.child = Some(child);
        // The first start may build Alertmanager (scripts/go-tools.sh): minutes on a cold cache.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(900);
        while self.get("/-/ready").is_none() {
            let exited = self.child.as_mut().unwrap().try_wait().unwrap();
            assert!(exited.is_none() && std::time::Instant::now() < deadline, "Alertmanager did not start:\n{}", self.logs());
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(self.dir.join("stderr")).unwrap_or_default()
    }

    fn agent() -> ureq::Agent {
        ureq::Agent::config_builder().http_status_as_error(false).timeout_global(Some(std::time::Duration::from_secs(10))).build().into()
    }

    fn authorization() -> String {
        use base64::Engine;
        format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{ALERTMANAGER_USER}:{ALERTMANAGER_PASSWORD}")))
    }

    /// GET with credentials: the body of a 2xx answer, None otherwise (or when it is down).
    pub fn get(&self, path: &str) -> Option<String> {
        let mut response = Self::agent().get(format!("{}{path}", self.url())).header("Authorization", Self::authorization()).call().ok()?;
        response.status().is_success().then(|| response.body_mut().read_to_string().unwrap())
    }

    /// HTTP status of a GET without credentials.
    pub fn status_without_credentials(&self, path: &str) -> u16 {
        Self::agent().get(format!("{}{path}", self.url())).call().unwrap().status().as_u16()
    }

    /// The alerts it holds (`GET /api/v2/alerts`); empty while it is down.
    pub fn alerts(&self) -> Vec<serde_json::Value> {
        self.get("/api/v2/alerts").map(|body| serde_json::from_str::<Vec<serde_json::Value>>(&body).unwrap()).unwrap_or_default()
    }

    /// POSTs JSON with credentials; returns the status and the parsed answer.
    pub fn post(&self, path: &str, body: &serde_json::Value) -> (u16, serde_json::Value) {
        let mut response = Self::agent()
            .post(format!("{}{path}", self.url()))
            .header("Authorization", Self::authorization())
            .header("Content-Type", "application/json")
            .send(body.to_string())
            .unwrap();
        let text = response.body_mut().read_to_string().unwrap();
        (response.status().as_u16(), serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text)))
    }

    pub fn delete(&self, path: &str) -> u16 {
        Self::agent().delete(format!("{}{path}", self.url())).header("Authorization", Self::authorization()).call().unwrap().status().as_u16()
    }
}

impl Drop for Alertmanager {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A real S3-compatible server (tests/s3_server.py: moto's, in memory) on a free port, with
/// `bucket` created; credentials `test`/`test`, region us-east-1.
pub struct S3Server {
    child: Child,
    pub endpoint: String,
    pub bucket: String,
}

impl S3Server {
    pub fn start(bucket: &str) -> S3Server {
        let port = free_port();
        let mut child = Command::new(format!("{ROOT}/.venv/bin/python"))
            .arg(format!("{ROOT}/tests/s3_server.py"))
            .arg(port.to_string())
            .arg(bucket)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("the test S3 server needs .venv with moto (scripts/test.sh installs it)");
        let mut line = String::new();
        BufReader::new(child.stdout.as_mut().unwrap()).read_line(&mut line).unwrap();
        assert_eq!(line.trim(), "ready", "S3 server did not start");
        S3Server { child, endpoint: format!("http://127.0.0.1:{port}"), bucket: bucket.to_string() }
    }

    /// The `[storage.s3]` table of a pipeline file that writes to this server.
    pub fn storage_settings(&self) -> String {
        format!("[storage.s3]\nendpoint = \"{}\"\naccess_key_id = \"test\"\nsecret_access_key = \"test\"\n", self.endpoint)
    }

    /// The environment that `bearwatch sql --storage s3://…` and the other commands read.
    pub fn env(&self) -> [(&'static str, String); 4] {
        [
            ("AWS_ENDPOINT_URL", self.endpoint.clone()),
            ("AWS_ACCESS_KEY_ID", "test".into()),
            ("AWS_SECRET_ACCESS_KEY", "test".into()),
            ("AWS_REGION", "us-east-1".into()),
        ]
    }

    /// A client of its own, not bearwatch's.
    fn client(&self) -> object_store::aws::AmazonS3 {
        object_store::aws::AmazonS3Builder::new()
            .with_endpoint(&self.endpoint)
            .with_allow_http(true)
            .with_bucket_name(&self.bucket)
            .with_region("us-east-1")
            .with_access_key_id("test")
            .with_secret_access_key("test")
            .build()
            .unwrap()
    }

    /// The keys under `prefix`, sorted.
    pub fn list(&self, prefix: &str) -> Vec<String> {
        use futures::TryStreamExt;
        use object_store::ObjectStore;
        let store = self.client();
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let mut keys: Vec<String> = runtime
            .block_on(store.list(Some(&object_store::path::Path::from(prefix))).map_ok(|m| m.location.to_string()).try_collect())
            .unwrap();
        keys.sort();
        keys
    }

    /// The object at `key` (under the bucket), if any: read with its own client, not bearwatch's.
    pub fn get(&self, key: &str) -> Option<Vec<u8>> {
        use object_store::ObjectStoreExt;
        let store = self.client();
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(async {
            match store.get(&object_store::path::Path::from(key)).await {
                Ok(got) => Some(got.bytes().await.unwrap().to_vec()),
                Err(object_store::Error::NotFound { .. }) => None,
                Err(e) => panic!("{key}: {e}"),
            }
        })
    }

    /// Writes `bytes` at `key` (under the bucket) with its own client, as another process would.
    pub fn put(&self, key: &str, bytes: &[u8]) {
        use object_store::ObjectStoreExt;
        let store = self.client();
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(store.put(&object_store::path::Path::from(key), bytes.to_vec().into())).unwrap();
    }

    /// Stops answering (SIGSTOP: connections open, no replies) until [`S3Server::resume`].
    pub fn pause(&self) {
        assert!(Command::new("kill").args(["-STOP", &self.child.id().to_string()]).status().unwrap().success());
    }

    pub fn resume(&self) {
        assert!(Command::new("kill").args(["-CONT", &self.child.id().to_string()]).status().unwrap().success());
    }

    /// The `[storage.s3]` settings that reach this server, as bearwatch's storage takes them.
    pub fn settings(&self) -> bearwatch::storage::S3Config {
        let text = |t: &str| Some(bearwatch::config::EnvString::expand(t).unwrap());
        bearwatch::storage::S3Config {
            endpoint: text(&self.endpoint),
            access_key_id: text("test"),
            secret_access_key: text("test"),
            region: text("us-east-1"),
            ..Default::default()
        }
    }

    /// `s3://<bucket>/<prefix>` as bearwatch's storage reaches it.
    pub fn location(&self, prefix: &str) -> bearwatch::storage::Location {
        bearwatch::storage::Location::parse(&format!("s3://{}/{prefix}", self.bucket), &self.settings()).unwrap()
    }

    /// The checkpoint under `prefix` (of `instance`, when given), read by bearwatch's storage (it
    /// joins a checkpoint written in pieces).
    pub fn checkpoint(&self, prefix: &str, instance: Option<&str>) -> Option<serde_json::Value> {
        bearwatch::storage::checkpoint(&self.location(prefix), instance).unwrap().map(|bytes| serde_json::from_slice(&bytes).unwrap())
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A TCP relay on 127.0.0.1 to `target` (`host:port`): one process's own way to a server. While
/// [`Relay::cut`], the connections it carries are closed and new ones closed as they come, as a
/// network partition between that process and the server would, while others reach the server
/// directly.
pub struct Relay {
    pub port: u16,
    /// Whether it is cut, and the connections it carries (both ends), under one lock: a connection
    /// is either refused or closed by the cut, never kept past it.
    state: Arc<Mutex<(bool, Vec<TcpStream>)>>,
}

impl Relay {
    pub fn start(target: &str) -> Relay {
        let port = free_port();
        let listener = TcpListener::bind(("127.0.0.1", port)).unwrap();
        let state: Arc<Mutex<(bool, Vec<TcpStream>)>> = Arc::default();
        let (relayed, target) = (state.clone(), target.to_string());
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let mut state = relayed.lock().unwrap();
                if state.0 {
                    continue;
                }
                let Ok(server) = TcpStream::connect(&target) else { continue };
                for (mut from, mut to) in [(client.try_clone().unwrap(), server.try_clone().unwrap()), (server.try_clone().unwrap(), client.try_clone().unwrap())] {
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut to);
                        let _ = to.shutdown(Shutdown::Write);
                    });
                }
                state.1.extend([client, server]);
            }
        });
        Relay { port, state }
    }

    pub fn cut(&self) {
        let mut state = self.state.lock().unwrap();
        state.0 = true;
        for connection in state.1.drain(..) {
            let _ = connection.shutdown(Shutdown::Both);
        }
    }

    pub fn mend(&self) {
        self.state.lock().unwrap().0 = false;
    }
}
