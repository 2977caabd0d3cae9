"""Image shards: plain tar files of JPEGs, named by the image's relative path in the source dataset.

A few large files instead of thousands of small ones keep DVC hashing, pushing and pulling fast. A shard
is written to a temporary name and renamed when complete, so a crash never leaves a half shard under its
final name. The manifest records every member's byte offset, so a reader seeks straight to an image.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from albef.data.images import decode_rgb
from albef.io import atomic_write


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class ShardEntry:
    key: str
    offset: int
    size: int


def write_shard(path: Path, items: list[tuple[str, bytes]]) -> list[ShardEntry]:
    """Write ``(key, bytes)`` pairs as one tar at ``path`` atomically; return each member's offset."""
    entries: list[ShardEntry] = []

    def write(tmp: Path) -> None:
        # PAX: long member names are fine (USTAR stops at 255 characters).
        with open(tmp, "wb") as raw, tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for key, data in items:
                info = tarfile.TarInfo(name=key)
                info.size = len(data)
                info.mtime = 0  # same bytes for the same content: reproducible shards
                info.mode = 0o644
                tar.addfile(info, io.BytesIO(data))
                # the member's data ends the archive so far, padded to whole 512-byte blocks
                padded = -(-len(data) // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
                entries.append(ShardEntry(key, tar.offset - padded, len(data)))

    atomic_write(path, write)
    return entries


class ShardedImages:
    """Random access to the images of a preprocessed dataset by their original relative path."""

    def __init__(self, processed_dir: str | Path):
        self.root = Path(processed_dir)
        manifest_path = self.root / "manifest.json"
        if not manifest_path.is_file():
            raise FileNotFoundError(f"{manifest_path} not found: run `albef preprocess` first")
        manifest = json.loads(manifest_path.read_text())
        self.index: dict[str, tuple[str, int, int]] = {}
        for shard in manifest["shards"]:
            for key, offset, size in shard["members"]:
                self.index[key] = (shard["name"], offset, size)

    def __contains__(self, key: str) -> bool:
        return key in self.index

    def __len__(self) -> int:
        return len(self.index)

    def read_bytes(self, key: str) -> bytes:
        if key not in self.index:
            raise KeyError(
                f"image {key!r} is not in {self.root} (dropped during preprocessing, or a wrong path)"
            )
        name, offset, size = self.index[key]
        with open(self.root / name, "rb") as fh:
            fh.seek(offset)
            return fh.read(size)

    def open(self, key: str) -> Image.Image:
        """The stored image through the one decoder (:func:`albef.data.images.decode_rgb`), as every other
        reader decodes images."""
        return decode_rgb(self.read_bytes(key), f"{self.root}:{key}")
