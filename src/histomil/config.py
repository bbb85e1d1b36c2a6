"""Reading validated configs: YAML/JSON files, ``--set KEY=VALUE`` overrides, one-line errors.

Every config in histomil is a pydantic model that rejects unknown keys; these helpers turn files and
command-line overrides into such a model and pydantic's errors into one line naming the file and key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from histomil.errors import HistomilError

M = TypeVar("M", bound=BaseModel)


def read_mapping(path: str | Path) -> dict[str, Any]:
    """A YAML or JSON file holding a mapping of settings."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise HistomilError(f"{path}: cannot read config ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise HistomilError(f"{path}: a config must be a mapping of settings, got {type(data).__name__}")
    return data


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["train.epochs=5", "seeds=[0,1]"]`` -> ``{"train.epochs": 5, "seeds": [0, 1]}`` (values read as YAML)."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise HistomilError(f"--set {item!r}: expected KEY=VALUE, e.g. --set train.epochs=5")
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise HistomilError(f"--set {item!r}: the value is not valid YAML") from None
    return out


def apply_overrides(raw: dict[str, Any], overrides: Mapping[str, Any] | None) -> dict[str, Any]:
    """Set dotted keys (``study.train_bags``) in a nested mapping, in place; returns it."""
    for dotted, value in (overrides or {}).items():
        node = raw
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise HistomilError(f"--set {dotted}: {key!r} is not a group of settings")
        node[leaf] = value
    return raw


def validation_message(exc: ValidationError) -> str:
    """pydantic's first error as one line: 'key.sub: what is wrong'."""
    err = exc.errors()[0]
    where = ".".join(str(x) for x in err["loc"])
    more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    message = err["msg"].replace("Value error, ", "")
    return f"{where}: {message}{more}" if where else f"{message}{more}"


def validate(model: type[M], raw: Mapping[str, Any], source: str) -> M:
    """``model.model_validate(raw)`` with errors as one line naming ``source``."""
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise HistomilError(f"{source}: {validation_message(exc)}") from None


def load_config(model: type[M], path: str | Path, overrides: Mapping[str, Any] | None = None, path_keys: tuple[str, ...] = ("tiles",)) -> M:
    """Read, override and validate a config file; ``path_keys`` relative paths are taken from the file's folder."""
    path = Path(path)
    cfg = validate(model, apply_overrides(read_mapping(path), overrides), str(path))
    for key in path_keys:
        value = getattr(cfg, key, None)
        if isinstance(value, Path) and not value.is_absolute():
            setattr(cfg, key, (path.parent / value).resolve())
    return cfg


def changed_keys(old: Any, new: Any, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """The dotted keys (as tuples) whose values differ between two nested dicts, in sorted order;
    how a resumed run tells which of its recorded settings changed."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new)):
            out += changed_keys(old.get(k), new.get(k), prefix + (k,))
        return out
    return [] if old == new else [prefix]
