//! The live dashboard in a real browser: Debian's chromium, driven by `playwright-core`
//! (`tests/browser/dashboard.mjs`), against a pipeline replaying the demo's Reuters stories with the
//! default alert rules. The screenshot is kept as `target/test-artifacts/dashboard.png`.

mod common;

use std::net::TcpListener;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{DEMO_DATA, Pipeline, ROOT};

#[test]
fn the_dashboard_draws_the_windows_shows_an_alert_and_updates_live() {
    let dir = tempfile::tempdir().unwrap();
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let config = format!(
        "[source]\ntype = \"file\"\npath = \"{DEMO_DATA}\"\nspeed = 40000\n\
         [window]\nsize = \"1d\"\nslide = \"12h\"\nallowed_lateness = \"1h\"\n\
         [storage]\npath = \"store\"\ncheckpoint_interval = \"2s\"\n\
         [run]\nsummary_interval = \"0s\"\nkeep_serving = true\n\
         [server]\nhttp = \"127.0.0.1:{port}\"\n\
         [alerts]\nrules = [\"{ROOT}/alerts/default.toml\"]\n\
         [[receivers]]\nname = \"log\"\ntype = \"log\"\n"
    );
    let mut run = Pipeline::start(dir.path(), "demo", &config);
    let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
    let deadline = Instant::now() + Duration::from_secs(60);
    while agent.get(format!("http://127.0.0.1:{port}/ready")).call().map(|r| r.status().as_u16()).unwrap_or(0) != 200 {
        assert!(Instant::now() < deadline, "never ready\n{}", run.logs());
        std::thread::sleep(Duration::from_millis(100));
    }

    let artifacts = std::path::Path::new(ROOT).join("target/test-artifacts");
    std::fs::create_dir_all(&artifacts).unwrap();
    let screenshot = artifacts.join("dashboard.png");
    let _ = std::fs::remove_file(&screenshot);
    let out = Command::new("node")
        .arg(std::path::Path::new(ROOT).join("tests/browser/dashboard.mjs"))
        .arg(format!("http://127.0.0.1:{port}/"))
        .arg(&screenshot)
        .output()
        .expect("node is needed (and `npm ci` in tests/browser; scripts/test.sh does both)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "browser run failed: {stdout}\n{}\n{}", String::from_utf8_lossy(&out.stderr), run.logs());
    let result: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap_or_default()).unwrap();
    assert_eq!(result["errors"], serde_json::json!([]), "errors in the page: {result}");
    assert!(result["later"].as_u64() > result["first"].as_u64(), "the page did not update: {result}");
    assert!(result["series"].as_u64().unwrap() >= 2, "the chart has the `all` line and topic lines: {result}");
    assert!(result["points"].as_u64().unwrap() >= 2, "a line has several windows: {result}");
    let alert = result["alert"].as_str().unwrap();
    assert!(alert.contains("value") && alert.contains("stories"), "the alert says why it fired: {alert}");
    assert!(result["headlines"].as_u64().unwrap() >= 10, "{result}");
    assert!(std::fs::metadata(&screenshot).unwrap().len() > 10_000, "screenshot kept");

    run.signal("TERM");
    assert!(run.wait(Duration::from_secs(30)).success(), "{}", run.logs());
}
