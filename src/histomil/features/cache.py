"""A tile feature cache keyed by tile content.

Composed studies reuse the same tiles in many bags (2,000 training bags of 40 drawn from a few
hundred tiles), so each distinct tile is encoded once and looked up by the hash of its bytes. The
cache is a folder of shards ``shard-NNNNN.h5`` (datasets ``keys`` and ``features``), one folder per
encoder configuration. Each shard is written atomically, so an interrupted extraction keeps every
shard it finished and resumes from there.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import h5py
import numpy as np

from histomil.errors import HistomilError
from histomil.features.store import atomic_write


class FeatureCache:
    """Content-hash -> feature vector, stored as append-only HDF5 shards."""

    def __init__(self, root: str | Path, encoder_info: dict) -> None:
        self.encoder_info = dict(encoder_info)
        self.root = Path(root) / _config_name(self.encoder_info)
        self.root.mkdir(parents=True, exist_ok=True)
        self._check_config()
        self._index: dict[str, tuple[int, int]] = {}  # key -> (shard number, row)
        self._shards: dict[int, np.ndarray] = {}
        self._n_shards = 0
        for shard_path in sorted(self.root.glob("shard-*.h5")):
            number = int(shard_path.stem.split("-")[1])
            try:
                with h5py.File(shard_path, "r") as f:
                    keys = [k.decode() if isinstance(k, bytes) else str(k) for k in f["keys"][()]]
            except (OSError, KeyError) as exc:
                raise HistomilError(f"{shard_path}: unreadable feature cache shard ({exc}); delete it to re-encode its tiles") from None
            for row, key in enumerate(keys):
                self._index.setdefault(key, (number, row))
            self._n_shards = max(self._n_shards, number + 1)

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
        meta = self.root / "encoder.json"
        if meta.exists():
            stored = json.loads(meta.read_text())
            if stored != json.loads(json.dumps(self.encoder_info)):
                raise HistomilError(f"{meta}: cache was made with a different encoder configuration")
        else:
            with atomic_write(meta) as tmp:
                tmp.write_text(json.dumps(self.encoder_info, indent=2, sort_keys=True))

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, key: str) -> bool:
        return key in self._index

    def missing(self, keys: Iterable[str]) -> list[str]:
        """The keys (in first-seen order, without repeats) that still need encoding."""
        seen: set[str] = set()
        out = []
        for k in keys:
            if k not in self._index and k not in seen:
                seen.add(k)
                out.append(k)
        return out

    def add(self, keys: list[str], features: np.ndarray) -> None:
        """Store one batch of features as a new shard (written atomically)."""
        if len(keys) == 0:
            return
        features = np.asarray(features, dtype=np.float32)
        number = self._n_shards
        path = self.root / f"shard-{number:05d}.h5"
        with atomic_write(path) as tmp, h5py.File(tmp, "w") as f:
            f.create_dataset("keys", data=np.array(keys, dtype=object), dtype=h5py.string_dtype())
            f.create_dataset("features", data=features)
        self._n_shards += 1
        self._shards[number] = features
        for row, key in enumerate(keys):
            self._index.setdefault(key, (number, row))

    def _shard(self, number: int) -> np.ndarray:
        if number not in self._shards:
            with h5py.File(self.root / f"shard-{number:05d}.h5", "r") as f:
                self._shards[number] = np.asarray(f["features"][()], dtype=np.float32)
        return self._shards[number]

    def get_many(self, keys: list[str]) -> np.ndarray:
        """Features for ``keys`` in that order, shape (len(keys), D)."""
        rows = []
        for key in keys:
            if key not in self._index:
                raise KeyError(key)
            number, row = self._index[key]
            rows.append(self._shard(number)[row])
        return np.stack(rows) if rows else np.zeros((0, int(self.encoder_info.get("dim", 0))), np.float32)


def _config_name(info: dict) -> str:
    """A folder name that changes whenever anything that changes the features changes."""
    import hashlib

    digest = hashlib.blake2b(json.dumps(info, sort_keys=True).encode(), digest_size=6).hexdigest()
    return f"{info.get('name', 'encoder')}-{digest}"
