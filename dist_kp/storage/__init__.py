"""File systems for output_dir and data: local paths or any fsspec URL, with bounded S3 requests.

    storage = Storage(cfg.storage.options, cfg.storage.timeout_s)
    fs, path = storage.url_to_fs("s3://bucket/runs/exp1/config.yaml")
    storage.write("s3://bucket/runs/exp1/config.yaml", data)   # whole or nothing

One `Storage` (the config's `storage` section) serves data reads and outputs alike; it is a
plain value, passed to what needs it (and pickled into data-loader workers). Credentials and
the endpoint come from the standard environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
AWS_ENDPOINT_URL, AWS_REGION, or the AWS credential chain); only non-secret options come from
the config. S3 requests retry transient errors (5xx, 429, refused or reset connections) with
backoff for up to `timeout_s` (`TransientRetry`); 403 and 404 fail at once.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import fsspec
from fsspec.spec import AbstractFileSystem

from dist_kp.config.secrets import redact_text

log = logging.getLogger(__name__)

# Attempts per S3 request at least (a frozen server: one lost answer is retried), and s3fs's own loop
# around each (it retries failed body reads, SlowDown and timeouts once more).
MIN_ATTEMPTS = 2
S3FS_ATTEMPTS = 2
DEFAULT_TIMEOUT_S = 60.0
# Jittered exponential backoff between attempts: up to 0.25 s, 0.5 s, 1 s, ... 20 s.
BACKOFF_BASE_S = 0.25
BACKOFF_MAX_S = 20.0
# Answers that a later attempt may not get: overload, a restarting or failing server.
TRANSIENT_STATUS = frozenset({429, 500, 502, 503, 504})
TRANSIENT_CODES = frozenset({"RequestTimeout", "SlowDown", "Throttling", "ThrottlingException",
                             "TooManyRequests", "TooManyRequestsException", "RequestLimitExceeded"})
_STARTED = "dist_kp_started"  # the monotonic start of a request, in botocore's per-request context


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


def _prepare_client(fs: AbstractFileSystem, timeout_s: float) -> None:
    """Drop the Expect header and put `TransientRetry` in place of botocore's count-based retries."""
    import botocore.handlers

    if getattr(fs, "_dist_kp_prepared", False):  # fsspec caches instances; do it once each
        return
    fs.connect()
    events = fs.s3.meta.events
    # Without this a write to a server that accepts but never answers hangs forever.
    events.unregister("before-call.s3", botocore.handlers.add_expect_header)
    retry = TransientRetry(timeout_s)
    events.unregister("needs-retry.s3", unique_id="retry-config-s3")
    events.register("before-call.s3", retry.start, unique_id="dist-kp-retry-start")
    events.register("needs-retry.s3", retry.needs_retry, unique_id="dist-kp-retry")
    fs._dist_kp_prepared = True


def transient_error(response: tuple[Any, dict] | None, error: BaseException | None) -> str | None:
    """What went wrong in one S3 attempt if another attempt may succeed (5xx, 429, throttling, a
    refused, reset or timed-out connection); None for a success or an error a retry cannot fix (403, 404)."""
    from botocore.exceptions import ConnectionError, HTTPClientError, SSLError

    if error is not None:
        # A certificate problem does not go away; a connection that failed or broke may.
        transient = isinstance(error, (ConnectionError, HTTPClientError)) and not isinstance(error, SSLError)
        return f"{type(error).__name__}: {error}" if transient else None
    if response is None:
        return None
    http_response, parsed = response
    status, code = http_response.status_code, parsed.get("Error", {}).get("Code", "")
    if status in TRANSIENT_STATUS or code in TRANSIENT_CODES:
        return f"{status} {code}" if code and code != str(status) else str(status)  # HEAD answers have no code
    return None


