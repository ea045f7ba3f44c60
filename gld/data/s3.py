"""Object-storage access for datasets: one boto3 client, configured from the environment.

Endpoint: the explicit argument (`cfg.data.s3_endpoint`), else `S3_ENDPOINT_URL`; credentials:
`AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY` (boto3's usual chain); region
`AWS_DEFAULT_REGION` (default us-east-1). Secrets are never logged or put in messages.
mosaicml-streaming reads the same variables, so `configure_endpoint` exports an explicit
endpoint to the environment before any worker starts.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import BinaryIO, Optional

__all__ = ["is_s3", "split_s3", "configure_endpoint", "client", "open_binary", "read_bytes",
           "exists", "size_of", "upload_dir", "download_dir", "join"]

_CLIENTS: dict = {}


def is_s3(path: str) -> bool:
    return str(path).startswith("s3://")


def join(base: str, name: str) -> str:
    return f"{base.rstrip('/')}/{name}" if is_s3(base) else str(Path(base) / name)


def split_s3(url: str) -> tuple[str, str]:
    """'s3://bucket/a/b' -> ('bucket', 'a/b')."""
    if not is_s3(url):
        raise ValueError(f"not an s3:// URL: {url!r}")
    bucket, _, key = url[5:].partition("/")
    if len(bucket) < 3:
        raise ValueError(f"{url!r}: bucket names need at least 3 characters")
    return bucket, key.strip("/")


def configure_endpoint(endpoint: Optional[str]) -> None:
    """Export an explicit endpoint (config) so boto3 here and mosaicml-streaming use it."""
    if endpoint:
        os.environ["S3_ENDPOINT_URL"] = endpoint


def client(endpoint: Optional[str] = None):
    """A cached boto3 S3 client (per process and endpoint)."""
    import boto3
    from botocore.config import Config

    endpoint = endpoint or os.environ.get("S3_ENDPOINT_URL") or None
    key = (os.getpid(), endpoint)
    if key not in _CLIENTS:
        _CLIENTS[key] = boto3.session.Session().client(
            "s3", endpoint_url=endpoint,
            region_name=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
            config=Config(retries={"max_attempts": 5, "mode": "standard"}))
    return _CLIENTS[key]


def _missing(e: Exception) -> bool:
    code = getattr(e, "response", {}).get("Error", {}).get("Code", "")
    return code in ("NoSuchKey", "404", "NotFound", "NoSuchBucket")


def open_binary(path: str, endpoint: Optional[str] = None) -> BinaryIO:
    """A readable binary stream over a local file or an s3:// object.

    Raises FileNotFoundError naming the path when the file or object does not exist.
    """
    if not is_s3(path):
        return open(path, "rb")
    bucket, key = split_s3(path)
    try:
        return client(endpoint).get_object(Bucket=bucket, Key=key)["Body"]
    except Exception as e:  # botocore.exceptions.ClientError
        if _missing(e):
            raise FileNotFoundError(f"object {path} does not exist") from None
        raise


def read_bytes(path: str, endpoint: Optional[str] = None) -> bytes:
    with open_binary(path, endpoint) as f:
        return f.read()


def size_of(path: str, endpoint: Optional[str] = None) -> int:
    """Size in bytes of a local file or an s3:// object (FileNotFoundError if absent)."""
    if not is_s3(path):
        return os.path.getsize(path)
    bucket, key = split_s3(path)
    try:
        return int(client(endpoint).head_object(Bucket=bucket, Key=key)["ContentLength"])
    except Exception as e:
        if _missing(e):
            raise FileNotFoundError(f"object {path} does not exist") from None
        raise


def exists(path: str, endpoint: Optional[str] = None) -> bool:
    if not is_s3(path):
        return os.path.exists(path)
    bucket, key = split_s3(path)
    try:
        client(endpoint).head_object(Bucket=bucket, Key=key)
        return True
    except Exception as e:
        if _missing(e):
            return False
        raise


def upload_dir(local: str, url: str, last: tuple[str, ...] = (),
               endpoint: Optional[str] = None) -> None:
    """Upload every file of a local folder under an s3:// prefix; the names in `last` go last
    (a reader that sees them can rely on everything else being there)."""
    c = client(endpoint)
    bucket, prefix = split_s3(url)
    files = sorted(p for p in Path(local).rglob("*") if p.is_file())
    files.sort(key=lambda p: p.name in last)
    for p in files:
        rel = p.relative_to(local).as_posix()
        c.upload_file(str(p), bucket, f"{prefix}/{rel}" if prefix else rel)


def download_dir(url: str, local: str, endpoint: Optional[str] = None) -> None:
    """Copy every object under an s3:// prefix (or a local folder) into `local`."""
    if not is_s3(url):
        shutil.copytree(url, local, dirs_exist_ok=True)
        return
    c = client(endpoint)
    bucket, prefix = split_s3(url)
    pages = c.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/")
    for page in pages:
        for obj in page.get("Contents", []):
            rel = obj["Key"][len(prefix) + 1:]
            dst = Path(local) / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            c.download_file(bucket, obj["Key"], str(dst))
