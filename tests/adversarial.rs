//! Hostile input against a running pipeline, each ending in a clear error and a pipeline that still
//! ingests: SQL over every interface (deep expressions, oversized queries, joins that explode, a
//! result too large to hold, regexes, cancel requests), config extremes, damaged storage and
//! edits of a file source. Short in CI; `BEARWATCH_ADVERSARIAL_FULL=1` runs larger inputs.

mod common;

use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::servers::free_port;
use common::{Pipeline, query_one, stories};

fn full() -> bool {
    std::env::var_os("BEARWATCH_ADVERSARIAL_FULL").is_some()
}

/// `n` stories one minute apart from 2026-01-02, each with a 1 KiB body.
fn minute_stories(n: usize, first_id: usize) -> String {
    let body = "word ".repeat(200);
    (first_id..first_id + n)
        .map(|i| {
            let at = chrono::DateTime::parse_from_rfc3339("2026-01-02T00:00:00Z").unwrap() + chrono::Duration::minutes(i as i64);
            let mood = ["falls sharply on weak demand", "rises after strong results", "holds steady"][i % 3];
            format!(
                "{{\"id\":\"adv-{i}\",\"published_at\":\"{}\",\"headline\":\"Company {i} {mood}\",\"body\":\"{body}\"}}\n",
                at.to_rfc3339()
            )
        })
        .collect()
}

fn rss_mib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status.lines().find_map(|l| l.strip_prefix("VmRSS:")).and_then(|v| v.trim().trim_end_matches(" kB").trim().parse::<u64>().ok()).unwrap_or(0)
        / 1024
}

fn post_sql(http: u16, query: &str) -> (u16, String) {
    let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).timeout_global(Some(Duration::from_secs(120))).build().into();
    match agent.post(format!("http://127.0.0.1:{http}/sql")).header("Authorization", "bearer t0ken-0123456789abcdef").send(query) {
        Ok(mut response) => (response.status().as_u16(), response.body_mut().read_to_string().unwrap_or_default()),
        Err(e) => (0, e.to_string()),
    }
}

