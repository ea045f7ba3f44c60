"""Object-storage access for datasets: one boto3 client, configured from the environment.

Endpoint: the explicit argument (`cfg.data.s3_endpoint`), else `S3_ENDPOINT_URL`; credentials:
`AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY` (boto3's usual chain); region
`AWS_DEFAULT_REGION` (default us-east-1); attempts per request `AWS_MAX_ATTEMPTS` (default 5).
Secrets are never logged or put in messages. mosaicml-streaming reads the same variables, so
`configure_endpoint` exports an explicit endpoint to the environment before any worker starts.

A missing object raises FileNotFoundError naming it; missing or refused credentials and an
endpoint that cannot be reached raise `S3AccessError`, one line naming the URL, the endpoint and
the variables to set.
"""
from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Optional

__all__ = ["S3AccessError", "is_s3", "split_s3", "configure_endpoint", "client", "open_binary",
           "read_bytes", "exists", "size_of", "upload_dir", "download_dir", "join"]

_CLIENTS: dict = {}
_CREDENTIALS = "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
_REFUSED = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403", "Forbidden"}


class S3AccessError(RuntimeError):
    """S3 cannot be used as configured: no or refused credentials, or an unreachable endpoint."""


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


def _endpoint(endpoint: Optional[str]) -> Optional[str]:
    return endpoint or os.environ.get("S3_ENDPOINT_URL") or None


def client(endpoint: Optional[str] = None):
    """A cached boto3 S3 client (per process and endpoint)."""
    import boto3
    from botocore.config import Config

    endpoint = _endpoint(endpoint)
    key = (os.getpid(), endpoint)
    if key not in _CLIENTS:
        attempts = int(os.environ.get("AWS_MAX_ATTEMPTS", 5))
        _CLIENTS[key] = boto3.session.Session().client(
            "s3", endpoint_url=endpoint,
            region_name=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
            config=Config(retries={"max_attempts": attempts, "mode": "standard"}))
    return _CLIENTS[key]


def _code(e: Exception) -> str:
    """The S3 error code of a ClientError, or of the ClientError behind a boto3 transfer error."""
    for err in (e, e.__context__):
        code = (getattr(err, "response", None) or {}).get("Error", {}).get("Code")
        if code:
            return str(code)
    return ""


def _missing(e: Exception) -> bool:
    return _code(e) in ("NoSuchKey", "404", "NotFound", "NoSuchBucket")


@contextmanager
def _errors(url: str, endpoint: Optional[str]):
    """Turn a missing object into FileNotFoundError naming `url`, and botocore's credential and
    connection failures into one-line S3AccessErrors."""
    from botocore.exceptions import (
        ConnectionError as BotoConnectionError, NoCredentialsError, PartialCredentialsError)

    try:
        yield
    except (NoCredentialsError, PartialCredentialsError, BotoConnectionError) as e:
        reason = (f"no usable credentials ({e})" if not isinstance(e, BotoConnectionError)
                  else f"cannot connect ({type(e).__name__})")
        raise _access_error(url, endpoint, reason) from None
    except Exception as e:  # botocore.exceptions.ClientError, boto3's transfer errors
        if _missing(e):
            what = f"bucket of {url}" if _code(e) == "NoSuchBucket" else f"object {url}"
            raise FileNotFoundError(f"{what} does not exist") from None
        if _code(e) in _REFUSED:
            raise _access_error(url, endpoint, f"credentials refused ({_code(e)})") from None
        raise


def _access_error(url: str, endpoint: Optional[str], reason: str) -> S3AccessError:
    where = _endpoint(endpoint) or "the default AWS endpoint"
    return S3AccessError(f"{url}: S3 endpoint {where}: {reason}; set S3_ENDPOINT_URL (or "
                         f"data.s3_endpoint) to a reachable server and {_CREDENTIALS} to its keys")


def open_binary(path: str, endpoint: Optional[str] = None) -> BinaryIO:
    """A readable binary stream over a local file or an s3:// object.

    Raises FileNotFoundError naming the path when the file or object does not exist.
    """
    if not is_s3(path):
        return open(path, "rb")
    bucket, key = split_s3(path)
    with _errors(path, endpoint):
        return client(endpoint).get_object(Bucket=bucket, Key=key)["Body"]


def read_bytes(path: str, endpoint: Optional[str] = None) -> bytes:
    with open_binary(path, endpoint) as f:
        return f.read()


def size_of(path: str, endpoint: Optional[str] = None) -> int:
    """Size in bytes of a local file or an s3:// object (FileNotFoundError if absent)."""
    if not is_s3(path):
        return os.path.getsize(path)
    bucket, key = split_s3(path)
    with _errors(path, endpoint):
        return int(client(endpoint).head_object(Bucket=bucket, Key=key)["ContentLength"])


def exists(path: str, endpoint: Optional[str] = None) -> bool:
    if not is_s3(path):
        return os.path.exists(path)
    bucket, key = split_s3(path)
    try:
        with _errors(path, endpoint):
            client(endpoint).head_object(Bucket=bucket, Key=key)
        return True
    except FileNotFoundError:
        return False


def upload_dir(local: str, url: str, last: tuple[str, ...] = (),
               endpoint: Optional[str] = None) -> None:
    """Upload every file of a local folder under an s3:// prefix; the names in `last` go last
    (a reader that sees them can rely on everything else being there)."""
    c = client(endpoint)
    bucket, prefix = split_s3(url)
    files = sorted(p for p in Path(local).rglob("*") if p.is_file())
    files.sort(key=lambda p: p.name in last)
    with _errors(url, endpoint):
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
    with _errors(url, endpoint):
        pages = c.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/")
        for page in pages:
            for obj in page.get("Contents", []):
                rel = obj["Key"][len(prefix) + 1:]
                dst = Path(local) / rel
                dst.parent.mkdir(parents=True, exist_ok=True)
                c.download_file(bucket, obj["Key"], str(dst))
