"""Writes docs/BENCHMARKS.md from benches/BENCHMARKS.md.in and the tables `bearwatch bench …` printed.

Called by scripts/bench.sh with the folder holding each bench's output (classify.md, sql.md,
windows.md, e2e.md, alerts.md) and the seconds the run took; fills the template's @NAME@
placeholders, the machine and versions, and a goals table read from the benches' own tables.
"""
import datetime
import importlib.metadata
import json
import os
import pathlib
import platform
import re
import subprocess
import sys


def command(*args):
    return subprocess.run(args, capture_output=True, text=True, check=True).stdout.strip()


def facts():
    cpu = next((l.split(":", 1)[1].strip() for l in command("lscpu").splitlines() if l.startswith("Model name:")), platform.processor())
    memory_kib = next(int(l.split()[1]) for l in pathlib.Path("/proc/meminfo").read_text().splitlines() if l.startswith("MemTotal:"))
    os_name = next(l.split("=", 1)[1].strip('"') for l in pathlib.Path("/etc/os-release").read_text().splitlines() if l.startswith("PRETTY_NAME="))
    lock = pathlib.Path("Cargo.lock").read_text()
    datafusion = re.search(r'name = "datafusion"\nversion = "([^"]+)"', lock).group(1)
    kafka = re.search(r"<kafka.version>([^<]+)</kafka.version>", pathlib.Path("scripts/kafka/pom.xml").read_text()).group(1)
    labels = json.loads(pathlib.Path("models/labels.json").read_text())
    dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "src", "Cargo.toml", "Cargo.lock"]).returncode != 0
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory": f"{memory_kib / 1024 / 1024:.0f} GiB",
        "os": os_name,
        "kernel": platform.release(),
        "commit": os.environ.get("BENCH_COMMIT") or command("git", "rev-parse", "--short", "HEAD") + (" (with uncommitted changes)" if dirty else ""),
        "rustc": command("rustc", "--version"),
        "onnxruntime": importlib.metadata.version("onnxruntime"),
        "duckdb": importlib.metadata.version("duckdb"),
        "datafusion": datafusion,
        "kafka": kafka,
        "model": f'{labels["name"]}@{labels["version"]}',
    }


def tables(markdown):
    """Every markdown table in `markdown`, as lists of {header: cell}."""
    found, rows, header = [], None, None
    for line in markdown.splitlines() + [""]:
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if header is None:
                header = cells
            elif not set("".join(cells)) <= set("-: "):
                rows.append(dict(zip(header, cells)))
            if rows is None:
                rows = []
        elif header is not None:
            found.append(rows)
            rows, header = None, None
    return found


def number(cell):
    return float(cell.replace(",", "").replace("%", "").replace("×", "").split()[0])


