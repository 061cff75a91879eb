"""Encoded-image cache: the projector's output for an image, kept so a follow-up question about
the same image skips the encoder (a minute per 896 px image on a 2-core CPU).

Entries are float32 arrays [n_tokens, n_embd] keyed by the image's content hash *and* the
projector file's fingerprint (a different mmproj never reuses another's embeddings). Memory:
an LRU bounded in bytes. Disk (optional): one ``.npy`` per entry in a directory, written
atomically, oldest-used evicted past a byte budget. Entries are embeddings, not pixels, but
they are still derived from patient images: the directory belongs on the device, never synced.
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


class ImageCache:
    """Memory LRU (+ optional on-disk store) of encoded images. Thread-safe."""

    def __init__(
        self,
        *,
        max_bytes: int = 512 << 20,
        disk_dir: str | os.PathLike | None = None,
        disk_max_bytes: int = 2 << 30,
    ):
        self.max_bytes = max_bytes
        self.disk_dir = Path(disk_dir) if disk_dir else None
        self.disk_max_bytes = disk_max_bytes
        self._mem: OrderedDict[str, np.ndarray] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0
        if self.disk_dir:
            self.disk_dir.mkdir(parents=True, exist_ok=True, mode=0o700)

    def __len__(self) -> int:
        return len(self._mem)

    def values(self) -> list[np.ndarray]:
        """The entries held in memory (read-only arrays), least recently used first."""
        with self._lock:
            return list(self._mem.values())

    def clear(self) -> None:
        """Forget every entry held in memory (the on-disk store, if any, is kept)."""
        with self._lock:
            self._mem.clear()
            self._bytes = 0

    def get(self, key: str) -> np.ndarray | None:
        """The embeddings stored under ``key`` (memory, then disk), or None; counts a hit or miss."""
        with self._lock:
            arr = self._mem.get(key)
            if arr is not None:
                self._mem.move_to_end(key)
                self.hits += 1
                return arr
        arr = self._disk_get(key)
        with self._lock:
            if arr is None:
                self.misses += 1
                return None
            self.hits += 1
            self._mem_put(key, arr)
            return arr

    def put(self, key: str, arr: np.ndarray) -> None:
        """Keep ``arr`` under ``key`` in memory (evicting the least recently used past the budget)
        and, with a ``disk_dir``, on disk."""
        arr = np.ascontiguousarray(arr, dtype=np.float32)
        arr.setflags(write=False)
        with self._lock:
            self._mem_put(key, arr)
        self._disk_put(key, arr)

    def _mem_put(self, key: str, arr: np.ndarray) -> None:
        if key in self._mem:
            self._bytes -= self._mem.pop(key).nbytes
        if arr.nbytes > self.max_bytes:
            return
        self._mem[key] = arr
        self._bytes += arr.nbytes
        while self._bytes > self.max_bytes:
            _, old = self._mem.popitem(last=False)
            self._bytes -= old.nbytes

    def _path(self, key: str) -> Path:
        assert self.disk_dir is not None
        return self.disk_dir / f"{key}.npy"

    def _disk_get(self, key: str) -> np.ndarray | None:
        if not self.disk_dir:
            return None
        p = self._path(key)
        try:
            arr = np.load(p, allow_pickle=False)
        except (OSError, ValueError):
            return None
        os.utime(p)  # recency for eviction
        return arr

    def _disk_put(self, key: str, arr: np.ndarray) -> None:
        if not self.disk_dir:
            return
        tmp = self.disk_dir / f".{key}.{secrets.token_hex(4)}.tmp"
        try:
            with open(tmp, "wb") as f:
                np.save(f, arr, allow_pickle=False)
            os.replace(tmp, self._path(key))
        except OSError as exc:  # a full disk must not fail the answer; the memory copy serves
            log.warning("image cache: can't write to %s (%s)", self.disk_dir, exc.strerror)
            tmp.unlink(missing_ok=True)
            return
        self._evict_disk()

    def _evict_disk(self) -> None:
        assert self.disk_dir is not None
        files = [(p.stat().st_mtime, p.stat().st_size, p) for p in self.disk_dir.glob("*.npy")]
        total = sum(s for _, s, _ in files)
        for _, size, p in sorted(files):
            if total <= self.disk_max_bytes:
                break
            p.unlink(missing_ok=True)
            total -= size