fn scored(http: u16) -> f64 {
    let text = ureq::get(format!("http://127.0.0.1:{http}/metrics")).call().unwrap().body_mut().read_to_string().unwrap();
    text.lines()
        .filter(|l| l.starts_with("bearwatch_stage_sent_total{") && l.contains("stage=\"classify\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn psql(port: u16, command: &str) -> (bool, String) {
    let out = Command::new("psql")
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", "bearwatch", "-d", "bearwatch", "-X", "-A", "-t", "-c", command])
        .env("PGPASSWORD", "pw")
        .env("PGCONNECT_TIMEOUT", "10")
        .output()
        .expect("psql (Debian postgresql-client) is needed; scripts/test.sh installs it");
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

/// Runs `f` while timing `/health` every 100 ms; returns f's result and the slowest answer.
fn with_health_probe<T>(http: u16, f: impl FnOnce() -> T + Send) -> (T, Duration) {
    let done = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|scope| {
        let probe = scope.spawn(|| {
            let agent: ureq::Agent = ureq::Agent::config_builder().timeout_global(Some(Duration::from_secs(30))).build().into();
            let mut slowest = Duration::ZERO;
            while !done.load(std::sync::atomic::Ordering::SeqCst) {
                let started = Instant::now();
                let ok = agent.get(format!("http://127.0.0.1:{http}/health")).call().is_ok();
                slowest = slowest.max(if ok { started.elapsed() } else { Duration::from_secs(30) });
                std::thread::sleep(Duration::from_millis(100));
            }
            slowest
        });
        let result = f();
        done.store(true, std::sync::atomic::Ordering::SeqCst);
        (result, probe.join().unwrap())
    })
}

#[test]
fn hostile_sql_on_every_interface_ends_in_errors_while_the_pipeline_ingests() {
    let dir = tempfile::tempdir().unwrap();
    let total = if full() { 40_000 } else { 10_000 };
    std::fs::write(dir.path().join("in.jsonl"), minute_stories(total, 0)).unwrap();
    let (http, pg) = (free_port(), free_port());
    // SAFETY: only this test reads these variables.
    unsafe {
        std::env::set_var("BEARWATCH_ADV_TOKEN", "t0ken-0123456789abcdef");
        std::env::set_var("BEARWATCH_ADV_HTTP", format!("127.0.0.1:{http}"));
    }
    // 3000× the stories' pace: fifty a second, so the replay outlasts the attacks.
    let config = format!(
        "[source]\ntype = \"file\"\npath = \"in.jsonl\"\nspeed = 3000\n[storage]\npath = \"store\"\ncheckpoint_interval = \"1s\"\n\
         [run]\nsummary_interval = \"0s\"\n[server]\nhttp = \"${{BEARWATCH_ADV_HTTP}}\"\nauth_token = \"${{BEARWATCH_ADV_TOKEN}}\"\n\
         query_timeout = \"8s\"\nquery_memory_mib = 64\npostgres = \"127.0.0.1:{pg}\"\npostgres_password = \"pw\"\n"
    );
    let mut run = Pipeline::start(dir.path(), "p", &config);
    let deadline = Instant::now() + Duration::from_secs(120);
    while !post_sql(http, "SELECT count(*) AS n FROM news").1.contains("\"n\":") || scored(http) < 1000.0 {
        assert!(Instant::now() < deadline && run.child.try_wait().unwrap().is_none(), "no stories yet\n{}", run.logs());
        std::thread::sleep(Duration::from_millis(200));
    }
    let before = scored(http);
    let rss_before = rss_mib(run.child.id());

    // Deep expressions: refused by name on every interface; just under the limit still answers.
    let chain = |n: usize| format!("SELECT {} AS v", vec!["1"; n].join("+"));
    let (status, body) = post_sql(http, &chain(400));
    assert!(status == 400 && body.contains("max_nesting"), "{status} {body}");
    let (status, body) = post_sql(http, &chain(240));
    assert!(status == 200 && body.contains("\"v\":240"), "{status} {body}");
    let (ok, out) = psql(pg, &chain(400));
    assert!(!ok && out.contains("max_nesting"), "{out}");
    let (ok, out) = psql(pg, &chain(240));
    assert!(ok && out.trim() == "240", "{out}");
    let cli = Command::new(env!("CARGO_BIN_EXE_bearwatch")).args(["sql", "--storage"]).arg(dir.path().join("store")).arg(chain(5000)).output().unwrap();
    assert_eq!(cli.status.code(), Some(2), "{}", String::from_utf8_lossy(&cli.stderr));
    assert!(String::from_utf8_lossy(&cli.stderr).contains("max_nesting"));
    let (status, body) = post_sql(http, &format!("SELECT '{}'", "x".repeat(70_000)));
    assert!(status == 400 && body.contains("max_query_bytes"), "{status} {body}");

    // The sorted three-way cross join of the report answers (or stops) in time...
    let started = Instant::now();
    let (status, body) = post_sql(http, "SELECT a.headline, b.headline, c.headline FROM news a, news b, news c ORDER BY 1, 2, 3 LIMIT 5");
    assert!(status == 200 || (status == 408 && body.contains("longer than")), "{status} {body}");
    assert!(started.elapsed() < Duration::from_secs(20), "answered after {:?}", started.elapsed());
    // ...and a join of a billion comparisons is stopped by a bound, /health answering meanwhile: the
    // deadline, or the query memory when its pairs outgrow 64 MiB first (never a partial answer).
    let explode = "SELECT count(*) FROM news a, news b, news c WHERE a.headline < b.headline AND b.headline < c.headline";
    let started = Instant::now();
    let ((status, body), slowest) = with_health_probe(http, || post_sql(http, explode));
    let took = started.elapsed();
    let stopped = |text: &str| text.contains("longer than") || text.contains("more memory than query_memory_mib");
    assert!(matches!(status, 408 | 400) && stopped(&body), "{status} {body}");
    assert!(took < Duration::from_secs(20), "the 8 s deadline answered after {took:?}");
    assert!(slowest < Duration::from_secs(2), "/health took {slowest:?} while the join ran");
    let (ok, out) = psql(pg, explode);
    assert!(!ok && stopped(&out), "{out}");

    // A Postgres cancel request stops a running query long before its deadline.
    let mut client = postgres::Client::connect(&format!("host=127.0.0.1 port={pg} user=bearwatch password=pw dbname=bearwatch"), postgres::NoTls).unwrap();
    let token = client.cancel_token();
    let answered = Arc::new(AtomicBool::new(false));
    // A cancel that arrives before the query runs cancels nothing (as in Postgres), and on a loaded
    // machine the query may start late: cancel every 300 ms until it answers.
    let canceller = std::thread::spawn({
        let answered = answered.clone();
        move || {
            loop {
                std::thread::sleep(Duration::from_millis(300));
                if answered.load(Ordering::SeqCst) {
                    break;
                }
                token.cancel_query(postgres::NoTls).unwrap();
            }
        }
    });
    // A query that runs long in little memory, a few milliseconds a batch: every pair of headlines
    // compared letter by letter.
    let slow = "SELECT count(*) FROM news a, news b WHERE levenshtein(a.headline, b.headline) > 0";
    let started = Instant::now();
    let err = client.simple_query(slow).unwrap_err();
    answered.store(true, Ordering::SeqCst);
    canceller.join().unwrap();
    assert!(started.elapsed() < Duration::from_secs(7), "cancel took {:?}", started.elapsed());
    assert!(format!("{err:?}").contains("cancelled"), "{err:?}");
    assert_eq!(err.code(), Some(&postgres::error::SqlState::QUERY_CANCELED), "{err:?}");
    // The connection stays usable after a cancel. A cancel sent just as the query ended may still
    // reach the server while the next query runs and cancel that one (Postgres says the same of its
    // cancel requests): one such stray cancel is allowed, then the connection must answer.
    let select = |client: &mut postgres::Client| client.simple_query("SELECT 1");
    let rows = match select(&mut client) {
        Err(e) if format!("{e:?}").contains("cancelled") => select(&mut client),
        other => other,
    };
    assert_eq!(rows.unwrap().len(), 3, "row description, row, completion");

    // A wide cross join too large to hold: refused within the query memory, RSS bounded.
    let peak = std::sync::atomic::AtomicU64::new(0);
    let ((status, body), _) = with_health_probe(http, || {
        std::thread::scope(|scope| {
            let sampler = scope.spawn(|| {
                for _ in 0..400 {
                    peak.fetch_max(rss_mib(run.child.id()), std::sync::atomic::Ordering::SeqCst);
                    std::thread::sleep(Duration::from_millis(25));
                }
            });
            let answer = post_sql(http, "SELECT a.headline, b.body FROM news a, news b");
            drop(sampler);
            answer
        })
    });
    assert!(status == 400 && body.contains("query_memory_mib"), "{status} {body}");
    let grown = peak.load(std::sync::atomic::Ordering::SeqCst).saturating_sub(rss_before);
    assert!(grown < 400, "RSS grew {grown} MiB with query_memory_mib = 64");

    // Backtracking-prone regexes run in linear time (Rust's regex); a huge string is a result too large.
    let (status, body) = post_sql(http, "SELECT count(*) AS n FROM news WHERE headline ~ '(a+)+$'");
    assert!(status == 200 && body.contains("\"n\":"), "{status} {body}");
    let (status, body) = post_sql(http, "SELECT repeat('x', 100000000) AS s");
    assert!(status == 400 && body.contains("query_memory_mib"), "{status} {body}");

    // Functions that multiply their input or nest into an exponential, constants that the planner
    // folds one call at a time, a constant repeated on every row: each took gigabytes (or had the
    // process killed) before they were bounded. Refused at once, RSS bounded.
    let many_constants = format!("SELECT {} 1", (0..40).map(|i| format!("repeat('x', 60000000) AS c{i}, ")).collect::<String>());
    let growing = [
        "SELECT cardinality(array_repeat(1, 2000000000))",
        "SELECT cardinality(range(1, 1000000000))",
        "SELECT length(replace(repeat('a', 1000000), 'a', repeat('b', 1000)))",
        "SELECT length(encode(encode(encode(encode(encode(repeat('x', 10000000), 'hex'), 'hex'), 'hex'), 'hex'), 'hex'))",
        many_constants.as_str(),
        "SELECT length(h) FROM (SELECT headline || repeat('x', 10000000) AS h FROM news)",
        "SELECT count(*) FROM (SELECT repeat('x', 10000000) AS s, headline FROM news) GROUP BY s",
    ];
    let peak = std::sync::atomic::AtomicU64::new(0);
    let rss_before = rss_mib(run.child.id());
    let done = AtomicBool::new(false);
    std::thread::scope(|scope| {
        scope.spawn(|| {
            while !done.load(Ordering::SeqCst) {
                peak.fetch_max(rss_mib(run.child.id()), Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(10));
            }
        });
        // Refused, not run: one that ran would pass the RSS bound, or the 8 s deadline (a 408).
        for query in growing {
            let (status, body) = post_sql(http, query);
            assert!(status == 400 && body.contains("query_memory_mib"), "{query}: {status} {body}");
        }
        let (ok, out) = psql(pg, "SELECT cardinality(array_repeat(1, 2000000000))");
        assert!(!ok && out.contains("more memory than query_memory_mib"), "{out}");
        done.store(true, Ordering::SeqCst);
    });
    let grown = peak.load(Ordering::SeqCst).saturating_sub(rss_before);
    assert!(grown < 400, "RSS grew {grown} MiB refusing growing functions with query_memory_mib = 64");
    // Within the bounds the same functions answer.
    let (status, body) = post_sql(http, "SELECT cardinality(range(1, 1000)) AS r, 'a' || 'b' AS ab, length(replace('a-b', '-', '--')) AS n");
    assert!(status == 200 && body.contains("\"r\":999") && body.contains("\"ab\":\"ab\"") && body.contains("\"n\":4"), "{status} {body}");

    // Through all of it the pipeline went on scoring, and it still stops cleanly.
    let after = scored(http);
    assert!(after > before + 20.0, "scored {before} → {after} during the attacks\n{}", run.logs());
    assert!(run.child.try_wait().unwrap().is_none(), "the pipeline died\n{}", run.logs());
    run.signal("TERM");
    assert!(run.wait(Duration::from_secs(60)).success(), "{}", run.logs());
    eprintln!("scored {before} → {after} during the attacks; /health at worst {slowest:?}; RSS +{grown} MiB");
}

fn run_config(dir: &std::path::Path, config: &str) -> (i32, String) {
    std::fs::write(dir.join("p.toml"), config).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_bearwatch"))
        .args(["run", "--pipeline", "p.toml"])
        .current_dir(dir)
        .env("BEARWATCH_EMPTY", "")
        .output()
        .unwrap();
    (out.status.code().unwrap_or(-1), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

/// A 200 answer to `GET path`, on a connection of its own that the server closes after the answer,
/// so no client pool holds one of the server's places.
fn get_on_its_own_connection(http: u16, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", http)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    stream.write_all(format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").as_bytes()).ok()?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer).ok()?;
    answer.starts_with("HTTP/1.1 200").then_some(answer)
}

/// Clients that open connections and send nothing, a request head or body a byte at a time, or
/// never read their answer: with every place taken, a new connection is served in place of the
/// one idle the longest, each of the others is cut off once 30 s late, and a Postgres client that
/// never reads its answer is cut off alike.
#[test]
fn idle_crawling_and_stalled_http_and_postgres_clients_are_cut_off_and_the_api_keeps_answering() {
    use std::io::{Read, Write};
    use std::net::TcpStream;
    const MAX_CONNECTIONS: usize = 256;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("in.jsonl"), stories(20)).unwrap();
    let (http, pg) = (free_port(), free_port());
    let config = format!(
        "[source]\ntype = \"file\"\npath = \"in.jsonl\"\n[storage]\npath = \"store\"\n\
         [run]\nsummary_interval = \"0s\"\nkeep_serving = true\nshutdown_timeout = \"2s\"\n[server]\nhttp = \"127.0.0.1:{http}\"\n\
         postgres = \"127.0.0.1:{pg}\"\npostgres_password = \"pw\"\n"
    );
    let mut run = Pipeline::start(dir.path(), "p", &config);
    let get = |path: &str| get_on_its_own_connection(http, path);
    let health = || get("/health").is_some();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !health() {
        assert!(Instant::now() < deadline && run.child.try_wait().unwrap().is_none(), "no API\n{}", run.logs());
        std::thread::sleep(Duration::from_millis(100));
    }
    let opened = Instant::now();
    let connect = || {
        let stream = TcpStream::connect(("127.0.0.1", http)).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(90))).unwrap();
        stream
    };
    // Whether the server closed `stream` (end of stream or a reset), waiting at most its read timeout.
    let closed_by_server = |stream: &mut TcpStream| match stream.read(&mut [0u8; 64]) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => !matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut),
    };
    // The clients that will not read their answer have a 4 KiB receive buffer, so the server's writes wait.
    let unread = |port: u16| {
        let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        socket.connect(&std::net::SocketAddr::from(([127, 0, 0, 1], port)).into()).unwrap();
        TcpStream::from(socket)
    };
    let mut stalled = unread(http);
    let mut idle: Vec<TcpStream> = (1..MAX_CONNECTIONS).map(|_| connect()).collect();
    // A crawler sends its head a byte at a time, one byte a second, and never finishes it.
    let mut crawler = idle.pop().unwrap();
    let crawling = std::thread::spawn(move || {
        for byte in b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ".iter().cycle() {
            if crawler.write_all(&[*byte]).is_err() {
                return (opened.elapsed(), true);
            }
            std::thread::sleep(Duration::from_secs(1));
            if opened.elapsed() > Duration::from_secs(120) {
                return (opened.elapsed(), false);
            }
        }
        unreachable!()
    });
    // Another sends a whole head, then its body a byte a second, reading what comes back meanwhile.
    let mut body_crawler = idle.pop().unwrap();
    body_crawler.write_all(b"POST /sql HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 1000\r\n\r\n").unwrap();
    body_crawler.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
    let body_crawling = std::thread::spawn(move || {
        let mut answer = Vec::new();
        for byte in b"SELECT 1 ".iter().cycle() {
            if body_crawler.write_all(&[*byte]).is_err() {
                break;
            }
            let mut buf = [0u8; 512];
            match body_crawler.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => answer.extend_from_slice(&buf[..n]),
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
                Err(_) => break,
            }
            if opened.elapsed() > Duration::from_secs(120) {
                return (opened.elapsed(), false, answer);
            }
        }
        (opened.elapsed(), true, answer)
    });
    // And one asks for a 20 MB answer and never reads it.
    let query = "SELECT repeat('x', 20000000) AS s";
    stalled.write_all(format!("POST /sql HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {}\r\n\r\n{query}", query.len()).as_bytes()).unwrap();
    let mut stalled_pg = common::pgwire::login(unread(pg), "pw");
    stalled_pg.write_all(&common::pgwire::message(b'Q', &[query.as_bytes(), b"\0"].concat())).unwrap();
    // Its answer has begun: its connection is busy, not one to close for another.
    let mut status_line = [0u8; 12];
    stalled.read_exact(&mut status_line).unwrap();
    assert_eq!(&status_line, b"HTTP/1.1 200");
    // One more than the bound: the connection idle the longest (the first idle one) is closed for it.
    assert!(health(), "a request past the bound was not served\n{}", run.logs());
    idle[0].set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    assert!(closed_by_server(&mut idle[0]), "the connection idle the longest was not closed for the new one");
    // The idle ones are cut off after the head timeout, not before.
    for stream in idle.iter_mut() {
        assert!(closed_by_server(stream), "an idle connection stayed open");
    }
    let cut = opened.elapsed();
    assert!(cut >= Duration::from_secs(29), "cut off after {cut:?}, before the 30 s head timeout");
    let (crawled, cut_off) = crawling.join().unwrap();
    assert!(cut_off, "the crawler was still sending after {crawled:?}");
    let (crawled, cut_off, answer) = body_crawling.join().unwrap();
    assert!(cut_off, "the body crawler was still sending after {crawled:?}");
    assert!(crawled >= Duration::from_secs(29), "the body crawler was cut off after {crawled:?}, before the 30 s body timeout");
    // Its 408 may be lost to the reset that closing on its unread bytes makes; the counter is not.
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.is_empty() || answer.starts_with("HTTP/1.1 408"), "{answer}");
    let counter = |name: &str| -> f64 {
        let metrics = get("/metrics").expect("metrics answer");
        metrics.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok()).unwrap_or(0.0)
    };
    assert!(counter("bearwatch_http_body_timeouts_total") >= 1.0, "the late body is counted");
    // Each client that never read is cut off and counted; what it can still read is what the
    // kernel held when the server gave up, not the whole answer.
    let cut_off = |stream: &mut TcpStream, metric: &str, who: &str| {
        let deadline = Instant::now() + Duration::from_secs(60);
        while counter(metric) < 1.0 {
            assert!(Instant::now() < deadline, "the {who} client that never read was not cut off\n{}", run.logs());
            std::thread::sleep(Duration::from_millis(500));
        }
        stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut received = Vec::new();
        let _ = stream.read_to_end(&mut received);
        assert!(received.len() < 20_000_000, "the stalled {who} answer was sent whole ({} bytes)", received.len());
    };
    cut_off(&mut stalled, "bearwatch_http_write_timeouts_total", "HTTP");
    cut_off(&mut stalled_pg, "bearwatch_postgres_connections_closed_total{reason=\"write_timeout\"}", "Postgres");
    assert!(counter("bearwatch_http_connections_closed_idle_total") >= 1.0, "idle connections closed for new ones are counted");
    run.signal("TERM");
    assert!(run.wait(Duration::from_secs(30)).success(), "{}", run.logs());
}

