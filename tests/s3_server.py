"""A real S3 server for tests: moto's ThreadedMotoServer on 127.0.0.1, and a TCP proxy that can drop.

moto answers each request in tens of ms, so tests against it use tiny parents and small parts:
`PART` bytes (the object sink's internal knob `DARWIN_STREAM_S3_PART_BYTES`), with moto's minimum
part size lowered to the same value so that it still refuses a short part that is not the last.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from dataclasses import dataclass, field
from typing import Any

PART = 64 * 1024  # bytes per multipart part in tests (real S3: at least 5 MiB)
BUCKET = "darwin"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def options(endpoint: str, key: str = "testing", secret: str = "testing") -> dict[str, Any]:
    """s3fs storage options for a server at `endpoint`, failing fast (no retries) when it is gone."""
    return {"key": key, "secret": secret, "endpoint_url": endpoint,
            "client_kwargs": {"region_name": "us-east-1"},
            "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 2, "read_timeout": 5}}


@dataclass
class S3Server:
    endpoint: str
    server: Any
    client: Any = field(repr=False)  # boto3 client, for looking at the bucket behind darwin-stream's back

    @property
    def opts(self) -> dict[str, Any]:
        return options(self.endpoint)

    def keys(self, prefix: str, bucket: str = BUCKET) -> list[str]:
        r = self.client.list_objects_v2(Bucket=bucket, Prefix=prefix)
        return [o["Key"] for o in r.get("Contents", [])]

    def uploads(self, prefix: str, bucket: str = BUCKET) -> list[dict]:
        return self.client.list_multipart_uploads(Bucket=bucket, Prefix=prefix).get("Uploads", [])

    def get(self, key: str, bucket: str = BUCKET) -> bytes:
        return self.client.get_object(Bucket=bucket, Key=key)["Body"].read()


def start() -> S3Server:
    import logging

    import boto3
    import moto.s3.models
    from moto.server import ThreadedMotoServer

    moto.s3.models.S3_UPLOAD_PART_MIN_SIZE = PART  # read at each CompleteMultipartUpload
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="testing",
                          aws_secret_access_key="testing")
    client.create_bucket(Bucket=BUCKET)
    return S3Server(endpoint, server, client)


class Proxy:
    """A loopback TCP proxy in front of the server; `drop()` closes every connection and the port."""

    def __init__(self, target_port: int):
        self.target = target_port
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.conns: list[socket.socket] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while True:
            try:
                a, _ = self.sock.accept()
            except OSError:
                return
            b = socket.create_connection(("127.0.0.1", self.target))
            with self.lock:
                self.conns += [a, b]
            for src, dst in ((a, b), (b, a)):
                threading.Thread(target=self._pipe, args=(src, dst), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def drop(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        with self.lock:
            for c in self.conns:
                with contextlib.suppress(OSError):
                    c.shutdown(socket.SHUT_RDWR)
                c.close()
