"""The object-store and HTTP clients behind storage.py: one fsspec filesystem per protocol,
timeout, process and client environment, with the clients' own retry loops cut to one
attempt (storage.Transfer does the retrying)."""

from __future__ import annotations

import os
import threading

_LOCK = threading.Lock()
_FILESYSTEMS: dict[tuple, object] = {}
# a DataLoader worker forked while a prefetch thread held _LOCK would wait for it forever
os.register_at_fork(before=_LOCK.acquire, after_in_parent=_LOCK.release,
                    after_in_child=_LOCK.release)  # fmt: skip
_CLIENT_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_ACCESS_KEY_ID",
               "GOOGLE_APPLICATION_CREDENTIALS", "STORAGE_EMULATOR_HOST")  # fmt: skip


def filesystem(url: str, timeout: float = 60.0):
    """(fsspec filesystem, its path for `url`): one per protocol, timeout and process.

    Our Transfer does the retrying, so the clients' own retry loops are kept to one attempt
    (a 503 is not then retried 5 x 5 times)."""
    import fsspec

    protocol = url.partition("://")[0].lower()
    protocol = "gs" if protocol == "gcs" else protocol
    # async clients do not survive a fork; endpoints and profiles come from the environment
    env = tuple(os.environ.get(k) for k in _CLIENT_ENV)
    key = (protocol, timeout, os.getpid(), env)
    with _LOCK:
        fs = _FILESYSTEMS.get(key)
        if fs is None:
            if protocol == "s3":
                fs = fsspec.filesystem(
                    "s3",
                    skip_instance_cache=True,
                    session=_aws_session(),
                    config_kwargs={
                        "connect_timeout": timeout,
                        "read_timeout": timeout,
                        "retries": {"total_max_attempts": 1, "mode": "standard"},
                    },
                )
                fs.retries = 1
            elif protocol == "gs":
                if os.environ.get("STORAGE_EMULATOR_HOST"):
                    # gcsfs asks a bucket's type over gRPC first, which an emulator does not
                    # answer: 60 s of waiting per bucket (read when gcsfs is imported)
                    os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
                fs = fsspec.filesystem("gs", skip_instance_cache=True, timeout=timeout)
                fs.retries = 1
            else:
                import aiohttp

                client_timeout = aiohttp.ClientTimeout(
                    total=None, sock_connect=timeout, sock_read=timeout
                )
                fs = fsspec.filesystem(
                    "http",
                    skip_instance_cache=True,
                    client_kwargs={"timeout": client_timeout},
                )
            _FILESYSTEMS[key] = fs
    path = url if protocol in ("http", "https") else url.split("://", 1)[1]
    return fs, path


_SESSIONS: dict[tuple, object] = {}


def _aws_session():
    """One aiobotocore session per environment, kept across forks: a DataLoader worker
    then starts its client from the models its parent parsed (0.2 s of CPU per worker and
    epoch otherwise, on cores that decode). A session holds no connection or loop."""
    from aiobotocore.session import AioSession

    key = tuple(os.environ.get(k) for k in _CLIENT_ENV)
    if key not in _SESSIONS:
        _SESSIONS[key] = AioSession()  # reading the shard set's listing warms it
    return _SESSIONS[key]
