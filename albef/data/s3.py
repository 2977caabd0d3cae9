"""Pull and push data between a local directory and any S3-compatible object store.

:func:`pull` downloads the objects under an S3 prefix, :func:`push` uploads a file or a directory tree. Both
are safe to rerun and to interrupt:

* **Up to date is skipped.** A local file with the object's size and checksum is not downloaded again; an
  object whose size and ``sha256`` metadata match the local file is not uploaded again.
* **Verified.** ``push`` stores the sha256 of the content as object metadata (``x-amz-meta-sha256``) and
  checks the ETag the store reports against the MD5 it should have. ``pull`` checks that sha256 when the
  object has one, else the MD5 ETag of a single-part upload. A mismatch deletes the download and is retried;
  after the last attempt it raises :class:`S3ChecksumError` naming the key.
* **Atomic and resumable.** A download is written to ``<name>.part`` beside its final name, with the ETag it
  belongs to in ``<name>.part.etag``; it is fsynced, verified and only then renamed with ``os.replace``. An
  interrupted download (this call or an earlier process) continues with a ranged GET (``Range: bytes=N-``)
  when the object's ETag is unchanged, and starts over otherwise.
* **Retried.** Throttling (SlowDown, 429, ...), 5xx, timeouts and connection errors are retried twice over:
  per request by botocore's ``standard`` retry mode, and per file by an outer loop with exponential backoff
  and jitter that logs every retry. Errors that a retry cannot fix (no such bucket, access denied, a missing
  object) raise :class:`S3Error` at once, naming the bucket, key and endpoint.

Credentials come from boto3's usual chain (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, ``AWS_PROFILE``,
instance roles, ...); the endpoint and the retries from :class:`S3Settings`.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import random
import re
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar

import boto3
import botocore.loaders
import botocore.session
import urllib3.exceptions
from boto3.exceptions import S3UploadFailedError
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    HTTPClientError,
    IncompleteReadError,
    NoCredentialsError,
)
from botocore.exceptions import ConnectionError as BotoConnectionError
from s3transfer.utils import ChunksizeAdjuster
from tqdm import tqdm

__all__ = ["S3ChecksumError", "S3Error", "S3Settings", "TransferReport", "parse_s3_uri", "pull", "push"]

log = logging.getLogger(__name__)

T = TypeVar("T")

MIB = 2**20
MIN_PART_SIZE = 5 * MIB  # S3's smallest allowed part (all but the last)
PART_SUFFIX = ".part"
ETAG_SUFFIX = ".part.etag"
SHA256_METADATA = "sha256"  # stored as x-amz-meta-sha256
_READ_CHUNK = MIB

_RETRYABLE_STATUS = frozenset({408, 429, 500, 502, 503, 504})
# Error codes a retry can fix: throttling, then transient ones. botocore's standard mode retries most of these
# per request already; the outer loop uses the same list so that a file whose requests ran out of botocore
# attempts is tried again later.
_RETRYABLE_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "RequestThrottled",
        "RequestThrottledException",
        "RequestLimitExceeded",
        "TooManyRequests",
        "TooManyRequestsException",
        "BandwidthLimitExceeded",
        "ProvisionedThroughputExceededException",
        "InternalError",
        "ServiceUnavailable",
        "RequestTimeout",
        "RequestTimeoutException",
        "PriorRequestNotComplete",
        "IDPCommunicationError",
        # Our GETs carry If-Match: the object changed between HEAD and GET. The next attempt sees the new
        # ETag, drops the stale .part and starts over.
        "PreconditionFailed",
        *map(str, _RETRYABLE_STATUS),  # the code of an error without a body (a HEAD's) is its HTTP status
    }
)
_NOT_FOUND_CODES = frozenset({"NoSuchKey", "NotFound", "404"})
_DENIED_CODES = frozenset(
    {"AccessDenied", "403", "Forbidden", "InvalidAccessKeyId", "SignatureDoesNotMatch", "AllAccessDisabled"}
)
_BUCKET_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{1,61}[A-Za-z0-9]")
_MD5_RE = re.compile(r"[0-9a-f]{32}")


class S3Error(RuntimeError):
    """A transfer failed. The message names the bucket, the key and the endpoint."""


class S3ChecksumError(S3Error):
    """Downloaded or uploaded bytes do not match their checksum (retried before it is raised)."""


class _IncompleteDownload(S3Error):
    """The body ended before the object's size; the .part is kept so the next attempt resumes."""


