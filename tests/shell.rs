//! `bearwatch completions SHELL` and `bearwatch man`: generated from the CLI's own definitions, so
//! they list every subcommand; bash loads the completion and completes a subcommand with it.

use std::process::Command;

fn bearwatch(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_bearwatch")).args(args).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn completions_for_each_shell_name_the_subcommands_and_bash_completes_with_them() {
    for shell in ["bash", "zsh", "fish"] {
        let script = bearwatch(&["completions", shell]);
        for sub in ["run", "backtest", "completions", "detect"] {
            assert!(script.contains(sub), "{shell} completion lacks `{sub}`");
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("bearwatch.bash");
    std::fs::write(&script, bearwatch(&["completions", "bash"])).unwrap();
    // What bash offers after `bearwatch rules b<TAB>`.
    let probe = format!(
        "source {:?}; COMP_WORDS=(bearwatch rules b); COMP_CWORD=2; COMP_LINE='bearwatch rules b'; COMP_POINT=${{#COMP_LINE}}; \
         _bearwatch bearwatch b rules; printf '%s\\n' \"${{COMPREPLY[@]}}\"",
        script
    );
    let out = Command::new("bash").args(["-c", &probe]).output().expect("bash");
    let offered = String::from_utf8_lossy(&out.stdout);
    assert_eq!(offered.trim(), "backtest", "{offered}\n{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn the_man_page_is_roff_with_every_top_level_command() {
    let page = bearwatch(&["man"]);
    assert!(page.contains(".TH bearwatch 1") && page.contains(".SH SUBCOMMANDS"), "{page}");
    for sub in ["run", "sql", "rules", "bench", "completions", "man"] {
        assert!(page.contains(&format!("bearwatch\\-{sub}")), "the man page lacks {sub}");
    }
}

/// The subcommands a `--help` lists under "Commands:" (without `help`).
fn subcommands(help: &str) -> Vec<String> {
    let Some(start) = help.find("Commands:\n") else { return Vec::new() };
    help[start + 10..]
        .lines()
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|name| *name != "help")
        .map(str::to_string)
        .collect()
}

#[test]
fn every_commands_help_shows_an_example_of_itself() {
    let mut pending = vec![Vec::<String>::new()];
    let mut seen = 0;
    while let Some(path) = pending.pop() {
        let mut args: Vec<&str> = path.iter().map(String::as_str).collect();
        args.push("--help");
        let help = bearwatch(&args);
        let invocation = format!("Example: {}", ["bearwatch"].into_iter().chain(path.iter().map(String::as_str)).collect::<Vec<_>>().join(" "));
        let example = help.lines().find(|l| l.trim_start().starts_with("Example: "));
        assert!(example.is_some_and(|e| e.trim_start().starts_with(&invocation)), "`{}` shows no example of itself:\n{help}", args.join(" "));
        seen += 1;
        for sub in subcommands(&help) {
            pending.push(path.iter().cloned().chain([sub]).collect());
        }
    }
    assert!(seen >= 30, "walked only {seen} commands");
}
