"""Published pathology foundation-model tile encoders, as data: one home for encoder identity.

Each :class:`Preset` records what a model card and its reference code say about one encoder: the
timm architecture and keyword arguments that rebuild it, the preprocessing (input size, resize of
the shorter side, centre crop, interpolation, mean/std), the embedding it returns (the class token;
class token + mean patch token for Virchow/Virchow2), its dimension, licence, Hugging Face
repository and whether that repository is gated. Sources: the model cards on Hugging Face (repo ids
below) and TRIDENT's encoder factory (``mahmoodlab/TRIDENT``, ``trident/patch_encoder_models/load.py``),
whose names the presets use as canonical names.

:data:`ENCODER_ALIASES` maps every canonical encoder name to the names CLAM, TRIDENT, STAMP and
histomil give it; :mod:`histomil.features.validate` compares feature files and models by it. This
module imports no model code (timm is imported only when an encoder is built, in
:mod:`histomil.features.encoders`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HOPTIMUS_MEAN = (0.707223, 0.578729, 0.703617)  # bioptimus/H-optimus-0 and -1 model cards
HOPTIMUS_STD = (0.211883, 0.230117, 0.177517)

#: the embeddings a preset can return (see :class:`Preset.embedding`)
EMBEDDINGS = ("cls", "cls+mean_patch", "timm_head", "attn_pool")
#: what builds a preset's network: timm (architecture + kwargs) or transformers (the model folder's config.json)
BUILDERS = ("timm", "transformers", "conch")
#: layer names a preset's timm kwargs may use for ``mlp_layer`` / ``act_layer`` (resolved at build time)
LAYER_NAMES = ("swiglu_packed", "silu")


@dataclass(frozen=True)
class Preset:
    """One published tile encoder: how to rebuild it, what it expects and what it returns.

    ``embedding``: ``cls`` is the class token after the final norm; ``cls+mean_patch`` concatenates it
    with the mean of the patch tokens (register tokens excluded), so ``dim`` is twice the width;
    ``timm_head`` is timm's own pooling (``forward_head(pre_logits=True)``, for ``timm:<name>``);
    ``attn_pool`` an attentional pooler's output (CONCH v1.5, :mod:`histomil.features.conch`).
    ``resize``: the shorter tile side is resized to this (``interpolation``), then the centre
    ``input_size`` square is cropped. ``prefix_tokens``: class + register tokens of the ViT.
    ``builder``: ``timm`` (``arch`` + ``timm_kwargs``, timm-format weights), ``transformers`` (a Hugging
    Face transformers model folder: ``config.json`` beside the weights) or ``conch`` (CONCH v1.5's tower:
    a timm trunk from ``arch`` + ``timm_kwargs`` under an attentional pooler).
    """

    name: str
    title: str
    hf_repo: str
    arch: str | None
    timm_kwargs: Mapping[str, Any]
    input_size: int
    resize: int
    interpolation: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    embedding: str
    dim: int
    prefix_tokens: int
    licence: str
    gated: bool
    weights_files: tuple[str, ...] = ("model.safetensors", "pytorch_model.bin")
    aliases: tuple[str, ...] = ()
    builder: str = "timm"
    notes: str = ""
    extra: Mapping[str, Any] = field(default_factory=dict)


_NON_COMMERCIAL = "CC-BY-NC-ND-4.0"

PRESETS: dict[str, Preset] = {}


def register_preset(preset: Preset) -> Preset:
    """Add a preset to :data:`PRESETS` (its name must be new); returns it."""
    if preset.name in PRESETS:
        raise ValueError(f"preset {preset.name!r} is already registered")
    if preset.embedding not in EMBEDDINGS:
        raise ValueError(f"preset {preset.name!r}: unknown embedding {preset.embedding!r}")
    if preset.builder not in BUILDERS:
        raise ValueError(f"preset {preset.name!r}: unknown builder {preset.builder!r}")
    PRESETS[preset.name] = preset
    return preset


register_preset(Preset(
    name="uni_v1", title="UNI", hf_repo="MahmoodLab/UNI", arch="vit_large_patch16_224",
    timm_kwargs={"img_size": 224, "patch_size": 16, "init_values": 1e-5, "num_classes": 0, "dynamic_img_size": True},
    input_size=224, resize=224, interpolation="bilinear", mean=IMAGENET_MEAN, std=IMAGENET_STD,
    embedding="cls", dim=1024, prefix_tokens=1, licence=_NON_COMMERCIAL, gated=True,
    aliases=("uni", "uni_v1", "uni1", "mahmood_uni", "uni_v1_0"),
))
register_preset(Preset(
    name="uni_v2", title="UNI2-h", hf_repo="MahmoodLab/UNI2-h", arch="vit_giant_patch14_224",
    timm_kwargs={"img_size": 224, "patch_size": 14, "depth": 24, "num_heads": 24, "init_values": 1e-5,
                 "embed_dim": 1536, "mlp_ratio": 2.66667 * 2, "num_classes": 0, "no_embed_class": True,
                 "mlp_layer": "swiglu_packed", "act_layer": "silu", "reg_tokens": 8, "dynamic_img_size": True},
    input_size=224, resize=224, interpolation="bilinear", mean=IMAGENET_MEAN, std=IMAGENET_STD,
    embedding="cls", dim=1536, prefix_tokens=9, licence=_NON_COMMERCIAL, gated=True,
    aliases=("uni2", "uni_v2", "uni_2", "uni2_h", "mahmood_uni2"),
))
register_preset(Preset(
    name="conch_v15", title="CONCH v1.5 (image tower)", hf_repo="MahmoodLab/conchv1_5", arch="vit_large_patch16_224",
    timm_kwargs={"img_size": 448, "patch_size": 16, "init_values": 1.0, "num_classes": 0},
    input_size=448, resize=448, interpolation="bilinear", mean=IMAGENET_MEAN, std=IMAGENET_STD,
    embedding="attn_pool", dim=768, prefix_tokens=1, licence=_NON_COMMERCIAL, gated=True,
    weights_files=("pytorch_model_vision.bin",),
    aliases=("conch_v15", "conch_v1_5", "conch1_5", "conchv1_5", "mahmood_conch1_5"),
    builder="conch",
    notes="timm ViT-L/16 trunk + CoCa attentional pooler (histomil.features.conch), the checkpoint's layout as "
          "TRIDENT reads it; not yet run on the released (gated) weights",
))
register_preset(Preset(
    name="virchow", title="Virchow", hf_repo="paige-ai/Virchow", arch="vit_huge_patch14_224",
    timm_kwargs={"img_size": 224, "init_values": 1e-5, "num_classes": 0, "mlp_ratio": 5.3375, "global_pool": "",
                 "dynamic_img_size": True, "mlp_layer": "swiglu_packed", "act_layer": "silu"},
    input_size=224, resize=224, interpolation="bicubic", mean=IMAGENET_MEAN, std=IMAGENET_STD,
    embedding="cls+mean_patch", dim=2560, prefix_tokens=1, licence="Apache-2.0", gated=True,
    aliases=("virchow", "virchow1", "virchow_v1", "paige_virchow", "virchow_full"),
))
register_preset(Preset(
    name="virchow2", title="Virchow2", hf_repo="paige-ai/Virchow2", arch="vit_huge_patch14_224",
    timm_kwargs={"img_size": 224, "init_values": 1e-5, "num_classes": 0, "reg_tokens": 4, "mlp_ratio": 5.3375,
                 "global_pool": "", "dynamic_img_size": True, "mlp_layer": "swiglu_packed", "act_layer": "silu"},
    input_size=224, resize=224, interpolation="bicubic", mean=IMAGENET_MEAN, std=IMAGENET_STD,
    embedding="cls+mean_patch", dim=2560, prefix_tokens=5, licence=_NON_COMMERCIAL, gated=True,
    aliases=("virchow2", "virchow_v2", "paige_virchow2"),
))
register_preset(Preset(
    name="phikon_v2", title="Phikon-v2", hf_repo="owkin/phikon-v2", arch=None, timm_kwargs={},
    input_size=224, resize=224, interpolation="bilinear", mean=IMAGENET_MEAN, std=IMAGENET_STD,
    embedding="cls", dim=1024, prefix_tokens=1, licence="Owkin non-commercial", gated=False,
    weights_files=("model.safetensors",),
    aliases=("phikon_v2", "phikon2", "owkin_phikon_v2"),
    builder="transformers",
    notes="transformers Dinov2Model ViT-L/16, last_hidden_state[:, 0]",
))
register_preset(Preset(
    name="gigapath", title="Prov-GigaPath (tile encoder)", hf_repo="prov-gigapath/prov-gigapath",
    arch="vit_giant_patch14_dinov2",
    timm_kwargs={"img_size": 224, "in_chans": 3, "patch_size": 16, "embed_dim": 1536, "depth": 40, "num_heads": 24,
                 "init_values": 1e-5, "mlp_ratio": 5.33334, "num_classes": 0, "dynamic_img_size": True},
    input_size=224, resize=256, interpolation="bicubic", mean=IMAGENET_MEAN, std=IMAGENET_STD,
    embedding="cls", dim=1536, prefix_tokens=1, licence="Apache-2.0 (access form: research use)", gated=True,
    aliases=("gigapath", "prov_gigapath", "provgigapath"),
))
register_preset(Preset(
    name="h_optimus_0", title="H-optimus-0", hf_repo="bioptimus/H-optimus-0", arch="vit_giant_patch14_reg4_dinov2",
    timm_kwargs={"num_classes": 0, "img_size": 224, "global_pool": "token", "init_values": 1e-5, "dynamic_img_size": True},
    input_size=224, resize=224, interpolation="bilinear", mean=HOPTIMUS_MEAN, std=HOPTIMUS_STD,
    embedding="cls", dim=1536, prefix_tokens=5, licence="Apache-2.0", gated=True,
    aliases=("h_optimus_0", "hoptimus0", "h_optimus0", "bioptimus_h_optimus_0"),
))
register_preset(Preset(
    name="h_optimus_1", title="H-optimus-1", hf_repo="bioptimus/H-optimus-1", arch="vit_giant_patch14_reg4_dinov2",
    timm_kwargs={"num_classes": 0, "img_size": 224, "global_pool": "token", "init_values": 1e-5, "dynamic_img_size": True},
    input_size=224, resize=224, interpolation="bilinear", mean=HOPTIMUS_MEAN, std=HOPTIMUS_STD,
    embedding="cls", dim=1536, prefix_tokens=5, licence=_NON_COMMERCIAL, gated=True,
    aliases=("h_optimus_1", "hoptimus1", "h_optimus1"),
))

#: encoders histomil does not build but whose features it reads (CLAM, TRIDENT, STAMP names)
OTHER_ENCODER_ALIASES: dict[str, tuple[str, ...]] = {
    "conch_v1": ("conch", "conch_v1", "conch1", "mahmood_conch"),
    "ctranspath": ("ctranspath", "xiyuewang_ctranspath", "ctp"),
    "chief_ctranspath": ("chief_ctranspath", "chief"),
    "phikon": ("phikon", "phikon_v1", "owkin_phikon"),
    "musk": ("musk",),
    "hibou_l": ("hibou_l",),
    "hibou_b": ("hibou_b",),
    "kaiko_vitb8": ("kaiko_vitb8", "kaiko_vit_b8"),
    "lunit_vits8": ("lunit_vits8", "lunit_dino_vits8"),
    "resnet50_trunc": ("resnet50_trunc", "resnet50", "resnet50_imagenet", "resnet50_trunc_imagenet"),
    "efficientnet_lite0": ("efficientnet_lite0", "efficientnet_lite_0"),
}


def encoder_aliases() -> dict[str, tuple[str, ...]]:
    """Canonical encoder name -> every name the tools give it (presets first, then the others)."""
    table = {p.name: tuple(dict.fromkeys((p.name, *p.aliases))) for p in PRESETS.values()}
    for name, aliases in OTHER_ENCODER_ALIASES.items():
        table.setdefault(name, aliases)
    return table


#: canonical encoder name -> the names CLAM, TRIDENT, STAMP and histomil give it (lower case, '_' for '-')
ENCODER_ALIASES: dict[str, tuple[str, ...]] = encoder_aliases()


def preset_table_markdown() -> str:
    """The presets as a markdown table (name, HF repo, architecture, dim, input, embedding, licence, gated,
    the other tools' names) for the README."""
    rows = ["| name | Hugging Face repo | architecture (timm) | dim | input | embedding | licence | gated | also read as |",
            "| --- | --- | --- | ---: | --- | --- | --- | --- | --- |"]
    for p in PRESETS.values():
        arch = f"`{p.arch}`" if p.arch else f"not timm ({p.notes})"
        crop = f"resize {p.resize} {p.interpolation}, crop {p.input_size}" if p.resize != p.input_size \
            else f"resize {p.input_size} {p.interpolation}"
        rows.append(f"| `{p.name}` ({p.title}) | {p.hf_repo} | {arch} | {p.dim} | {crop} | {p.embedding} | "
                    f"{p.licence} | {'yes' if p.gated else 'no'} | {', '.join(a for a in p.aliases if a != p.name)} |")
    return "\n".join(rows)
