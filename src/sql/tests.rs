use super::*;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

fn limits() -> Limits {
    Limits { memory_bytes: 64 << 20, timeout: Duration::from_secs(10) }
}

/// Statements that write, change settings or touch files (shared with the CLI and HTTP tests).
const FORBIDDEN: &str = include_str!("../../tests/sql/forbidden.sql");

pub fn forbidden() -> impl Iterator<Item = &'static str> {
    FORBIDDEN.lines().filter(|l| !l.starts_with("--") && !l.trim().is_empty())
}

#[test]
fn writes_settings_and_file_access_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let ctx = context(dir.path(), limits(), None).unwrap();
    assert!(forbidden().count() >= 20);
    for statement in forbidden() {
        let result = runtime().block_on(run(&ctx, statement));
        match result {
            Err(SqlError::Refused(_) | SqlError::Invalid { .. }) => {}
            other => panic!("{statement}: {other:?}"),
        }
    }
    assert!(!Path::new("/tmp/bearwatch-leak.csv").exists());
}

#[test]
fn empty_tables_answer_and_errors_point_at_the_query() {
    let dir = tempfile::tempdir().unwrap();
    let ctx = context(dir.path(), limits(), None).unwrap();
    let batches = runtime().block_on(run(&ctx, "SELECT count(*) AS n FROM news")).unwrap();
    assert_eq!(String::from_utf8(encode(&batches, Format::Csv).unwrap()).unwrap(), "n\n0\n");
    let query = "SELECT topic\nFROM windows WHER n > 1";
    let err = runtime().block_on(run(&ctx, query)).unwrap_err();
    let rendered = err.render(query);
    assert!(rendered.contains("Line: 2") && rendered.ends_with("^"), "{rendered}");
}

#[test]
fn queries_stop_at_the_time_limit() {
    let dir = tempfile::tempdir().unwrap();
    let limits = Limits { memory_bytes: 64 << 20, timeout: Duration::from_millis(300) };
    let ctx = context(dir.path(), limits, None).unwrap();
    let started = std::time::Instant::now();
    let err = runtime().block_on(run(&ctx, "SELECT count(*) FROM range(1, 1000000000000) WHERE value % 7 = 3")).unwrap_err();
    assert!(matches!(err, SqlError::Timeout(t) if t == limits.timeout), "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(10), "stopped after {:?}", started.elapsed());
    // A query within the limit still answers, on the same context.
    let batches = runtime().block_on(run(&ctx, "SELECT count(*) AS n FROM range(1, 1000)")).unwrap();
    assert_eq!(String::from_utf8(encode(&batches, Format::Csv).unwrap()).unwrap(), "n\n999\n");
}

/// The table schemas users query are contracts (DESIGN §3): `schemas/*.table.json` are their
/// reviewed copies. After a deliberate change, regenerate with `BEARWATCH_BLESS=1 cargo test` and
/// record the change in docs/ARCHITECTURE.md.
#[test]
fn table_schemas_match_the_files_in_schemas() {
    for table in [Table::News, Table::Windows, Table::Alerts, Table::Notifications] {
        let columns: Vec<serde_json::Value> = stored_schema(table)
            .fields()
            .iter()
            .map(|f| serde_json::json!({"name": f.name(), "type": f.data_type().to_string(), "nullable": f.is_nullable()}))
            .collect();
        let mut expected = serde_json::to_string_pretty(&serde_json::json!({"table": table.name(), "columns": columns})).unwrap();
        expected.push('\n');
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("schemas/{}.table.json", table.name()));
        if std::env::var_os("BEARWATCH_BLESS").is_some() {
            std::fs::write(&path, &expected).unwrap();
        }
        assert_eq!(std::fs::read_to_string(&path).unwrap_or_default(), expected, "{} changed", path.display());
    }
}
