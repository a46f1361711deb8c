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