/// A request whose body is still on its way has had nothing done for it: with every place taken by
/// such requests (a body a byte a second, say), a new connection is served in place of the one
/// that has waited the longest, and a body that does arrive is answered as usual.
#[test]
fn requests_still_sending_their_body_make_room_for_new_connections() {
    use std::io::{BufRead, BufReader, Read, Write};
    use std::net::TcpStream;
    const MAX_CONNECTIONS: usize = 256;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("in.jsonl"), stories(5)).unwrap();
    let http = free_port();
    let config = format!(
        "[source]\ntype = \"file\"\npath = \"in.jsonl\"\n[storage]\npath = \"store\"\n\
         [run]\nsummary_interval = \"0s\"\nkeep_serving = true\nshutdown_timeout = \"2s\"\n[server]\nhttp = \"127.0.0.1:{http}\"\n"
    );
    let mut run = Pipeline::start(dir.path(), "p", &config);
    let get = |path: &str| get_on_its_own_connection(http, path);
    let deadline = Instant::now() + Duration::from_secs(60);
    while get("/health").is_none() {
        assert!(Instant::now() < deadline && run.child.try_wait().unwrap().is_none(), "no API\n{}", run.logs());
        std::thread::sleep(Duration::from_millis(100));
    }
    // Every place: a query's head and the first bytes of its body. The server's "100 Continue"
    // says it has taken the request and is reading the body, so each is in flight before the next.
    let query = format!("{:<1000}", "SELECT 42 AS answer");
    let mut senders: Vec<BufReader<TcpStream>> = (0..MAX_CONNECTIONS)
        .map(|_| {
            let mut stream = TcpStream::connect(("127.0.0.1", http)).unwrap();
            stream.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
            let head = "POST /sql HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 1000\r\nExpect: 100-continue\r\n\r\n";
            stream.write_all(head.as_bytes()).unwrap();
            let mut reader = BufReader::new(stream);
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            assert!(line.starts_with("HTTP/1.1 100"), "{line}");
            reader.read_line(&mut line).unwrap();
            reader.get_mut().write_all(&query.as_bytes()[..6]).unwrap();
            reader
        })
        .collect();
    // One more: served, and the request that has waited the longest is closed unanswered.
    let health = get("/health");
    assert!(health.is_some(), "a connection past the bound was refused while every place held an unfinished body\n{}", run.logs());
    let mut rest = Vec::new();
    let _ = senders[0].read_to_end(&mut rest);
    assert!(rest.is_empty(), "the oldest unfinished request was answered: {}", String::from_utf8_lossy(&rest));
    // The others were left alone: one finishes its body and gets its answer.
    senders[1].get_mut().write_all(&query.as_bytes()[6..]).unwrap();
    let mut status = String::new();
    senders[1].read_line(&mut status).unwrap();
    assert!(status.starts_with("HTTP/1.1 200"), "a request whose body arrived was not answered: {status}");
    let metrics = get("/metrics").expect("metrics");
    let closed = metrics.lines().find_map(|l| l.strip_prefix("bearwatch_http_connections_closed_idle_total ")).and_then(|v| v.trim().parse::<f64>().ok());
    assert!(closed.is_some_and(|n| n >= 1.0), "the closing is counted: {closed:?}");
    drop(senders);
    run.signal("TERM");
    assert!(run.wait(Duration::from_secs(30)).success(), "{}", run.logs());
}

