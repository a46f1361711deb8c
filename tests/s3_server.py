"""A real S3-compatible server on 127.0.0.1 for the tests and the scale-out walk-through: moto's
server (Apache-2.0, from PyPI), in memory, with conditional writes (If-None-Match, If-Match).

usage: s3_server.py PORT [BUCKET ...]   creates the buckets, prints "ready", serves until killed.
"""

import sys
import time

import boto3
from moto.server import ThreadedMotoServer


def main() -> None:
    port = int(sys.argv[1])
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    client = boto3.client(
        "s3",
        endpoint_url=f"http://127.0.0.1:{port}",
        region_name="us-east-1",
        aws_access_key_id="test",
        aws_secret_access_key="test",
    )
    for bucket in sys.argv[2:]:
        client.create_bucket(Bucket=bucket)
    print("ready", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        server.stop()


if __name__ == "__main__":
    main()
