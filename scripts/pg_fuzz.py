#!/usr/bin/env python3
"""Random Postgres wire messages against a running pipeline's Postgres listener: each session logs
in, sends 1 to 8 messages of random types with bodies pieced from edge-case fragments (counts that
run past the end, huge lengths inside the body, missing terminators), then a Sync, and reads until
the server answers or closes. With `--phase startup` the sessions do not log in: they send what
comes before a login (SSL, GSS and cancel requests, startup messages with odd protocol versions and
parameters, password messages, bare lengths and random bytes) in random order. Every malformed message must be refused or answered as a protocol
error, never crash the connection's task (no "panicked" in the pipeline's log) and never stop the
listener: psql is asked `SELECT 1` at the end.

    bearwatch run --pipeline P.toml 2> run.log &     # [server] postgres = "127.0.0.1:5433", postgres_password
    scripts/pg_fuzz.py --port 5433 --password pw --sessions 300 --seed 1 && ! grep panicked run.log

Standard library only (and psql for the last check)."""
import argparse
import os
import random
import socket
import struct
import subprocess
import sys

TYPES = b"PBEDSHCQFdcfXp"
PIECES = [b"\0", b"\xff\xff", b"\x00\x01", b"\x7f\xff\xff\xff", b"SELECT 1", b"SELECT $1", b"st", b"S", b"P",
          b"\x00\x00\x00\x00", b"\xff\xff\xff\xff", b"x" * 100, b"\x00\x02\x00\x00\x00\x01"]


def message(kind, body):
    return kind + struct.pack("!i", len(body) + 4) + body


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=5433)
    p.add_argument("--user", default="bearwatch")
    p.add_argument("--password", required=True)
    p.add_argument("--sessions", type=int, default=300)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--phase", choices=["query", "startup"], default="query", help="after a login, or before one")
    args = p.parse_args()
    rng = random.Random(args.seed)

    def login():
        s = socket.create_connection((args.host, args.port))
        s.settimeout(2)
        startup = struct.pack("!i", 196608) + b"user\0" + args.user.encode() + b"\0database\0bearwatch\0\0"
        s.sendall(struct.pack("!i", len(startup) + 4) + startup)
        s.recv(9)
        s.sendall(message(b"p", args.password.encode() + b"\0"))
        received = b""
        while not received.endswith(b"Z\0\0\0\x05I"):
            byte = s.recv(1)
            if not byte:
                sys.exit(f"the login was refused: {received[:200]!r}")
            received += byte
        return s

    def before_login():
        frames = []
        for _ in range(rng.randint(1, 4)):
            kind = rng.randrange(7)
            if kind == 0:
                frames.append(struct.pack("!ii", 8, 80877103))  # SSLRequest
            elif kind == 1:
                frames.append(struct.pack("!ii", 8, 80877104))  # GSSENCRequest
            elif kind == 2:
                frames.append(struct.pack("!iiii", 16, 80877102, rng.randint(-2**31, 2**31 - 1), rng.randint(-2**31, 2**31 - 1)))
            elif kind == 3:
                version = rng.choice([196608, 196609, 131072, 0, -1, 0x00030002])
                body = struct.pack("!i", version) + b"".join(
                    rng.choice([b"user\0", b"bearwatch\0", b"\0", b"database\0", b"x" * 50, b"\xff", b"options\0-c x=y\0", b"_pq_.a\0b\0"])
                    for _ in range(rng.randint(0, 6)))
                frames.append(struct.pack("!i", len(body) + 4) + body)
            elif kind == 4:
                frames.append(bytes(rng.randrange(256) for _ in range(rng.randint(1, 40))))
            elif kind == 5:
                body = b"".join(rng.choice([b"pw", b"\0", b"x" * 30, b"\xff\xfe"]) for _ in range(rng.randint(0, 4)))
                frames.append(message(b"p", body))
            else:
                frames.append(struct.pack("!i", rng.choice([0, 3, 4, 5, 7, 9, 10001, 2**31 - 1, -5])))
        s = socket.create_connection((args.host, args.port))
        s.settimeout(0.5)
        s.sendall(b"".join(frames))
        return s

    ended = 0
    for _ in range(args.sessions):
        s = login() if args.phase == "query" else before_login()
        try:
            if args.phase == "query":
                for _ in range(rng.randint(1, 8)):
                    body = b"".join(rng.choice(PIECES) for _ in range(rng.randint(0, 6)))
                    s.sendall(message(bytes([rng.choice(TYPES)]), body))
                s.sendall(message(b"S", b""))
            while s.recv(65536):
                pass
            ended += 1
        except socket.timeout:
            pass
        except OSError:
            ended += 1
        s.close()
    check = subprocess.run(["psql", "-h", args.host, "-p", str(args.port), "-U", args.user, "-X", "-A", "-t", "-c", "SELECT 1"],
                           env=dict(os.environ, PGPASSWORD=args.password), capture_output=True, text=True)
    print(f"{args.sessions} sessions, {ended} ended by the server; psql afterwards: {check.stdout.strip() or check.stderr.strip()}")
    sys.exit(0 if check.returncode == 0 and check.stdout.strip() == "1" else 1)


if __name__ == "__main__":
    main()
