"""A tile feature cache keyed by tile content, safe for concurrent writers and readers.

Composed studies reuse the same tiles in many bags (2,000 training bags of 40 drawn from a few
hundred tiles), so each distinct tile is encoded once and looked up by the hash of its bytes. The
cache is a folder of shards ``shard-*.h5`` (datasets ``keys`` and ``features``), one folder per
encoder configuration.

Several processes may share one cache (one extraction per cohort or per GPU). No file is ever
rewritten: each writer names its shards uniquely (time, pid and a random part) and publishes each
one complete by a rename, so a visible shard is always whole and never changes. The folder listing
is the index; there is no index file to merge and so no lock. A reader that misses a key re-scans
the folder for shards published since it last looked. Two writers may both encode a tile the other
has not published yet: both store identical features and readers keep the first shard by name.
Caches of older versions (``shard-NNNNN.h5``) read as before. The temporary file of a writer killed
while writing a shard is removed by the next cache opened there once it is an hour old (a live writer
fills its temporary file within seconds, and no lock can tell a live writer on another machine).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from pathlib import Path
from typing import Iterable

import h5py
import numpy as np

from histomil.errors import HistomilError, write_failure
from histomil.files import atomic_path, atomic_write

STALE_TEMP_S = 3600.0  # a shard's temporary file older than this belongs to a killed writer


class FeatureCache:
    """Content-hash -> feature vector, stored as immutable HDF5 shards."""

    def __init__(self, root: str | Path, encoder_info: dict) -> None:
        self.encoder_info = dict(encoder_info)
        self.root = Path(root) / _config_name(self.encoder_info)
        self.root.mkdir(parents=True, exist_ok=True)
        self._check_config()
        self._remove_stale_temps()
        self._index: dict[str, tuple[str, int]] = {}  # key -> (shard file name, row)
        self._shards: dict[str, np.ndarray] = {}  # shard file name -> its features, once read
        self._seen: set[str] = set()  # shard file names already indexed
        self.refresh()

    @classmethod
    def for_encoder(cls, root: str | Path, encoder: object) -> FeatureCache:
        """The cache of one TileEncoder: its name, input size, normalisation, precision and runtime.

        The runtime (``histomil.features.runtimes``) enters the identity only when it is not torch,
        so caches made before runtimes existed keep their folder."""
        identity = {**encoder.info.to_dict(), "precision": encoder.precision}  # type: ignore[attr-defined]
        runtime = str(getattr(encoder, "runtime", "torch"))
        if runtime != "torch":
            identity["runtime"] = runtime
        return cls(root, identity)

    def _check_config(self) -> None:
        """Create ``encoder.json`` once (an atomic create: of two first writers one wins and the other
        compares), else check that the stored configuration is this one."""
        meta = self.root / "encoder.json"
        wanted = json.loads(json.dumps(self.encoder_info))
        if not meta.exists():
            tmp = atomic_path(meta)
            try:
                tmp.write_text(json.dumps(self.encoder_info, indent=2, sort_keys=True))
            except OSError as exc:  # e.g. a full disk: publish nothing (the except below would publish half)
                tmp.unlink(missing_ok=True)
                raise (write_failure(exc, meta, tmp) or exc) from None
            try:
                os.link(tmp, meta)  # fails if another writer created it first: never overwrites
            except FileExistsError:
                pass
            except OSError:  # a filesystem without hard links: rename, as atomic but last one wins
                if not meta.exists():
                    os.replace(tmp, meta)
            finally:
                tmp.unlink(missing_ok=True)
        try:
            stored = json.loads(meta.read_text())
        except (OSError, ValueError) as exc:
            raise HistomilError(f"{meta}: unreadable feature cache configuration ({exc}); delete the folder to re-encode") from None
        if stored != wanted:
            raise HistomilError(f"{meta}: cache was made with a different encoder configuration")

    def _remove_stale_temps(self) -> None:
        """Delete shard temporary files (``.shard-*.h5.*.tmp``) that killed writers left over an hour ago."""
        now = time.time()
        for tmp in self.root.glob(".shard-*.h5.*.tmp"):
            try:
                if now - tmp.stat().st_mtime > STALE_TEMP_S:
                    tmp.unlink()
            except OSError:  # gone already (another reader cleaned it) or not ours to delete: harmless
                continue

    def refresh(self) -> int:
        """Index the shards published since the last look (by this or another process); returns how many."""
        new = sorted(p for p in self.root.glob("shard-*.h5") if p.name not in self._seen)
        for shard_path in new:
            try:
                with h5py.File(shard_path, "r") as f:
                    keys = [k.decode() if isinstance(k, bytes) else str(k) for k in f["keys"][()]]
            except (OSError, KeyError) as exc:
                raise HistomilError(f"{shard_path}: unreadable feature cache shard ({exc}); delete it to re-encode its tiles") from None
            self._seen.add(shard_path.name)
            for row, key in enumerate(keys):
                self._index.setdefault(key, (shard_path.name, row))
        return len(new)

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, key: str) -> bool:
        return key in self._index or (self.refresh() > 0 and key in self._index)

    def _absent(self, keys: Iterable[str]) -> list[str]:
        seen: set[str] = set()
        out = []
        for k in keys:
            if k not in self._index and k not in seen:
                seen.add(k)
                out.append(k)
        return out

    def missing(self, keys: Iterable[str]) -> list[str]:
        """The keys (in first-seen order, without repeats) that still need encoding, after a look for
        shards other processes published."""
        keys = list(keys)
        out = self._absent(keys)
        if out and self.refresh():
            out = self._absent(out)
        return out

    def add(self, keys: list[str], features: np.ndarray) -> None:
        """Store one batch of features as a new shard, published whole under a name no other writer uses."""
        if len(keys) == 0:
            return
        features = np.asarray(features, dtype=np.float32)
        if features.ndim != 2 or features.shape[0] != len(keys):
            raise ValueError(f"features {features.shape} do not match {len(keys)} keys")
        name = f"shard-{time.time_ns():020d}-{os.getpid()}-{uuid.uuid4().hex[:12]}.h5"
        with atomic_write(self.root / name) as tmp, h5py.File(tmp, "w") as f:
            f.create_dataset("keys", data=np.array(keys, dtype=object), dtype=h5py.string_dtype())
            f.create_dataset("features", data=features)
        self._seen.add(name)
        self._shards[name] = features
        for row, key in enumerate(keys):
            self._index.setdefault(key, (name, row))

    def _shard(self, name: str) -> np.ndarray:
        if name not in self._shards:
            path = self.root / name
            try:
                with h5py.File(path, "r") as f:
                    self._shards[name] = np.asarray(f["features"][()], dtype=np.float32)
            except (OSError, KeyError) as exc:
                raise HistomilError(f"{path}: unreadable feature cache shard ({exc}); delete it to re-encode its tiles") from None
        return self._shards[name]

    def get_many(self, keys: list[str]) -> np.ndarray:
        """Features for ``keys`` in that order, shape (len(keys), D); KeyError for a key in no shard."""
        if any(k not in self._index for k in keys):
            self.refresh()
        rows = []
        for key in keys:
            if key not in self._index:
                raise KeyError(key)
            name, row = self._index[key]
            rows.append(self._shard(name)[row])
        return np.stack(rows) if rows else np.zeros((0, int(self.encoder_info.get("dim", 0))), np.float32)


def _config_name(info: dict) -> str:
    """A folder name that changes whenever anything that changes the features changes."""
    digest = hashlib.blake2b(json.dumps(info, sort_keys=True).encode(), digest_size=6).hexdigest()
    return f"{info.get('name', 'encoder')}-{digest}"
