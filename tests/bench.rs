//! `bearwatch bench classify` runs end to end (tiny sizes; the real numbers come from a release build).

use assert_cmd::Command;

#[test]
fn bench_classify_prints_a_row_per_configuration_with_its_python_ratio() {
    let out = Command::cargo_bin("bearwatch")
        .unwrap()
        .args(["bench", "classify", "--items", "40", "--batch-sizes", "1,8", "--threads", "1", "--repeats", "2"])
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
        let speedup: f64 = cells[8].trim_end_matches('×').parse().unwrap();
        assert!(speedup > 0.0, "{row}");
    }
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