#[test]
fn config_extremes_are_refused_with_file_line_and_field() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("in.jsonl"), stories(10)).unwrap();
    let base = "[source]\ntype = \"file\"\npath = \"in.jsonl\"\n[storage]\npath = \"store\"\n";
    let cases = [
        ("[window]\nsize = \"1000000000s\"\nslide = \"1s\"\n", "window.slide"),
        ("[window]\ndedup_max_ids = 0\n", "window.dedup_max_ids"),
        ("[model]\nmax_queued = 0\n", "model.max_queued"),
        ("[model]\nmax_queued = 100000000000\n", "model.max_queued"),
        ("[model]\nmax_batch_size = 1000000\n", "model.max_batch_size"),
        ("[model]\nworkers = 1000\n", "model.workers"),
        ("[server]\nhttp = \"127.0.0.1:0\"\nauth_token = \"\"\n", "server.auth_token"),
        ("[server]\npostgres = \"127.0.0.1:0\"\npostgres_password = \"${BEARWATCH_EMPTY}\"\n", "server.postgres_password"),
        ("[server]\nquery_memory_mib = 0\n", "server.query_memory_mib"),
        ("[server]\nquery_timeout = \"0s\"\n", "server.query_timeout"),
        // Anyone who reaches an open API is an admin: loopback only, unless said explicitly.
        ("[server]\nhttp = \"0.0.0.0:0\"\n", "server.http"),
        ("[server]\nhttp = \"127.0.0.1:0\"\nauth_token = \"t\"\n", "server.auth_token"),
        ("[server]\nhttp = \"127.0.0.1:0\"\n[[server.users]]\nname = \"Anonymous\"\nrole = \"viewer\"\ntoken = \"0123456789abcdef\"\n", "server.users"),
    ];
    for (extra, field) in cases {
        let started = Instant::now();
        let (code, out) = run_config(dir.path(), &format!("{base}{extra}"));
        assert_eq!(code, 2, "{extra}: {out}");
        assert!(out.contains("p.toml:") && out.contains(&format!("`{field}`")), "{extra}: {out}");
        assert!(started.elapsed() < Duration::from_secs(20), "{extra}: took {:?}", started.elapsed());
    }
    // `${ENV}` in the storage path: each instance its own folder.
    // SAFETY: only this test reads this variable.
    unsafe { std::env::set_var("BEARWATCH_ADV_STORAGE", "store-a") };
    let (code, out) = run_config(dir.path(), &base.replace("path = \"store\"", "path = \"${BEARWATCH_ADV_STORAGE}\""));
    assert_eq!(code, 0, "{out}");
    assert!(dir.path().join("store-a/checkpoint.json").exists() && !dir.path().join("${BEARWATCH_ADV_STORAGE}").exists());
}

