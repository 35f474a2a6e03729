"""Build the KeypointIndex of an annotation JSON once per node and memory-map it in every process.

    index = cached_index("s3://bucket/coco/annotations/person_keypoints_train2017.json", Storage(),
                         cache_dir=None, min_visible_keypoints=10)
    python -m dist_kp.data.index_cache ANNOTATIONS [--cache-dir DIR] [--min-visible-keypoints N]

Layout of the cache directory (node-local disk: `data.cache_dir`, default
$TMPDIR/dist_kp_index-<uid>):

    <sha256 of the JSON>-v<format>/   one entry per JSON content: an .npy file per array
        manifest.json                 written last: sizes, shapes, dtypes, keypoint metadata
        trainable-min<N>.npy          training positions for data.min_visible_keypoints=N
    sources/<hash of the URL>.json    the URL's size/mtime (or ETag) when its sha256 was taken
    .lock                             held by the one process that hashes or builds

A process first tries the cache without the lock: the URL's fingerprint (stat, or one HEAD
request on object storage) finds the content hash, and the entry's manifest and file sizes
are checked. Only if that fails does it take the lock, check again (another process may
have built it meanwhile), and then hash the JSON (streamed) and build the entry. The builder
logs one "building index cache" line. A changed JSON has another hash, so another entry; a
damaged entry (truncated file, bad manifest) is rebuilt.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from filelock import FileLock, Timeout

from dist_kp.cli import as_process
from dist_kp.data.coco import trainable_images
from dist_kp.data.coco_stream import index_from_stream
from dist_kp.data.index import DataError, KeypointIndex, KeypointMeta, PackedStrings
from dist_kp.storage import Storage, StorageError, is_local_url, local_path

log = logging.getLogger("dist_kp.data.index_cache")  # the same name when run as __main__ (setup_logging)

FORMAT_VERSION = 1
BLOCK_BYTES = 16 << 20  # streaming reads: large enough for object storage, small next to the JSON
ARRAYS = ("image_ids", "widths", "heights", "ann_offsets", "boxes", "keypoints", "iscrowd", "areas", "ann_ids",
          "file_name_bytes", "file_name_offsets", "aspect_ratios")


@dataclass
class CachedKeypointIndex(KeypointIndex):
    """A KeypointIndex memory-mapped from a cache entry (read-only arrays shared by the node's processes)."""

    cache_path: str = ""  # the cache entry the arrays are mapped from
    sha256: str = ""  # of the annotation file's content

    def __reduce_ex__(self, protocol: Any) -> Any:
        # Workers started by spawn/forkserver map the same files instead of receiving copies.
        return _reopen, (self.cache_path, self.source, tuple(self.trainable))


def _reopen(path: str, source: str, trainable: tuple[int, ...]) -> CachedKeypointIndex:
    index = open_entry(path, source, trainable)
    if index is None:
        raise DataError(f"index cache entry {path} of {source} is gone or damaged")
    return index


def default_cache_dir() -> Path:
    """Node-local default: $TMPDIR (or /tmp)/dist_kp_index-<uid>."""
    return Path(tempfile.gettempdir()) / f"dist_kp_index-{os.getuid()}"


def source_fingerprint(url: str, storage: Storage) -> dict[str, Any] | None:
    """What changes when the file changes, without reading it: stat, or size + ETag/mtime of the object.

    None when the file system reports neither (the content is then hashed every time).
    """
    try:
        if is_local_url(url):
            st = os.stat(local_path(url))
            return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns,
                    "inode": st.st_ino, "device": st.st_dev}
        with storage.named_errors(url):
            fs, path = storage.url_to_fs(url)
            info = fs.info(path)
    except FileNotFoundError:
        raise DataError(f"annotation file not found: {url}") from None
    except StorageError as error:
        if isinstance(error.__cause__, FileNotFoundError):
            raise DataError(f"annotation file not found: {url}") from None
        raise
    version = info.get("ETag") or info.get("etag") or info.get("LastModified") or info.get("mtime")
    return None if version is None else {"size": info.get("size"), "version": str(version)}


def _blocks(url: str, storage: Storage) -> Iterator[bytes]:
    """The file's bytes in BLOCK_BYTES pieces (one ranged request per piece on object storage)."""
    if is_local_url(url):
        with open(local_path(url), "rb", buffering=0) as f:
            while block := f.read(BLOCK_BYTES):
                yield block
        return
    with storage.named_errors(url):
        fs, path = storage.url_to_fs(url)
        with fs.open(path, "rb", block_size=BLOCK_BYTES, cache_type="none") as f:
            while block := f.read(BLOCK_BYTES):
                yield block


def _reader(blocks: Iterator[bytes]) -> Callable[[], bytes]:
    return lambda: next(blocks, b"")