class _Cancelled(Exception):
    """Another file of the same call failed for good; stop this one at its next attempt."""


# ---------------------------------------------------------------------------- settings and results


@dataclass
class S3Settings:
    """How to reach the store and how hard to try.

    Attributes:
        endpoint_url: any S3-compatible endpoint (``http://127.0.0.1:9000``); ``None`` reads
            ``ALBEF_S3_ENDPOINT_URL``, then ``AWS_ENDPOINT_URL``, then uses AWS itself.
        region: signing region; ``None`` uses boto3's chain (``AWS_DEFAULT_REGION``, config files).
        max_attempts: attempts per file in the outer retry loop (1 = no outer retries).
        base_delay, max_delay: the outer loop sleeps about ``min(max_delay, base_delay * 2**n)`` seconds
            (with jitter) before attempt ``n + 2``.
        connect_timeout, read_timeout: socket timeouts in seconds for every request.
        multipart_threshold: files of at least this size are uploaded in parts.
        multipart_chunksize: part size for multipart uploads (at least 5 MiB, as S3 requires).
        client_max_attempts: botocore's own attempts per request (``standard`` retry mode).
        max_workers: files transferred in parallel.
        addressing_style: ``"path"``, ``"virtual"`` or ``"auto"``; ``None`` means ``"path"`` for a custom
            endpoint (MinIO, Ceph, moto, ... rarely have wildcard DNS) and ``"auto"`` for AWS.
        verify_upload_etag: check after each upload that the store's ETag is the MD5 (or multipart MD5) of
            what was sent. Turn off for stores whose ETags are not MD5s; SSE-KMS objects are detected.
    """

    endpoint_url: str | None = None
    region: str | None = None
    max_attempts: int = 8
    base_delay: float = 0.2
    max_delay: float = 10.0
    connect_timeout: float = 10.0
    read_timeout: float = 60.0
    multipart_threshold: int = 64 * MIB
    multipart_chunksize: int = 16 * MIB
    client_max_attempts: int = 3
    max_workers: int = 8
    addressing_style: str | None = None
    verify_upload_etag: bool = True

    def __post_init__(self) -> None:
        if self.endpoint_url is None:
            self.endpoint_url = (
                os.environ.get("ALBEF_S3_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL") or None
            )
        for name in ("max_attempts", "client_max_attempts", "max_workers", "multipart_threshold"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"S3Settings.{name} must be an integer >= 1, got {value!r}")
        for name in ("base_delay", "max_delay"):
            if getattr(self, name) < 0:
                raise ValueError(f"S3Settings.{name} must be >= 0, got {getattr(self, name)!r}")
        for name in ("connect_timeout", "read_timeout"):
            if getattr(self, name) <= 0:
                raise ValueError(f"S3Settings.{name} must be > 0, got {getattr(self, name)!r}")
        if self.multipart_chunksize < MIN_PART_SIZE:
            raise ValueError(
                f"S3Settings.multipart_chunksize must be >= {MIN_PART_SIZE} (5 MiB, the S3 minimum part size), "
                f"got {self.multipart_chunksize!r}"
            )
        if self.addressing_style not in (None, "path", "virtual", "auto"):
            raise ValueError(
                f"S3Settings.addressing_style must be 'path', 'virtual', 'auto' or None, got {self.addressing_style!r}"
            )


