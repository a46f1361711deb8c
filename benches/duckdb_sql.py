"""DuckDB side of `bearwatch bench sql`: one connection over the same Parquet parts, one query per
request. Reads JSON lines {"query": ...} on stdin; answers {"seconds", "rows", "checksum"} (the time
to execute and fetch the whole answer, its row count and the sum of its numeric cells)."""

import decimal
import json
import sys
import time

import duckdb


def main() -> None:
    news = sys.argv[1]
    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    con.execute(f"CREATE VIEW news AS SELECT * FROM read_parquet('{news}/*.parquet')")
    threads = con.execute("SELECT current_setting('threads')").fetchone()[0]
    print(json.dumps({"duckdb": duckdb.__version__, "threads": threads}), flush=True)
    for line in sys.stdin:
        query = json.loads(line)["query"]
        try:
            started = time.perf_counter()
            rows = con.execute(query).fetchall()
            seconds = time.perf_counter() - started
        except duckdb.Error as e:
            print(json.dumps({"error": str(e)}), flush=True)
            continue
        checksum = 0.0
        for row in rows:
            for cell in row:
                if isinstance(cell, (int, float, decimal.Decimal)) and not isinstance(cell, bool):
                    checksum += float(cell)
        print(json.dumps({"seconds": seconds, "rows": len(rows), "checksum": checksum}), flush=True)


if __name__ == "__main__":
    main()