def _save_atomic(path: Path, write: Callable[[Any], None]) -> None:
    """Write via a temporary file in the same folder, flushed, then renamed into place."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _load_array(path: Path, dtype: str, shape: list[int], size: int) -> np.ndarray:
    if path.stat().st_size != size:
        raise ValueError(f"{path} has {path.stat().st_size} bytes, expected {size}")
    array = np.load(path, mmap_mode="r")
    if str(array.dtype) != dtype or list(array.shape) != shape:
        raise ValueError(f"{path} holds {array.dtype}{list(array.shape)}, expected {dtype}{shape}")
    return array


def open_entry(path: str | Path, source: str, trainable: tuple[int, ...] = ()) -> CachedKeypointIndex | None:
    """The index of a cache entry, memory-mapped; None if the entry is missing, incomplete or damaged."""
    entry = Path(path)
    try:
        manifest = json.loads((entry / "manifest.json").read_text())
        if manifest.get("format") != FORMAT_VERSION:
            return None
        arrays = {name: _load_array(entry / f"{name}.npy", *manifest["arrays"][name]) for name in ARRAYS}
        positions = {}
        for m in trainable:
            array = np.load(entry / f"trainable-min{m}.npy", mmap_mode="r")
            if array.dtype != np.int64 or array.ndim != 1 or (len(array) and int(array[-1]) >= len(arrays["image_ids"])):
                return None
            positions[m] = array
        images, annotations = len(arrays["image_ids"]), len(arrays["boxes"])
        if (len(arrays["ann_offsets"]) != images + 1 or int(arrays["ann_offsets"][-1]) != annotations
                or len(arrays["file_name_offsets"]) != images + 1
                or int(arrays["file_name_offsets"][-1]) != len(arrays["file_name_bytes"])):
            return None
    except (OSError, ValueError, KeyError, TypeError, EOFError):
        return None
    return CachedKeypointIndex(
        source=source,
        meta=KeypointMeta(**manifest["meta"]),
        image_ids=arrays["image_ids"],
        file_names=PackedStrings(arrays["file_name_bytes"], arrays["file_name_offsets"]),
        widths=arrays["widths"],
        heights=arrays["heights"],
        ann_offsets=arrays["ann_offsets"],
        boxes=arrays["boxes"],
        keypoints=arrays["keypoints"],
        iscrowd=arrays["iscrowd"],
        areas=arrays["areas"],
        ann_ids=arrays["ann_ids"],
        trainable=positions,
        precomputed_aspect_ratios=arrays["aspect_ratios"],
        cache_path=str(entry),
        sha256=manifest["sha256"],
    )


def write_entry(index: KeypointIndex, entry: Path, digest: str) -> None:
    """Write the index as a complete entry at `entry` (built aside, renamed into place)."""
    names = index.file_names if isinstance(index.file_names, PackedStrings) else PackedStrings.pack(index.file_names)
    arrays = {name: getattr(index, name) for name in ARRAYS[:9]}
    arrays.update(file_name_bytes=names.blob, file_name_offsets=names.offsets, aspect_ratios=index.aspect_ratios)
    tmp = entry.with_name(f".tmp-{entry.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp.mkdir(parents=True)
    try:
        recorded = {}
        for name, array in arrays.items():
            array = np.ascontiguousarray(array)
            _save_atomic(tmp / f"{name}.npy", lambda f, a=array: np.save(f, a, allow_pickle=False))
            recorded[name] = [str(array.dtype), list(array.shape), (tmp / f"{name}.npy").stat().st_size]
        manifest = {"format": FORMAT_VERSION, "sha256": digest, "source": index.source, "meta": index.meta.to_dict(),
                    "images": len(index), "annotations": len(index.boxes), "arrays": recorded}
        _save_atomic(tmp / "manifest.json", lambda f: f.write(json.dumps(manifest, indent=1).encode()))
        if entry.exists():  # a damaged entry: move it away first (readers that mapped it keep their pages)
            stale = entry.with_name(f".stale-{entry.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
            os.replace(entry, stale)
            shutil.rmtree(stale, ignore_errors=True)
        os.replace(tmp, entry)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class IndexCache:
    """The cache directory of one node; see the module docstring for its layout and protocol.

    Annotation files are read through `storage`; the cache itself is a local folder.
    """

    def __init__(self, storage: Storage, cache_dir: str | Path | None = None) -> None:
        self.storage = storage
        self.root = Path(cache_dir) if cache_dir else default_cache_dir()

    def _source_record(self, url: str) -> Path:
        return self.root / "sources" / f"{hashlib.sha256(url.encode()).hexdigest()[:32]}.json"

    def _entry(self, digest: str) -> Path:
        return self.root / f"{digest}-v{FORMAT_VERSION}"

    def _known_digest(self, url: str, fingerprint: dict[str, Any] | None) -> str | None:
        """The sha256 recorded for this URL, if the file has not changed since."""
        if fingerprint is None:
            return None
        try:
            record = json.loads(self._source_record(url).read_text())
        except (OSError, ValueError):
            return None
        return record.get("sha256") if record.get("url") == url and record.get("fingerprint") == fingerprint else None

    def _open(self, digest: str, url: str, min_visible_keypoints: int | None) -> CachedKeypointIndex | None:
        trainable = () if min_visible_keypoints is None else (min_visible_keypoints,)
        return open_entry(self._entry(digest), url, trainable)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            (self.root / "sources").mkdir(exist_ok=True)
        except OSError as error:
            raise DataError(f"index cache directory {self.root} cannot be created ({error}); "
                            "set data.cache_dir to a writable node-local folder") from None
        lock = FileLock(str(self.root / ".lock"))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            log.info("waiting for the index cache lock in %s (another process is hashing or building)", self.root)
            lock.acquire()
        try:
            for leftover in self.root.glob(".tmp-*"):  # from a builder that died; only lock holders make them
                shutil.rmtree(leftover, ignore_errors=True)
            yield
        finally:
            lock.release()

    def load(self, url: str, min_visible_keypoints: int | None = None) -> CachedKeypointIndex:
        """The index of the JSON at `url` (local path or fsspec URL), from the cache or built into it.

        With min_visible_keypoints, the index also holds the training positions for that filter
        (index.trainable[min_visible_keypoints]).
        """
        fingerprint = source_fingerprint(url, self.storage)
        digest = self._known_digest(url, fingerprint)
        index = None if digest is None else self._open(digest, url, min_visible_keypoints)
        if index is not None:
            return index
        with self._locked():
            digest = self._known_digest(url, fingerprint)
            download = None
            try:
                if digest is None:
                    digest, download = self._hash(url)
                    if fingerprint is not None:
                        record = {"url": url, "fingerprint": fingerprint, "sha256": digest}
                        _save_atomic(self._source_record(url), lambda f: f.write(json.dumps(record).encode()))
                entry = self._entry(digest)
                built = open_entry(entry, url)
                if built is None:
                    self._build(url, download, entry, digest)
                    built = open_entry(entry, url)
                    if built is None:
                        raise DataError(f"index cache entry {entry} of {url} cannot be read back after writing it")
                if min_visible_keypoints is not None and self._open(digest, url, min_visible_keypoints) is None:
                    positions = trainable_images(built, min_visible_keypoints)
                    _save_atomic(entry / f"trainable-min{min_visible_keypoints}.npy",
                                 lambda f: np.save(f, positions, allow_pickle=False))
            finally:
                if download is not None:
                    download.unlink(missing_ok=True)
        index = self._open(digest, url, min_visible_keypoints)
        if index is None:
            raise DataError(f"index cache entry {self._entry(digest)} of {url} was removed while loading it")
        return index

    def _hash(self, url: str) -> tuple[str, Path | None]:
        """sha256 of the file, streamed; a remote file is also kept locally for the build that may follow."""
        digest = hashlib.sha256()
        download = None if is_local_url(url) else self.root / f".tmp-download-{os.getpid()}.json"
        sink = open(download, "wb") if download else None
        try:
            for block in _blocks(url, self.storage):
                digest.update(block)
                if sink:
                    sink.write(block)
        except FileNotFoundError:
            raise DataError(f"annotation file not found: {url}") from None
        finally:
            if sink:
                sink.close()
        return digest.hexdigest(), download

    def _build(self, url: str, download: Path | None, entry: Path, digest: str) -> None:
        log.info("building index cache for %s in %s (pid %d)", url, entry, os.getpid())
        start = time.perf_counter()
        index = index_from_stream(_reader(_blocks(str(download) if download else url, self.storage)), url)
        write_entry(index, entry, digest)
        log.info("index cache of %s: %d images, %d annotations, built in %.1f s", url, len(index),
                 len(index.boxes), time.perf_counter() - start)


def cached_index(url: str, storage: Storage, cache_dir: str | Path | None = None,
                 min_visible_keypoints: int | None = None) -> CachedKeypointIndex:
    """The KeypointIndex of an annotation JSON (read through `storage`) via the node's cache (see IndexCache.load)."""
    return IndexCache(storage, cache_dir).load(url, min_visible_keypoints)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dist_kp.data.index_cache", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("annotations", help="COCO keypoints JSON: local path or fsspec URL")
    parser.add_argument("--cache-dir", help=f"cache directory (default {default_cache_dir()})")
    parser.add_argument("--min-visible-keypoints", type=int, help="also store the training positions for this filter")
    args = parser.parse_args(argv)
    from dist_kp.distributed import setup_logging

    setup_logging()
    try:
        index = cached_index(args.annotations, Storage(), args.cache_dir, args.min_visible_keypoints)
    except (DataError, StorageError) as error:
        log.error("%s", error)
        return 2
    trained = "" if args.min_visible_keypoints is None else \
        f", {len(index.trainable[args.min_visible_keypoints])} training images"
    log.info("%s: %d images, %d annotations%s; cache entry %s", args.annotations, len(index), len(index.boxes),
             trained, index.cache_path)
    return 0


if __name__ == "__main__":
    sys.exit(as_process(main))