#[test]
fn damaged_storage_refuses_to_start_until_repaired() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("in.jsonl"), stories(300)).unwrap();
    let config = "[source]\ntype = \"file\"\npath = \"in.jsonl\"\n[storage]\npath = \"store\"\n[run]\nsummary_interval = \"0s\"\n";
    assert_eq!(run_config(dir.path(), config).0, 0);
    let store = dir.path().join("store");
    std::fs::remove_file(store.join("windows/part-00000000.parquet")).unwrap();
    let news = store.join("news/part-00000000.parquet");
    let bytes = std::fs::read(&news).unwrap();
    std::fs::write(&news, &bytes[..bytes.len() / 3]).unwrap();

    let (code, out) = run_config(dir.path(), config);
    assert_ne!(code, 0, "{out}");
    assert!(out.contains("windows/part-00000000.parquet is missing") && out.contains("news/part-00000000.parquet is unreadable"), "{out}");
    assert!(out.contains("bearwatch storage repair --storage"), "{out}");

    let repair = Command::new(env!("CARGO_BIN_EXE_bearwatch")).args(["storage", "repair", "--storage"]).arg(dir.path().join("store")).output().unwrap();
    assert!(repair.status.success(), "{}", String::from_utf8_lossy(&repair.stderr));
    assert_eq!(String::from_utf8_lossy(&repair.stdout).matches("set aside").count(), 2);
    let (code, out) = run_config(dir.path(), config);
    assert_eq!(code, 0, "{out}");
    // Queries work again: the set-aside part's rows are gone (the restart re-read nothing, as the
    // checkpoint had the whole file), the parts written since are there.
    let sql = Command::new(env!("CARGO_BIN_EXE_bearwatch")).args(["sql", "--storage"]).arg(&store).arg("SELECT count(*) AS n FROM news").output().unwrap();
    assert!(sql.status.success(), "{}", String::from_utf8_lossy(&sql.stderr));
    assert!(store.join("damaged/news-part-00000000.parquet").exists());
}

