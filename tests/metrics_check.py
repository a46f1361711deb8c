"""Parses a Prometheus text exposition from stdin with Prometheus's own Python client (an
independent parser; tests/ops.rs runs it beside `promtool check metrics`) and checks it against the
metrics bearwatch says it exports, given as arguments NAME=KIND (counter | gauge | histogram).
Prints one JSON object: the families parsed; exits 1 with the problems found."""
import json
import math
import sys

from prometheus_client.parser import text_string_to_metric_families


def main() -> int:
    families = {}
    for family in text_string_to_metric_families(sys.stdin.read()):
        # The client names a counter family without its `_total` suffix.
        name = family.name + "_total" if family.type == "counter" else family.name
        families[name] = family
    problems = []
    for expected in sys.argv[1:]:
        name, kind = expected.split("=")
        family = families.get(name)
        if family is None:
            problems.append(f"{name}: not exported")
            continue
        if family.type != kind:
            problems.append(f"{name}: type {family.type}, expected {kind}")
        if not family.documentation:
            problems.append(f"{name}: no HELP text")
        if kind == "histogram":
            problems += histogram_problems(name, family)
    print(json.dumps({"families": sorted(families), "problems": problems}))
    return 1 if problems else 0


def histogram_problems(name, family):
    """Buckets per label set: ascending bounds ending at +Inf, cumulative counts, +Inf = _count."""
    series = {}
    for sample in family.samples:
        labels = tuple(sorted((k, v) for k, v in sample.labels.items() if k != "le"))
        entry = series.setdefault(labels, {"buckets": [], "count": None, "sum": None})
        if sample.name == name + "_bucket":
            entry["buckets"].append((float(sample.labels["le"]), sample.value))
        elif sample.name == name + "_count":
            entry["count"] = sample.value
        elif sample.name == name + "_sum":
            entry["sum"] = sample.value
    problems = []
    for labels, entry in series.items():
        buckets = entry["buckets"]
        bounds = [b for b, _ in buckets]
        counts = [c for _, c in buckets]
        if len(buckets) < 2 or bounds[-1] != math.inf:
            problems.append(f"{name}{labels}: buckets {bounds} do not end at +Inf")
        if bounds != sorted(bounds) or counts != sorted(counts):
            problems.append(f"{name}{labels}: buckets are not ascending and cumulative")
        if entry["count"] is None or entry["sum"] is None or (counts and counts[-1] != entry["count"]):
            problems.append(f"{name}{labels}: _count {entry['count']} / _sum {entry['sum']} do not match the +Inf bucket")
    if not series:
        problems.append(f"{name}: no samples")
    return problems


if __name__ == "__main__":
    sys.exit(main())
