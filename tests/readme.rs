//! README's reference sections are checked against the code: the configuration reference against
//! the typed config (every field of every section is shown, and the block parses), the metrics
//! table against `bearwatch::telemetry::METRICS`, and the Alertmanager route shown against
//! `alerts/alertmanager.yml`.

use std::collections::{BTreeMap, BTreeSet};

use bearwatch::pipeline::PipelineConfig;

const README: &str = include_str!("../README.md");

fn block(marker: &str) -> &'static str {
    let start = README.find(&format!("<!-- {marker}:start -->")).unwrap_or_else(|| panic!("README has no {marker} block"));
    let end = README.find(&format!("<!-- {marker}:end -->")).unwrap();
    &README[start..end]
}

/// The config reference: a ```toml block inside the markers.
fn reference() -> String {
    let text = block("config-reference");
    let code = &text[text.find("```toml").unwrap() + 7..];
    code[..code.find("```").unwrap()].to_string()
}

/// The field names serde expects in `section`, from its deny_unknown_fields error.
fn expected_fields(section: &str) -> Vec<String> {
    let minimal = "[source]\ntype = \"file\"\npath = \"x.jsonl\"\n[storage]\npath = \"s\"\n";
    let text = match section {
        "" => format!("zz_unknown = 1\n{minimal}"),
        "source" => minimal.replace("[source]\n", "[source]\nzz_unknown = 1\n"),
        "storage" => minimal.replace("[storage]\n", "[storage]\nzz_unknown = 1\n"),
        "receivers" => format!("{minimal}[[receivers]]\nname = \"x\"\ntype = \"log\"\nzz_unknown = 1\n"),
        other => format!("{minimal}[{other}]\nzz_unknown = 1\n"),
    };
    let message = PipelineConfig::parse(&text, "t.toml").unwrap_err().to_string();
    let list = &message[message.find("expected").unwrap_or_else(|| panic!("{section}: {message}"))..];
    list.split('`').skip(1).step_by(2).map(str::to_string).collect()
}

/// Keys shown per section (`key =`, also in comments), [[receivers]] blocks together.
fn shown_fields(reference: &str) -> BTreeMap<String, BTreeSet<String>> {
    let mut shown: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut section = String::new();
    for line in reference.lines() {
        let line = line.trim().trim_start_matches('#').trim();
        if line.starts_with('[') {
            let header = line.split('#').next().unwrap_or_default().trim();
            section = header.trim_matches(|c| c == '[' || c == ']').to_string();
            shown.entry(section.clone()).or_default().insert(String::new());
            continue;
        }
        if let Some((key, _)) = line.split_once(" = ") {
            if !key.contains(' ') {
                shown.entry(section.clone()).or_default().insert(key.trim_matches('"').to_string());
            }
        }
    }
    shown
}

#[test]
fn the_configuration_reference_shows_every_field_and_parses() {
    let reference = reference();
    // SAFETY: only this test, in its own process, uses these variables.
    unsafe {
        std::env::set_var("BEARWATCH_PG_PASSWORD", "x");
        std::env::set_var("BEARWATCH_TOKEN", "an-admin-token-of-16");
        std::env::set_var("BEARWATCH_TOKEN_ANA", "a-token-of-16-chars");
        std::env::set_var("SMTP_PASSWORD", "x");
        std::env::set_var("KAFKA_PASSWORD", "x");
        std::env::set_var("AM_TOKEN", "x");
    }
    PipelineConfig::parse(&reference, "README.md config reference").unwrap_or_else(|e| panic!("{e}"));
    let shown = shown_fields(&reference);
    let sections = ["", "source", "model", "window", "storage", "sink", "run", "server", "feedback", "alerts", "receivers"];
    let mut missing = Vec::new();
    for section in sections {
        for field in expected_fields(section) {
            let here = shown.get(section).is_some_and(|keys| keys.contains(&field));
            // A field that is a table is shown as its section header.
            let path = if section.is_empty() { field.clone() } else { format!("{section}.{field}") };
            let as_table = shown.contains_key(&path);
            if !here && !as_table {
                missing.push(format!("{section}.{field}"));
            }
        }
    }
    assert!(missing.is_empty(), "README's configuration reference lacks: {missing:?}");
}

#[test]
fn the_metrics_table_lists_exactly_the_exported_metrics() {
    let table = block("metrics");
    let listed: BTreeSet<&str> =
        table.lines().filter_map(|l| l.strip_prefix("| `")).filter_map(|l| l.split('`').next()).filter(|n| n.starts_with("bearwatch_")).collect();
    let exported: BTreeSet<&str> = bearwatch::telemetry::METRICS.iter().map(|m| m.0).collect();
    assert_eq!(listed, exported);
}


#[test]
fn the_alertmanager_route_shown_is_the_shipped_file() {
    let shipped = include_str!("../alerts/alertmanager.yml");
    let section = &README[README.find("### Alertmanager").expect("README has an Alertmanager section")..];
    let code = &section[section.find("```yaml\n").unwrap() + 8..];
    assert_eq!(&code[..code.find("```").unwrap()], shipped, "README's alertmanager.yml differs from alerts/alertmanager.yml");
}
