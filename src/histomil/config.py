"""Reading validated configs: YAML/JSON files, ``--set KEY=VALUE`` overrides, one-line errors.

Every config in histomil is a pydantic model that rejects unknown keys; these helpers turn files and
command-line overrides into such a model and pydantic's errors into one line naming the file and key.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Collection, Iterable, Mapping, TypeVar

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


def validation_message(exc: ValidationError, as_options: bool = False) -> str:
    """pydantic's first error as one line: 'key.sub: what is wrong (got VALUE)'; with ``as_options`` the
    key is named as the command-line option that set it ('--batch-size: ...')."""
    err = exc.errors()[0]
    where = ".".join(str(x) for x in err["loc"])
    if as_options and where:
        where = "--" + where.replace("_", "-")
    more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    message = err["msg"].replace("Value error, ", "")
    value = err.get("input")
    if err["type"] != "value_error" and (value is None or isinstance(value, (str, int, float, bool))):
        message += f" (got {value!r})"  # pydantic's own messages say what is allowed, not what was given
    return f"{where}: {message}{more}" if where else f"{message}{more}"


def one_of(value: str, allowed: Iterable[str], what: str) -> str:
    """``value`` when it is one of ``allowed``; else a ValueError naming it and the allowed names
    (for pydantic validators, so an unknown model or encoder fails when the config is read)."""
    names = sorted(allowed)
    if value not in names:
        raise ValueError(f"unknown {what} {value!r}; allowed: {', '.join(names)}")
    return value


def validate(model: type[M], raw: Mapping[str, Any], source: str) -> M:
    """``model.model_validate(raw)`` with errors as one line naming ``source``."""
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise HistomilError(f"{source}: {validation_message(exc)}") from None


def validate_options(model: type[M], options: Mapping[str, Any]) -> M:
    """``model.model_validate(options)`` for command-line options, errors naming the option: the same
    checks as the config files, before any work."""
    try:
        return model.model_validate(options)
    except ValidationError as exc:
        raise HistomilError(validation_message(exc, as_options=True)) from None


def check_range(option: str, value: float | None, low: float | None = None, high: float | None = None) -> None:
    """Refuse a numeric command-line option outside [low, high] (or not finite) in one line:
    '--threshold must lie in [0, 1], got 1.5'. ``None`` (option not given) passes."""
    if value is None:
        return
    if math.isfinite(value) and (low is None or value >= low) and (high is None or value <= high):
        return
    if low is not None and high is not None:
        allowed = f"lie in [{low:g}, {high:g}]"
    else:
        allowed = f"be at least {low:g}" if low is not None else f"be at most {high:g}"
    raise HistomilError(f"{option} must {allowed}, got {value:g}")


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


def changed_settings(model: type[BaseModel], old: Mapping[str, Any], new: Mapping[str, Any]) -> list[tuple[str, ...]]:
    """:func:`changed_keys` between a recorded config (``old``, e.g. a run folder's config.json) and
    ``new``, both as JSON-like dicts of ``model``; a key the record lacks (added to ``model`` since the
    folder was made) counts as its default, so newer versions can still resume older folders."""
    required = {name: new[name] for name, field in model.model_fields.items() if field.is_required() and name in new}
    defaults = json.loads(model.model_construct(**required).model_dump_json())

    def filled(base: Any, record: Any) -> Any:
        if isinstance(base, dict) and isinstance(record, dict):
            return {**base, **{k: filled(base.get(k), v) for k, v in record.items()}}
        return record

    return changed_keys(filled(defaults, dict(old)), dict(new))


def changed_since_record(
    path: Path, model: type[BaseModel], new: Mapping[str, Any], resumable: Collection[tuple[str, ...]], unreadable: str
) -> list[tuple[str, ...]]:
    """The settings of ``new`` that differ from the config recorded at ``path`` (e.g. a run folder's
    config.json; none when there is no record yet), leaving out keys at or below a ``resumable`` prefix.

    How ``run`` and ``crossval`` refuse to resume a folder made with other settings. A record that cannot
    be read is refused with ``unreadable``, formatted with ``path`` and ``exc``."""
    if not path.exists():
        return []
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(old, dict):
            raise ValueError("not a mapping")
    except (OSError, ValueError) as exc:
        raise HistomilError(unreadable.format(path=path, exc=exc)) from None
    return [k for k in changed_settings(model, old, new) if not any(k[:i] in resumable for i in range(1, len(k) + 1))]