def goals(out):
    classify = tables(out["classify"])[0]
    defaults = next(r for r in classify if r["pipeline"].startswith("bearwatch, defaults"))
    overheads = [abs(number(r["overhead vs bare ORT"])) for r in classify if r["pipeline"].startswith("bearwatch")]
    windows = tables(out["windows"])[0][0]
    e2e = tables(out["e2e"])[0][0]
    sql = tables(out["sql"])[0]
    sql_met = sum(r["goal ≤ 1.5×"] == "met" for r in sql)
    misses = ", ".join(f'{r["query"].split(" (")[0]} {r["bearwatch / DuckDB"]}' for r in sql if r["goal ≤ 1.5×"] != "met")
    alerts = tables(out["alerts"])[0]
    loop = tables(out["loop"])[1]
    loop_goals = "; ".join(f'{r["over the splits"]} {r["mean difference ± sd"]} ({r["goal"]})' for r in loop)
    detect = next(r for r in tables(out["detect"])[0] if r["seed"] == "all")
    detect_met = (
        number(detect["recall (95 %)"]) >= 0.9
        and number(detect["median delay h"]) <= 2
        and number(detect["unexplained episodes / week, injected"]) <= 1
    )
    verdict = lambda ok: "**met**" if ok else "**not met**"
    rows = [
        ("classify ≥ 1.5× the Python reference (wall time)", f'{defaults["× Python (wall)"]} with the defaults: {verdict(number(defaults["× Python (wall)"]) >= 1.5)}'),
        ("classify ≥ 4× the Python reference in CPU time (issue 36)", f'{defaults["× Python (CPU)"]} with the defaults: {verdict(number(defaults["× Python (CPU)"]) >= 4)}'),
        ("classify overhead ≤ 5 % over bare ORT (issue 36; was ≤ 10 %)", f"at most {max(overheads):.1f} % at any batch size: {verdict(max(overheads) <= 5)}"),
        ("windows + rules ≥ 1 M events/s per core", f'{number(windows["events/s per core"]):,.0f} events/s: {verdict(windows["goal ≥ 1 M events/s"] == "met")}'),
        ("end to end ≥ 90 % of classify alone", f'{e2e["pipeline / classify"]} ({e2e["pipeline from Kafka, stories/s"]} vs {e2e["classify alone, stories/s"]} stories/s): {verdict(e2e["goal ≥ 90 %"] == "met")} in this run (runs vary by several points; see its section)'),
        ("alert latency, p50 / p99 (no target set)", "; ".join(f'checkpoint every {r["checkpoint_interval"]}: {r["p50 ms"]} / {r["p99 ms"]} ms' for r in alerts)),
        ("the loop: ≥ +3 points on the untouched part, ≥ −1 elsewhere", loop_goals),
        (
            "detection: recall ≥ 0.9, median delay ≤ 2 h, ≤ 1 unexplained episode / week",
            f'recall {detect["recall (95 %)"]}, median delay {detect["median delay h"]} h, {detect["unexplained episodes / week, injected"]} unexplained / week: {verdict(detect_met)}',
        ),
        ("SQL within 1.5× of DuckDB on each query", f"{sql_met} of {len(sql)}: {verdict(sql_met == len(sql))}" + (f" (over: {misses})" if misses else "")),
        ("peak RSS at steady state (no target set)", f'{e2e["steady-state RSS MiB"]} MiB steady, {e2e["peak RSS MiB"]} MiB peak, end to end on a 24,000-story backlog'),
        ("GPU ≥ 20 k headlines/s on an H200", "not measured: this task was lent no GPU machine"),
    ]
    return "\n".join(f"| {goal} | {result} |" for goal, result in rows)


def main():
    out_dir, seconds = pathlib.Path(sys.argv[1]), int(sys.argv[2])
    machine_facts = facts()
    out = {name: (out_dir / f"{name}.md").read_text().strip() for name in ["classify", "sql", "windows", "e2e", "alerts", "loop", "detect"]}
    machine = "\n".join(
        [
            "Machine and versions:",
            "",
            f'- {machine_facts["cpu"]}, {machine_facts["cores"]} cores, {machine_facts["memory"]} memory, {machine_facts["os"]}, Linux {machine_facts["kernel"]}',
            f'- bearwatch {machine_facts["commit"]}, release build, {machine_facts["rustc"]}',
            f'- ONNX Runtime {machine_facts["onnxruntime"]} (PyPI wheel), DataFusion {machine_facts["datafusion"]}, DuckDB {machine_facts["duckdb"]}, Apache Kafka {machine_facts["kafka"]} (KRaft, one broker on 127.0.0.1)',
            f'- model `{machine_facts["model"]}`',
        ]
    )
    text = pathlib.Path("benches/BENCHMARKS.md.in").read_text()
    for name, value in {
        "DATE": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
        "DURATION": f"{seconds // 60} minutes",
        "MACHINE": machine,
        "GOALS": goals(out),
        "CLASSIFY": out["classify"],
        "SQL": out["sql"],
        "WINDOWS": out["windows"],
        "E2E": out["e2e"],
        "ALERTS": out["alerts"],
        "LOOP": out["loop"],
        "DETECT": out["detect"],
    }.items():
        text = text.replace(f"@{name}@", value)
    leftover = [w for w in text.split() if w.startswith("@") and w.endswith("@") and len(w) > 2]
    if leftover:
        sys.exit(f"report.py: unfilled placeholders {leftover}")
    pathlib.Path("docs/BENCHMARKS.md").write_text(text)


if __name__ == "__main__":
    main()