@dataclass(frozen=True)
class TransientRetry:
    """botocore's needs-retry handler: transient errors are retried with jittered exponential backoff
    until `timeout_s` has passed since the request started (at least MIN_ATTEMPTS attempts).

    The last attempt may still wait `timeout_s` for an answer, so one request ends within
    2 x timeout_s (s3fs's own loop around it: `Storage.request_limit_s`). Logs the first retry
    of a request at WARNING; the error of a request that gives up names its attempts.
    """

    timeout_s: float

    def start(self, context: dict, **_: Any) -> None:
        context[_STARTED] = time.monotonic()

    def needs_retry(self, response: tuple[Any, dict] | None, caught_exception: BaseException | None,
                    attempts: int, request_dict: dict, operation: Any, **_: Any) -> float | None:
        """Seconds to wait before the next attempt, or None: done (success, a lasting error, time is up)."""
        problem = transient_error(response, caught_exception)
        if problem is None:
            return None
        elapsed = time.monotonic() - request_dict["context"][_STARTED]
        if attempts >= MIN_ATTEMPTS and elapsed >= self.timeout_s:
            if response is not None:  # botocore's ClientError then says "(reached max retries: N)"
                response[1].setdefault("ResponseMetadata", {}).update(MaxAttemptsReached=True,
                                                                      RetryAttempts=attempts - 1)
            return None
        backoff = random.uniform(0.0, min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2 ** (attempts - 1)))
        where = redact_text(f"S3 {operation.name} {request_dict.get('url', '')}")
        (log.warning if attempts == 1 else log.debug)(
            "%s: attempt %d failed with a transient error (%s); retrying with backoff for up to %.0f s",
            where, attempts, problem, self.timeout_s)
        return min(backoff, max(0.0, self.timeout_s - elapsed))


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

    @property
    def request_limit_s(self) -> float:
        """The longest one object-store request takes to fail: retries start until `timeout_s` has
        passed, the last may wait `timeout_s` more, and s3fs may repeat the whole once."""
        return 2 * self.timeout_s * S3FS_ATTEMPTS

    def _s3_options(self) -> dict[str, Any]:
        import s3fs

        # Bounded retries: s3fs otherwise retries a dead endpoint for minutes (a class attribute:
        # the constructor refuses `retries=`). botocore's own count-based retries give way to
        # TransientRetry (`_prepare_client`); "standard" is the mode whose handler that replaces.
        s3fs.S3FileSystem.retries = S3FS_ATTEMPTS
        config: dict[str, Any] = {"connect_timeout": min(self.timeout_s, 10.0), "read_timeout": self.timeout_s,
                                  "retries": {"mode": "standard"}}
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
            _prepare_client(fs, self.timeout_s)
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


def _gave_up_retrying(error: BaseException | None) -> BaseException | None:
    """The botocore error that TransientRetry gave up on, in `error`'s chain (s3fs re-raises it translated)."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        response = getattr(error, "response", None)
        if isinstance(response, dict) and response.get("ResponseMetadata", {}).get("MaxAttemptsReached"):
            return error
        error = error.__cause__ or error.__context__
    return None


def explain(error: BaseException, url: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> StorageError:
    """A StorageError naming the URL for an error raised by a file system call."""
    text = f"{type(error).__name__}: {error}"
    if isinstance(error, PermissionError) or "AccessDenied" in text or "Forbidden" in text \
            or "InvalidAccessKeyId" in text or "SignatureDoesNotMatch" in text:
        hint = "access denied: check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or the AWS profile) for it"
    elif (gave_up := _gave_up_retrying(error)) is not None:
        hint = (f"the storage server kept failing with a transient error for {timeout_s:.0f} s of retries "
                f"(overloaded or restarting? storage.timeout_s sets how long to retry): {gave_up}")
    elif "EndpointConnectionError" in text or "ConnectTimeout" in text or "ReadTimeout" in text \
            or "Could not connect" in text:
        hint = (f"storage endpoint not reachable (retried for {timeout_s:.0f} s, no answer within {timeout_s:.0f} s "
                "per attempt; check AWS_ENDPOINT_URL and the server)")
    elif isinstance(error, FileNotFoundError):
        hint = "not found"
    else:
        hint = "storage error"
    # Backend messages and URLs may carry user:password@ or signed query strings.
    return StorageError(redact_text(f"{url}: {hint} ({text})"))