@dataclass
class TransferReport:
    """What a :func:`pull` or :func:`push` did.

    Attributes:
        direction: ``"pull"`` or ``"push"``.
        uri: the S3 URI of the call.
        transferred: files downloaded or uploaded.
        skipped: files that were already up to date.
        bytes: payload bytes moved over the network for the transferred files (a resumed download counts
            only the part fetched by this call).
        keys: every key the call covered (transferred and skipped), in order.
        skipped_keys: the keys that were skipped.
        retries: outer-loop retries (botocore's per-request retries are not counted).
        seconds: wall time of the call.
    """

    direction: str
    uri: str
    transferred: int = 0
    skipped: int = 0
    bytes: int = 0
    keys: list[str] = field(default_factory=list)
    skipped_keys: list[str] = field(default_factory=list)
    retries: int = 0
    seconds: float = 0.0

    def summary(self) -> str:
        return (
            f"{self.direction} {self.uri}: {self.transferred} transferred, {self.skipped} up to date, "
            f"{self.bytes} bytes, {self.retries} retries in {self.seconds:.1f} s"
        )


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """``"s3://bucket/some/prefix"`` -> ``("bucket", "some/prefix")``; the prefix may be empty.

    Raises:
        ValueError: naming the URI when it is not ``s3://<bucket>[/<prefix>]`` with a valid bucket name.
    """
    match = re.fullmatch(r"s3://([^/]*)(?:/(.*))?", uri, flags=re.DOTALL) if isinstance(uri, str) else None
    if match is None:
        raise ValueError(f"not an S3 URI: {uri!r} (expected s3://bucket/prefix)")
    bucket, prefix = match.group(1), match.group(2) or ""
    if not bucket:
        raise ValueError(f"S3 URI {uri!r} has no bucket (expected s3://bucket/prefix)")
    if not _BUCKET_RE.fullmatch(bucket) or ".." in bucket:
        raise ValueError(
            f"S3 URI {uri!r} has an invalid bucket name {bucket!r}: 3-63 letters, digits, '.', '-' or '_', "
            "starting and ending with a letter or digit"
        )
    return bucket, prefix


def _as_folder(prefix: str) -> str:
    """``prefix`` as a "folder" of keys: empty or ending with ``/``."""
    return prefix if (not prefix or prefix.endswith("/")) else prefix + "/"


# ---------------------------------------------------------------------------- errors and retries


def _error_code(exc: BaseException) -> tuple[str, int | None]:
    if isinstance(exc, ClientError):
        code = str(exc.response.get("Error", {}).get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return code, status
    return "", None


def _is_retryable(exc: BaseException) -> bool:
    if isinstance(exc, ClientError):
        code, status = _error_code(exc)
        return code in _RETRYABLE_CODES or status in _RETRYABLE_STATUS
    # Of our own errors, a checksum mismatch and a short body (any other S3Error is final);
    # EndpointConnectionError, ConnectTimeoutError, ReadTimeoutError, ConnectionClosedError,
    # ResponseStreamingError, IncompleteReadError; raw socket errors that slip through a body read.
    return isinstance(
        exc,
        (
            S3ChecksumError,
            _IncompleteDownload,
            BotoConnectionError,
            HTTPClientError,
            IncompleteReadError,
            urllib3.exceptions.HTTPError,
            ConnectionError,
            TimeoutError,
        ),
    )


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ClientError):
        code, status = _error_code(exc)
        message = exc.response.get("Error", {}).get("Message", "")
        return f"{code or 'error'} (HTTP {status}){': ' + message if message else ''}"
    if isinstance(exc, S3Error):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


def _fatal(root: BaseException, op: str, bucket: str, key: str, endpoint: str) -> S3Error:
    """The error to raise for a failure that a retry cannot fix."""
    where = f"s3://{bucket}/{key}"
    if isinstance(root, NoCredentialsError):
        return S3Error(
            f"{op} {where} at {endpoint}: no credentials found; set AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)"
        )
    code, _ = _error_code(root)
    if code == "NoSuchBucket":
        return S3Error(f"{op} {where}: bucket {bucket!r} does not exist at {endpoint}")
    if code in _DENIED_CODES:
        return S3Error(
            f"{op} {where}: access denied at {endpoint}: {_describe(root)}; check the credentials "
            "(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE) and the bucket policy"
        )
    if code in _NOT_FOUND_CODES:
        return S3Error(f"{op} {where}: not found at {endpoint}")
    return S3Error(f"{op} {where} failed at {endpoint}: {_describe(root)}")


