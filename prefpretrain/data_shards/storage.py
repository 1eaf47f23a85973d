"""Object storage: any fsspec URL (`s3://bucket/prefix`, `gs://…`, `memory://…`) where a path is expected.

S3 credentials and endpoint come from the standard AWS environment (`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`,
`AWS_SECRET_ACCESS_KEY`, ...), read by botocore itself. Every failure to reach a store is one line
(`StorageError`, a ValueError: the commands print it and exit 2) before any work starts.
"""
from __future__ import annotations

import os
from functools import lru_cache

from prefpretrain.errors import describe

EXTRA_FOR = {"s3": "s3fs (pip install 'prefpretrain[s3]')", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs",
             "abfs": "adlfs"}


class StorageError(ValueError):
    """A URL that cannot be used: no driver for its protocol, no credentials, an unreachable store."""


def is_url(path: str) -> bool:
    return "://" in str(path) and not str(path).startswith("file://")


def protocol(url: str) -> str:
    return url.split("://", 1)[0]


@lru_cache(maxsize=16)
def _filesystem(proto: str):
    import fsspec

    kw = {}
    if proto == "s3" and os.environ.get("AWS_ENDPOINT_URL"):
        kw["endpoint_url"] = os.environ["AWS_ENDPOINT_URL"]  # (botocore reads it too; s3fs needs it for listing)
    try:
        return fsspec.filesystem(proto, **kw)
    except (ImportError, ValueError) as e:
        need = EXTRA_FOR.get(proto, f"an fsspec driver for {proto!r}")
        raise StorageError(f"{proto}:// URLs need {need}: {e}") from None


def filesystem(url: str):
    """The fsspec filesystem of a URL (one per protocol and process)."""
    return _filesystem(protocol(url))


def check_reachable(url: str) -> None:
    """Fail in one line when the store (bucket) of `url` cannot be listed: a wrong endpoint, no credentials."""
    fs = filesystem(url)
    root = url.split("://", 1)[1].split("/", 1)[0]
    try:
        fs.ls(f"{protocol(url)}://{root}", detail=False)
    except FileNotFoundError:
        raise StorageError(f"{url}: the bucket {root!r} does not exist") from None
    except Exception as e:  # noqa: BLE001 - botocore raises many kinds (NoCredentialsError, EndpointConnectionError...)
        hint = " (set AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)" if protocol(url) == "s3" else ""
        raise StorageError(f"{url}: cannot reach the store ({describe(e)}){hint}") from None


def _version(d: dict) -> str:
    """An object's version tag from its listing details: the ETag, else its modification time."""
    return str(d.get("ETag") or d.get("etag") or d.get("mtime") or d.get("LastModified") or d.get("last_modified"))


def list_files(spec: str) -> dict[str, tuple[int, str]]:
    """{URL: (size in bytes, version tag)} of the objects a URL names: itself, everything under it (a prefix), or
    a glob's matches; from the listing itself (no request per object)."""
    fs, proto = filesystem(spec), protocol(spec)
    check_reachable(spec)
    if any(c in spec for c in "*?["):
        found = fs.glob(spec, detail=True)
    elif fs.isdir(spec):
        found = fs.find(spec, detail=True)
    elif fs.isfile(spec):
        found = {spec: fs.info(spec)}
    else:
        raise FileNotFoundError(f"input {spec!r} does not exist")
    return {(f if "://" in f else f"{proto}://{f}"): (int(d["size"]), _version(d))
            for f, d in sorted(found.items()) if d.get("type", "file") == "file"}


def open_url(url: str, mode: str = "rb"):
    return filesystem(url).open(url, mode)