#[test]
fn a_file_source_resumes_across_appends_and_refuses_an_edited_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("in.jsonl");
    std::fs::write(&file, minute_stories(300, 1000)).unwrap();
    let config = "[source]\ntype = \"file\"\npath = \"./in.jsonl\"\n[storage]\npath = \"store\"\n[run]\nsummary_interval = \"0s\"\n";
    assert_eq!(run_config(dir.path(), config).0, 0);
    let store = dir.path().join("store");
    // The same file named another way, with stories appended that are older than any read.
    let mut text = std::fs::read_to_string(&file).unwrap();
    text.push_str(&minute_stories(100, 0));
    std::fs::write(&file, &text).unwrap();
    let (code, out) = run_config(dir.path(), &config.replace("./in.jsonl", "in.jsonl"));
    assert_eq!(code, 0, "{out}");
    assert_eq!(query_one(&store, "SELECT count(*) FROM news"), "400");
    assert_eq!(query_one(&store, "SELECT count(DISTINCT id) FROM news"), "400");
    // The appended stories were behind the watermark: kept, and counted as late.
    assert_eq!(query_one(&store, "SELECT count(*) FROM late"), "100");

    // An edit in the part already read: refused, with what to do, and nothing is stored.
    std::fs::write(&file, text.replacen("Company 1000", "Company 999x", 1)).unwrap();
    let (code, out) = run_config(dir.path(), config);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("have changed") && out.contains("in.jsonl"), "{out}");
    assert_eq!(query_one(&store, "SELECT count(*) FROM news"), "400");
}
