//! A client of bearwatch's HTTP API that holds every answer to docs/openapi.json: it keeps each
//! exchange, and when it is dropped (or at [`Api::check`]) tests/openapi_check.py validates them
//! (documented path, method, status, media type; JSON bodies against their schemas).

use std::process::Command;
use std::sync::Mutex;

use serde_json::Value;

use super::ROOT;

pub struct Api {
    pub url: String,
    agent: ureq::Agent,
    exchanges: Mutex<Vec<Value>>,
}

impl Api {
    /// `url`: e.g. "http://127.0.0.1:9464".
    pub fn new(url: &str) -> Api {
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(std::time::Duration::from_secs(120)))
            .build()
            .into();
        Api { url: url.trim_end_matches('/').to_string(), agent, exchanges: Mutex::new(Vec::new()) }
    }

    /// One request; returns the status, the content type and the body as text.
    pub fn raw(&self, method: &str, path: &str, headers: &[(&str, &str)], body: Option<&str>) -> Result<(u16, String, String), ureq::Error> {
        let (status, content_type, bytes) = self.bytes(method, path, headers, body)?;
        Ok((status, content_type, String::from_utf8_lossy(&bytes).into_owned()))
    }

    /// As [`Api::raw`], with the body as bytes (an Arrow IPC stream is binary).
    pub fn bytes(&self, method: &str, path: &str, headers: &[(&str, &str)], body: Option<&str>) -> Result<(u16, String, Vec<u8>), ureq::Error> {
        let url = format!("{}{path}", self.url);
        let mut response = match method {
            "GET" | "DELETE" => {
                let mut request = if method == "GET" { self.agent.get(&url) } else { self.agent.delete(&url) };
                for (name, value) in headers {
                    request = request.header(*name, *value);
                }
                request.call()?
            }
            _ => {
                let mut request = self.agent.post(&url);
                for (name, value) in headers {
                    request = request.header(*name, *value);
                }
                request.send(body.unwrap_or(""))?
            }
        };
        let status = response.status().as_u16();
        let content_type = response.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
        let bytes = response.body_mut().with_config().limit(64 << 20).read_to_vec()?;
        // Lossy: an Arrow IPC answer is binary, and only its media type is checked.
        self.exchanges.lock().unwrap().push(serde_json::json!({
            "method": method, "path": path, "status": status, "content_type": content_type, "body": String::from_utf8_lossy(&bytes),
        }));
        Ok((status, content_type, bytes))
    }

    /// A JSON call with an optional bearer token; the answer parsed (a string when it is not JSON).
    pub fn call(&self, method: &str, path: &str, token: Option<&str>, body: Option<&str>) -> (u16, Value) {
        let auth = token.map(|t| format!("Bearer {t}"));
        let mut headers = vec![("Content-Type", "application/json")];
        if let Some(auth) = &auth {
            headers.push(("Authorization", auth));
        }
        let (status, _, text) = self.raw(method, path, &headers, body).unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }

    /// Rows of a query that must succeed.
    pub fn sql(&self, token: Option<&str>, query: &str) -> Vec<Value> {
        let (status, body) = self.call("POST", "/sql", token, Some(query));
        assert_eq!(status, 200, "{query}: {body}");
        body.as_array().cloned().unwrap_or_default()
    }

    /// Validates the exchanges so far against docs/openapi.json, and forgets them; returns the
    /// operations they covered ("METHOD /path/template").
    pub fn check(&self) -> Vec<String> {
        let exchanges = std::mem::take(&mut *self.exchanges.lock().unwrap());
        if exchanges.is_empty() {
            return Vec::new();
        }
        let file = tempfile::NamedTempFile::new().unwrap();
        let lines: String = exchanges.iter().map(|x| format!("{x}\n")).collect();
        std::fs::write(file.path(), lines).unwrap();
        let out = Command::new(format!("{ROOT}/.venv/bin/python"))
            .arg(format!("{ROOT}/tests/openapi_check.py"))
            .arg(format!("{ROOT}/docs/openapi.json"))
            .arg(file.path())
            .output()
            .expect("the test virtualenv (scripts/test.sh installs jsonschema there)");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "answers that docs/openapi.json does not describe:\n{stdout}{}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_str(stdout.trim()).unwrap()
    }
}

impl Drop for Api {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            self.check();
        }
    }
}
