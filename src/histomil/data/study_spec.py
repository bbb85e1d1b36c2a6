"""The settings of a composed MIL study (:class:`StudySpec`), read from YAML/JSON or a mapping.

Bag size, witness counts W (one value or a range drawn per bag) for training, validation and the
test sets, bag counts, split fractions and the seed; unknown keys are refused, so a typo never
silently falls back to a default. :mod:`histomil.data.compose` builds the study they describe.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import pydantic
from pydantic import field_validator, model_validator

from histomil.errors import HistomilError


def parse_witnesses(text: str) -> tuple[int, int]:
    """Parse a witness count ``"20"`` -> (20, 20) or an inclusive range ``"1-20"`` -> (1, 20)."""
    raw = str(text).strip()
    parts = raw.split("-")
    try:
        if len(parts) == 1:
            lo = hi = int(parts[0])
        elif len(parts) == 2:
            lo, hi = int(parts[0]), int(parts[1])
        else:
            raise ValueError
    except ValueError:
        raise HistomilError(f"witnesses {text!r}: expected a whole number like '20' or a range like '1-20'") from None
    if lo < 1:
        raise HistomilError(f"witnesses {text!r}: a positive bag needs at least 1 witness tile")
    if lo > hi:
        raise HistomilError(f"witnesses {text!r}: range start {lo} is above its end {hi}")
    return lo, hi


def _witness_range(value: Any) -> Any:
    """Accept ``20``, ``"20"``, ``"1-20"`` or ``[1, 20]`` for a witness range field."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return (value, value)
    if isinstance(value, str):
        try:
            return parse_witnesses(value)
        except HistomilError as exc:
            raise ValueError(str(exc)) from None
    return value


class StudySpec(pydantic.BaseModel, extra="forbid"):
    """What to compose: bag size, bag counts, witness counts, patient split and seed."""

    bag_size: int = 40
    train_bags: int = 2000
    val_bags: int = 100
    test_bags: int = 1000
    train_witnesses: tuple[int, int] = (20, 20)  # inclusive range, W drawn uniformly per positive bag
    val_witnesses: tuple[int, int] = (20, 20)
    test_witnesses: list[int] = [20, 10, 5, 1]  # one test set per W
    split_fractions: tuple[float, float, float] = (0.6, 0.2, 0.2)  # of patients: train/val/test
    positive_fraction: float = 0.5
    seed: int = 0
    link: Literal["symlink", "hardlink", "copy"] = "symlink"

    @field_validator("train_witnesses", "val_witnesses", mode="before")
    @classmethod
    def _coerce_range(cls, value: Any) -> Any:
        return _witness_range(value)

    @field_validator("test_witnesses", mode="before")
    @classmethod
    def _coerce_list(cls, value: Any) -> Any:
        if isinstance(value, str):  # "20,10,5,1"
            try:
                return [int(v) for v in value.replace(" ", "").split(",") if v]
            except ValueError:
                raise ValueError(f"expected whole numbers separated by commas, got {value!r}") from None
        if isinstance(value, int) and not isinstance(value, bool):
            return [value]
        return value

    @model_validator(mode="after")
    def _check(self) -> StudySpec:
        k = self.bag_size
        if k < 1:
            raise ValueError(f"bag_size must be at least 1, got {k}")
        for name in ("train_bags", "val_bags", "test_bags"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be 0 or more, got {getattr(self, name)}")
        for name in ("train_witnesses", "val_witnesses"):
            lo, hi = getattr(self, name)
            if lo > hi:
                raise ValueError(f"{name}: range start {lo} is above its end {hi}")
            if lo < 1 or hi > k:
                raise ValueError(f"{name}: witnesses must lie in 1..bag_size={k}, got {lo}-{hi}")
        for w in self.test_witnesses:
            if w < 1 or w > k:
                raise ValueError(f"test_witnesses: each W must lie in 1..bag_size={k}, got {w}")
        if len(set(self.test_witnesses)) != len(self.test_witnesses):
            raise ValueError(f"test_witnesses: repeated W in {self.test_witnesses}")
        fr = self.split_fractions
        if any(not math.isfinite(f) or f < 0 or f > 1 for f in fr):
            raise ValueError(f"split_fractions must each lie in 0..1, got {list(fr)}")
        if abs(sum(fr) - 1.0) > 1e-6:
            raise ValueError(f"split_fractions must sum to 1, got {list(fr)} (sum {sum(fr):g})")
        if not (0.0 <= self.positive_fraction <= 1.0):
            raise ValueError(f"positive_fraction must lie in 0..1, got {self.positive_fraction}")
        if self.seed < 0:
            raise ValueError(f"seed must be 0 or more, got {self.seed}")
        return self


def spec_from_mapping(data: Mapping[str, Any], source: str = "study spec") -> StudySpec:
    """Validate a config mapping into a :class:`StudySpec`; bad values -> one-line HistomilError."""
    try:
        return StudySpec.model_validate(dict(data))
    except pydantic.ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err.get("loc", ()))
        msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
        if err.get("type") == "extra_forbidden":
            msg = f"unknown setting (settings: {', '.join(StudySpec.model_fields)})"
        more = f" (and {exc.error_count() - 1} more problem(s))" if exc.error_count() > 1 else ""
        raise HistomilError(f"{source}: {loc + ': ' if loc else ''}{msg}{more}") from None


def load_spec(path: str | Path) -> StudySpec:
    """Read a study spec from a YAML or JSON file (keys = :class:`StudySpec` fields)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise HistomilError(f"{path}: cannot read study spec ({exc.strerror or exc})") from None
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as exc:  # noqa: BLE001 - parser errors vary; report them in one line
        raise HistomilError(
            f"{path}: not valid {'JSON' if path.suffix.lower() == '.json' else 'YAML'}: {exc}"
        ) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise HistomilError(f"{path}: a study spec must be a mapping of settings, got {type(data).__name__}")
    return spec_from_mapping(data, source=str(path))
