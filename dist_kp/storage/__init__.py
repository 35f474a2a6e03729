"""File systems for output_dir and data: local paths or any fsspec URL, with bounded S3 requests.

    storage = Storage(cfg.storage.options, cfg.storage.timeout_s)
    fs, path = storage.url_to_fs("s3://bucket/runs/exp1/config.yaml")
    storage.write("s3://bucket/runs/exp1/config.yaml", data)   # whole or nothing

One `Storage` (the config's `storage` section) serves data reads and outputs alike; it is a
plain value, passed to what needs it (and pickled into data-loader workers). Credentials and
the endpoint come from the standard environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
AWS_ENDPOINT_URL, AWS_REGION, or the AWS credential chain); only non-secret options come from
the config.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import fsspec
from fsspec.spec import AbstractFileSystem

from dist_kp.config.secrets import redact_text

log = logging.getLogger(__name__)

# Attempts per S3 request: botocore's (total_max_attempts) times s3fs's own retry loop.
BOTOCORE_ATTEMPTS = 2
S3FS_ATTEMPTS = 2
DEFAULT_TIMEOUT_S = 60.0


class StorageError(OSError):
    """A storage location that cannot be used; the message names the URL and the likely cause."""


def is_local_url(url: str) -> bool:
    """True for a plain path or a file:// URL (rename is atomic there; object stores have no rename)."""
    return "://" not in url or url.startswith("file://")


def local_path(url: str) -> str:
    """The path of a local URL (file:// stripped)."""
    return url[len("file://"):] if url.startswith("file://") else url


def is_local(fs: AbstractFileSystem) -> bool:
    """True for the local file system."""
    return "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))


def _drop_expect_header(fs: AbstractFileSystem) -> None:
    """Without this a write to a server that accepts but never answers hangs forever."""
    import botocore.handlers

    if getattr(fs, "_dist_kp_no_expect", False):  # fsspec caches instances; do it once each
        return
    fs.connect()
    fs.s3.meta.events.unregister("before-call.s3", botocore.handlers.add_expect_header)
    fs._dist_kp_no_expect = True


@dataclass(frozen=True)
class _SendTimeoutSocket:
    """A socket factory: TCP sockets that give up when sent data stays unacknowledged for `timeout_s`.

    aiohttp bounds connecting and reading but not sending: an upload larger than the socket
    buffers to a server that accepts but stops reading (frozen, overloaded) waits forever.
    """

    timeout_s: float

    def __call__(self, addr_info: tuple) -> socket.socket:
        family, kind, proto, _, _ = addr_info
        sock = socket.socket(family=family, type=kind, proto=proto)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(self.timeout_s * 1000))
        return sock


@dataclass(frozen=True)
class Storage:
    """Non-secret fsspec options and the request timeout for every URL a run reads or writes."""

    options: dict[str, Any] = field(default_factory=dict)
    timeout_s: float = DEFAULT_TIMEOUT_S

    @classmethod
    def from_config(cls, section: Any) -> Storage:
        """From the config's `storage` section (options, timeout_s)."""
        return cls(dict(section.options), float(section.timeout_s))

    def _s3_options(self) -> dict[str, Any]:
        import s3fs

        # Bounded retries: s3fs otherwise retries a dead endpoint for minutes (a class attribute:
        # the constructor refuses `retries=`).
        s3fs.S3FileSystem.retries = S3FS_ATTEMPTS
        config: dict[str, Any] = {"connect_timeout": min(self.timeout_s, 10.0), "read_timeout": self.timeout_s,
                                  "retries": {"total_max_attempts": BOTOCORE_ATTEMPTS, "mode": "standard"}}
        if hasattr(socket, "TCP_USER_TIMEOUT"):
            config["connector_args"] = {"socket_factory": _SendTimeoutSocket(self.timeout_s)}
        client_kwargs = dict(self.options.get("client_kwargs", {}))
        endpoint = self.options.get("endpoint_url") or os.environ.get("AWS_ENDPOINT_URL") \
            or os.environ.get("FSSPEC_S3_ENDPOINT_URL")
        if endpoint:
            client_kwargs["endpoint_url"] = endpoint
        region = self.options.get("region") or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        if region:
            client_kwargs["region_name"] = region
        # The user's botocore settings, but never their own timeouts and retries: storage.timeout_s bounds them.
        options: dict[str, Any] = {"config_kwargs": {**self.options.get("config_kwargs", {}), **config},
                                   "client_kwargs": client_kwargs}
        options.update({k: v for k, v in self.options.items()
                        if k not in ("endpoint_url", "region", "client_kwargs", "config_kwargs")})
        return options

    def url_to_fs(self, url: str) -> tuple[AbstractFileSystem, str]:
        """(file system, path) for a local path or fsspec URL."""
        protocol = url.split("://", 1)[0] if "://" in url else "file"
        if protocol in ("s3", "s3a"):
            fs, path = fsspec.core.url_to_fs(url, **self._s3_options())
            _drop_expect_header(fs)
            return fs, path
        return fsspec.core.url_to_fs(url, **(self.options if protocol != "file" else {}))

    def open(self, url: str, mode: str = "rb") -> Any:
        """Open a local path or URL (a context manager, as fsspec's open)."""
        fs, path = self.url_to_fs(url)
        return fs.open(path, mode)

    def write(self, url: str, data: bytes | memoryview) -> None:
        """`write_file` for a local path or URL; errors become a StorageError naming `url`."""
        with self.named_errors(url):
            fs, path = self.url_to_fs(url)
            write_file(fs, path, data)

    def named_errors(self, url: str) -> contextlib.AbstractContextManager[None]:
        """Turn any file-system error inside the block into a StorageError naming `url`."""
        return _named_errors(url, self.timeout_s)

    def explain(self, error: BaseException, url: str) -> StorageError:
        """A StorageError naming the URL for an error raised by a file system call."""
        return explain(error, url, self.timeout_s)


