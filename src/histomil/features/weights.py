"""Where an encoder's weights come from, what they are, and loading them into a timm model.

Weights come from a local file (``--weights PATH``: ``.safetensors``, ``.pth``, ``.pt`` or ``.bin``)
or from the local Hugging Face cache (``hf download <repo>``, or any earlier timm/huggingface_hub
download). Nothing is ever downloaded here: a gated or absent repository is one
:class:`~histomil.errors.HistomilError` line saying what to do.

The weights' identity, which goes into the encoder's :class:`~histomil.features.encoders.EncoderInfo`
(``weights``) so that features from different weights are never mixed, is :func:`state_digest`: a
SHA-256 of the tensors the model holds once loaded, so the same weights have one identity whether
they came as safetensors or a pickle, from a file or the cache (``random`` for an untrained network).
A :class:`WeightsSource` says where they came from (``histomil encoders`` lists it).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from histomil.errors import HistomilError

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
FOUNDATION_EXTRA = "pip install 'histomil[foundation]'"
RANDOM_WEIGHTS = "random"


@dataclass(frozen=True)
class WeightsSource:
    """A weights file and where it came from (``file:<path>`` or ``hf:<repo>@<commit>/<file>``)."""

    path: Path
    identity: str


def state_digest(model: nn.Module) -> str:
    """``sha256:<hex>`` of a model's state dict (names, dtypes, shapes and bytes, in name order)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return f"sha256:{digest.hexdigest()}"


def local_weights(path: str | Path) -> WeightsSource:
    """A weights file given by the user (one error line if it is missing or of an unknown kind)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise HistomilError(f"{p}: weights file not found")
    if not p.name.endswith(WEIGHT_SUFFIXES):
        raise HistomilError(f"{p}: weights must be a {', '.join(WEIGHT_SUFFIXES)} file")
    return WeightsSource(p, f"file:{p.resolve()}")


def cached_weights(repo: str | None, files: tuple[str, ...]) -> WeightsSource | None:
    """The first of ``files`` in the local Hugging Face cache snapshot of ``repo`` (never downloads).

    The identity names the snapshot's commit, which the cache layout records (``snapshots/<commit>/``).
    Repository ids are tried as written and in lower case (timm's ``hf-hub:MahmoodLab/uni`` caches
    under the lower-case name).
    """
    if not repo:
        return None
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    for repo_id in dict.fromkeys((repo, repo.lower())):
        for filename in files:
            found = try_to_load_from_cache(repo_id, filename)
            if isinstance(found, str) and Path(found).is_file():
                path = Path(found)
                commit = path.parents[len(Path(filename).parts) - 1].name
                return WeightsSource(path, f"hf:{repo_id}@{commit}/{filename}")
    return None


def missing_weights_message(name: str, repo: str | None, gated: bool) -> str:
    """One line: which repository is missing, how to get it (licence, login, download) or --weights."""
    if not repo:
        return (f"encoder {name!r}: no weights found locally and the architecture names no Hugging Face repository; "
                f"pass --weights PATH ({', '.join(WEIGHT_SUFFIXES)})")
    access = (f"it is gated: accept its licence on its Hugging Face page, run `hf auth login` and `hf download {repo}` "
              "on a machine with access" if gated else f"run `hf download {repo}` on a machine with internet access")
    return (f"encoder {name!r}: the weights of Hugging Face repository {repo} are not in the local cache; {access} "
            f"(then copy the cache here), or pass --weights PATH ({', '.join(WEIGHT_SUFFIXES)})")


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from a weights file (safetensors, or a torch pickle read with ``weights_only``).

    Uses timm's reader, which also unwraps ``state_dict``/``model`` wrappers and ``module.`` prefixes.
    """
    from timm.models import load_state_dict

    try:
        state = load_state_dict(str(path), use_ema=False, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any reader failure is a bad file, said in one line
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise HistomilError(f"{path}: cannot read weights ({detail[:200]})") from None
    if not isinstance(state, Mapping) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise HistomilError(f"{path}: not a state dict of tensors")
    return dict(state)


def load_weights(model: nn.Module, source: WeightsSource, arch: str, classifier: Any = None) -> None:
    """Load ``source`` into ``model`` (timm architecture ``arch``): every parameter must be filled. A model
    with an ``adapt_state_dict`` method gets the file's tensors through it first.

    Keys of the classifier head (timm's ``pretrained_cfg['classifier']``) may be left over, since the
    encoder is built without one; any other missing, unexpected or mis-shaped tensor is an error.
    """
    state = read_state_dict(source.path)
    adapt = getattr(model, "adapt_state_dict", None)
    if adapt is not None:
        try:
            state = adapt(state)
        except ValueError as exc:
            raise HistomilError(f"{source.path}: weights do not fit {arch} ({exc})") from None
    heads = tuple(f"{c}." for c in ([classifier] if isinstance(classifier, str) else list(classifier or ())))
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        lines = [ln.strip() for ln in str(exc).splitlines() if "size mismatch" in ln]
        detail = lines[0] if lines else str(exc).strip().splitlines()[0]
        raise HistomilError(f"{source.path}: weights do not fit timm architecture {arch} ({detail[:300]})") from None
    unexpected = [k for k in unexpected if not (heads and k.startswith(heads))]
    if missing or unexpected:
        parts = [f"{len(missing)} missing (first: {missing[0]})" if missing else "",
                 f"{len(unexpected)} unexpected (first: {unexpected[0]})" if unexpected else ""]
        raise HistomilError(f"{source.path}: weights do not fit timm architecture {arch}: "
                            + ", ".join(p for p in parts if p))
