"""moto's standalone S3 server for tests that reach an object store for real.

A process of its own, not in-process threads: delta-rs holds the GIL while it waits on a
request, so a server in the test's own interpreter never answers it."""
from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

BUCKET = "vlm4rec-unit"


@contextlib.contextmanager
def moto_s3(bucket: str = BUCKET):
    """The server on a free loopback port, the AWS variables pointing at it while the block
    runs (restored after), and ``bucket`` created; yields a boto3 S3 client."""
    import boto3

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    saved = {}
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(endpoint, timeout=2).close()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto's S3 server did not answer on {endpoint} "
                                       f"(exit code {server.poll()})") from None
                time.sleep(0.2)
        env = {"AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s", "AWS_REGION": "us-east-1",
               "AWS_ENDPOINT_URL": endpoint}
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        client = boto3.client("s3")
        client.create_bucket(Bucket=bucket)
        yield client
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
