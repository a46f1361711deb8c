//! `bearwatch rules check`: the shipped rules pass; broken ones fail with file, line and field.

use std::process::Command;

fn check(files: &[&std::path::Path]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_bearwatch")).args(["rules", "check"]).args(files).output().unwrap();
    (out.status.code().unwrap(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn the_shipped_rules_pass() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("alerts");
    let files: Vec<std::path::PathBuf> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).filter(|p| p.extension().is_some_and(|x| x == "toml")).collect();
    assert!(!files.is_empty());
    let refs: Vec<&std::path::Path> = files.iter().map(|p| p.as_path()).collect();
    let (code, stdout, stderr) = check(&refs);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("default.toml: ok (1 rules"), "{stdout}");
}

#[test]
fn broken_rules_name_file_line_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("[[rules]]\nname = \"a\"\ngroup = \"topic\"\nmetric = \"neg_share\"\nsevrity = \"info\"\n", ":5:", "sevrity"),
        ("[[rules]]\nname = \"a\"\ngroup = \"sector\"\nmetric = \"neg_share\"\n", ":3:", "rules[0].group"),
        ("[[routes]]\nreceivers = [\"log\"]\ngroup_wait = \"soon\"\n", ":3:", "routes[0].group_wait"),
        ("[[silences]]\nmatch = {}\nstarts_at = \"tomorrow\"\nends_at = \"2026-01-01T00:00:00Z\"\n", ":3:", "silences[0].starts_at"),
    ];
    for (i, (text, line, field)) in cases.into_iter().enumerate() {
        let file = dir.path().join(format!("r{i}.toml"));
        std::fs::write(&file, text).unwrap();
        let (code, _, stderr) = check(&[&file]);
        assert_eq!(code, 2, "{stderr}");
        assert!(stderr.contains(&format!("{}{line}", file.display())) && stderr.contains(field), "{stderr}");
    }
    // The same rule name in two files is refused too.
    let a = dir.path().join("a.toml");
    let b = dir.path().join("b.toml");
    let rule = "[[rules]]\nname = \"same\"\ngroup = \"all\"\nmetric = \"n\"\ncondition = { kind = \"threshold\", op = \">\", value = 1 }\n";
    std::fs::write(&a, rule).unwrap();
    std::fs::write(&b, rule).unwrap();
    let (code, _, stderr) = check(&[&a, &b]);
    assert_eq!(code, 2);
    assert!(stderr.contains("also defined in"), "{stderr}");
    // And by a pipeline, which ran both as one rule (one state, one alert id for two rules).
    std::fs::write(dir.path().join("in.jsonl"), "").unwrap();
    let config = dir.path().join("p.toml");
    std::fs::write(&config, "[source]\ntype = \"file\"\npath = \"in.jsonl\"\n[storage]\npath = \"store\"\n[alerts]\nrules = [\"a.toml\", \"b.toml\"]\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_bearwatch")).args(["run", "--pipeline"]).arg(&config).current_dir(dir.path()).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("b.toml") && stderr.contains("rule `same` is also defined in"), "{stderr}");
}

/// A rule file can be right on its own and wrong for a pipeline (a route to a receiver it does
/// not define): `--pipeline` checks what its start and a reload would, before the reload refuses it.
#[test]
fn rules_are_checked_against_a_pipeline() {
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("r.toml");
    std::fs::write(&rules, "[[rules]]\nname = \"a\"\ngroup = \"all\"\nmetric = \"n\"\ncondition = { kind = \"threshold\", op = \">\", value = 1 }\n\n[[routes]]\nreceivers = [\"pager\"]\n").unwrap();
    let pipeline = dir.path().join("p.toml");
    let config = format!(
        "[source]\ntype = \"file\"\npath = \"in.jsonl\"\n[storage]\npath = \"store\"\n[alerts]\nrules = [\"{}\"]\n[[receivers]]\nname = \"hook\"\ntype = \"webhook\"\nurl = \"http://127.0.0.1:9/\"\n",
        rules.display()
    );
    std::fs::write(&pipeline, &config).unwrap();
    assert_eq!(check(&[&rules]).0, 0, "right on its own");
    let run = |args: &[&std::path::Path]| {
        let out = Command::new(env!("CARGO_BIN_EXE_bearwatch")).args(["rules", "check", "--pipeline"]).args(args).output().unwrap();
        (out.status.code().unwrap(), String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr))
    };
    for args in [vec![pipeline.as_path()], vec![pipeline.as_path(), rules.as_path()]] {
        let (code, out) = run(&args);
        assert_eq!(code, 2, "{out}");
        assert!(out.contains("r.toml") && out.contains("receiver `pager`"), "{out}");
    }
    std::fs::write(&pipeline, config.replace("name = \"hook\"", "name = \"pager\"")).unwrap();
    let (code, out) = run(&[pipeline.as_path()]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("the rules fit"), "{out}");
}

fn rules_test(file: &std::path::Path) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_bearwatch")).args(["rules", "test"]).arg(file).output().unwrap();
    (out.status.code().unwrap(), String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr))
}

#[test]
fn the_shipped_rules_pass_their_unit_tests_and_a_wrong_expectation_prints_exp_and_got() {
    let shipped = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("alerts/tests/default.test.toml");
    let (code, out) = rules_test(&shipped);
    assert_eq!(code, 0, "{out}");
    assert_eq!(out.lines().filter(|l| l.starts_with("ok ")).count(), 7, "{out}");

    // Expecting the burst to go unnoticed fails, and says what fired instead.
    let dir = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(&shipped).unwrap().replace("\"../default.toml\"", &format!("{:?}", shipped.parent().unwrap().join("../default.toml")));
    let wrong = text.replacen(r#"firing = [{ rule = "topic-negative-burst", topic = "earnings" }]"#, "firing = []", 1);
    assert_ne!(wrong, text);
    let file = dir.path().join("wrong.test.toml");
    std::fs::write(&file, wrong).unwrap();
    let (code, out) = rules_test(&file);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("FAIL") && out.contains("at 2026-01-08T10:30:00Z"), "{out}");
    assert!(out.contains("exp: (none)\n"), "{out}");
    assert!(out.contains("got: topic-negative-burst topic=earnings\n"), "{out}");
}
