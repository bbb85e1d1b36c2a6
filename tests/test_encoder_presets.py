"""Encoder registry: timm encoders from local weights equal the model's own forward, the presets match
their architectures (on the meta device, nothing downloaded), absent/gated weights fail in one line,
weights identity, and ``histomil encoders``.

Tiny random-weight ViTs stand in for the published models; everything runs offline (HF_HUB_OFFLINE=1
is set in conftest, and no test asks the hub for anything).
"""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
import timm  # a dev dependency (pyproject 'dev' and 'foundation' extras): missing, these tests fail, never skip
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from histomil.cli import app
from histomil.errors import HistomilError
from histomil.features.encoders import EncoderInfo, build_encoder, fit_tile, timm_kwargs
from histomil.features.presets import PRESETS, Preset
from histomil.features.store import FeatureBag, read_feature_bag
from histomil.features.validate import canonical_encoder

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = "vit_tiny_patch16_224"
#: |histomil - model's own forward| allowed on fp32 features (same ops, same order: measured 0.0)
ATOL = 1e-5
runner = CliRunner()


def invoke(*args: object):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def tiny_vit() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(TINY, pretrained=False, num_classes=0).eval()


@pytest.fixture(scope="module")
def weight_files(tiny_vit: torch.nn.Module, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny ViT's random weights as .safetensors and as .pth (a torch pickle of the state dict)."""
    root = tmp_path_factory.mktemp("weights")
    state = {k: v.contiguous() for k, v in tiny_vit.state_dict().items()}
    save_file(state, str(root / "tiny.safetensors"))
    torch.save(state, root / "tiny.pth")
    return {"safetensors": root / "tiny.safetensors", "pth": root / "tiny.pth"}


@pytest.fixture(scope="module")
def bag_root(ebhi_table: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two bags of 3 real EBHI tiles each (224 x 224 H&E), labelled."""
    root = tmp_path_factory.mktemp("bags")
    with ebhi_table.open() as fh:
        rows = list(csv.DictReader(fh))
    picks = {"bag_pos": [r for r in rows if r["tumor"] == "1"][:3], "bag_neg": [r for r in rows if r["tumor"] == "0"][:3]}
    for bag, chosen in picks.items():
        (root / bag).mkdir()
        for r in chosen:
            shutil.copy(ebhi_table.parent / r["path"], root / bag / Path(r["path"]).name)
    (root / "labels.csv").write_text("case,y_true\nbag_pos,1\nbag_neg,0\n")
    return root


def own_forward(model: torch.nn.Module, encoder, tiles: list[Path]) -> np.ndarray:
    """The model's own forward on histomil's preprocessing of ``tiles`` (decoded tiles made even by
    ``fit_tile``, here 224 -> 248 in PIL bicubic, then the encoder's crop and normalisation)."""
    from PIL import Image

    arr = np.stack([fit_tile(np.asarray(Image.open(p).convert("RGB")), encoder.info) for p in tiles])
    with torch.no_grad():
        return model(encoder.preprocess(arr)).numpy()


def extracted(out: Path) -> dict[str, tuple[np.ndarray, list[str], dict]]:
    bags = [read_feature_bag(p) for p in sorted(out.glob("*.h5"))]
    return {b.bag_id: (b.features, b.tile_paths, b.attrs) for b in bags}


@pytest.mark.parametrize("kind", ["safetensors", "pth"])
def test_timm_weights_file_extracts_the_models_own_forward(
    kind: str, tiny_vit: torch.nn.Module, weight_files: dict[str, Path], bag_root: Path, tmp_path: Path
) -> None:
    out = tmp_path / "feats"
    r = invoke("features", "extract", bag_root, out, "--encoder", f"timm:{TINY}", "--weights", weight_files[kind],
               "--precision", "fp32", "--runtime", "torch", "--workers", "0")
    assert r.exit_code == 0, r.output
    encoder = build_encoder(f"timm:{TINY}", precision="fp32", weights=weight_files[kind])
    # timm's pretrained config for this architecture: 224 input, crop_pct 0.9 (resize 248 bicubic), mean=std=0.5
    assert (encoder.info.input_size, encoder.info.resize, encoder.info.interpolation) == (224, 248, "bicubic")
    bags = extracted(out)
    assert set(bags) == {"bag_pos", "bag_neg"}
    for feats, paths, attrs in bags.values():
        assert feats.shape == (3, 192)
        ref = own_forward(tiny_vit, encoder, [Path(p) if Path(p).is_absolute() else bag_root / p for p in paths])
        np.testing.assert_allclose(feats, ref, atol=ATOL, rtol=0)
        assert attrs["encoder"] == f"timm:{TINY}"
        assert attrs["weights"].startswith("sha256:")


def test_weights_identity_is_the_tensors_digest_whatever_the_file_format(
    tiny_vit: torch.nn.Module, weight_files: dict[str, Path]
) -> None:
    from histomil.features.weights import state_digest

    a = build_encoder(f"timm:{TINY}", precision="fp32", weights=weight_files["safetensors"])
    b = build_encoder(f"timm:{TINY}", precision="fp32", weights=weight_files["pth"])
    assert a.info.weights == b.info.weights == state_digest(tiny_vit)  # same tensors, one identity
    tiles = np.random.default_rng(0).integers(0, 256, (2, 200, 260, 3), dtype=np.uint8)
    np.testing.assert_array_equal(a.encode(tiles), b.encode(tiles))
    changed = timm.create_model(TINY, pretrained=False, num_classes=0)
    changed.load_state_dict(tiny_vit.state_dict())
    with torch.no_grad():
        changed.blocks[0].attn.qkv.weight[0, 0] += 1e-3  # one value of 5.5 million
    assert state_digest(changed) != a.info.weights


def test_preprocessing_matches_torchvision_resize_crop_normalise(weight_files: dict[str, Path]) -> None:
    """Shorter side to 248 (bicubic, antialiased), centre 224 crop, mean/std: as torchvision's transforms."""
    from torchvision.transforms import v2

    enc = build_encoder(f"timm:{TINY}", precision="fp32", weights=weight_files["safetensors"])
    tiles = np.random.default_rng(1).integers(0, 256, (2, 230, 300, 3), dtype=np.uint8)
    x = torch.from_numpy(tiles).permute(0, 3, 1, 2).float() / 255
    ref = v2.Compose([v2.Resize(248, interpolation=v2.InterpolationMode.BICUBIC, antialias=True), v2.CenterCrop(224),
                      v2.Normalize(mean=[0.5] * 3, std=[0.5] * 3)])(x.clamp(0, 1))
    got = enc.preprocess(tiles)
    assert got.shape == (2, 3, 224, 224)
    # histomil clamps bicubic overshoot to [0, 1] as an 8-bit image would; torchvision on floats does not
    np.testing.assert_allclose(got.numpy(), ref.clamp(-1, 1).numpy(), atol=1e-5)


def test_virchow_style_cls_plus_mean_patch_embedding(
    tiny_vit: torch.nn.Module, tmp_path: Path, bag_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A preset with 4 register tokens and class + mean patch token (Virchow2's layout), through the CLI."""
    kwargs = {"img_size": 224, "reg_tokens": 4, "global_pool": "", "num_classes": 0, "mlp_layer": "swiglu_packed",
              "act_layer": "silu"}
    preset = Preset(name="tiny_virchow", title="tiny", hf_repo="", arch=TINY, timm_kwargs=kwargs, input_size=224,
                    resize=224, interpolation="bicubic", mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                    embedding="cls+mean_patch", dim=384, prefix_tokens=5, licence="test", gated=False)
    monkeypatch.setitem(PRESETS, preset.name, preset)
    torch.manual_seed(1)
    model = timm.create_model(TINY, pretrained=False, **timm_kwargs(preset)).eval()
    assert model.num_prefix_tokens == 5
    torch.save(model.state_dict(), tmp_path / "v.pth")
    out = tmp_path / "feats"
    r = invoke("features", "extract", bag_root, out, "--encoder", "tiny_virchow", "--weights", tmp_path / "v.pth",
               "--precision", "fp32", "--runtime", "torch", "--workers", "0")
    assert r.exit_code == 0, r.output
    enc = build_encoder("tiny_virchow", precision="fp32", weights=tmp_path / "v.pth")
    for feats, paths, attrs in extracted(out).values():
        from PIL import Image

        x = enc.preprocess(np.stack([np.asarray(Image.open(bag_root / p if not Path(p).is_absolute() else p)) for p in paths]))
        with torch.no_grad():
            tokens = model.forward_features(x)  # (B, 1 + 4 + 196, 192): class, registers, patches
        assert tokens.shape[1] == 1 + 4 + (224 // 16) ** 2
        ref = torch.cat([tokens[:, 0], tokens[:, 5:].mean(1)], dim=-1).numpy()
        assert feats.shape == (3, 384)
        np.testing.assert_allclose(feats, ref, atol=ATOL, rtol=0)
        assert attrs["encoder"] == "tiny_virchow"


BUILDABLE = [p for p in PRESETS.values() if p.builder == "timm"]  # CONCH v1.5: tests/test_conch.py


@pytest.mark.parametrize("preset", BUILDABLE, ids=lambda p: p.name)
def test_preset_matches_its_architecture_on_meta(preset: Preset) -> None:
    """Dimension, token layout, patch grid and input size of each preset, without weights or memory."""
    with torch.device("meta"):
        model = timm.create_model(preset.arch, pretrained=False, **timm_kwargs(preset))
    width = model.num_features * (2 if preset.embedding == "cls+mean_patch" else 1)
    assert width == preset.dim
    assert model.num_prefix_tokens == preset.prefix_tokens
    assert tuple(model.patch_embed.img_size) == (preset.input_size, preset.input_size)
    assert model.global_pool in (("token",) if preset.embedding == "cls" else ("",))
    assert preset.resize >= preset.input_size


def test_preset_facts() -> None:
    """The table's published facts that the meta check cannot see (model cards / TRIDENT)."""
    facts = {name: (p.hf_repo, p.dim, p.input_size, p.gated) for name, p in PRESETS.items()}
    assert facts == {
        "uni_v1": ("MahmoodLab/UNI", 1024, 224, True),
        "uni_v2": ("MahmoodLab/UNI2-h", 1536, 224, True),
        "conch_v15": ("MahmoodLab/conchv1_5", 768, 448, True),
        "virchow": ("paige-ai/Virchow", 2560, 224, True),
        "virchow2": ("paige-ai/Virchow2", 2560, 224, True),
        "phikon_v2": ("owkin/phikon-v2", 1024, 224, False),
        "gigapath": ("prov-gigapath/prov-gigapath", 1536, 224, True),
        "h_optimus_0": ("bioptimus/H-optimus-0", 1536, 224, True),
        "h_optimus_1": ("bioptimus/H-optimus-1", 1536, 224, True),
    }
    assert PRESETS["gigapath"].resize == 256 and PRESETS["h_optimus_0"].mean == (0.707223, 0.578729, 0.703617)


@pytest.mark.parametrize(("written", "canonical"), [
    ("uni_v1", "uni_v1"), ("mahmood-uni", "uni_v1"), ("UNI2-h", "uni_v2"), ("conch_v15", "conch_v15"),
    ("conch1_5", "conch_v15"), ("virchow2", "virchow2"), ("phikon_v2", "phikon_v2"), ("gigapath", "gigapath"),
    ("hoptimus0", "h_optimus_0"), ("h_optimus_1", "h_optimus_1"),
])
def test_trident_and_stamp_names_map_to_the_preset_names(written: str, canonical: str) -> None:
    assert canonical_encoder(written) == canonical
    assert canonical in PRESETS


@pytest.mark.parametrize("name", ["uni_v2", "virchow2", "h_optimus_1", "uni"])
def test_absent_gated_weights_one_line(name: str, bag_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "empty_cache"))  # an empty cache, whatever this machine has
    with pytest.raises(HistomilError) as err:
        build_encoder(name, precision="fp32")
    msg = str(err.value)
    repo = PRESETS[canonical_encoder(name)].hf_repo
    assert "\n" not in msg and repo in msg and "gated" in msg and "hf auth login" in msg and "--weights" in msg
    r = invoke("features", "extract", bag_root, tmp_path / "out", "--encoder", name)
    assert r.exit_code == 2 and r.output.count("error:") == 1 and repo in r.output and "Traceback" not in r.output


def test_weights_found_in_the_hf_cache_record_repo_and_commit(
    weight_files: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cached snapshot (as `hf download` leaves it) is used without --weights, with the same weights identity
    as the same tensors from a file; `histomil encoders` names the snapshot's repo and commit."""
    import huggingface_hub.constants as hc

    cache = tmp_path / "hub"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snap = cache / "models--timm--vit_tiny_patch16_224.augreg_in21k_ft_in1k" / "snapshots" / commit
    snap.mkdir(parents=True)
    shutil.copy(weight_files["safetensors"], snap / "model.safetensors")
    (snap.parents[1] / "refs").mkdir()
    (snap.parents[1] / "refs" / "main").write_text(commit)
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(cache))
    enc = build_encoder(f"timm:{TINY}", precision="fp32")
    assert enc.info.weights == build_encoder(f"timm:{TINY}", precision="fp32", weights=weight_files["pth"]).info.weights
    uni = cache / "models--MahmoodLab--UNI" / "snapshots" / commit  # listing only looks for the file
    uni.mkdir(parents=True)
    (uni / "pytorch_model.bin").write_bytes(b"x")
    (uni.parents[1] / "refs").mkdir()
    (uni.parents[1] / "refs" / "main").write_text(commit)
    r = invoke("encoders")
    assert r.exit_code == 0, r.output
    rows = {ln.split()[0]: ln for ln in r.output.splitlines()}
    assert f"found (hf:MahmoodLab/UNI@{commit}/pytorch_model.bin)" in rows["uni_v1"]
    assert "absent (MahmoodLab/UNI2-h)" in rows["uni_v2"]


@pytest.mark.parametrize(("make", "expected"), [
    (lambda d: d / "none.pth", "weights file not found"),
    (lambda d: (d / "w.txt").write_text("x") and d / "w.txt", "weights must be a"),
    (lambda d: (d / "junk.pth").write_bytes(b"not a pickle") and d / "junk.pth", "cannot read weights"),
])
def test_bad_weights_files_one_line(make, expected: str, tmp_path: Path) -> None:
    path = make(tmp_path)
    with pytest.raises(HistomilError, match=expected) as err:
        build_encoder(f"timm:{TINY}", precision="fp32", weights=path)
    assert str(path) in str(err.value)


def test_weights_of_another_architecture_refused(weight_files: dict[str, Path]) -> None:
    with pytest.raises(HistomilError, match=r"tiny.pth: weights do not fit timm architecture vit_small_patch16_224"):
        build_encoder("timm:vit_small_patch16_224", precision="fp32", weights=weight_files["pth"])


def test_unknown_encoders_and_misplaced_weights_refused(weight_files: dict[str, Path]) -> None:
    with pytest.raises(HistomilError, match="unknown timm architecture 'vit_nonsense'"):
        build_encoder("timm:vit_nonsense")
    with pytest.raises(HistomilError, match="efficientnet_lite0.*--weights is for"):
        build_encoder("efficientnet_lite0", weights=weight_files["pth"])


def test_encoder_info_weights_optional_and_kept_out_of_lite0_identity() -> None:
    """Old feature files (no weights/resize keys) still load; Lite0's dict (its cache identity) is unchanged."""
    lite = EncoderInfo("efficientnet_lite0", 224, (0.5,) * 3, (0.5,) * 3, 1280)
    assert set(lite.to_dict()) == {"name", "input_size", "mean", "std", "dim"}
    assert EncoderInfo.from_dict(lite.to_dict()) == lite
    vit = EncoderInfo("uni_v1", 224, (0.4,) * 3, (0.2,) * 3, 1024, resize=256, interpolation="bicubic", weights="sha256:ab")
    assert EncoderInfo.from_dict(vit.to_dict()) == vit
    assert vit.to_dict()["weights"] == "sha256:ab"


def test_encoders_command_lists_presets() -> None:
    r = invoke("encoders")
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert lines[0].split()[:6] == ["name", "dim", "input", "licence", "gated", "weights"]
    rows = {ln.split()[0]: ln for ln in lines[1:]}
    assert {"efficientnet_lite0", *PRESETS, "timm:<architecture>"} <= set(rows)
    assert rows["virchow2"].split()[1:3] == ["2560", "224"] and " yes " in rows["virchow2"]
    assert "shipped" in rows["efficientnet_lite0"]


def test_bag_tiles_of_another_size_get_the_presets_resize_and_crop(
    weight_files: dict[str, Path], ebhi_table: Path, tmp_path: Path
) -> None:
    """300 x 260 tiles through 'features extract' equal the encoder's own preprocessing of the full tile
    (shorter side to 248, centre 224 crop) up to 8-bit resampling: 1.0e-3 of the feature scale measured.
    Squashing them to 224 x 224 first, as decoding did before presets, is off by 0.10 of the scale."""
    from PIL import Image

    src = sorted((ebhi_table.parent / "tiles" / "Adenocarcinoma").glob("*.jpg"))[:4]
    (tmp_path / "bags" / "b").mkdir(parents=True)
    tiles = {}
    for i, p in enumerate(src):
        tiles[f"t{i}"] = np.asarray(Image.open(p).convert("RGB").resize((300, 260)))
        Image.fromarray(tiles[f"t{i}"]).save(tmp_path / "bags" / "b" / f"t{i}.png")
    out = tmp_path / "out"
    r = invoke("features", "extract", tmp_path / "bags", out, "--encoder", f"timm:{TINY}", "--weights",
               weight_files["pth"], "--precision", "fp32", "--runtime", "torch", "--workers", "0")
    assert r.exit_code == 0, r.output
    feats, paths, _ = extracted(out)["b"]
    enc = build_encoder(f"timm:{TINY}", precision="fp32", weights=weight_files["pth"])
    ref = enc.encode(np.stack([tiles[Path(p).stem] for p in paths]))
    assert np.abs(feats - ref).max() < 0.01 * np.abs(ref).max()


def test_slide_features_are_redone_when_the_weights_change(
    weight_files: dict[str, Path], tmp_path: Path
) -> None:
    """'features slides' into a folder holding another weights file's features re-encodes, never keeps them."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from slide_fixtures import make_slide

    (tmp_path / "slides").mkdir()
    slide = make_slide(tmp_path / "slides")
    torch.manual_seed(5)
    other = tmp_path / "other.safetensors"
    save_file({k: v.contiguous() for k, v in timm.create_model(TINY, num_classes=0).state_dict().items()}, str(other))
    out = tmp_path / "feats"
    args = ("features", "slides", slide, "--out", out, "--encoder", f"timm:{TINY}", "--mpp", "1", "--precision", "fp32",
            "--runtime", "torch", "--workers", "0")
    assert invoke(*args, "--weights", weight_files["safetensors"]).exit_code == 0
    first = read_feature_bag(out / f"{slide.stem}.h5")
    r = invoke(*args, "--weights", other)
    assert r.exit_code == 0, r.output
    second = read_feature_bag(out / f"{slide.stem}.h5")
    fresh = tmp_path / "fresh"
    assert invoke(*args[:4], fresh, *args[5:], "--weights", other).exit_code == 0
    assert second.attrs["weights"] != first.attrs["weights"]
    np.testing.assert_array_equal(second.features, read_feature_bag(fresh / f"{slide.stem}.h5").features)
    assert not np.allclose(second.features, first.features)


def test_model_remembers_its_weights_and_predict_refuses_others(
    weight_files: dict[str, Path], bag_root: Path, tmp_path: Path
) -> None:
    """train records the weights identity of its features; predict on images re-extracts with --weights
    and refuses another weights file of the same architecture in one line (features would mean nothing)."""
    feats = tmp_path / "feats"
    common = ("--encoder", f"timm:{TINY}", "--precision", "fp32", "--runtime", "torch", "--workers", "0")
    assert invoke("features", "extract", bag_root, feats, *common, "--weights", weight_files["pth"]).exit_code == 0
    r = invoke("train", feats, "--val", feats, "--out", tmp_path / "run", "--epochs", "2", "--min-epochs", "1")
    assert r.exit_code == 0, r.output
    meta = torch.load(tmp_path / "run" / "model.pt", map_location="cpu", weights_only=False)
    info = meta.get("encoder_info") or meta.get("meta", {}).get("encoder_info")
    assert info["weights"] == read_feature_bag(next(feats.glob("*.h5"))).attrs["weights"]
    ok = invoke("predict", tmp_path / "run" / "model.pt", bag_root, "--out", tmp_path / "p.csv", "--precision", "fp32",
                "--weights", weight_files["pth"])
    assert ok.exit_code == 0, ok.output
    torch.manual_seed(7)
    other = tmp_path / "other.pth"
    torch.save(timm.create_model(TINY, num_classes=0).state_dict(), other)
    bad = invoke("predict", tmp_path / "run" / "model.pt", bag_root, "--out", tmp_path / "q.csv", "--precision", "fp32",
                 "--weights", other)
    assert bad.exit_code == 2 and bad.output.count("error:") == 1 and "weights" in bad.output, bad.output
    assert "Traceback" not in bad.output


def test_slide_prediction_refuses_an_encoder_with_other_weights() -> None:
    from types import SimpleNamespace

    from histomil.slides.predict_slides import check_encoder

    info = EncoderInfo(f"timm:{TINY}", 224, (0.5,) * 3, (0.5,) * 3, 192, resize=248, interpolation="bicubic", weights="sha256:b")
    meta = {"in_dim": 192, "encoder_info": {"name": f"timm:{TINY}", "input_size": 224, "weights": "sha256:a"}}
    with pytest.raises(HistomilError, match="weights sha256:a"):
        check_encoder("model.pt", meta, SimpleNamespace(info=info))
    check_encoder("model.pt", {**meta, "encoder_info": {**meta["encoder_info"], "weights": "sha256:b"}}, SimpleNamespace(info=info))


def test_features_of_other_weights_are_refused_for_training_and_prediction(
    weight_files: dict[str, Path], bag_root: Path, tmp_path: Path
) -> None:
    """One encoder name, two weights files: training on both, or predicting one with a model of the other,
    is one error line each (the canonical names agree, only the weights identity tells them apart)."""
    torch.manual_seed(11)
    other = tmp_path / "other.pth"
    torch.save(timm.create_model(TINY, num_classes=0).state_dict(), other)
    common = ("--encoder", f"timm:{TINY}", "--precision", "fp32", "--runtime", "torch", "--workers", "0")
    for name, w in (("a", weight_files["pth"]), ("b", other)):
        assert invoke("features", "extract", bag_root, tmp_path / name, *common, "--weights", w).exit_code == 0
    mixed = invoke("train", tmp_path / "a", "--val", tmp_path / "b", "--out", tmp_path / "mixed", "--epochs", "1")
    assert mixed.exit_code == 2 and mixed.output.count("error:") == 1 and "one set of weights" in mixed.output, mixed.output
    r = invoke("train", tmp_path / "a", "--val", tmp_path / "a", "--out", tmp_path / "run", "--epochs", "1", "--min-epochs", "1")
    assert r.exit_code == 0, r.output
    bad = invoke("predict", tmp_path / "run" / "model.pt", tmp_path / "b", "--out", tmp_path / "p.csv")
    assert bad.exit_code == 2 and bad.output.count("error:") == 1 and "weights" in bad.output, bad.output
    assert invoke("predict", tmp_path / "run" / "model.pt", tmp_path / "a", "--out", tmp_path / "q.csv").exit_code == 0


def test_predict_slides_uses_weights_and_refuses_others(
    weight_files: dict[str, Path], bag_root: Path, tmp_path: Path
) -> None:
    """predict-slides re-encodes the slide with the model's timm encoder and --weights; another weights
    file of the same architecture is refused in one line before any tile is encoded."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from slide_fixtures import make_slide

    (tmp_path / "slides").mkdir()
    slide = make_slide(tmp_path / "slides")
    common = ("--encoder", f"timm:{TINY}", "--precision", "fp32", "--runtime", "torch", "--workers", "0")
    assert invoke("features", "extract", bag_root, tmp_path / "f", *common, "--weights", weight_files["pth"]).exit_code == 0
    r = invoke("train", tmp_path / "f", "--val", tmp_path / "f", "--out", tmp_path / "run", "--epochs", "1", "--min-epochs", "1")
    assert r.exit_code == 0, r.output
    model = tmp_path / "run" / "model.pt"
    ok = invoke("predict-slides", model, slide, "--out", tmp_path / "pred", "--mpp", "1", "--no-heatmaps",
                "--precision", "fp32", "--workers", "0", "--weights", weight_files["safetensors"])
    assert ok.exit_code == 0, ok.output
    torch.manual_seed(13)
    other = tmp_path / "other.pth"
    torch.save(timm.create_model(TINY, num_classes=0).state_dict(), other)
    bad = invoke("predict-slides", model, slide, "--out", tmp_path / "pred2", "--mpp", "1", "--no-heatmaps",
                 "--precision", "fp32", "--workers", "0", "--weights", other)
    assert bad.exit_code == 2 and bad.output.count("error:") == 1 and "weights" in bad.output, bad.output


def test_train_without_encoder_info_records_the_features_weights(tmp_path: Path) -> None:
    """train() called with bags only (no encoder_info) takes the weights identity from their files too."""
    from histomil.training.checkpoint import load_checkpoint
    from histomil.training.trainer import TrainConfig, train

    attrs = {"encoder": f"timm:{TINY}", "input_size": 224, "mean": [0.5] * 3, "std": [0.5] * 3, "weights": "sha256:abc"}
    rng = np.random.default_rng(0)
    bags = [FeatureBag(f"b{i}", rng.normal(size=(5, 8)).astype(np.float32), [str(j) for j in range(5)], label=i % 2,
                       attrs=dict(attrs)) for i in range(6)]
    result = train(bags[:4], bags[4:], TrainConfig(model="abmil", epochs=1, min_epochs=0, seed=0), tmp_path / "run")
    assert load_checkpoint(result.model_path)[1]["encoder_info"]["weights"] == "sha256:abc"


@pytest.fixture()
def tiny_dinov2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A random 2-layer transformers Dinov2Model saved as a model folder, and a Phikon-v2-like preset for it."""
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(3)
    config = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, patch_size=16,
                          image_size=224)
    model = Dinov2Model(config).eval()
    model.save_pretrained(tmp_path / "dino")
    preset = Preset(name="tiny_phikon", title="tiny", hf_repo="owkin/tiny-phikon-test", arch=None, timm_kwargs={},
                    input_size=224, resize=224, interpolation="bilinear", mean=(0.485, 0.456, 0.406),
                    std=(0.229, 0.224, 0.225), embedding="cls", dim=32, prefix_tokens=1, licence="test", gated=False,
                    builder="transformers")
    monkeypatch.setitem(PRESETS, preset.name, preset)
    return model, tmp_path / "dino"


def test_transformers_preset_extracts_the_models_own_class_token(tiny_dinov2, bag_root: Path, tmp_path: Path) -> None:
    """Phikon-v2's path (a transformers Dinov2Model folder) through 'features extract': last_hidden_state[:, 0]."""
    model, folder = tiny_dinov2
    out = tmp_path / "feats"
    r = invoke("features", "extract", bag_root, out, "--encoder", "tiny_phikon", "--weights", folder, "--precision", "fp32",
               "--runtime", "torch", "--workers", "0")
    assert r.exit_code == 0, r.output
    enc = build_encoder("tiny_phikon", precision="fp32", weights=folder / "model.safetensors")  # the file names its folder
    for feats, paths, attrs in extracted(out).values():
        from PIL import Image

        x = enc.preprocess(np.stack([np.asarray(Image.open(bag_root / p if not Path(p).is_absolute() else p)) for p in paths]))
        with torch.no_grad():
            ref = model(pixel_values=x).last_hidden_state[:, 0].numpy()
        assert feats.shape == (3, 32)
        np.testing.assert_allclose(feats, ref, atol=ATOL, rtol=0)
        assert attrs["weights"] == enc.info.weights


def test_transformers_preset_refuses_incomplete_folders(tiny_dinov2, tmp_path: Path) -> None:
    """No config.json, or weights that leave tensors to random initialisation: one error line, never random weights."""
    from safetensors.torch import load_file

    _, folder = tiny_dinov2
    lone = tmp_path / "lone"
    lone.mkdir()
    shutil.copy(folder / "model.safetensors", lone / "model.safetensors")
    with pytest.raises(HistomilError, match="no config.json"):
        build_encoder("tiny_phikon", weights=lone / "model.safetensors")
    partial = tmp_path / "partial"
    partial.mkdir()
    shutil.copy(folder / "config.json", partial / "config.json")
    state = load_file(str(folder / "model.safetensors"))
    dropped = sorted(state)[0]
    save_file({k: v for k, v in state.items() if k != dropped}, str(partial / "model.safetensors"))
    with pytest.raises(HistomilError, match="weights do not fill the model: 1 missing"):
        build_encoder("tiny_phikon", weights=partial)
    with pytest.raises(HistomilError, match="not in the local cache"):
        build_encoder("tiny_phikon")


def test_auto_runtime_leaves_vits_to_torch(weight_files: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """runtime 'auto' converts only the encoders it was measured to speed up (Lite0), never a ViT preset."""
    from histomil.features import runtimes

    monkeypatch.setattr(runtimes, "runtime_installed", lambda name: True)
    vit = build_encoder(f"timm:{TINY}", precision="fp32", weights=weight_files["pth"])
    assert runtimes.with_runtime(vit, "auto") is vit
    lite = build_encoder("efficientnet_lite0", pretrained=False, precision="fp32")
    monkeypatch.setattr(runtimes, "RuntimeEncoder", lambda encoder, resolved, threads=None: ("converted", resolved))
    assert runtimes.with_runtime(lite, "auto") == ("converted", runtimes.AUTO_RUNTIME)
