"""albef.data.s3 against a real S3 endpoint on loopback (moto's threaded server), not a mocked client.

Faults (throttling, 5xx, access denied, dropped connections, corrupted bodies) come from a small HTTP
proxy in front of moto, so the code under test sees them exactly as it would from a real store.
"""

from __future__ import annotations

import dataclasses
import hashlib
import http.client
import logging
import os
import socket
import threading
import time
import urllib.request
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import boto3
import pytest
from moto.server import ThreadedMotoServer

from albef.data.s3 import (
    S3ChecksumError,
    S3Error,
    S3Settings,
    TransferReport,
    parse_s3_uri,
    pull,
    push,
)

MIB = 2**20
LOGGER = "albef.data.s3"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _retry_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == LOGGER and r.getMessage().startswith("retry ")]


# ---------------------------------------------------------------------------- servers


@pytest.fixture(scope="module")
def moto_url():
    """A moto S3 server on a free loopback port, with throw-away credentials and no proxies or profiles."""
    with pytest.MonkeyPatch.context() as mp:
        for name in (
            "AWS_PROFILE",
            "AWS_SESSION_TOKEN",
            "AWS_ENDPOINT_URL",
            "AWS_ENDPOINT_URL_S3",
            "ALBEF_S3_ENDPOINT_URL",
            "HTTP_PROXY",
            "HTTPS_PROXY",
            "ALL_PROXY",
            "http_proxy",
            "https_proxy",
            "all_proxy",
        ):
            mp.delenv(name, raising=False)
        mp.setenv("AWS_ACCESS_KEY_ID", "test")
        mp.setenv("AWS_SECRET_ACCESS_KEY", "test")
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        mp.setenv("AWS_CONFIG_FILE", os.devnull)
        mp.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
        mp.setenv("AWS_EC2_METADATA_DISABLED", "true")
        mp.setenv("NO_PROXY", "127.0.0.1,localhost")
        port = _free_port()
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        server.start()
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 10
        while True:
            try:
                with urllib.request.urlopen(f"{url}/moto-api/", timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        try:
            yield url
        finally:
            server.stop()


@pytest.fixture
def client(moto_url):
    return boto3.client("s3", endpoint_url=moto_url, region_name="us-east-1")


@pytest.fixture
def bucket(client) -> str:
    name = f"albef-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=name)
    return name


@pytest.fixture
def settings(moto_url) -> S3Settings:
    # botocore's own retries off (client_max_attempts=1) so that every retry goes through the logged outer
    # loop; tiny delays keep the file fast. test_botocore_retries_transient_errors covers the inner layer.
    return S3Settings(
        endpoint_url=moto_url,
        region="us-east-1",
        max_attempts=3,
        base_delay=0.01,
        max_delay=0.05,
        connect_timeout=2.0,
        read_timeout=10.0,
        multipart_threshold=5 * MIB,
        multipart_chunksize=5 * MIB,
        client_max_attempts=1,
        max_workers=4,
    )


class FaultyProxy:
    """A loopback HTTP proxy in front of moto that injects faults and records every request.

    Attributes:
        faults: ``(status, code)`` errors answered, in order, to the next requests instead of forwarding.
        truncate_gets: the next N object GETs send half their body and then drop the connection.
        corrupt_gets: the next N object GETs have their first byte flipped.
        requests: ``(method, path, Range header, status)`` for every request seen.
    """

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.removeprefix("http://")
        self.faults: list[tuple[int, str]] = []
        self.truncate_gets = 0
        self.corrupt_gets = 0
        self.requests: list[tuple[str, str, str | None, int]] = []
        self.lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive and "Expect: 100-continue" like a real store

            def log_message(self, format, *args):  # quiet
                pass

            def _handle(self) -> None:
                assert "chunked" not in self.headers.get("Transfer-Encoding", ""), "unexpected chunked upload"
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                object_get = self.command == "GET" and "?" not in self.path
                with proxy.lock:
                    fault = proxy.faults.pop(0) if proxy.faults else None
                    truncate = corrupt = False
                    if fault is None and object_get and proxy.truncate_gets:
                        proxy.truncate_gets -= 1
                        truncate = True
                    elif fault is None and object_get and proxy.corrupt_gets:
                        proxy.corrupt_gets -= 1
                        corrupt = True
                if fault is not None:
                    status, code = fault
                    payload = (
                        f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
                        f"<Message>injected {code}</Message></Error>"
                    ).encode()
                    self._record(status)
                    self.send_response(status)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", "0" if self.command == "HEAD" else str(len(payload)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(payload)
                    return
                headers = {k: v for k, v in self.headers.items() if k.lower() != "expect"}
                conn = http.client.HTTPConnection(proxy.upstream, timeout=30)
                try:
                    conn.request(self.command, self.path, body=body, headers=headers)
                    response = conn.getresponse()
                    data = response.read()
                    upstream_headers = response.getheaders()
                finally:
                    conn.close()
                self._record(response.status)
                if corrupt and data:
                    data = bytes([data[0] ^ 0xFF]) + data[1:]
                self.send_response(response.status)
                for name, value in upstream_headers:
                    if name.lower() in ("transfer-encoding", "connection", "keep-alive", "server", "date"):
                        continue
                    if name.lower() == "content-length" and self.command != "HEAD":
                        continue
                    self.send_header(name, value)
                if self.command != "HEAD":
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command == "HEAD":
                    return
                if truncate:
                    self.wfile.write(data[: len(data) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(data)

            def _record(self, status: int) -> None:
                with proxy.lock:
                    proxy.requests.append((self.command, self.path, self.headers.get("Range"), status))

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self.thread.start()

    def object_gets(self, key: str) -> list[tuple[str, str, str | None, int]]:
        return [r for r in self.requests if r[0] == "GET" and r[1].endswith("/" + key)]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def proxy(moto_url):
    faulty = FaultyProxy(moto_url)
    yield faulty
    faulty.close()


def _via(settings: S3Settings, proxy: FaultyProxy, **changes) -> S3Settings:
    return dataclasses.replace(settings, endpoint_url=proxy.url, **changes)


def _make_tree(root: Path) -> dict[str, bytes]:
    rng = __import__("random").Random(0)
    files = {
        "top.txt": b"hello\n",
        "empty.dat": b"",
        "nested/a.bin": rng.randbytes(10_000),
        "nested/deeper/b.json": b'{"x": 1}\n',
        "big.bin": rng.randbytes(5 * MIB + 4099),  # two parts at a 5 MiB threshold
    }
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return files


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


# ---------------------------------------------------------------------------- URIs and settings


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("s3://bucket/prefix", ("bucket", "prefix")),
        ("s3://my.bucket-1/a/b/c.tar", ("my.bucket-1", "a/b/c.tar")),
        ("s3://bucket/", ("bucket", "")),
        ("s3://bucket", ("bucket", "")),
        ("s3://bucket/dir/", ("bucket", "dir/")),
    ],
)
def test_parse_s3_uri(uri, expected):
    assert parse_s3_uri(uri) == expected


@pytest.mark.parametrize(
    "uri",
    [
        "",
        "bucket/key",
        "http://bucket/key",
        "s3:/bucket/key",
        "s3://",
        "s3:///key",
        "s3://ab/key",
        "s3://-bad-/k",
    ],
)
def test_parse_s3_uri_rejects_bad_uris(uri):
    with pytest.raises(ValueError, match="S3 URI") as info:
        parse_s3_uri(uri)
    assert repr(uri) in str(info.value)


def test_pull_and_push_reject_bad_uris(tmp_path):
    with pytest.raises(ValueError, match="'gs://bucket/x'"):
        pull("gs://bucket/x", tmp_path)
    with pytest.raises(ValueError, match="'bucket/x'"):
        push(tmp_path, "bucket/x")


def test_settings_endpoint_from_env_and_validation(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://aws-env:1")
    monkeypatch.delenv("ALBEF_S3_ENDPOINT_URL", raising=False)
    assert S3Settings().endpoint_url == "http://aws-env:1"
    monkeypatch.setenv("ALBEF_S3_ENDPOINT_URL", "http://albef-env:2")
    assert S3Settings().endpoint_url == "http://albef-env:2"
    assert S3Settings(endpoint_url="http://explicit:3").endpoint_url == "http://explicit:3"
    with pytest.raises(ValueError, match="max_attempts"):
        S3Settings(max_attempts=0)
    with pytest.raises(ValueError, match="multipart_chunksize"):
        S3Settings(multipart_chunksize=MIB)
    with pytest.raises(ValueError, match="read_timeout"):
        S3Settings(read_timeout=0)


# ---------------------------------------------------------------------------- round trip


def test_push_pull_round_trip_then_skip_up_to_date(tmp_path, client, bucket, settings):
    src, out = tmp_path / "src", tmp_path / "out"
    files = _make_tree(src)
    # Leftovers of an interrupted pull are not data.
    (src / "stale.part").write_bytes(b"x")
    (src / "stale.part.etag").write_text('"abc"')
    client.put_object(Bucket=bucket, Key="dsx/not-under-the-prefix", Body=b"no")

    report = push(src, f"s3://{bucket}/ds", settings, progress=True)
    assert isinstance(report, TransferReport)
    assert (report.transferred, report.skipped) == (5, 0)
    assert report.bytes == sum(len(d) for d in files.values())
    assert sorted(report.keys) == sorted(f"ds/{rel}" for rel in files)
    big = client.head_object(Bucket=bucket, Key="ds/big.bin")
    assert big["ETag"].strip('"').endswith("-2"), "big.bin should have gone up in two parts"
    for rel, data in files.items():
        assert client.head_object(Bucket=bucket, Key=f"ds/{rel}")["Metadata"]["sha256"] == _sha256(data)

    report = pull(f"s3://{bucket}/ds", out, settings, progress=False)
    assert (report.transferred, report.skipped) == (5, 0)
    assert report.bytes == sum(len(d) for d in files.values())
    assert _tree(out) == files  # also: no .part/.etag leftovers and nothing from dsx/

    again = push(src, f"s3://{bucket}/ds", settings, progress=False)
    assert (again.transferred, again.skipped, again.bytes) == (0, 5, 0)
    again = pull(f"s3://{bucket}/ds/", out, settings, progress=False)
    assert (again.transferred, again.skipped, again.bytes) == (0, 5, 0)

    # Same size, new content: both directions must notice through the checksum, not the size.
    changed = bytes(reversed(files["nested/a.bin"]))
    (src / "nested/a.bin").write_bytes(changed)
    report = push(src, f"s3://{bucket}/ds", settings, progress=False)
    assert (report.transferred, report.skipped) == (1, 4)
    assert report.keys.count("ds/nested/a.bin") == 1 and "ds/nested/a.bin" not in report.skipped_keys
    report = pull(f"s3://{bucket}/ds", out, settings, progress=False)
    assert (report.transferred, report.skipped) == (1, 4)
    assert (out / "nested/a.bin").read_bytes() == changed


def test_single_object_uris(tmp_path, client, bucket, settings):
    src = tmp_path / "model.bin"
    src.write_bytes(b"weights" * 100)
    assert push(src, f"s3://{bucket}/models/", settings, progress=False).keys == ["models/model.bin"]
    assert push(src, f"s3://{bucket}/exact/name.bin", settings, progress=False).keys == ["exact/name.bin"]

    target = tmp_path / "copy.bin"
    report = pull(f"s3://{bucket}/models/model.bin", target, settings, progress=False)
    assert report.keys == ["models/model.bin"] and target.read_bytes() == src.read_bytes()
    into = tmp_path / "into"
    into.mkdir()
    pull(f"s3://{bucket}/exact/name.bin", into, settings, progress=False)
    assert (into / "name.bin").read_bytes() == src.read_bytes()


def test_pull_verifies_md5_etag_without_sha256_metadata(tmp_path, client, bucket, settings, proxy, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    data = os.urandom(100_000)
    client.put_object(Bucket=bucket, Key="plain/x.bin", Body=data)  # no sha256 metadata: MD5 ETag only
    proxy.corrupt_gets = 1
    report = pull(f"s3://{bucket}/plain", tmp_path / "out", _via(settings, proxy), progress=False)
    assert (tmp_path / "out/x.bin").read_bytes() == data
    assert report.retries == 1
    assert any("checksum mismatch for s3://" in r.getMessage() for r in _retry_records(caplog))


# ---------------------------------------------------------------------------- resume


@pytest.fixture
def remote_blob(tmp_path, client, bucket, settings):
    data = os.urandom(3 * MIB + 12_345)
    (tmp_path / "blob.bin").write_bytes(data)
    push(tmp_path / "blob.bin", f"s3://{bucket}/r/blob.bin", settings, progress=False)
    etag = client.head_object(Bucket=bucket, Key="r/blob.bin")["ETag"]
    return data, etag


def test_resume_from_part_uses_ranged_get(tmp_path, bucket, settings, proxy, remote_blob):
    data, etag = remote_blob
    out = tmp_path / "out"
    out.mkdir()
    (out / "blob.bin.part").write_bytes(data[:1_000_000])
    (out / "blob.bin.part.etag").write_text(etag)

    report = pull(f"s3://{bucket}/r", out, _via(settings, proxy), progress=False)
    assert report.transferred == 1
    assert report.bytes == len(data) - 1_000_000
    gets = proxy.object_gets("r/blob.bin")
    assert [(g[2], g[3]) for g in gets] == [("bytes=1000000-", 206)]
    assert (out / "blob.bin").read_bytes() == data
    assert sorted(p.name for p in out.iterdir()) == ["blob.bin"]


def test_part_of_another_version_is_discarded(tmp_path, bucket, settings, proxy, remote_blob):
    data, _ = remote_blob
    out = tmp_path / "out"
    out.mkdir()
    (out / "blob.bin.part").write_bytes(b"old version bytes")
    (out / "blob.bin.part.etag").write_text('"0123456789abcdef0123456789abcdef"')

    report = pull(f"s3://{bucket}/r", out, _via(settings, proxy), progress=False)
    assert report.bytes == len(data)
    assert [g[2] for g in proxy.object_gets("r/blob.bin")] == [None]
    assert (out / "blob.bin").read_bytes() == data
    assert sorted(p.name for p in out.iterdir()) == ["blob.bin"]


def test_corrupt_part_is_detected_and_refetched(tmp_path, bucket, settings, proxy, remote_blob, caplog):
    data, etag = remote_blob
    out = tmp_path / "out"
    out.mkdir()
    (out / "blob.bin.part").write_bytes(b"\0" * 1000)  # right ETag, wrong bytes
    (out / "blob.bin.part.etag").write_text(etag)

    report = pull(f"s3://{bucket}/r", out, _via(settings, proxy), progress=False)
    assert [g[2] for g in proxy.object_gets("r/blob.bin")] == ["bytes=1000-", None]
    assert report.retries == 1 and "checksum mismatch" in _retry_records(caplog)[0].getMessage()
    assert report.bytes == len(data), "bytes of the discarded download must not count"
    assert (out / "blob.bin").read_bytes() == data


def test_dropped_connection_resumes_where_it_stopped(tmp_path, bucket, settings, proxy, remote_blob, caplog):
    data, _ = remote_blob
    out = tmp_path / "out"
    proxy.truncate_gets = 1  # first GET: half the body, then the connection drops

    report = pull(f"s3://{bucket}/r", out, _via(settings, proxy), progress=False)
    gets = proxy.object_gets("r/blob.bin")
    assert len(gets) == 2 and gets[0][2] is None
    resumed_from = int(gets[1][2].removeprefix("bytes=").rstrip("-"))
    assert 0 < resumed_from <= len(data) // 2
    assert report.bytes == len(data), "the resumed attempt must not fetch bytes it already had"
    assert report.retries == 1 and len(_retry_records(caplog)) == 1
    assert (out / "blob.bin").read_bytes() == data
    assert sorted(p.name for p in out.iterdir()) == ["blob.bin"]


# ---------------------------------------------------------------------------- failures


def test_checksum_mismatch_raises_naming_key_and_leaves_no_file(tmp_path, client, bucket, settings, caplog):
    client.put_object(
        Bucket=bucket, Key="bad/weights.bin", Body=b"payload", Metadata={"sha256": _sha256(b"x")}
    )
    out = tmp_path / "out"
    with pytest.raises(S3ChecksumError, match=f"s3://{bucket}/bad/weights.bin"):
        pull(f"s3://{bucket}/bad", out, settings, progress=False)
    assert len(_retry_records(caplog)) == settings.max_attempts - 1
    assert not (out / "weights.bin").exists()
    assert list(out.iterdir()) == []  # no .part or .etag either


def test_throttling_and_5xx_are_retried_and_logged(tmp_path, bucket, settings, proxy, caplog):
    src = tmp_path / "src"
    files = _make_tree(src)
    del files["big.bin"]
    (src / "big.bin").unlink()
    cfg = _via(settings, proxy, max_attempts=5, max_workers=1)

    proxy.faults = [(503, "SlowDown"), (500, "InternalError"), (503, "SlowDown")]
    report = push(src, f"s3://{bucket}/t", cfg, progress=False)
    assert proxy.faults == [] and report.transferred == len(files)
    assert report.retries == 3 and len(_retry_records(caplog)) == 3

    caplog.clear()
    proxy.faults = [(503, "SlowDown"), (500, "InternalError"), (429, "TooManyRequests"), (502, "BadGateway")]
    report = pull(f"s3://{bucket}/t", tmp_path / "out", cfg, progress=False)
    assert proxy.faults == [] and report.transferred == len(files)
    assert _tree(tmp_path / "out") == files
    messages = " ".join(r.getMessage() for r in _retry_records(caplog))
    assert len(_retry_records(caplog)) == 4
    assert "SlowDown (HTTP 503)" in messages and "HTTP 500" in messages


def test_botocore_retries_transient_errors(tmp_path, client, bucket, settings, proxy, caplog):
    client.put_object(Bucket=bucket, Key="b/x.txt", Body=b"data")
    proxy.faults = [(503, "SlowDown")]
    report = pull(f"s3://{bucket}/b", tmp_path, _via(settings, proxy, client_max_attempts=3), progress=False)
    assert (tmp_path / "x.txt").read_bytes() == b"data"
    assert report.retries == 0 and _retry_records(caplog) == []  # handled inside botocore
    assert [r[3] for r in proxy.requests][:2] == [503, 200]


def test_access_denied_is_not_retried(tmp_path, bucket, settings, proxy, caplog):
    proxy.faults = [(403, "AccessDenied")]
    with pytest.raises(S3Error, match="access denied") as info:
        pull(f"s3://{bucket}/x", tmp_path, _via(settings, proxy, client_max_attempts=3), progress=False)
    assert bucket in str(info.value) and proxy.url in str(info.value)
    assert len(proxy.requests) == 1 and _retry_records(caplog) == []


def test_missing_bucket_and_object_fail_fast_with_clear_errors(tmp_path, bucket, settings, moto_url, caplog):
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(S3Error, match="bucket 'no-such-bucket-x' does not exist at " + moto_url):
        pull("s3://no-such-bucket-x/data", tmp_path / "out", settings, progress=False)
    with pytest.raises(S3Error, match="bucket 'no-such-bucket-x' does not exist at " + moto_url):
        push(tmp_path / "f.txt", "s3://no-such-bucket-x/data/f.txt", settings, progress=False)
    with pytest.raises(S3Error, match=f"s3://{bucket}/missing.bin: not found at {moto_url}"):
        pull(f"s3://{bucket}/missing.bin", tmp_path / "out", settings, progress=False)
    with pytest.raises(S3Error, match="no objects under"):
        pull(f"s3://{bucket}/empty/", tmp_path / "out", settings, progress=False)
    assert _retry_records(caplog) == []
    with pytest.raises(FileNotFoundError):
        push(tmp_path / "nope", f"s3://{bucket}/x", settings, progress=False)


def test_unreachable_endpoint_fails_fast_naming_it(tmp_path, settings):
    endpoint = f"http://127.0.0.1:{_free_port()}"  # nothing listens there
    cfg = dataclasses.replace(settings, endpoint_url=endpoint, max_attempts=2, client_max_attempts=2)
    (tmp_path / "f.txt").write_text("x")
    start = time.monotonic()
    with pytest.raises(S3Error, match=f"at {endpoint} after 2 attempts") as info:
        pull("s3://some-bucket/data", tmp_path / "out", cfg, progress=False)
    assert "reachable" in str(info.value)
    with pytest.raises(S3Error, match=f"at {endpoint} after 2 attempts"):
        push(tmp_path / "f.txt", "s3://some-bucket/data/", cfg, progress=False)
    assert time.monotonic() - start < 10
    assert not (tmp_path / "out").exists()


def test_cli_push_and_pull(tmp_path, moto_url, bucket, capsys):
    from albef.cli import main

    tree = _make_tree(tmp_path / "src")
    assert (
        main(
            [
                "data",
                "push",
                str(tmp_path / "src"),
                f"s3://{bucket}/cli",
                "--endpoint-url",
                moto_url,
                "--quiet",
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "data",
                "pull",
                f"s3://{bucket}/cli",
                str(tmp_path / "dst"),
                "--endpoint-url",
                moto_url,
                "--quiet",
            ]
        )
        == 0
    )
    for rel, data in tree.items():
        assert (tmp_path / "dst" / rel).read_bytes() == data
    assert (
        main(
            [
                "data",
                "pull",
                "s3://no-such-bucket-here/x",
                str(tmp_path / "d2"),
                "--endpoint-url",
                moto_url,
                "--quiet",
            ]
        )
        == 2
    )
    assert "no-such-bucket-here" in capsys.readouterr().err
