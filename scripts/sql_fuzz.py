#!/usr/bin/env python3
"""Random SQL function calls against a running pipeline, with megabyte-sized arguments, watching its
memory: each call must be answered or refused as the query's error (HTTP 4xx), and the process's
peak resident memory must stay bounded. What `tests/sql_functions.rs` cannot draw in CI time.

    bearwatch run --pipeline P.toml &        # [server] http = "127.0.0.1:9464", query_memory_mib = 64
    scripts/sql_fuzz.py --pid $(pgrep -f 'bearwatch run') --calls 3000 --seed 1
    scripts/sql_fuzz.py --pid ... --kind aggregate --rows 0      # aggregates over the whole table

Prints every call that was the server's failure (a 5xx other than DataFusion's self-reported bugs,
or no answer), took over 5 s, or raised the peak RSS by over 80 MB, then the peak RSS before and
after. Standard library only."""
import argparse
import json
import random
import sys
import time
import urllib.error
import urllib.request

ARGUMENTS = [
    "NULL", "0", "-1", "1", "2", "3", "2147483647", "-2147483648", "9223372036854775807", "-9223372036854775808", "1e308",
    "-1e308", "CAST('NaN' AS DOUBLE)", "CAST('inf' AS DOUBLE)", "0.5", "''", "'abc'", "'é€𝄞'", "'%'", "'('", "'hex'",
    "'base64'", "'%Y-%m-%d'", "'day'", "DATE '1970-01-01'", "DATE '9999-12-31'", "TIMESTAMP '2262-04-11T23:47:16'",
    "TIMESTAMP '1677-09-21T00:12:44'", "INTERVAL '1 day'", "INTERVAL '-1 second'", "[1, 2, 3]", "[]", "make_array(NULL)",
    "[[1], [2, 3]]", "X'00ff'", "true", "'a,b,,c'", "headline", "published_at", "p_negative", "topic", "tickers",
    "named_struct('a', 1)", "map(['k'], [1])", "'Invalid/Zone'",
    # Megabytes: what a function may multiply.
    "repeat('ab', 5000000)", "repeat('é', 3000000)", "array_repeat(1, 2000000)", "array_repeat('xyz', 1000000)",
    "repeat(headline, 1000)", "generate_series(1, 1000000)",
]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:9464")
    p.add_argument("--token", help="a bearer token, where the API has one")
    p.add_argument("--pid", type=int, required=True, help="the pipeline's process id (its peak RSS is read from /proc)")
    p.add_argument("--calls", type=int, default=3000)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--kind", choices=["scalar", "aggregate", "window"], default="scalar", help="which functions to call")
    p.add_argument("--rows", type=int, default=3, help="rows of news each call runs over; 0: the whole table")
    args = p.parse_args()

    def sql(query):
        headers = {"Content-Type": "text/plain", "Accept": "application/json"}
        if args.token:
            headers["Authorization"] = f"Bearer {args.token}"
        request = urllib.request.Request(args.url + "/sql", data=query.encode(), method="POST", headers=headers)
        started = time.time()
        try:
            with urllib.request.urlopen(request, timeout=120) as r:
                return r.status, r.read(), time.time() - started
        except urllib.error.HTTPError as e:
            return e.code, e.read(), time.time() - started
        except OSError as e:
            return 0, str(e).encode(), time.time() - started

    def peak_mib():
        with open(f"/proc/{args.pid}/status") as status:
            return next(int(line.split()[1]) // 1024 for line in status if line.startswith("VmHWM"))

    kind = args.kind.upper()
    status, body, _ = sql(f"SELECT DISTINCT routine_name AS name FROM information_schema.routines WHERE function_type = '{kind}' ORDER BY 1")
    if status != 200:
        sys.exit(f"cannot list the functions: {status} {body[:200]!r}")
    names = [row["name"] for row in json.loads(body)]
    rng = random.Random(args.seed)
    start = peak = peak_mib()
    failures = 0
    for _ in range(args.calls):
        arguments = ", ".join(rng.choice(ARGUMENTS) for _ in range(rng.choice([1, 1, 2, 2, 3])))
        over = " OVER (ORDER BY published_at)" if args.kind == "window" else ""
        rows = f"(SELECT * FROM news LIMIT {args.rows})" if args.rows else "news"
        query = f'SELECT "{rng.choice(names)}"({arguments}){over} AS v FROM {rows} t'
        status, body, took = sql(query)
        now = peak_mib()
        servers_fault = status == 0 or (status >= 500 and b"bug in DataFusion" not in body)
        if servers_fault or took > 5 or now > peak + 80:
            failures += servers_fault
            print(f"{status} {took:.2f} s, peak {peak} -> {now} MiB: {query}\n    {body[:200]!r}", flush=True)
        peak = max(peak, now)
    print(f"{args.calls} calls of {len(names)} {args.kind} functions: {failures} the server's failure; peak RSS {start} -> {peak} MiB")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
