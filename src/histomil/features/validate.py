"""One validation of feature bags against the model that reads them, used by every command.

A model trained on one encoder's features gives meaningless outputs on another's, even when the
dimensions agree (TRIDENT's ``conch_v1`` and ``uni_v1`` runs here are both 1024-d), and a single NaN
row turns a probability into NaN. So before any prediction, evaluation or training, every bag is
checked for:

* finite values (NaN/inf: one line naming the file and how many tiles);
* the model's input dimension;
* the model's encoder, compared by canonical name (:func:`canonical_encoder` maps TRIDENT's
  ``uni_v1``, STAMP's ``uni`` / ``mahmood-uni-<hash>``, CLAM's ``resnet50_trunc``, ... onto one
  name). Another encoder is refused unless ``allow_encoder_mismatch``; a file that records no encoder
  (CLAM) is accepted with one warning that names the assumption;
* the encoder's weights, where both the file and the model record them (``weights``: a file's
  SHA-256 or a Hugging Face snapshot, :mod:`histomil.features.weights`): other weights are refused
  unless ``allow_encoder_mismatch``;
* precision, where the file records it: an unknown value is refused, a different one than the
  model's features had is reported with a warning (bf16 and fp32 features of one encoder agree
  closely; see the README), never silently.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from histomil.errors import HistomilError
from histomil.features.presets import ENCODER_ALIASES
from histomil.features.store import FeatureBag

#: canonical encoder name -> the names CLAM, TRIDENT, STAMP and histomil give it (compared after
#: :func:`_normalise`); one table for the whole package, kept with the encoder presets.
_CANONICAL: dict[str, str] = {alias: name for name, aliases in ENCODER_ALIASES.items() for alias in aliases}
#: STAMP v1 appends an 8-hex code hash to the extractor name (``mahmood-uni-56ef09b4``).
_HASH_SUFFIX = re.compile(r"_[0-9a-f]{8}$")
#: a tag that names another version (``conch_v2``, ``uni_2``) is never read as a variant of a known name.
_VERSION_TAG = re.compile(r"(v?\d|h(_|$))")
#: precisions a feature file may record (histomil writes fp32/bf16; fp16 is TRIDENT's half precision).
KNOWN_PRECISIONS = ("fp32", "bf16", "fp16")


def _normalise(name: str) -> str:
    return re.sub(r"[\s\-]+", "_", name.strip().lower())


def canonical_encoder(name: object) -> str | None:
    """One name per encoder whichever tool wrote it (None for no name).

    Exact aliases first (:data:`ENCODER_ALIASES`), then STAMP's forms: a trailing code hash is dropped
    and ``<alias>-<tag>`` (an extractor registered under a variant tag, e.g. ``uni-random``) maps to
    the alias's encoder. Unknown names are returned normalised, so equal names still compare equal.
    """
    if name is None:
        return None
    text = _normalise(str(name))
    if not text or text in ("unknown", "none", "nan"):
        return None
    if text in _CANONICAL:
        return _CANONICAL[text]
    text = _HASH_SUFFIX.sub("", text)
    if text in _CANONICAL:
        return _CANONICAL[text]
    for cut in range(1, text.count("_") + 1):  # the longest known head before a '_<tag>'
        head, tail = text.rsplit("_", cut)[0], text.split("_", text.count("_") - cut + 1)[-1]
        if head in _CANONICAL and not _VERSION_TAG.match(tail):
            return _CANONICAL[head]
    return text


def check_finite(features: np.ndarray, path: str | Path, key: str = "features") -> None:
    """Refuse NaN or infinite feature values with one line naming the file and how many tiles."""
    finite = np.isfinite(features)
    if not finite.all():
        bad = int((~finite).any(axis=1).sum()) if finite.ndim == 2 else int((~finite).sum())
        n = features.shape[0] if features.ndim else 1
        raise HistomilError(f"{path}: '{key}' has NaN or infinite values in {bad} of {n} tiles")


@dataclass(frozen=True)
class ModelInputs:
    """What a model expects of its features: dimension, encoder (canonical name) and precision."""

    dim: int | None
    encoder: str | None
    encoder_recorded: str | None = None  # the name as the checkpoint stores it, for messages
    precision: str | None = None
    weights: str | None = None  # identity of the encoder's weights (histomil.features.weights), when recorded


def model_inputs(meta: Mapping[str, Any]) -> ModelInputs:
    """The expectations recorded in a checkpoint's ``meta`` (see :func:`load_checkpoint`)."""
    info = meta.get("encoder_info") or {}
    name = info.get("name") or info.get("encoder")
    dim = meta.get("in_dim", info.get("feature_dim"))
    precision = info.get("precision")
    return ModelInputs(
        dim=int(dim) if dim is not None else None,
        encoder=canonical_encoder(name),
        encoder_recorded=str(name) if name else None,
        precision=str(precision) if precision else None,
        weights=str(info["weights"]) if info.get("weights") else None,
    )


def bag_path(bag: FeatureBag, path: str | Path | None = None) -> str:
    """The file a bag came from (for messages): ``path``, else the reader's ``source_file``, else its id."""
    return str(path if path is not None else bag.attrs.get("source_file", f"bag {bag.bag_id}"))


def bag_encoder(bag: FeatureBag) -> str | None:
    """The bag's encoder as a canonical name (None when its file records none)."""
    return bag.attrs.get("encoder_canonical") or canonical_encoder(bag.attrs.get("encoder"))


