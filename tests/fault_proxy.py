"""A fault-injecting reverse proxy in front of the test S3 server (stdlib only, 127.0.0.1).

    with FaultProxy(s3_server.endpoint) as proxy:
        proxy.fail_next(SLOW_DOWN, INTERNAL_ERROR, RESET)   # the next three requests fail so
        ...                                                 # clients talk to proxy.endpoint

Requests pass through unchanged (method, path and query, headers including Authorization and
the client's Host, body byte for byte), so SigV4 signatures stay valid. Faults answer in place
of the server: an S3 XML error with its HTTP status, or a connection reset without an answer.
"""

from __future__ import annotations

import http.client
import http.server
import socket
import struct
import threading
from collections import deque
from dataclasses import dataclass
from typing import Self
from urllib.parse import urlsplit


@dataclass(frozen=True)
class Fault:
    """What the proxy answers instead of the server: an S3 error (status, code), or status 0: a reset."""

    status: int
    code: str = ""


SLOW_DOWN = Fault(503, "SlowDown")
INTERNAL_ERROR = Fault(500, "InternalError")
RESET = Fault(0)

# Connection-level headers of one hop: http.client frames the forwarded body and answer itself.
_HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding"}


class FaultProxy:
    """A threaded HTTP/1.1 reverse proxy to `target` that fails the requests it is told to."""

    def __init__(self, target: str) -> None:
        parts = urlsplit(target)
        self.target = (parts.hostname, parts.port)
        self._faults: deque[Fault] = deque()
        self._always: Fault | None = None
        self._lock = threading.Lock()
        self.requests = 0  # every request that reached the proxy
        self.failed = 0    # of those, answered with a fault
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="fault-proxy", daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def fail_next(self, *faults: Fault) -> None:
        """Answer the next requests with these faults, one each, in order; then pass through again."""
        with self._lock:
            self._faults.extend(faults)

    def fail_always(self, fault: Fault | None) -> None:
        """Answer every request with `fault` (None: pass through again)."""
        with self._lock:
            self._always = fault

    def reset(self) -> None:
        """Pass everything through again, with the counts at zero."""
        with self._lock:
            self._faults.clear()
            self._always = None
            self.requests = self.failed = 0

    def next_fault(self) -> Fault | None:
        """Count one request; the fault it gets, if any."""
        with self._lock:
            self.requests += 1
            fault = self._faults.popleft() if self._faults else self._always
            self.failed += fault is not None
            return fault

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()


def _error_body(fault: Fault, path: str) -> bytes:
    return (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{fault.code}</Code>'
            f"<Message>injected by the test proxy</Message><Resource>{path}</Resource>"
            "<RequestId>fault-proxy</RequestId></Error>").encode()


def _handler(proxy: FaultProxy) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as clients pool connections

        def log_message(self, format: str, *args: object) -> None:  # quiet: the tests read the counts
            pass

        def _body(self) -> bytes:
            """The request body as sent: by Content-Length, or the raw chunked framing."""
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                raw = b""
                while True:
                    line = self.rfile.readline()
                    raw += line
                    size = int(line.split(b";")[0], 16)
                    raw += self.rfile.read(size + 2)
                    if size == 0:
                        return raw  # no trailers from the clients used here
            return self.rfile.read(int(self.headers.get("Content-Length", 0)))

        def _forward(self) -> None:
            body = self._body()
            fault = proxy.next_fault()
            if fault == RESET:
                # SO_LINGER 0: close with an RST, as a server that goes down mid-request.
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.close_connection = True
                return
            if fault is not None:
                self._answer(fault.status, [("Content-Type", "application/xml")], _error_body(fault, self.path))
                return
            upstream = http.client.HTTPConnection(*proxy.target, timeout=120)
            try:
                upstream.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
                for name, value in self.headers.items():
                    upstream.putheader(name, value)
                upstream.endheaders(body)
                answer = upstream.getresponse()
                data = answer.read()
                headers = [(k, v) for k, v in answer.getheaders() if k.lower() not in _HOP_HEADERS]
                self._answer(answer.status, headers, data, keep_length=self.command == "HEAD")
            finally:
                upstream.close()

        def _answer(self, status: int, headers: list[tuple[str, str]], data: bytes, keep_length: bool = False) -> None:
            self.send_response_only(status)
            for name, value in headers:
                if keep_length or name.lower() != "content-length":
                    self.send_header(name, value)
            if not keep_length:
                self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

    return Handler