# ---------------------------------------------------------------------------- per-call state


class _FileProgress:
    """This file's share of the progress bar; ``set``/``add`` move the bar by the difference."""

    def __init__(self, run: _Run) -> None:
        self._run = run
        self.count = 0

    def set(self, n: int) -> None:
        self.add(n - self.count)

    def add(self, n: int) -> None:
        if n:
            self.count += n
            with self._run.lock:
                self._run.bar.update(n)


class _Run:
    """State shared by the files of one pull/push: client, settings, progress bar, retry counter."""

    def __init__(self, settings: S3Settings, progress: bool) -> None:
        self.start = time.monotonic()  # the call's wall time counts from here
        self.settings = settings
        self.client = _make_client(settings)
        self.endpoint: str = self.client.meta.endpoint_url
        self.transfer_config = TransferConfig(
            multipart_threshold=settings.multipart_threshold,
            multipart_chunksize=settings.multipart_chunksize,
            max_concurrency=4,
        )
        self.progress = progress
        self.cancel = threading.Event()
        self.retries = 0
        self.lock = threading.Lock()
        self.bar: Any = None  # the tqdm bar of the transfers, opened by _transfer once the plan is known

    def call(self, op: str, bucket: str, key: str, fn: Callable[[], T]) -> T:
        """``fn()`` with the outer retry loop: backoff + jitter on retryable errors, a clear S3Error otherwise."""
        attempts = self.settings.max_attempts
        for attempt in range(1, attempts + 1):
            if self.cancel.is_set():
                raise _Cancelled
            try:
                return fn()
            except Exception as exc:  # _Cancelled included: not retryable, not the store's, so re-raised
                root = exc
                if isinstance(exc, S3UploadFailedError):  # boto3's upload_file wraps ClientErrors in it
                    root = exc.__cause__ or exc.__context__ or exc
                if not _is_retryable(root):
                    if isinstance(root, (ClientError, BotoCoreError)):
                        raise _fatal(root, op, bucket, key, self.endpoint) from exc
                    raise  # our own S3Error, or a local problem (disk full, permissions): not the store's
                what, reason = f"{op} s3://{bucket}/{key}", _describe(root)
                if attempt == attempts:
                    message = f"{what} failed at {self.endpoint} after {attempts} attempts: {reason}"
                    if isinstance(root, BotoConnectionError):
                        message += f" (is the endpoint {self.endpoint} reachable?)"
                    raise (S3ChecksumError if isinstance(exc, S3ChecksumError) else S3Error)(message) from exc
                # Exponential backoff with "equal jitter": half the delay fixed, half random.
                delay = min(self.settings.max_delay, self.settings.base_delay * 2 ** (attempt - 1))
                delay = delay / 2 + random.uniform(0, delay / 2)
                with self.lock:
                    self.retries += 1
                log.warning(
                    "retry %d/%d of %s in %.2f s after %s", attempt, attempts - 1, what, delay, reason
                )
                if self.cancel.wait(delay):
                    raise _Cancelled from exc
        raise AssertionError("unreachable")  # pragma: no cover

    def map(self, fn: Callable[[Any], T], items: Sequence[Any]) -> list[T]:
        """``[fn(i) for i in items]`` on up to ``max_workers`` threads; the first real failure is raised."""
        workers = min(self.settings.max_workers, len(items))
        if workers <= 1:
            return [fn(item) for item in items]
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="albef-s3") as pool:
            futures = [pool.submit(fn, item) for item in items]
            try:
                wait(futures, return_when=FIRST_EXCEPTION)
                errors = [f.exception() for f in futures if f.done() and not f.cancelled() and f.exception()]
                if errors:
                    real = [e for e in errors if not isinstance(e, _Cancelled)]
                    raise (real or errors)[0]
            except BaseException:
                # A failure, or Ctrl-C: running files stop at their next attempt, keeping their .part files.
                self.cancel.set()
                pool.shutdown(wait=False, cancel_futures=True)
                raise
            return [f.result() for f in futures]