def check_feature_bag(
    bag: FeatureBag,
    path: str | Path | None = None,
    *,
    dim: int | None,
    encoder: str | None,
    precision: str | None = None,
    allow_encoder_mismatch: bool = False,
    weights: str | None = None,
) -> None:
    """Check one bag for a model taking ``dim``-d features of ``encoder`` (any tool's name).

    Raises HistomilError (one line naming the file) on NaN/inf, a wrong dimension, another encoder
    (unless ``allow_encoder_mismatch``) or an unknown recorded precision. A bag without an encoder
    name, or with another precision than ``precision``, is accepted; :func:`check_bags_for_model`
    reports those with one warning per command rather than one per file.
    """
    where = bag_path(bag, path)
    feats = np.asarray(bag.features)
    if feats.ndim != 2 or feats.shape[0] == 0:
        raise HistomilError(f"{where}: features have shape {feats.shape}; expected (tiles, feature dim) with at least one tile")
    check_finite(feats, where)
    if dim is not None and feats.shape[1] != int(dim):
        raise HistomilError(f"{where}: features have {feats.shape[1]} dims, the model expects {int(dim)}")
    want, have = canonical_encoder(encoder), bag_encoder(bag)
    if want and have and want != have and not allow_encoder_mismatch:
        raise HistomilError(
            f"{where}: features were made with encoder {bag.attrs.get('encoder', have)!r} ({have}), the model was "
            f"trained on {encoder!r} ({want}); pass --allow-encoder-mismatch if you know they are interchangeable"
        )
    have_weights = bag.attrs.get("weights")
    if weights and have_weights and str(have_weights) != weights and not allow_encoder_mismatch:
        raise HistomilError(
            f"{where}: features were made with {bag.attrs.get('encoder', have)!r} weights {have_weights}, the model was "
            f"trained on weights {weights}; extract them again with the model's weights (--weights)"
        )
    recorded = bag.attrs.get("precision")
    if recorded is not None and str(recorded) not in KNOWN_PRECISIONS:
        raise HistomilError(f"{where}: records precision {recorded!r}; known: {', '.join(KNOWN_PRECISIONS)}")


def check_bags_for_model(
    bags: Sequence[FeatureBag],
    meta: Mapping[str, Any],
    *,
    allow_encoder_mismatch: bool = False,
    source: str | Path | None = None,
) -> None:
    """:func:`check_feature_bag` on every bag for the checkpoint ``meta``; one warning per assumption.

    Warnings (``warnings.warn``; the CLI prints each as one ``warning:`` line): files that record no
    encoder (assumed to come from the model's), a model that records none (encoders not compared),
    precisions other than the model's features had, and encoder mismatches let through by the flag.
    """
    want = model_inputs(meta)
    unnamed, other_precision, mismatched = [], [], []
    for bag in bags:
        check_feature_bag(bag, dim=want.dim, encoder=want.encoder, allow_encoder_mismatch=allow_encoder_mismatch,
                          weights=want.weights)
        have = bag_encoder(bag)
        if have is None:
            unnamed.append(bag)
        elif want.encoder and have != want.encoder:
            mismatched.append(bag)
        recorded = bag.attrs.get("precision")
        if want.precision and recorded and str(recorded) != want.precision:
            other_precision.append(bag)
    where = f"{source}: " if source is not None else ""
    if unnamed and want.encoder:
        warnings.warn(
            f"{where}{_count(unnamed)} record no encoder (first: {bag_path(unnamed[0])}); assuming they were made with "
            f"the model's encoder {want.encoder_recorded!r}",
            stacklevel=2,
        )
    if bags and not want.encoder:
        warnings.warn(f"{where}the model records no encoder, so the features' encoder cannot be checked", stacklevel=2)
    if mismatched:
        warnings.warn(
            f"{where}{_count(mismatched)} come from encoder {mismatched[0].attrs.get('encoder')!r}, not the model's "
            f"{want.encoder_recorded!r}; used anyway (--allow-encoder-mismatch)",
            stacklevel=2,
        )
    if other_precision:
        warnings.warn(
            f"{where}{_count(other_precision)} were computed in {other_precision[0].attrs.get('precision')}, the model's "
            f"training features in {want.precision} (first: {bag_path(other_precision[0])})",
            stacklevel=2,
        )


def _count(bags: Sequence[FeatureBag]) -> str:
    return "1 feature file" if len(bags) == 1 else f"{len(bags)} feature files"


#: feature-file attributes a trained model records as its ``encoder_info`` (``encoder`` becomes ``name``).
ENCODER_INFO_KEYS = ("encoder", "encoder_canonical", "input_size", "mean", "std", "feature_dim", "precision",
                     "source_tool", "stored_dtype", "weights", "resize", "interpolation")


def training_encoder_info(bags: Sequence[FeatureBag]) -> dict[str, Any] | None:
    """The encoder description a model trained on ``bags`` records (None when no file names one).

    Bags from different encoders (compared by canonical name) are refused with one line naming a
    file of each; bags that name none are assumed to share the others' encoder.
    """
    named = [b for b in bags if bag_encoder(b)]
    if not named:
        return None
    first = named[0]
    odd = next((b for b in named if bag_encoder(b) != bag_encoder(first)), None)
    if odd is not None:
        raise HistomilError(
            f"{bag_path(odd)}: features of encoder {odd.attrs.get('encoder')!r}, but {bag_path(first)} has "
            f"{first.attrs.get('encoder')!r}; train on features of one encoder"
        )
    odd = next((b for b in named if b.attrs.get("weights") != first.attrs.get("weights")), None)
    if odd is not None:  # one encoder, other weights (histomil.features.weights): the features mean other things
        raise HistomilError(
            f"{bag_path(odd)}: features from weights {odd.attrs.get('weights')}, but {bag_path(first)} from "
            f"{first.attrs.get('weights')}; train on features of one set of weights"
        )
    info = {k: first.attrs[k] for k in ENCODER_INFO_KEYS if k in first.attrs}
    info["name"] = str(info.pop("encoder"))
    info["encoder_canonical"] = bag_encoder(first)
    return info
