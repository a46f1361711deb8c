//! The compose stack (docker-compose.yml, Dockerfile, deploy/) agrees with bearwatch: the pipeline it
//! runs parses, its ports are the ones published and scraped, the files it mounts exist. No Docker
//! engine runs here; where Go or the compose plugin is available, the file is also loaded the way
//! `docker compose config` loads it (scripts/compose-check.sh).

use std::path::Path;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

fn read(path: &str) -> String {
    std::fs::read_to_string(Path::new(ROOT).join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

#[test]
fn the_compose_stack_matches_the_pipeline_it_runs() {
    let compose = read("docker-compose.yml");
    // SAFETY: only this test, in its own process, reads these variables (compose passes them in).
    unsafe {
        std::env::set_var("BEARWATCH_PG_PASSWORD", "test");
        std::env::set_var("BEARWATCH_INSTANCE", "a");
    }
    let config = bearwatch::pipeline::PipelineConfig::parse(&read("pipelines/compose.toml"), "pipelines/compose.toml").unwrap();
    assert!(compose.contains("pipelines/compose.toml"), "compose runs pipelines/compose.toml");
    assert_eq!(config.source.brokers.as_ref().unwrap().as_str(), "kafka:9092");
    let http_port = config.server.http.as_ref().map(|s| s.as_str()).unwrap().rsplit(':').next().unwrap().to_string();
    let pg_port = config.server.postgres.as_ref().map(|s| s.as_str()).unwrap().rsplit(':').next().unwrap().to_string();
    // The API is open in compose (allow_open): its port is published on the host's loopback only.
    assert!(config.server.allow_open && config.server.is_open());
    assert!(compose.contains(&format!("\"127.0.0.1:{http_port}:{http_port}\"")) && compose.contains(&format!("\"{pg_port}:{pg_port}\"")));
    assert!(read("deploy/prometheus.yml").contains(&format!("bearwatch:{http_port}")), "Prometheus scrapes the HTTP port");
    assert!(read("deploy/grafana/provisioning/datasources/bearwatch.yml").contains(&format!("url: bearwatch:{pg_port}")));
    assert!(compose.contains("image: apache/kafka:") && compose.contains("KAFKA_PROCESS_ROLES: broker,controller"), "official image, KRaft");
    for mounted in ["./deploy/prometheus.yml", "./deploy/grafana/provisioning", "./deploy/grafana/dashboards"] {
        assert!(compose.contains(mounted));
        assert!(Path::new(ROOT).join(mounted).exists(), "{mounted} is missing");
    }
    // Scaled out: one classify process and two aggregate instances with their own instance names,
    // whose storage is the `s3` service's bucket, made by the one-shot before they start.
    assert!(compose.matches("\"--role\", \"aggregate\"]").count() == 2 && compose.contains("\"--role\", \"classify\"]"));
    for instance in ["BEARWATCH_INSTANCE: a", "BEARWATCH_INSTANCE: b", "BEARWATCH_INSTANCE: classify"] {
        assert!(compose.contains(instance), "{instance}");
    }
    assert_eq!(config.storage.instance(), Some("a"));
    let path = config.storage.path.to_str().unwrap();
    let bucket = path.strip_prefix("s3://").and_then(|p| p.split('/').next()).expect("the storage is an s3:// bucket");
    assert!(compose.contains(&format!("\"s3\", \"mb\", \"s3://{bucket}\"")), "the one-shot makes bucket {bucket}");
    let endpoint = config.storage.s3.endpoint.as_ref().map(|e| e.as_str().to_string()).unwrap();
    assert_eq!(endpoint, "http://s3:5000");
    assert!(compose.contains("  s3:\n    image: motoserver/moto:") && compose.contains("\"127.0.0.1:5000:5000\""));
    assert!(compose.contains("condition: service_completed_successfully"), "instances wait for the bucket");
    // The rule files and receivers load as the container will load them.
    for rules in &config.alerts.rules {
        bearwatch::detect::RuleFile::load(&Path::new(ROOT).join(rules)).unwrap();
    }
    let dockerfile = read("Dockerfile");
    assert!(dockerfile.matches("FROM ").count() >= 3, "multi-stage");
    let ort = read("scripts/requirements-ort.txt");
    assert!(ort.contains("onnxruntime==") && dockerfile.contains("requirements-ort.txt"), "the image's ONNX Runtime is the pinned one");

    // `docker compose config`, or the same loader (compose-go) where Go is installed.
    let status = std::process::Command::new("bash").arg(Path::new(ROOT).join("scripts/compose-check.sh")).output();
    match status {
        Ok(out) if out.status.code() == Some(3) => eprintln!("compose-check: {}", String::from_utf8_lossy(&out.stderr).trim()),
        Ok(out) => assert!(out.status.success(), "{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)),
        Err(e) => panic!("bash: {e}"),
    }
}