@functools.cache
def _shared_loader() -> botocore.loaders.Loader:
    """One botocore data loader for all calls: parsing the S3 model costs ~0.1 s per fresh session."""
    return botocore.loaders.create_loader()


def _make_client(settings: S3Settings) -> Any:
    style = settings.addressing_style or ("path" if settings.endpoint_url else "auto")
    config = Config(
        region_name=settings.region,
        connect_timeout=settings.connect_timeout,
        read_timeout=settings.read_timeout,
        retries={"mode": "standard", "total_max_attempts": settings.client_max_attempts},
        max_pool_connections=max(10, settings.max_workers * 4),
        s3={"addressing_style": style},
        # botocore >= 1.36 adds CRC32 checksums and aws-chunked bodies to every upload by default, which many
        # S3-compatible stores reject. We verify content ourselves (sha256 metadata and MD5 ETags).
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    # A fresh session per call, so credentials and profiles are resolved anew (the usual boto3 chain).
    core = botocore.session.get_session()
    core.register_component("data_loader", _shared_loader())
    session = boto3.session.Session(botocore_session=core)
    return session.client("s3", endpoint_url=settings.endpoint_url, config=config)


# ---------------------------------------------------------------------------- checksums


@dataclass(frozen=True)
class _Remote:
    """What HEAD says about an object."""

    size: int
    etag: str
    sha256: str | None
    md5: str | None  # the ETag when it is the MD5 of the content (single-part, not SSE-KMS/SSE-C)
    kms: bool  # SSE-KMS: the ETag is no MD5 of the content, not even of the parts

    @classmethod
    def from_head(cls, head: dict[str, Any]) -> _Remote:
        etag = head.get("ETag", "")
        metadata = {k.lower(): v for k, v in (head.get("Metadata") or {}).items()}
        sha256 = metadata.get(SHA256_METADATA)
        plain = etag.strip('"').lower()
        kms = str(head.get("ServerSideEncryption", "")).startswith("aws:kms")
        md5 = plain if _MD5_RE.fullmatch(plain) and not (kms or head.get("SSECustomerAlgorithm")) else None
        return cls(int(head["ContentLength"]), etag, sha256.lower() if sha256 else None, md5, kms)

    def expected(self) -> str | None:
        return self.sha256 if self.sha256 is not None else self.md5

    def algorithm(self) -> str:
        return "sha256" if self.sha256 is not None else "md5"

    def hasher(self) -> Any:
        """A fresh hash of :meth:`algorithm`; None when the object has no checksum to verify."""
        return None if self.expected() is None else hashlib.new(self.algorithm(), usedforsecurity=False)


def _hash_file(path: Path, hasher: Any) -> Any:
    with open(path, "rb") as f:
        while chunk := f.read(_READ_CHUNK):
            hasher.update(chunk)
    return hasher


def _local_matches(path: Path, remote: _Remote) -> bool:
    """A local file is up to date when its size and (where the object has one) its checksum match."""
    if path.stat().st_size != remote.size:
        return False
    hasher = remote.hasher()
    if hasher is None:
        log.debug("%s: object has no verifiable checksum; size matches, keeping the local file", path)
        return True
    return _hash_file(path, hasher).hexdigest() == remote.expected()


@dataclass(frozen=True)
class _LocalDigest:
    sha256: str
    md5: str
    multipart_etag: str | None  # what an S3 multipart upload with the same part size reports


def _digest_for_upload(path: Path, size: int, settings: S3Settings) -> _LocalDigest:
    """sha256, MD5 and the multipart ETag of a file in one read."""
    multipart = size >= settings.multipart_threshold
    part_size = (
        ChunksizeAdjuster().adjust_chunksize(settings.multipart_chunksize, size) if multipart else _READ_CHUNK
    )
    sha, md5, part_digests = hashlib.sha256(), hashlib.md5(usedforsecurity=False), []
    with open(path, "rb") as f:
        while True:  # part by part, each in _READ_CHUNK pieces; a single-part upload needs no part MD5s
            part, left = hashlib.md5(usedforsecurity=False), part_size
            while left and (chunk := f.read(min(left, _READ_CHUNK))):
                for hasher in (sha, md5, part) if multipart else (sha, md5):
                    hasher.update(chunk)
                left -= len(chunk)
            if left == part_size:  # end of file
                break
            part_digests.append(part.digest())
    etag = f"{hashlib.md5(b''.join(part_digests), usedforsecurity=False).hexdigest()}-{len(part_digests)}"
    return _LocalDigest(sha.hexdigest(), md5.hexdigest(), etag if multipart else None)


# ---------------------------------------------------------------------------- pull


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # e.g. Windows cannot open directories
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _plan_pull(run: _Run, uri: str, bucket: str, prefix: str, dest: Path, dest_is_dir: bool) -> list[Any]:
    """(key, size, local path) for every object to pull."""
    folder = _as_folder(prefix)
    paginator = run.client.get_paginator("list_objects_v2")
    # list() inside the retried call: the paginator fetches its pages lazily.
    pages = run.call("list", bucket, folder, lambda: list(paginator.paginate(Bucket=bucket, Prefix=folder)))
    plan = []
    for obj in (obj for page in pages for obj in page.get("Contents", [])):
        key = obj["Key"]
        parts = PurePosixPath(key[len(folder) :]).parts  # the key's path below the prefix
        if not parts or parts[0] == "/" or any(p in ("..", ".") for p in parts) or key.endswith("/"):
            if not key.endswith("/"):  # "folder/" markers are expected; anything else is worth a word
                log.warning("skipping s3://%s/%s: its key cannot be a path under %s", bucket, key, dest)
            continue
        plan.append((key, int(obj["Size"]), dest.joinpath(*parts)))
    if plan:
        return plan
    if folder == prefix:
        raise S3Error(f"pull {uri}: no objects under s3://{bucket}/{prefix} at {run.endpoint}")
    # Not a "directory": the URI names one object.
    head = run.call("pull", bucket, prefix, lambda: run.client.head_object(Bucket=bucket, Key=prefix))
    target = dest / PurePosixPath(prefix).name if dest_is_dir else dest
    return [(prefix, int(head["ContentLength"]), target)]


def _download(
    run: _Run, bucket: str, key: str, remote: _Remote, path: Path, progress: _FileProgress, fetched: list[int]
) -> None:
    """Fetch into ``<path>.part`` (resuming it when its ETag matches), fsync, verify, rename."""
    part = path.with_name(path.name + PART_SUFFIX)
    etag_file = path.with_name(path.name + ETAG_SUFFIX)
    path.parent.mkdir(parents=True, exist_ok=True)

    offset = 0
    if part.is_file() and etag_file.is_file():
        size = part.stat().st_size
        if remote.etag and etag_file.read_text().strip() == remote.etag and size <= remote.size:
            offset = size
        else:
            log.info("s3://%s/%s changed since %s was written; starting over", bucket, key, part)
    if offset == 0:
        etag_file.write_text(remote.etag)
        part.write_bytes(b"")
    else:
        log.info("resuming s3://%s/%s from byte %d of %d", bucket, key, offset, remote.size)

    hasher = remote.hasher()
    if hasher is not None and offset:
        _hash_file(part, hasher)
    progress.set(offset)
    try:
        if offset < remote.size:
            request: dict[str, Any] = {"Bucket": bucket, "Key": key}
            if remote.etag:  # the object must not change under a resumed download
                request["IfMatch"] = remote.etag
            if offset:
                request["Range"] = f"bytes={offset}-"
            response = run.client.get_object(**request)
            mode = "ab"
            if offset and response["ResponseMetadata"]["HTTPStatusCode"] != 206:
                log.info(
                    "%s ignored the range request for s3://%s/%s; starting over", run.endpoint, bucket, key
                )
                mode, hasher = "wb", remote.hasher()
                progress.set(0)
            with open(part, mode) as f:
                for chunk in response["Body"].iter_chunks(_READ_CHUNK):
                    f.write(chunk)
                    if hasher is not None:
                        hasher.update(chunk)
                    fetched[0] += len(chunk)
                    progress.add(len(chunk))
                f.flush()
                os.fsync(f.fileno())
        got = part.stat().st_size
        if got < remote.size:
            raise _IncompleteDownload(
                f"download of s3://{bucket}/{key} from {run.endpoint} stopped at byte {got} of {remote.size}"
            )
        actual = hasher.hexdigest() if hasher is not None else None
        if got != remote.size or actual != remote.expected():
            part.unlink(missing_ok=True)
            etag_file.unlink(missing_ok=True)
            fetched[0] = 0
            detail = (
                f"size {got} != {remote.size}"
                if got != remote.size
                else f"{remote.algorithm()} {actual} != expected {remote.expected()}"
            )
            raise S3ChecksumError(
                f"checksum mismatch for s3://{bucket}/{key} from {run.endpoint}: {detail}; "
                "deleted the partial download"
            )
    except BaseException:
        progress.set(part.stat().st_size if part.exists() else 0)
        raise
    if remote.hasher() is None:
        log.debug(
            "s3://%s/%s has no sha256 metadata and a multipart ETag; checked the size only", bucket, key
        )
    os.replace(part, path)
    etag_file.unlink(missing_ok=True)
    _fsync_dir(path.parent)


def pull(
    uri: str, dest: str | Path, settings: S3Settings | None = None, progress: bool = True
) -> TransferReport:
    """Download every object under ``uri`` into ``dest``, keeping the key paths below the prefix.

    A URI that names one object (and no "directory" of that name) downloads that object to ``dest``, or
    into ``dest`` when ``dest`` is an existing directory or ends with a path separator.

    Raises:
        ValueError: ``uri`` is not an S3 URI.
        S3Error: a non-retryable error (missing bucket or object, access denied) or retries exhausted.
        S3ChecksumError: content kept failing verification; no file is left under its final name.
    """
    bucket, prefix = parse_s3_uri(uri)
    dest_is_dir = Path(dest).is_dir() or str(dest).endswith(("/", os.sep))
    dest = Path(dest)
    run = _Run(settings or S3Settings(), progress)
    plan = _plan_pull(run, uri, bucket, prefix, dest, dest_is_dir)

    def pull_one(item: tuple[str, int, Path]) -> tuple[str, bool, int]:
        key, _, path = item
        fetched = [0]
        progress = _FileProgress(run)

        def attempt() -> bool:
            remote = _Remote.from_head(run.client.head_object(Bucket=bucket, Key=key))
            if path.is_file() and _local_matches(path, remote):
                progress.set(remote.size)
                return False
            _download(run, bucket, key, remote, path, progress, fetched)
            return True

        transferred = run.call("pull", bucket, key, attempt)
        return key, transferred, fetched[0]

    return _transfer(run, "pull", uri, pull_one, plan, sum(size for _, size, _ in plan))


# ---------------------------------------------------------------------------- push


def _iter_files(root: Path) -> Iterator[Path]:
    """Files under ``root`` in a stable order, without our own ``.part``/``.part.etag`` leftovers."""
    for directory, dirnames, filenames in os.walk(root):
        dirnames.sort()
        names = set(filenames)
        for name in sorted(filenames):
            if name.endswith(ETAG_SUFFIX) or (name.endswith(PART_SUFFIX) and name + ".etag" in names):
                continue
            path = Path(directory, name)
            if path.is_file():
                yield path


def _upload(
    run: _Run, bucket: str, key: str, path: Path, size: int, digest: _LocalDigest, progress: _FileProgress
) -> None:
    try:  # every failed attempt takes its bytes off the bar, so the next one starts from 0
        run.client.upload_file(
            str(path),
            bucket,
            key,
            ExtraArgs={"Metadata": {SHA256_METADATA: digest.sha256}},
            Config=run.transfer_config,
            Callback=progress.add,
        )
        if not run.settings.verify_upload_etag:
            return
        remote = _Remote.from_head(run.client.head_object(Bucket=bucket, Key=key))
        etag = remote.etag.strip('"').lower()
        if "-" in etag:
            expected = digest.multipart_etag
            checkable = expected is not None and not remote.kms
        else:
            expected, checkable = digest.md5, remote.md5 is not None
        if remote.size != size or (checkable and etag != expected):
            raise S3ChecksumError(
                f"upload of {path} to s3://{bucket}/{key} at {run.endpoint} does not match: store reports "
                f"{remote.size} bytes, ETag {etag}; sent {size} bytes, expected ETag {expected}"
            )
    except BaseException:
        progress.set(0)
        raise


def push(
    src: str | Path, uri: str, settings: S3Settings | None = None, progress: bool = True
) -> TransferReport:
    """Upload a file or a directory tree to ``uri``.

    A directory's files land at ``<prefix>/<relative path>``. A file lands at ``<prefix>`` itself, or at
    ``<prefix><file name>`` when the prefix is empty or ends with ``/``. Objects whose size and sha256
    metadata already match are skipped.

    Raises:
        ValueError: ``uri`` is not an S3 URI.
        FileNotFoundError: ``src`` does not exist.
        S3Error: a non-retryable error (missing bucket, access denied) or retries exhausted.
    """
    bucket, prefix = parse_s3_uri(uri)
    src = Path(src)
    if src.is_file():
        plan = [(src, prefix + src.name if _as_folder(prefix) == prefix else prefix)]
    elif src.is_dir():
        plan = [(path, _as_folder(prefix) + path.relative_to(src).as_posix()) for path in _iter_files(src)]
    else:
        raise FileNotFoundError(f"push: source {src} does not exist")
    run = _Run(settings or S3Settings(), progress)

    def push_one(item: tuple[Path, str]) -> tuple[str, bool, int]:
        path, key = item
        size = path.stat().st_size
        digest = _digest_for_upload(path, size, run.settings)
        progress = _FileProgress(run)

        def attempt() -> bool:
            try:
                head = run.client.head_object(Bucket=bucket, Key=key)
            except ClientError as exc:
                # 404: not there yet. 403: S3 answers that for missing keys without s3:ListBucket; if we
                # really may not write, the upload itself fails with AccessDenied.
                if _error_code(exc)[1] not in (403, 404):
                    raise
            else:
                remote = _Remote.from_head(head)
                if remote.size == size and remote.sha256 == digest.sha256:
                    progress.set(size)
                    return False
            _upload(run, bucket, key, path, size, digest, progress)
            return True

        transferred = run.call("push", bucket, key, attempt)
        return key, transferred, size if transferred else 0

    if not plan:
        log.warning("push: %s has no files", src)
    return _transfer(run, "push", uri, push_one, plan, sum(path.stat().st_size for path, _ in plan))


def _transfer(run: _Run, direction: str, uri: str, one: Callable, plan: list, total: int) -> TransferReport:
    """``one`` over the ``plan`` of a pull or push (``total`` bytes) under a progress bar, and its report."""
    with tqdm(
        total=total,
        desc=f"{direction} {uri}",
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        disable=not run.progress,
    ) as run.bar:
        results = run.map(one, plan)
    report = TransferReport(direction, uri, keys=[key for key, _, _ in results], retries=run.retries)
    report.skipped_keys = [key for key, transferred, _ in results if not transferred]
    report.skipped = len(report.skipped_keys)
    report.transferred = len(results) - report.skipped
    report.bytes = sum(nbytes for _, transferred, nbytes in results if transferred)
    report.seconds = time.monotonic() - run.start
    log.info("%s", report.summary())
    return report
