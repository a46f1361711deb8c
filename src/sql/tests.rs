use std::path::Path;

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
    let ctx = context(&dir.path().into(), limits(), None).unwrap();
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
    let ctx = context(&dir.path().into(), limits(), None).unwrap();
    assert_eq!(answered_csv(&ctx, "SELECT count(*) AS n FROM news"), "n\n0\n");
    let query = "SELECT topic\nFROM windows WHER n > 1";
    let err = runtime().block_on(run(&ctx, query)).unwrap_err();
    let rendered = err.render(query);
    assert!(rendered.contains("Line: 2") && rendered.ends_with("^"), "{rendered}");
}

#[test]
fn queries_stop_at_the_time_limit() {
    let dir = tempfile::tempdir().unwrap();
    let limits = Limits { memory_bytes: 64 << 20, timeout: Duration::from_millis(300) };
    let ctx = context(&dir.path().into(), limits, None).unwrap();
    let started = std::time::Instant::now();
    let err = runtime().block_on(run(&ctx, "SELECT count(*) FROM range(1, 1000000000000) WHERE value % 7 = 3")).unwrap_err();
    assert!(matches!(err, SqlError::Timeout(t) if t == limits.timeout), "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(10), "stopped after {:?}", started.elapsed());
    // A query within the limit still answers, on the same context.
    assert_eq!(answered_csv(&ctx, "SELECT count(*) AS n FROM range(1, 1000)"), "n\n999\n");
}

/// The table schemas users query are contracts (DESIGN §3): `schemas/*.table.json` are their
/// reviewed copies. After a deliberate change, regenerate with `BEARWATCH_BLESS=1 cargo test` and
/// record the change in docs/ARCHITECTURE.md.
#[test]
fn table_schemas_match_the_files_in_schemas() {
    for table in Table::ALL.into_iter().filter(|t| *t != Table::Late) {
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

#[test]
fn a_table_cuts_long_cells_and_the_other_formats_keep_them_whole() {
    let ctx = SessionContext::new();
    let batches = runtime().block_on(async { ctx.sql("SELECT repeat('x', 3000000) AS s, 7 AS n").await.unwrap().collect().await.unwrap() });
    let table = String::from_utf8(encode(&batches, Format::Table).unwrap()).unwrap();
    assert!(table.len() < 10_000, "a table of {} bytes", table.len());
    assert!(table.contains("… (cut at 1000 characters)") && table.contains("| 7 "), "{}", &table[..200.min(table.len())]);
    let csv = encode(&batches, Format::Csv).unwrap();
    assert!(csv.len() > 3_000_000, "CSV keeps the whole value");
}

/// The answer to `query` on `ctx`, as CSV.
fn answered_csv(ctx: &SessionContext, query: &str) -> String {
    String::from_utf8(encode(&runtime().block_on(run(ctx, query)).unwrap(), Format::Csv).unwrap()).unwrap()
}

/// Runs each query on `ctx` and asserts that it fails, as `failed_as` says.
fn each_fails(ctx: &SessionContext, queries: &[&str], failed_as: impl Fn(&SqlError) -> bool) {
    for query in queries {
        let Err(err) = runtime().block_on(run(ctx, query)) else { panic!("{query} answered") };
        assert!(failed_as(&err), "{query}: {err:?}");
    }
}

#[test]
fn functions_that_multiply_their_input_refuse_outputs_beyond_the_bound_before_allocating() {
    let dir = tempfile::tempdir().unwrap();
    let ctx = context(&dir.path().into(), limits(), None).unwrap();
    let growing = [
        "SELECT repeat('x', 100000000) AS s",
        "SELECT lpad('x', 200000000) AS s",
        "SELECT rpad('x', 30000000, 'é€') AS s",
        "SELECT length(repeat(s, n)) FROM (VALUES ('ab', 40000000), ('c', 2)) t(s, n)",
        "SELECT cardinality(array_repeat(1, 2000000000))",
        "SELECT cardinality(range(1, 1000000000))",
        "SELECT cardinality(generate_series(TIMESTAMP '2020-01-01', TIMESTAMP '2030-01-01', INTERVAL '1 second'))",
        "SELECT cardinality(array_resize([1], 1000000000, 0))",
        "SELECT length(replace(repeat('a', 1000000), 'a', repeat('b', 1000)))",
        "SELECT length(regexp_replace(repeat('a', 1000000), '', repeat('x', 100), 'g'))",
        "SELECT length(array_to_string(array_repeat('', 100000), repeat('x', 10000)))",
        "SELECT length(array_to_string(array_repeat(array_repeat('', 1000), 1000), repeat('x', 1000)))",
        "SELECT cardinality(array_replace_all(array_repeat('a', 100000), 'a', repeat('x', 10000)))",
        "SELECT length(concat_ws(repeat('x', 10000000), 'a', 'b', 'c', 'd', 'e', 'f', 'g', 'h'))",
        "SELECT length(concat(s, s, s, s, s, s, s, s)) FROM (SELECT repeat('x', 10000000) AS s)",
        "SELECT length(s || s || s || s || s || s || s || s) FROM (SELECT repeat('x', 10000000) AS s)",
        "SELECT length(encode(encode(encode(encode(repeat('x', 10000000), 'hex'), 'hex'), 'hex'), 'hex'))",
        "SELECT cardinality(string_to_array(repeat('a', 20000000), NULL))",
        "SELECT cardinality(string_to_array(repeat('a,', 10000000), ','))",
        "SELECT length(upper(repeat('ß', 15000000)))",
        "SELECT length(translate(repeat('a', 20000000), 'a', '€'))",
        "SELECT length(to_char(to_timestamp(n), repeat('%A', 2000))) FROM generate_series(1, 8192) t(n)",
        // Each call within the bound, together over it: the plan keeps every folded constant.
        "SELECT repeat('x', 30000000) AS a, repeat('y', 30000000) AS b, repeat('z', 30000000) AS c",
        // A constant repeated on every row of a table.
        "SELECT s, n FROM (SELECT repeat('x', 100000) AS s, n FROM generate_series(1, 100000) t(n)) ORDER BY n",
    ];
    // A refusal, not a timeout: a query that ran would allocate gigabytes or meet the 10 s deadline.
    each_fails(&ctx, &growing, |err| matches!(err, SqlError::Limit(_)) && err.to_string().contains("query_memory_mib"));
    // Within the bound they answer as DataFusion's own functions do.
    assert_eq!(answered_csv(&ctx, "SELECT repeat('é', 3) AS a, lpad('7', 3, '0') AS b, rpad('x', 3) AS c, length(repeat('ab', 1000)) AS d"), "a,b,c,d\nééé,007,x  ,2000\n");
    let query = "SELECT cardinality(array_repeat('ab', 1000)) AS r, cardinality(generate_series(DATE '2020-01-01', DATE '2020-12-31', INTERVAL '1 day')) AS days, \
                 replace('a-b-c', '-', '--') AS rep, regexp_replace('a1b22', '([0-9]+)', '<$1>', 'g') AS re, array_to_string([[1, 2], [3]], ', ') AS joined, \
                 length(encode(repeat('x', 1000), 'hex')) AS hex, levenshtein('kitten', 'sitting') AS lev, now() IS NOT NULL AS now";
    assert_eq!(answered_csv(&ctx, query), "r,days,rep,re,joined,hex,lev,now\n1000,366,a--b--c,a<1>b<22>,\"1, 2, 3\",2000,3,true\n");
    // Estimates that look at the values: ASCII keeps its size, an absent delimiter makes one piece.
    let query = "SELECT length(upper(repeat('a', 15000000))) AS u, cardinality(string_to_array(repeat('a', 15000000), ',')) AS pieces";
    assert_eq!(answered_csv(&ctx, query), "u,pieces\n15000000,1\n");
    // A large constant that every row is compared with is read once, not repeated on each row
    // (the feedback API looks up an id as long as a caller sends).
    let query = "SELECT count(*) AS n FROM generate_series(1, 100000) t(n) WHERE CAST(n AS VARCHAR) = repeat('7', 300000) \
                 OR CAST(n AS VARCHAR) <> repeat('7', 300000) AND CAST(n AS VARCHAR) LIKE repeat('7', 20000) OR CAST(n AS VARCHAR) ~ repeat('7', 20000)";
    assert_eq!(answered_csv(&ctx, query), "n\n0\n");
}

/// Failures that the query's own values cause are the query's to change (a 400 over HTTP, exit 2 on
/// the CLI), not the server's: DataFusion reports a regex too large to compile as its own bug.
#[test]
fn failures_on_the_querys_values_are_data_errors() {
    let dir = tempfile::tempdir().unwrap();
    let ctx = context(&dir.path().into(), limits(), None).unwrap();
    let on_values = [
        "SELECT 1 / 0",
        "SELECT CAST('soon' AS TIMESTAMP)",
        "SELECT regexp_like(s, '(') FROM (VALUES ('a')) t(s)",
        "SELECT regexp_like(s, '(a{1000}){1000}') FROM (VALUES ('a')) t(s)",
        "SELECT to_timestamp(9223372036854775807)",
        "SELECT levenshtein(s, s) FROM (VALUES (repeat('a', 100000))) t(s)",
    ];
    each_fails(&ctx, &on_values, |err| matches!(err, SqlError::Data(_)) && err.class() == ErrorClass::User);
}

/// Patterns are compiled into regular expressions (`LIKE` too, past a prefix or substring): one of
/// megabytes, made by a function or per row, fails as a value error before it is compiled, and
/// patterns within the bound answer with the operators' own names.
#[test]
fn patterns_longer_than_the_bound_fail_before_they_are_compiled() {
    let dir = tempfile::tempdir().unwrap();
    let ctx = context(&dir.path().into(), limits(), None).unwrap();
    let too_long = [
        "SELECT regexp_like('x', repeat('ab', 5000000))",
        "SELECT regexp_match(s, repeat('(a)', 100000)) FROM (VALUES ('a')) t(s)",
        "SELECT count(*) FROM (VALUES ('a')) t(s) WHERE s ~ repeat('ab', 500000)",
        "SELECT count(*) FROM (VALUES ('a')) t(s) WHERE s !~* repeat(s, 100000)",
        "SELECT count(*) FROM (VALUES ('a')) t(s) WHERE s LIKE repeat('a%', 500000)",
        "SELECT count(*) FROM (VALUES ('a')) t(s) WHERE s ILIKE repeat('_', 100000)",
        "SELECT count(*) FROM (VALUES ('a')) t(s) WHERE s SIMILAR TO repeat('ab', 500000)",
        "SELECT count(*) FROM generate_series(1, 100000) t(n) WHERE CAST(n AS VARCHAR) LIKE repeat('7%', 100000)",
    ];
    each_fails(&ctx, &too_long, |err| matches!(err, SqlError::Data(_)) && err.to_string().contains("65536"));
    let query = "SELECT s LIKE 'a%' AS l, s ~ 'b' AS r, s NOT ILIKE 'X%' AS n, s SIMILAR TO '(a|z)bc', regexp_like(s, 'C', 'i') AS f \
                 FROM (VALUES ('abc')) t(s)";
    assert_eq!(answered_csv(&ctx, query), "l,r,n,\"t.s SIMILAR TO Utf8(\"\"(a|z)bc\"\")\",f\ntrue,true,true,true,true\n");
}

/// `||` on text runs through the bound as a function, and answers exactly as the operator: NULL
/// when either side is NULL, numbers as text, the operator's column names; on lists it stays
/// `array_concat`.
#[test]
fn the_text_concatenation_operator_keeps_its_answers_and_names() {
    let dir = tempfile::tempdir().unwrap();
    let ctx = context(&dir.path().into(), limits(), None).unwrap();
    let query = "SELECT 'a' || 'b' AS ab, NULL || 'x' AS n, 'x' || 1 AS num, t.s || '!', cardinality([1, 2] || [3]) AS l FROM (VALUES ('v')) t(s)";
    assert_eq!(answered_csv(&ctx, query), "ab,n,num,\"t.s || Utf8(\"\"!\"\")\",l\nab,,x1,v!,3\n");
    let plan = runtime().block_on(run(&ctx, "EXPLAIN SELECT t.s || t.s FROM (VALUES ('v')) t(s)")).unwrap();
    let plan = String::from_utf8(encode(&plan, Format::Csv).unwrap()).unwrap();
    assert!(plan.contains("||(") && !plan.contains("StringConcat"), "{plan}");
}

/// Lists, structs and maps (the news table's `tickers`) are CSV cells of JSON text; a map keyed by
/// numbers, which JSON cannot key, is its displayed text in either format.
#[test]
fn nested_values_are_written_in_every_format() {
    let dir = tempfile::tempdir().unwrap();
    let ctx = context(&dir.path().into(), limits(), None).unwrap();
    let query = "SELECT ['XOM', 'CVX'] AS l, named_struct('a', 1, 'b', 'x') AS s, map(['k'], [1]) AS m, map([1], [2]) AS n, \
                 CAST(NULL AS VARCHAR[]) AS none, 7 AS i";
    let batches = runtime().block_on(run(&ctx, query)).unwrap();
    let csv = String::from_utf8(encode(&batches, Format::Csv).unwrap()).unwrap();
    assert_eq!(csv, "l,s,m,n,none,i\n\"[\"\"XOM\"\",\"\"CVX\"\"]\",\"{\"\"a\"\":1,\"\"b\"\":\"\"x\"\"}\",\"{\"\"k\"\":1}\",{1: 2},,7\n");
    let json = String::from_utf8(encode(&batches, Format::Json).unwrap()).unwrap();
    assert_eq!(json, r#"[{"l":["XOM","CVX"],"s":{"a":1,"b":"x"},"m":{"k":1},"n":"{1: 2}","i":7}]"#);
    assert!(encode(&batches, Format::Table).is_ok() && encode(&batches, Format::Arrow).is_ok());
    // A value that no text format can write is the query's error.
    let batches = runtime().block_on(run(&ctx, "SELECT from_unixtime(0, 'nowhere') AS t")).unwrap();
    for format in [Format::Csv, Format::Json, Format::Table] {
        assert!(matches!(encode(&batches, format), Err(SqlError::Data(_))), "{format:?}");
    }
    let batches = runtime().block_on(run(&ctx, "SELECT to_timestamp_millis(-9223372036854775808) AS t")).unwrap();
    assert!(matches!(encode(&batches, Format::Csv), Err(SqlError::Data(_))));
}

#[test]
fn csv_text_cells_that_start_like_formulas_are_neutralised() {
    let dir = tempfile::tempdir().unwrap();
    let ctx = context(&dir.path().into(), limits(), None).unwrap();
    let query = "SELECT * FROM (VALUES ('=HYPERLINK(\"http://x\")', -1.5), ('+1', 2.0), ('@SUM(A1)', 0.0), ('-2', 0.0), (concat(chr(9), 'tab'), 0.0), ('plain - text', 0.0)) AS t(headline, score)";
    let batches = runtime().block_on(run(&ctx, query)).unwrap();
    let csv = String::from_utf8(encode(&batches, Format::Csv).unwrap()).unwrap();
    assert_eq!(csv, "headline,score\n\"'=HYPERLINK(\"\"http://x\"\")\",-1.5\n'+1,2.0\n'@SUM(A1),0.0\n'-2,0.0\n'\ttab,0.0\nplain - text,0.0\n");
    let json = String::from_utf8(encode(&batches, Format::Json).unwrap()).unwrap();
    assert!(json.contains("\"=HYPERLINK"), "only CSV is changed: {json}");
}

/// A merge of parts listed beside some of its inputs (a crash between writing the one and deleting
/// the others, or a query in between): SQL reads each row once.
#[test]
fn parts_that_a_merge_holds_are_read_once() {
    use crate::news::{News, Scores, ScoredNews};
    let dir = tempfile::tempdir().unwrap();
    let row = |i: usize| ScoredNews {
        news: News::from_json(format!(r#"{{"id":"s{i}","published_at":"2024-01-02T03:04:05Z","headline":"Copper slumps"}}"#).as_bytes()).unwrap(),
        scores: Scores {
            topic: "metals".into(),
            topic_score: 0.9,
            sentiment: "negative",
            p_negative: 0.8,
            p_neutral: 0.15,
            p_positive: 0.05,
            sentiment_score: -0.75,
            model: Arc::from("m@1"),
        },
        ingested_at: "2024-01-02T03:04:06Z".into(),
        kafka_partition: Some(0),
        kafka_offset: Some(i as i64),
        published_ms: 0,
        ingested_ms: 0,
    };
    let folder = dir.path().join("news");
    std::fs::create_dir_all(&folder).unwrap();
    let write = |name: &str, ids: std::ops::Range<usize>| {
        let rows: Vec<ScoredNews> = ids.map(row).collect();
        let batch = crate::classify::news_batch(&rows).unwrap();
        let mut writer = parquet::arrow::ArrowWriter::try_new(std::fs::File::create(folder.join(name)).unwrap(), batch.schema(), None).unwrap();
        writer.write(&batch).unwrap();
        writer.close().unwrap();
    };
    write("part-00000000-00000009.parquet", 0..10);
    write("part-00000003.parquet", 3..4);
    write("part-00000009.parquet", 9..10);
    write("part-00000010.parquet", 10..11);
    let ctx = context(&dir.path().into(), limits(), None).unwrap();
    assert_eq!(answered_csv(&ctx, "SELECT count(*) AS n, count(DISTINCT id) AS ids FROM news"), "n,ids\n11,11\n");
}

/// A store whose first read finds nothing: as a part deleted between the listing and the read.
#[derive(Debug)]
struct GoneOnce {
    inner: Arc<dyn object_store::ObjectStore>,
    gone: std::sync::atomic::AtomicBool,
}

impl std::fmt::Display for GoneOnce {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "GoneOnce({})", self.inner)
    }
}

#[async_trait::async_trait]
impl object_store::ObjectStore for GoneOnce {
    async fn put_opts(&self, location: &object_store::path::Path, payload: object_store::PutPayload, opts: object_store::PutOptions) -> object_store::Result<object_store::PutResult> {
        self.inner.put_opts(location, payload, opts).await
    }
    async fn put_multipart_opts(&self, location: &object_store::path::Path, opts: object_store::PutMultipartOptions) -> object_store::Result<Box<dyn object_store::MultipartUpload>> {
        self.inner.put_multipart_opts(location, opts).await
    }
    async fn get_opts(&self, location: &object_store::path::Path, options: object_store::GetOptions) -> object_store::Result<object_store::GetResult> {
        if !self.gone.swap(true, std::sync::atomic::Ordering::SeqCst) {
            return Err(object_store::Error::NotFound { path: location.to_string(), source: "deleted by a merge".into() });
        }
        self.inner.get_opts(location, options).await
    }
    fn delete_stream(
        &self,
        locations: futures::stream::BoxStream<'static, object_store::Result<object_store::path::Path>>,
    ) -> futures::stream::BoxStream<'static, object_store::Result<object_store::path::Path>> {
        self.inner.delete_stream(locations)
    }
    fn list(&self, prefix: Option<&object_store::path::Path>) -> futures::stream::BoxStream<'static, object_store::Result<object_store::ObjectMeta>> {
        self.inner.list(prefix)
    }
    async fn list_with_delimiter(&self, prefix: Option<&object_store::path::Path>) -> object_store::Result<object_store::ListResult> {
        self.inner.list_with_delimiter(prefix).await
    }
    async fn copy_opts(&self, from: &object_store::path::Path, to: &object_store::path::Path, options: object_store::CopyOptions) -> object_store::Result<()> {
        self.inner.copy_opts(from, to, options).await
    }
}

/// A part that a merge deleted after the query listed it: the query runs again, once, and answers.
#[test]
fn a_part_gone_between_listing_and_reading_runs_the_query_again() {
    let dir = tempfile::tempdir().unwrap();
    let folder = dir.path().join("alerts");
    std::fs::create_dir_all(&folder).unwrap();
    let schema = stored_schema(Table::Alerts);
    let batch = RecordBatch::new_empty(schema.clone());
    let mut writer = parquet::arrow::ArrowWriter::try_new(std::fs::File::create(folder.join("part-00000000.parquet")).unwrap(), schema, None).unwrap();
    writer.write(&batch).unwrap();
    writer.close().unwrap();
    let ctx = context(&dir.path().into(), limits(), None).unwrap();
    let store = Arc::new(GoneOnce { inner: Arc::new(object_store::local::LocalFileSystem::new()), gone: false.into() });
    ctx.register_object_store(&url::Url::parse("file://").unwrap(), store.clone());
    // Over the Postgres wire, which runs a query once, the failure asks the client to run it again.
    let failure = runtime().block_on(async { ctx.sql("SELECT count(*) FROM alerts").await?.collect().await }).unwrap_err();
    assert_eq!(super::sqlstate(&failure, &super::classify(&failure)), "40001", "{failure}");

    store.gone.store(false, std::sync::atomic::Ordering::SeqCst);
    assert_eq!(answered_csv(&ctx, "SELECT count(*) AS n FROM alerts"), "n\n0\n");
    assert!(store.gone.load(std::sync::atomic::Ordering::SeqCst), "the first read found nothing");
}
