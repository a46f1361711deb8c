use super::*;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

/// Statements that write, change settings or touch files (shared with the CLI and HTTP tests).
const FORBIDDEN: &str = include_str!("../../tests/sql/forbidden.sql");

pub fn forbidden() -> impl Iterator<Item = &'static str> {
    FORBIDDEN.lines().filter(|l| !l.starts_with("--") && !l.trim().is_empty())
}

#[test]
fn writes_settings_and_file_access_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let ctx = context(dir.path(), 64 << 20, None).unwrap();
    assert!(forbidden().count() >= 20);
    for statement in forbidden() {
        let result = runtime().block_on(run(&ctx, statement, Duration::from_secs(10)));
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
    let ctx = context(dir.path(), 64 << 20, None).unwrap();
    let batches = runtime().block_on(run(&ctx, "SELECT count(*) AS n FROM news", Duration::from_secs(10))).unwrap();
    assert_eq!(String::from_utf8(encode(&batches, Format::Csv).unwrap()).unwrap(), "n\n0\n");
    let query = "SELECT topic\nFROM windows WHER n > 1";
    let err = runtime().block_on(run(&ctx, query, Duration::from_secs(10))).unwrap_err();
    let rendered = err.render(query);
    assert!(rendered.contains("Line: 2") && rendered.ends_with("^"), "{rendered}");
}
