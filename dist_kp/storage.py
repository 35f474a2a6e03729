"""File systems for output_dir and data: local paths or any fsspec URL, with bounded S3 requests.

Credentials and the endpoint come from the standard environment (AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, AWS_REGION, or the AWS credential chain); only
non-secret options come from the config.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Iterator
from typing import Any

import fsspec
from fsspec.spec import AbstractFileSystem

log = logging.getLogger(__name__)

_options: dict[str, Any] = {}
_timeout_s = 60.0


class StorageError(OSError):
    """A storage location that cannot be used; the message names the URL and the likely cause."""


def configure(storage_options: dict[str, Any], timeout_s: float) -> None:
    """Set the non-secret options and request timeout used for every URL from now on."""
    global _options, _timeout_s
    _options = dict(storage_options)
    _timeout_s = timeout_s


# Attempts per S3 request: botocore's (total_max_attempts) times s3fs's own retry loop.
BOTOCORE_ATTEMPTS = 2
S3FS_ATTEMPTS = 2


def _socket_with_send_timeout(addr_info: tuple) -> socket.socket:
    """A TCP socket that gives up when sent data stays unacknowledged for the request timeout.

    aiohttp bounds connecting and reading but not sending: an upload larger than the socket
    buffers to a server that accepts but stops reading (frozen, overloaded) waits forever.
    """
    family, kind, proto, _, _ = addr_info
    sock = socket.socket(family=family, type=kind, proto=proto)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(_timeout_s * 1000))
    return sock


def _s3_options() -> dict[str, Any]:
    import s3fs

    # Bounded retries: s3fs otherwise retries a dead endpoint for minutes (a class attribute:
    # the constructor refuses `retries=`).
    s3fs.S3FileSystem.retries = S3FS_ATTEMPTS
    config = {"connect_timeout": min(_timeout_s, 10.0), "read_timeout": _timeout_s,
              "retries": {"total_max_attempts": BOTOCORE_ATTEMPTS, "mode": "standard"}}
    if hasattr(socket, "TCP_USER_TIMEOUT"):
        config["connector_args"] = {"socket_factory": _socket_with_send_timeout}
    options: dict[str, Any] = {"config_kwargs": config}
    client_kwargs = dict(_options.get("client_kwargs", {}))
    endpoint = _options.get("endpoint_url") or os.environ.get("AWS_ENDPOINT_URL") \
        or os.environ.get("FSSPEC_S3_ENDPOINT_URL")
    if endpoint:
        client_kwargs["endpoint_url"] = endpoint
    region = _options.get("region") or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        client_kwargs["region_name"] = region
    options["client_kwargs"] = client_kwargs
    options.update({k: v for k, v in _options.items() if k not in ("endpoint_url", "region", "client_kwargs")})
    return options


def _drop_expect_header(fs: AbstractFileSystem) -> None:
    """Without this a write to a server that accepts but never answers hangs forever."""
    import botocore.handlers

    if getattr(fs, "_dist_kp_no_expect", False):  # fsspec caches instances; do it once each
        return
    fs.connect()
    fs.s3.meta.events.unregister("before-call.s3", botocore.handlers.add_expect_header)
    fs._dist_kp_no_expect = True


def url_to_fs(url: str) -> tuple[AbstractFileSystem, str]:
    """(file system, path) for a local path or fsspec URL, with this run's options."""
    protocol = url.split("://", 1)[0] if "://" in url else "file"
    if protocol in ("s3", "s3a"):
        fs, path = fsspec.core.url_to_fs(url, **_s3_options())
        _drop_expect_header(fs)
        return fs, path
    return fsspec.core.url_to_fs(url, **(_options if protocol != "file" else {}))


def is_local(fs: AbstractFileSystem) -> bool:
    """True for the local file system (rename is atomic there; object stores have no rename)."""
    return "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))


def write_file(fs: AbstractFileSystem, path: str, data: bytes | memoryview) -> None:
    """Store `data` at `path` whole or not at all: no reader ever sees a truncated file.

    Local: write a temporary file in the same folder, fsync, rename over `path`. Object stores
    show an object only when its upload completes; on an error the upload is discarded, since
    closing the writer would publish what was written so far.
    """
    if is_local(fs):
        fs.makedirs(fs._parent(path), exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        return
    f = fs.open(path, "wb")
    try:
        f.write(data)
    except BaseException:
        f.discard()
        raise
    f.close()


def write_url(url: str, data: bytes) -> None:
    """`write_file` for a local path or URL; errors become a StorageError naming `url`."""
    with named_errors(url):
        fs, path = url_to_fs(url)
        write_file(fs, path, data)


def open_url(url: str, mode: str = "rb") -> Any:
    """Open a local path or URL (a context manager, as fsspec's open)."""
    fs, path = url_to_fs(url)
    return fs.open(path, mode)


@contextlib.contextmanager
def named_errors(url: str) -> Iterator[None]:
    """Turn any file-system error inside the block into a StorageError naming `url`."""
    try:
        yield
    except StorageError:
        raise
    except Exception as error:  # noqa: BLE001 - backends raise all kinds; the message keeps the type
        raise explain(error, url) from error


def explain(error: BaseException, url: str) -> StorageError:
    """A StorageError naming the URL for an error raised by a file system call."""
    text = f"{type(error).__name__}: {error}"
    if isinstance(error, PermissionError) or "AccessDenied" in text or "Forbidden" in text \
            or "InvalidAccessKeyId" in text or "SignatureDoesNotMatch" in text:
        hint = "access denied: check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or the AWS profile) for it"
    elif "EndpointConnectionError" in text or "ConnectTimeout" in text or "ReadTimeout" in text \
            or "Could not connect" in text:
        hint = (f"storage endpoint not reachable (no answer within {_timeout_s:.0f} s per attempt, "
                f"{BOTOCORE_ATTEMPTS * S3FS_ATTEMPTS} attempts; check AWS_ENDPOINT_URL and the server)")
    elif isinstance(error, FileNotFoundError):
        hint = "not found"
    else:
        hint = "storage error"
    return StorageError(f"{url}: {hint} ({text})")
