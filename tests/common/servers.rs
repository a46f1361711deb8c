//! Real servers on 127.0.0.1 for notification tests: SMTP (tests/smtp_server.py, aiosmtpd) and a
//! webhook endpoint that records what it receives.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex};

use super::ROOT;

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
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
    pub status: Arc<AtomicU16>,
    pub requests: Arc<Mutex<Vec<(String, serde_json::Value)>>>,
}

impl WebhookServer {
    pub fn start() -> WebhookServer {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let status = Arc::new(AtomicU16::new(200));
        let requests = Arc::new(Mutex::new(Vec::new()));
        let (answer, log) = (status.clone(), requests.clone());
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
                let code = answer.load(Ordering::SeqCst);
                if code == 200 {
                    log.lock().unwrap().push((head, serde_json::from_slice(&body).unwrap()));
                }
                write!(stream, "HTTP/1.1 {code} X\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").unwrap();
            }
        });
        WebhookServer { port, status, requests }
    }
}