TEMP_MARK = ".tmp-"


def temp_path(path: str) -> str:
    """Where `write_file` puts a local file's bytes before the rename (`*.tmp-PID`)."""
    return f"{path}{TEMP_MARK}{os.getpid()}"


def write_file(fs: AbstractFileSystem, path: str, data: bytes | memoryview) -> None:
    """Store `data` at `path` whole or not at all: no reader ever sees a truncated file.

    Local: write a temporary file in the same folder, fsync, rename over `path`. Object stores
    show an object only when its upload completes; on an error the upload is discarded, since
    closing the writer would publish what was written so far.
    """
    if is_local(fs):
        fs.makedirs(fs._parent(path), exist_ok=True)
        tmp = temp_path(path)
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


def remove_empty_folder(fs: AbstractFileSystem, path: str) -> None:
    """Remove the folder `path`, which the caller found empty: a local directory, or the folder entry
    an object store may keep (SeaweedFS lists an emptied prefix until its `key/` is deleted; S3 has none).
    Never recursive: a file that arrived in the meantime stays.
    """
    if is_local(fs):
        fs.rmdir(path)
    elif hasattr(fs, "call_s3"):  # s3fs
        bucket, _, key = path.partition("/")
        fs.call_s3("delete_object", Bucket=bucket, Key=f"{key}/")
        fs.invalidate_cache(path)


@contextlib.contextmanager
def _named_errors(url: str, timeout_s: float) -> Iterator[None]:
    try:
        yield
    except StorageError:
        raise
    except Exception as error:  # noqa: BLE001 - backends raise all kinds; the message keeps the type
        raise explain(error, url, timeout_s) from error


def explain(error: BaseException, url: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> StorageError:
    """A StorageError naming the URL for an error raised by a file system call."""
    text = f"{type(error).__name__}: {error}"
    if isinstance(error, PermissionError) or "AccessDenied" in text or "Forbidden" in text \
            or "InvalidAccessKeyId" in text or "SignatureDoesNotMatch" in text:
        hint = "access denied: check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or the AWS profile) for it"
    elif "EndpointConnectionError" in text or "ConnectTimeout" in text or "ReadTimeout" in text \
            or "Could not connect" in text:
        hint = (f"storage endpoint not reachable (no answer within {timeout_s:.0f} s per attempt, "
                f"{BOTOCORE_ATTEMPTS * S3FS_ATTEMPTS} attempts; check AWS_ENDPOINT_URL and the server)")
    elif isinstance(error, FileNotFoundError):
        hint = "not found"
    else:
        hint = "storage error"
    # Backend messages and URLs may carry user:password@ or signed query strings.
    return StorageError(redact_text(f"{url}: {hint} ({text})"))

