"""On-disk caches: artefacts worth keeping between runs (teacher explanations, auto-encoders, teachers).

A leaf of the package: it imports only :mod:`xkd.files` (and the standard library, torch, safetensors).

Layout under a root folder (``Cache(root)``), one sub-folder per ``kind`` of artefact:

* a **single-file entry** ``root/<kind>/<name>-<key>.safetensors`` (:meth:`Cache.file`): a dict of
  tensors written by :meth:`Cache.write` with two metadata strings, ``key`` (the full description
  the entry was built from, so a file reached under a colliding or copied name is detected) and
  ``seconds`` (how long building it took, so a run reusing it can count that cost);
* a **multi-file entry** ``root/<kind>/<key>/`` (:meth:`Cache.folder`, not created): a folder the
  caller fills, e.g. the trained teacher ``<cache_dir>/teachers/<key>/best.pt``.

Keys: :meth:`Cache.key` hashes any mix of JSON-serialisable values and tensors into 16 hex digits
(SHA-256; a value is hashed as ``json.dumps(value, sort_keys=True, default=str)``, a tensor as its
shape and raw bytes). For one JSON-serialisable value it equals
``hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]``, the teacher-cache
key of :mod:`xkd.pipeline`, so existing cache folders keep their names.

Example::

    cache = Cache(cache_dir)
    desc = json.dumps({"teacher": key, "explainer": "grad_cam"}, sort_keys=True)
    path = cache.file("xdistill", "targets", Cache.key(desc))   # root/xdistill/targets-<16 hex>.safetensors
    tensors = Cache.read(path, desc)                               # None: missing, other key, unreadable
    if tensors is None:
        tensors = {"targets": build()}
        Cache.write(path, desc, tensors, seconds=took)             # atomic
    spent = Cache.seconds(path)                                    # 0.0 when not stored
    folder = cache.folder("teachers", Cache.key(config_dict))      # root/teachers/<16 hex>/

Reading never raises for a bad entry: a file written for another key or one that cannot be read
gives ``None`` and a warning on the ``xkd`` logger, and the caller rebuilds and overwrites it.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from safetensors import safe_open
from safetensors.torch import save
from torch import Tensor

from xkd.files import atomic_write_bytes

log = logging.getLogger("xkd")

SUFFIX = ".safetensors"


class Cache:
    """A cache folder ``root``; see the module docstring for the layout and an example.

    Args:
        root: the cache's folder (created on the first write, not here).
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    @staticmethod
    def key(*parts: Any) -> str:
        """16 hex digits of the SHA-256 of ``parts``: tensors by shape and bytes, anything else as sorted JSON."""
        h = hashlib.sha256()
        for p in parts:
            if isinstance(p, Tensor):
                h.update(str(tuple(p.shape)).encode())
                h.update(p.detach().cpu().contiguous().numpy().tobytes())
            else:
                h.update(json.dumps(p, sort_keys=True, default=str).encode())
        return h.hexdigest()[:16]

    def file(self, kind: str, name: str, key: str) -> Path:
        """The single-file entry ``root/<kind>/<name>-<key>.safetensors`` (a path; nothing is created)."""
        return self.root / kind / f"{name}-{key}{SUFFIX}"

    def folder(self, kind: str, key: str) -> Path:
        """The multi-file entry ``root/<kind>/<key>/`` (a path; the caller creates and fills it)."""
        return self.root / kind / key

    @staticmethod
    def read(path: str | Path, key: str) -> dict[str, Tensor] | None:
        """The tensors of entry ``path`` if it exists and its stored key is ``key``; else ``None`` (logged
        when the file exists but was written for another key or cannot be read)."""
        path = Path(path)
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as f:
                stored = (f.metadata() or {}).get("key")
                if stored != key:
                    log.warning("cache %s was written for another key (other inputs or options); rebuilding", path)
                    return None
                return {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # noqa: BLE001  (a damaged file is rebuilt)
            log.warning("cannot read cache %s (%s); rebuilding", path, e)
            return None

    @staticmethod
    def write(path: str | Path, key: str, tensors: dict[str, Tensor], seconds: float | None = None) -> Path:
        """Write ``tensors`` (moved to the CPU) to entry ``path`` atomically, with ``key`` and, when given,
        the ``seconds`` building them took as metadata."""
        meta = {"key": key} if seconds is None else {"key": key, "seconds": repr(float(seconds))}
        data = save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata=meta)
        return atomic_write_bytes(path, data)

    @staticmethod
    def seconds(path: str | Path) -> float:
        """Seconds building entry ``path`` took (0.0 when not stored, e.g. a file from an older xkd)."""
        try:
            with safe_open(str(path), framework="pt") as f:
                return float((f.metadata() or {}).get("seconds", 0.0))
        except Exception:  # noqa: BLE001  (called after a successful read; be lenient with the metadata)
            return 0.0
