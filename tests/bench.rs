//! `bearwatch bench classify` runs end to end (tiny sizes; the real numbers come from a release build).

use assert_cmd::Command;

#[test]
fn bench_classify_prints_a_row_per_configuration_with_its_python_ratio() {
    let out = Command::cargo_bin("bearwatch")
        .unwrap()
        .args(["bench", "classify", "--items", "40", "--batch-sizes", "1,8", "--threads", "1", "--repeats", "2", "--profile"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let rows: Vec<&str> = stdout.lines().filter(|l| l.starts_with("| bearwatch") || l.starts_with("| Python")).collect();
    assert_eq!(rows.len(), 4, "{stdout}");
    for row in &rows {
        let cells: Vec<&str> = row.split('|').map(str::trim).collect();
        let items_per_second: f64 = cells[2].parse().unwrap();
        assert!(items_per_second > 0.0, "{row}");
        let speedup: f64 = cells[cells.len() - 2].trim_end_matches('×').parse().unwrap();
        assert!(speedup > 0.0, "{row}");
        if row.starts_with("| bearwatch") {
            let gop_per_item: f64 = cells[6].parse().unwrap();
            assert!((0.1..2.0).contains(&gop_per_item), "{row}");
        }
    }
    // The machine's int8 instruction sets, and ORT's profile: its time per operator type.
    assert!(stdout.contains("int8:"), "{stdout}");
    let operators: Vec<&str> = stdout.split("| operator |").nth(1).expect("a profile table").lines().skip(2).take_while(|l| l.starts_with('|')).collect();
    assert!(operators.len() >= 5, "{stdout}");
    let shares: f64 = operators.iter().map(|l| l.split('|').nth(4).unwrap().trim().trim_end_matches(" %").parse::<f64>().unwrap()).sum();
    assert!((shares - 100.0).abs() < 0.5, "the shares add up: {stdout}");
    assert!(operators.iter().any(|l| l.contains("MatMul")), "{stdout}");
}

/// A small table: both engines must give the same answers (the bench fails otherwise), and each of
/// the five queries gets a row with times and a ratio.
#[test]
fn bench_sql_times_five_queries_on_both_engines_and_checks_they_agree() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::cargo_bin("bearwatch")
        .unwrap()
        .args(["bench", "sql", "--rows", "30000", "--repeats", "1", "--dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let rows: Vec<&str> = stdout.lines().filter(|l| l.starts_with("| ") && !l.starts_with("| query")).collect();
    assert_eq!(rows.len(), 5, "{stdout}");
    for row in &rows {
        let cells: Vec<&str> = row.split('|').map(str::trim).collect();
        let ours: f64 = cells[2].parse().unwrap();
        let theirs: f64 = cells[3].parse().unwrap();
        let ratio: f64 = cells[4].trim_end_matches('×').parse().unwrap();
        assert!(ours >= 0.0 && theirs >= 0.0 && ratio > 0.0, "{row}");
    }
    assert!(std::fs::read_dir(dir.path().join("news")).unwrap().count() == 1, "one 30 000-row part");
}

/// The analyst's loop on a small set: corrections in, retrain, the gate, the swap's load, and both
/// models scored on the untouched part and elsewhere, each with its paired interval.
#[test]
fn bench_loop_retrains_on_a_reviewed_part_and_compares_before_and_after_on_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/data/loop");
    let head = |file: &str, n: usize| {
        let text: String = std::fs::read_to_string(root.join(file)).unwrap().lines().take(n).map(|l| format!("{l}\n")).collect();
        let path = dir.path().join(file);
        std::fs::write(&path, text).unwrap();
        path
    };
    let (set, elsewhere) = (head("sentfin-dev.jsonl", 80), head("phrasebank-dev.jsonl", 40));
    // Each headline twice (the twin in upper case with a "!", the same text to the memory), every
    // one labelled negative: where a reviewed headline's twin is untouched, the memory carries the
    // analyst's label to it, as the pipeline does to a re-sent story.
    let twinned: String = std::fs::read_to_string(&set)
        .unwrap()
        .lines()
        .flat_map(|l| {
            let mut row: serde_json::Value = serde_json::from_str(l).unwrap();
            row["label"] = "negative".into();
            let mut twin = row.clone();
            twin["text"] = format!("{}!", row["text"].as_str().unwrap().to_uppercase()).into();
            [row.to_string(), twin.to_string()]
        })
        .map(|l| l + "\n")
        .collect();
    std::fs::write(&set, twinned).unwrap();
    let out = Command::cargo_bin("bearwatch")
        .unwrap()
        .args(["bench", "loop", "--splits", "1", "--set"])
        .arg(&set)
        .arg("--elsewhere")
        .arg(&elsewhere)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let row = |set: &str| stdout.lines().find(|l| l.starts_with(&format!("| 0 | {set} | sentiment |"))).map(str::to_string);
    for set in ["sentfin (untouched)", "phrasebank"] {
        let row = row(set).unwrap_or_else(|| panic!("no row for {set}: {stdout}"));
        let cells: Vec<&str> = row.split('|').map(str::trim).collect();
        let (before, after): (f64, f64) = (cells[5].parse().unwrap(), cells[6].parse().unwrap());
        assert!((0.0..=1.0).contains(&before) && (0.0..=1.0).contains(&after), "{row}");
        assert!(cells[7].contains(" to "), "a paired interval: {row}");
    }
    assert_eq!(row("phrasebank").unwrap().split('|').nth(4).map(str::trim), Some("40"), "{stdout}");
    assert!(stdout.contains("Mean seconds: retrain") && stdout.contains("Gate: "), "{stdout}");
    let after = |set: &str| row(set).unwrap().split('|').nth(6).unwrap().trim().parse::<f64>().unwrap();
    let carried: f64 = stdout.split("the memory changed ").nth(1).and_then(|r| r.split(' ').next()).unwrap().parse().unwrap();
    assert!(carried > 0.0 && after("sentfin (untouched, with the memory)") > after("sentfin (untouched)"), "{stdout}");
}

/// `bench detect` on the bundled two weeks of 1987 with a few bursts: the shipped rules catch some
/// and are measured honestly, and a rule that cannot fire catches none and raises nothing.
#[test]
fn bench_detect_counts_caught_bursts_and_unexplained_episodes() {
    let dir = tempfile::tempdir().unwrap();
    let never = dir.path().join("never.toml");
    std::fs::write(&never, "[[rules]]\nname = \"never\"\ngroup = \"topic\"\nmetric = \"n\"\ncondition = { kind = \"threshold\", op = \">\", value = 1000000 }\n").unwrap();
    let bench = |rules: &[&std::path::Path]| {
        let mut cmd = Command::cargo_bin("bearwatch").unwrap();
        cmd.args(["bench", "detect", "--stream", "pipelines/data/reuters-1987.jsonl", "--warmup", "3d", "--bursts", "2", "--seeds", "5,6", "--sizes", "12", "--spans", "2h"]);
        for rules in rules {
            cmd.arg("--rules").arg(rules);
        }
        let out = cmd.current_dir(env!("CARGO_MANIFEST_DIR")).output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
        stdout
    };
    let cells = |stdout: &str, seed: &str| -> Vec<String> {
        let row = stdout.lines().find(|l| l.starts_with(&format!("| {seed} |"))).unwrap_or_else(|| panic!("no row {seed}: {stdout}"));
        row.split('|').map(|c| c.trim().to_string()).filter(|c| !c.is_empty()).collect()
    };
    let shipped = bench(&[]);
    for seed in ["5", "6", "all"] {
        let row = cells(&shipped, seed);
        let (bursts, caught): (usize, usize) = (row[1].parse().unwrap(), row[2].parse().unwrap());
        // Two kinds (added, turned) × one size × one span × 2.
        assert_eq!(bursts, if seed == "all" { 8 } else { 4 }, "{shipped}");
        assert!(caught <= bursts, "{shipped}");
    }
    let all = cells(&shipped, "all");
    assert!(all[2].parse::<usize>().unwrap() >= 1, "twelve negative stories in two hours are caught at least once: {shipped}");
    assert!(shipped.contains("| topic-negative-burst |"), "the per-rule table: {shipped}");
    for table in ["| kind, size, span |", "| added 12 in 2h |", "| size |", "| texts |", "| topic |"] {
        assert!(shipped.contains(table), "{table}: {shipped}");
    }

    let silent = bench(&[&never]);
    let all = cells(&silent, "all");
    assert_eq!((all[2].as_str(), all[4].as_str(), all[6].as_str(), all[7].as_str()), ("0", "—", "0.00", "0.00"), "{silent}");
}

/// A state past 1 MiB grown by the pipeline, then checkpoints of a few stories each: every
/// checkpoint the watcher saw wrote a small share of the state, and the checkpoint reads back.
#[test]
fn bench_checkpoints_counts_what_each_checkpoint_writes_against_the_state() {
    let out = Command::cargo_bin("bearwatch").unwrap().args(["bench", "checkpoints", "--stories", "3000", "--then", "60"]).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let row = stdout.lines().find(|l| l.starts_with("| ") && l.chars().nth(2).is_some_and(|c| c.is_ascii_digit())).expect("a row");
    let cells: Vec<f64> = row.split('|').map(str::trim).filter(|c| !c.is_empty()).map(|c| c.trim_end_matches(" %").parse().unwrap()).collect();
    let (state_mb, checkpoints, written_mb, share) = (cells[0], cells[1], cells[2], cells[3]);
    assert!(state_mb > 1.1 && checkpoints >= 2.0, "{row}");
    assert!(written_mb > 0.0 && share < 30.0, "only the changed pieces: {row}");
    assert!(cells[7] > 0.0, "opened and read: {row}");
}
