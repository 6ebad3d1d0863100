"""Servers the remote-data tests (and bench/remote_shards.py) start themselves, on 127.0.0.1
only: moto's S3 API server, a plain HTTP file server, and a proxy in front of either that
counts requests and injects faults (503, 403, connection reset, truncated body, stalled
socket), latency and a bandwidth cap."""

from __future__ import annotations

import contextlib
import http.client
import http.server
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, proc: subprocess.Popen | None = None, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


@contextlib.contextmanager
def _server(*args: str) -> Iterator[str]:
    """`python -m ARGS --port P` in its own process until the block ends; its URL."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", *args, str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port, proc)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def s3_server():
    """moto's S3 API in server mode; its endpoint URL (AWS_ENDPOINT_URL)."""
    return _server("moto.server", "-H", "127.0.0.1", "-p")


def gcs_server():
    """gcp-storage-emulator (Python, in memory), a bucket named data; its endpoint URL,
    for STORAGE_EMULATOR_HOST (google-auth's and gcsfs's convention)."""
    return _server("gcp_storage_emulator", "start", "--host", "127.0.0.1", "--in-memory",
                   "--default-bucket", "data", "--port")  # fmt: skip


def s3_env(endpoint: str) -> dict[str, str]:
    """What a client needs to reach the server: the AWS conventions, nothing distres-own."""
    return {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }


def s3_client(endpoint: str):
    import boto3

    env = s3_env(endpoint)
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        region_name=env["AWS_DEFAULT_REGION"],
    )


def upload_dir(client, local: Path, bucket: str, prefix: str, only: str = "") -> None:
    with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
        client.create_bucket(Bucket=bucket)
    for f in sorted(Path(local).iterdir()):
        if f.is_file() and f.name.endswith(only):
            client.upload_file(str(f), bucket, f"{prefix}/{f.name}")


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@contextlib.contextmanager
def http_server(root: Path) -> Iterator[str]:
    """A plain HTTP file server over `root` (Python's own; it takes no Range requests)."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(_Quiet, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


class Proxy(http.server.ThreadingHTTPServer):
    """Forwards every request to `upstream`, counting them; faults are taken in order from
    `faults` by the first request whose (method, path) `match`es: "503", "403", "reset"
    (half the body, then a TCP reset), "truncate" (half the body, then a clean close under
    the full Content-Length), "stall" (half the body, then silence for `stall_s`)."""

    daemon_threads = True

    def __init__(self, upstream: str, latency: float = 0.0, bandwidth: float = 0.0):
        super().__init__(("127.0.0.1", 0), _ProxyHandler)
        self.upstream = upstream.split("://", 1)[1]
        self.latency, self.bandwidth = latency, bandwidth
        self.requests: list[tuple[str, str]] = []
        self.faults: list[tuple[str, Callable[[str, str], bool]]] = []
        self.stall_s = 30.0
        self.cpu = 0.0  # CPU seconds its handler threads used (the bench reports it)
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def __enter__(self) -> Proxy:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
        self.server_close()

    def inject(self, kind: str, match: Callable[[str, str], bool], times: int = 1) -> None:
        with self.lock:
            self.faults += [(kind, match)] * times

    def take(self, method: str, path: str) -> str | None:
        with self.lock:
            self.requests.append((method, path))
            for n, (kind, match) in enumerate(self.faults):
                if match(method, path):
                    del self.faults[n]
                    return kind
        return None

    def count(self, method: str | None = None, contains: str = "") -> int:
        with self.lock:
            return sum(
                1 for m, p in self.requests if (method is None or m == method) and contains in p
            )

    def per_path(self, method: str = "GET") -> Counter:
        with self.lock:
            return Counter(p.split("?")[0] for m, p in self.requests if m == method)

    def reset_counts(self) -> None:
        with self.lock:
            self.requests.clear()


def is_get(name: str) -> Callable[[str, str], bool]:
    """A fault matcher: GETs of paths containing `name`."""
    return lambda method, path: method == "GET" and name in path.split("?")[0]


class _ProxyHandler(http.server.BaseHTTPRequestHandler):
    server: Proxy
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:
        pass

    def _handle(self) -> None:
        t0 = time.thread_time()
        try:
            self._forward()
        finally:
            with self.server.lock:
                self.server.cpu += time.thread_time() - t0

    def _forward(self) -> None:
        proxy = self.server
        fault = proxy.take(self.command, self.path)
        if proxy.latency:
            time.sleep(proxy.latency)
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        if fault in ("503", "403"):
            code = b"AccessDenied" if fault == "403" else b"SlowDown"  # what S3 answers
            message = b"<Error><Code>" + code + b"</Code><Message>injected</Message></Error>"
            self.send_response(int(fault))
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(message)))
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(message)
            self.close_connection = True
            return
        conn = http.client.HTTPConnection(proxy.upstream, timeout=60)
        headers = {k: v for k, v in self.headers.items() if k.lower() != "connection"}
        conn.request(self.command, self.path, body=body, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
        conn.close()
        self.send_response(resp.status)
        for k, v in resp.getheaders():
            if k.lower() not in ("transfer-encoding", "connection", "content-length", "date",
                                 "server"):  # fmt: skip
                self.send_header(k, v)
        # a HEAD answers with the object's length, and no body
        length = resp.getheader("Content-Length") if self.command == "HEAD" else len(data)
        self.send_header("Content-Length", str(length or 0))
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        if self.command == "HEAD":
            return
        if fault in ("reset", "truncate", "stall") and len(data) > 1:
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            if fault == "stall":
                time.sleep(proxy.stall_s)
            elif fault == "reset":  # SO_LINGER 0: close sends RST, not FIN
                self.connection.setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                )
            return
        self._send(data)

    def _send(self, data: bytes) -> None:
        rate = self.server.bandwidth
        if not rate:
            self.wfile.write(data)
            return
        step = max(1, int(rate / 50))  # 20 ms slices
        t0 = time.monotonic()
        for start in range(0, len(data), step):
            self.wfile.write(data[start : start + step])
            ahead = t0 + (start + step) / rate - time.monotonic()
            if ahead > 0:
                time.sleep(ahead)

    do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _handle


def disk_usage(path: Path) -> int:
    """Bytes of the files under `path` (partial downloads included)."""
    total = 0
    for dirpath, _, names in os.walk(path):
        for name in names:
            with contextlib.suppress(FileNotFoundError):
                total += os.stat(os.path.join(dirpath, name)).st_size
    return total


class PeakDisk:
    """The largest disk_usage(path) seen while the block runs (sampled every 5 ms)."""

    def __init__(self, path: Path):
        self.path, self.peak, self._stop = path, 0, threading.Event()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, disk_usage(self.path))
            time.sleep(0.005)

    def __enter__(self) -> PeakDisk:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, disk_usage(self.path))
