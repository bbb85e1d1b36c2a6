"""End-to-end MIL from pixels: augmentation, the original model's flaws, chunked encoding,
fine-tuning, training, checkpoints, the command, and real EBHI tiles."""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
import typer
from PIL import Image
from typer.testing import CliRunner

from histomil.commands.pixels import train_pixels_cmd
from histomil.hardware import resolve_precision
from histomil.data import augment
from histomil.data.bags import Bag, load_bags
from histomil.errors import HistomilError
from histomil.features.encoders import build_encoder
from histomil.models.original import OriginalMIL, OriginalTileCNN, flatten_dim
from histomil.training.checkpoint import load_checkpoint
from histomil.training.pixel_data import TilePrep
from histomil.training.pixels import (
    LAST_BLOCKS,
    PixelTrainConfig,
    build_pixel_model,
    predict_pixels,
    train_pixels,
)

TILE = 32

pytestmark = pytest.mark.usefixtures("one_thread")


# --- synthetic tile bags -----------------------------------------------------------------


def _tile(rng: np.random.Generator, positive: bool) -> np.ndarray:
    """Pink noise; a positive (tumour-like) tile also holds a dark purple square."""
    img = np.clip(rng.normal([220, 170, 200], 12, size=(TILE, TILE, 3)), 0, 255)
    if positive:
        y, x = rng.integers(0, TILE - 14, size=2)
        img[y : y + 14, x : x + 14] = [70, 30, 110]
    return img.astype(np.uint8)


def write_bags(root: Path, n_bags: int, size: int, seed: int, witnesses: int = 1) -> list[Bag]:
    """A bag root folder (labels.csv + one sub-folder of PNG tiles per bag); bags alternate labels."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    rows = []
    for i in range(n_bags):
        label = i % 2
        folder = root / f"{i}"
        folder.mkdir()
        pos = set(rng.choice(size, witnesses, replace=False).tolist()) if label else set()
        for j in range(size):
            Image.fromarray(_tile(rng, j in pos)).save(folder / f"tile_{j}.png")
        rows.append((str(i), label))
    with open(root / "labels.csv", "w", newline="") as f:
        csv.writer(f).writerows([("case", "y_true"), *rows])
    return load_bags(root)


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> tuple[list[Bag], list[Bag]]:
    base = tmp_path_factory.mktemp("pixbags")
    return write_bags(base / "train", 8, 4, seed=1, witnesses=2), write_bags(base / "val", 4, 4, seed=2, witnesses=2)


def small_cfg(**kw) -> PixelTrainConfig:
    # fp32 unless a test asks: the default, auto, is bf16 on CPUs with native bf16 and fp32 elsewhere
    base = dict(input_size=TILE, pretrained=False, finetune="all", epochs=2, lr=3e-3, encoder_lr=1e-3, min_epochs=0,
                patience=50, seed=5, num_workers=0, tile_chunk=3, precision="fp32",
                model_kwargs={"embed_dim": 16, "attn_dim": 8, "dropout": 0.0})
    base.update(kw)
    return PixelTrainConfig(**base)


# --- augmentation ------------------------------------------------------------------------

SQUARE = np.arange(3 * 3 * 2, dtype=np.uint8).reshape(3, 3, 2)  # (H, W, C), every pixel distinct


def _pixels(a: np.ndarray) -> list[tuple[int, ...]]:
    return sorted(map(tuple, a.reshape(-1, a.shape[-1]).tolist()))


@pytest.mark.parametrize(
    "fn,expected_rows",
    [
        (augment.hflip, [[2, 1, 0], [5, 4, 3], [8, 7, 6]]),
        (augment.vflip, [[6, 7, 8], [3, 4, 5], [0, 1, 2]]),
        (lambda t: augment.rot90(t, 1), [[2, 5, 8], [1, 4, 7], [0, 3, 6]]),  # counter-clockwise
        (lambda t: augment.rot90(t, 2), [[8, 7, 6], [5, 4, 3], [2, 1, 0]]),
        (augment.transpose, [[0, 3, 6], [1, 4, 7], [2, 5, 8]]),
    ],
)
def test_each_transform_is_the_expected_dihedral_symmetry(fn, expected_rows) -> None:
    out = fn(SQUARE)
    pixel_index = out[..., 0] // 2  # channel 0 holds 2 * (pixel index)
    assert pixel_index.tolist() == expected_rows
    assert _pixels(out) == _pixels(SQUARE)  # only moves pixels, never changes them
    np.testing.assert_array_equal(out[..., 1], out[..., 0] + 1)  # channels move together
    # The tensor path (C, H, W) does the same thing.
    t = fn(torch.from_numpy(np.ascontiguousarray(SQUARE)).permute(2, 0, 1))
    np.testing.assert_array_equal(t.permute(1, 2, 0).numpy(), out)


def test_augment_p1_applies_all_four_in_order_and_p0_is_identity() -> None:
    tile = np.random.default_rng(0).integers(0, 256, size=(5, 5, 3), dtype=np.uint8)
    for seed in range(6):
        rng, twin = np.random.default_rng(seed), np.random.default_rng(seed)
        out = augment.augment_tile(tile, rng, p=1.0)
        twin.random(3)
        k = int(twin.integers(1, 4))
        expected = np.rot90(tile[::-1, ::-1], k).transpose(1, 0, 2)  # hflip+vflip, rotate, transpose
        np.testing.assert_array_equal(out, expected)
        assert out.flags.c_contiguous and _pixels(out) == _pixels(tile)
        same = augment.augment_tile(tile, np.random.default_rng(seed), p=0.0)
        np.testing.assert_array_equal(same, tile)
        assert same is not tile


def test_augment_frequency_follows_p_and_tiles_are_independent() -> None:
    tile = np.arange(4 * 4 * 3, dtype=np.uint8).reshape(4, 4, 3)
    rng = np.random.default_rng(1)
    outs = augment.augment_tiles([tile] * 2000, rng, p=0.2)
    changed = np.mean([not np.array_equal(o, tile) for o in outs])
    # P(unchanged) = P(no transform) + P(hflip+vflip+transpose... cancel) ~ 0.8^4 = 0.41 plus rare cancellations
    assert 0.52 < changed < 0.62, changed
    assert len({o.tobytes() for o in outs}) == 8  # all eight symmetries of the square occur
    with pytest.raises(ValueError, match="probability"):
        augment.augment_tile(tile, rng, p=1.5)


# --- the original model ------------------------------------------------------------------


def test_original_flatten_dims_follow_the_tile_size() -> None:
    assert flatten_dim(256) == 62 * 62 * 32 == 123_008  # the original's 63 M-weight dense layer
    assert flatten_dim(32) == 6 * 6 * 32
    cnn = OriginalTileCNN(64)
    assert cnn.dense[0].in_features == flatten_dim(64) == 14 * 14 * 32
    assert cnn(torch.rand(2, 3, 64, 64) * 255).shape == (2, 256)
    with pytest.raises(HistomilError, match="too small"):
        flatten_dim(8)


def test_original_model_depends_on_tile_order_and_needs_a_fixed_bag_size() -> None:
    torch.manual_seed(0)
    model = OriginalMIL(tile_size=TILE, bag_size=6).eval()
    rng = np.random.default_rng(0)
    x = torch.from_numpy(np.stack([_tile(rng, j == 0) for j in range(6)])).permute(0, 3, 1, 2).float()[None]
    perm = torch.tensor([3, 1, 5, 0, 2, 4])
    with torch.no_grad():
        out, out_perm = model(x), model(x[:, perm])
    # Attention follows the tiles (a set function) ...
    torch.testing.assert_close(out_perm.attention[0], out.attention[0][perm])
    # ... but the concatenation gives each position its own weights: same tiles, other logits.
    assert (out.probs - out_perm.probs).abs().max() > 1e-3
    with pytest.raises(HistomilError, match="exactly 6 tiles.*got 5"):
        model(x[:, :5])
    with pytest.raises(HistomilError, match="exactly 6 tiles.*got 7"):
        model(torch.cat([x, x[:, :1]], dim=1))
    with pytest.raises(HistomilError, match="padded"):
        model.head(torch.zeros(1, 6, 256), torch.tensor([[True] * 5 + [False]]))


def test_gated_abmil_head_is_order_invariant_where_the_original_is_not() -> None:
    torch.manual_seed(0)
    model = build_pixel_model(small_cfg(backbone="original", model="gated_abmil", finetune=None), 2, TILE).eval()
    x = torch.rand(1, 6, 3, TILE, TILE) * 255
    perm = torch.tensor([5, 4, 3, 2, 1, 0])
    with torch.no_grad():
        torch.testing.assert_close(model(x).probs, model(x[:, perm]).probs, rtol=1e-5, atol=1e-6)


def test_original_pixels_enter_as_0_to_255_and_efficientnet_matches_tile_encoder(shared_data: Path) -> None:
    raw = TilePrep(TILE, mean=(0, 0, 0), std=(1, 1, 1), raw=True)
    tile = np.random.default_rng(0).integers(0, 256, size=(TILE, TILE, 3), dtype=np.uint8)
    np.testing.assert_array_equal(raw([tile])[0].permute(1, 2, 0).numpy(), tile.astype(np.float32))
    # EfficientNet preprocessing is TileEncoder.preprocess, on real 224 px tiles resized to 96.
    paths = sorted((shared_data / "ebhi" / "tiles" / "Normal").glob("*.jpg"))[:2]
    tiles = [np.asarray(Image.open(p).convert("RGB")) for p in paths]
    enc = build_encoder("efficientnet_lite0", pretrained=False)
    enc.info = dataclasses.replace(enc.info, input_size=96)
    torch.testing.assert_close(TilePrep(96)(tiles), enc.preprocess(np.stack(tiles)), rtol=0, atol=1e-6)


def test_original_backbone_trains_with_its_concat_head_and_refuses_other_bag_sizes(toy, tmp_path) -> None:
    train_bags, val_bags = toy
    cfg = small_cfg(backbone="original", finetune=None, model=None, model_kwargs={"bag_size": 4}, epochs=1, lr=1e-4)
    result = train_pixels(train_bags, val_bags, cfg, tmp_path / "run")
    assert result.config.model == "original_concat" and result.config.finetune == "all"
    assert result.config.input_size == TILE  # native tile size
    model, meta = load_checkpoint(result.model_path)
    assert model.encoder.dense[0].in_features == flatten_dim(TILE) and meta["kind"] == "pixels"
    assert meta["encoder_info"]["raw_pixels"] is True
    with pytest.raises(HistomilError, match="training bag '0'.*exactly 5 tiles"):
        train_pixels(train_bags, val_bags, cfg.model_copy(update={"model_kwargs": {"bag_size": 5}}), tmp_path / "r2")
    with pytest.raises(HistomilError, match="finetune applies to efficientnet"):
        small_cfg(backbone="original", finetune="last_blocks").resolved()


# --- chunked encoding and fine-tuning ----------------------------------------------------


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("backbone", ["efficientnet_lite0", "original"])
def test_chunked_checkpointed_encoding_matches_unchunked(backbone: str) -> None:
    cfg = small_cfg(backbone=backbone, finetune="all", tile_chunk=None, model="gated_abmil")
    torch.manual_seed(0)
    model = build_pixel_model(cfg, 2, TILE)
    x = torch.rand(1, 7, 3, TILE, TILE) * (255 if backbone == "original" else 2) - (0 if backbone == "original" else 1)
    if backbone == "original":
        model.eval()  # its dropout would draw different masks per chunk; efficientnet's encoder is always eval
    results = []
    for chunk in (None, 3):  # 3 + 3 + 1 tiles: an uneven last chunk
        model.tile_chunk = chunk
        model.zero_grad()
        out = model(x)
        torch.nn.functional.cross_entropy(out.logits, torch.tensor([1])).backward()
        results.append((out.logits.detach(), out.attention.detach(), _grads(model)))
    (l0, a0, g0), (l1, a1, g1) = results
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a1, a0, rtol=1e-5, atol=1e-6)
    assert g0.keys() == g1.keys() and any(k.startswith("encoder.") for k in g0)
    for k in g0:  # equal up to float summation order
        scale = float(g0[k].abs().max())
        assert float((g1[k] - g0[k]).abs().max()) <= 1e-5 * scale + 1e-6, k


def test_gradients_reach_the_encoder_only_when_finetuning() -> None:
    x = torch.rand(1, 4, 3, TILE, TILE) * 2 - 1
    touched = {}
    for finetune in ("none", "last_blocks", "all"):
        torch.manual_seed(0)
        model = build_pixel_model(small_cfg(finetune=finetune), 2, TILE)
        model.train()
        model(x).logits.sum().backward()
        touched[finetune] = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
        assert all(n.startswith("head.") for n in touched[finetune] if not n.startswith("encoder."))
        assert any(n.startswith("head.") for n in touched[finetune])
    enc = {f: {n for n in names if n.startswith("encoder.")} for f, names in touched.items()}
    assert enc["none"] == set()
    assert "encoder.backbone._conv_stem.weight" in enc["all"]
    assert "encoder.backbone._conv_stem.weight" not in enc["last_blocks"]
    assert "encoder.backbone._blocks.15._project_conv.weight" in enc["last_blocks"]
    assert f"encoder.backbone._blocks.{15 - LAST_BLOCKS}._project_conv.weight" not in enc["last_blocks"]
    assert enc["none"] < enc["last_blocks"] < enc["all"]


def test_efficientnet_encoder_stays_in_eval_mode_so_batchnorm_stats_do_not_move() -> None:
    torch.manual_seed(0)
    model = build_pixel_model(small_cfg(finetune="all"), 2, TILE)
    model.train()
    assert model.head.training and not model.encoder.training and not model.encoder.backbone._bn0.training
    before = model.encoder.backbone._bn0.running_mean.clone()
    model(torch.rand(1, 4, 3, TILE, TILE)).logits.sum().backward()
    torch.testing.assert_close(model.encoder.backbone._bn0.running_mean, before, rtol=0, atol=0)


def test_channels_last_gives_the_same_outputs() -> None:
    torch.manual_seed(0)
    model = build_pixel_model(small_cfg(finetune="all", channels_last=False), 2, TILE).eval()
    x = torch.rand(1, 5, 3, TILE, TILE) * 2 - 1
    with torch.no_grad():
        plain = model(x).logits
        model.channels_last = True
        model.encoder.to(memory_format=torch.channels_last)
        assert model.encoder.backbone._conv_stem.weight.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(model(x).logits, plain, rtol=1e-4, atol=1e-5)


def test_bf16_stays_close_to_fp32() -> None:
    torch.manual_seed(0)
    model = build_pixel_model(small_cfg(finetune="all", pretrained=True), 2, TILE).eval()
    x = torch.rand(1, 5, 3, TILE, TILE) * 2 - 1
    with torch.no_grad():
        fp32 = model(x)
        model.precision = "bf16"
        bf16 = model(x)
    assert bf16.logits.dtype == torch.float32
    assert (bf16.logits - fp32.logits).abs().max() < 0.05
    assert (bf16.logits - fp32.logits).abs().max() > 0  # autocast really ran


# --- training ----------------------------------------------------------------------------


def test_loss_decreases_on_a_fixed_tiny_problem(toy) -> None:
    """A few passes over 4 bags, fine-tuning a pretrained EfficientNet end to end."""
    train_bags, _ = toy
    torch.manual_seed(0)
    model = build_pixel_model(small_cfg(finetune="all", pretrained=True), 2, TILE)
    batch = [(model.prep([np.asarray(Image.open(p).convert("RGB")) for p in b.tile_paths])[None], torch.tensor([b.label]))
             for b in train_bags[:4]]
    opt = torch.optim.Adam([{"params": model.head.parameters(), "lr": 3e-3},
                            {"params": model.encoder.parameters(), "lr": 1e-3}])
    encoder_before = model.encoder.backbone._conv_stem.weight.detach().clone()

    def total() -> float:
        model.eval()
        with torch.no_grad():
            return sum(float(torch.nn.functional.cross_entropy(model(x).logits, y)) for x, y in batch)

    start = total()
    for _ in range(3):
        model.train()
        for x, y in batch:
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x).logits, y).backward()
            opt.step()
    assert total() < 0.85 * start
    assert not torch.equal(model.encoder.backbone._conv_stem.weight, encoder_before)


def test_train_pixels_writes_history_and_checkpoint_that_round_trips(toy, tmp_path) -> None:
    train_bags, val_bags = toy
    seen = []
    cfg = small_cfg(epochs=3, pretrained=True, finetune="none", tile_chunk=None)
    result = train_pixels(train_bags, val_bags, cfg, tmp_path / "run", on_epoch=seen.append)
    assert [r["epoch"] for r in seen] == [1, 2, 3] and result.epochs_run == 3
    with open(result.history_path) as f:
        rows = list(csv.DictReader(f))
    assert [float(r["train_loss"]) for r in rows] == [r["train_loss"] for r in result.history]
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    model, meta = load_checkpoint(result.model_path)
    assert meta["kind"] == "pixels" and meta["best_epoch"] == result.best_epoch
    assert meta["train_config"]["finetune"] == "none" and meta["encoder_info"]["input_size"] == TILE
    # The reloaded best model reproduces the validation loss recorded for its epoch.
    preds = predict_pixels(model, val_bags, num_workers=0)
    y = np.array([b.label for b in val_bags])
    probs = np.stack([p for p, _ in preds])
    loss = -np.mean(np.log(probs[np.arange(len(y)), y]))
    assert loss == pytest.approx(result.best_metrics["val_loss"], rel=1e-5)
    for probs_i, att in preds:
        assert probs_i.sum() == pytest.approx(1.0) and att.shape == (4,) and att.sum() == pytest.approx(1.0, abs=1e-5)


def test_training_is_deterministic_and_independent_of_worker_processes(toy, tmp_path) -> None:
    train_bags, val_bags = toy
    cfg = small_cfg(backbone="original", finetune=None, model="gated_abmil", epochs=2, max_tiles=3, augment_p=0.5,
                    lr=1e-4, model_kwargs={"embed_dim": 16, "attn_dim": 8, "dropout": 0.3})
    a = train_pixels(train_bags, val_bags, cfg, tmp_path / "a")
    b = train_pixels(train_bags, val_bags, cfg.model_copy(update={"num_workers": 1}), tmp_path / "b")

    def strip(history: list[dict]) -> list[dict]:
        return [{k: v for k, v in r.items() if k != "seconds"} for r in history]

    assert strip(a.history) == strip(b.history)
    c = train_pixels(train_bags, val_bags, cfg.model_copy(update={"seed": 6}), tmp_path / "c")
    assert strip(c.history) != strip(a.history)


class Crash(Exception):
    pass


def _crash_at(epoch: int):
    def on_epoch(row: dict) -> None:
        if row["epoch"] == epoch:
            raise Crash

    return on_epoch


def _strip(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in history]


def test_resumed_run_equals_uninterrupted_run(toy, tmp_path) -> None:
    """Killed after epoch 2 (last.pt and history.csv written), resumed: the same history and weights.

    Every source of randomness is on: dropout (torch RNG), bag order and tile sub-sampling (numpy
    Generator), augmentation and the DataLoader worker's seed (drawn from the Generator each epoch).
    """
    train_bags, val_bags = toy
    cfg = small_cfg(backbone="original", finetune=None, model="gated_abmil", epochs=4, max_tiles=3, augment_p=0.5,
                    lr=1e-3, num_workers=1, model_kwargs={"embed_dim": 16, "attn_dim": 8, "dropout": 0.3})
    full = train_pixels(train_bags, val_bags, cfg, tmp_path / "full")
    assert full.last_path.is_file()

    with pytest.raises(Crash):
        train_pixels(train_bags, val_bags, cfg, tmp_path / "resumed", on_epoch=_crash_at(2))
    with open(tmp_path / "resumed" / "history.csv") as f:
        assert len(list(csv.DictReader(f))) == 2
    seen = []
    # the worker count may change on resuming: it does not change the results
    resumed = train_pixels(train_bags, val_bags, cfg.model_copy(update={"num_workers": 0}), tmp_path / "resumed",
                           resume=True, on_epoch=lambda r: seen.append(r["epoch"]))
    assert seen == [3, 4]
    assert _strip(resumed.history) == _strip(full.history)
    assert resumed.best_epoch == full.best_epoch
    for name in ("model.pt", "last.pt"):
        key = "state_dict" if name == "model.pt" else "model_state"
        a = torch.load(tmp_path / "full" / name, weights_only=True)[key]
        b = torch.load(tmp_path / "resumed" / name, weights_only=True)[key]
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # more epochs continue a finished run; other data or options are refused
    more = train_pixels(train_bags, val_bags, cfg.model_copy(update={"epochs": 5}), tmp_path / "full", resume=True)
    assert more.epochs_run == 5 and _strip(more.history[:4]) == _strip(full.history)
    with pytest.raises(HistomilError, match="options changed.*lr"):
        train_pixels(train_bags, val_bags, cfg.model_copy(update={"lr": 1e-2}), tmp_path / "full", resume=True)
    with pytest.warns(UserWarning, match="data changed"):  # other data: starts afresh, never mixes
        other = train_pixels(train_bags[:6], val_bags, cfg, tmp_path / "full", resume=True)
    assert [r["epoch"] for r in other.history] == [1, 2, 3, 4]


def test_command_resumes_from_last_state_by_default(toy, tmp_path) -> None:
    train_bags, val_bags = toy
    app = typer.Typer()
    app.command()(train_pixels_cmd)
    out = tmp_path / "run"
    args = [str(train_bags[0].tile_paths[0].parent.parent), "--val", str(val_bags[0].tile_paths[0].parent.parent),
            "--out", str(out), "--backbone", "original", "--model", "gated_abmil", "--workers", "0", "--threads", "1",
            "--min-epochs", "0"]
    first = CliRunner().invoke(app, [*args, "--epochs", "1"])
    assert first.exit_code == 0, first.output
    assert (out / "last.pt").is_file() and "resuming" not in first.output
    again = CliRunner().invoke(app, [*args, "--epochs", "2"])
    assert again.exit_code == 0, again.output
    assert "resuming from" in again.output and "of 2" in again.output
    with open(out / "history.csv") as f:
        assert [r["epoch"] for r in csv.DictReader(f)] == ["1", "2"]
    changed = CliRunner().invoke(app, [*args, "--epochs", "2", "--lr", "0.01"])
    assert changed.exit_code == 2 and "cannot resume" in changed.output and "lr" in changed.output
    fresh = CliRunner().invoke(app, [*args, "--epochs", "1", "--lr", "0.01", "--no-resume"])
    assert fresh.exit_code == 0, fresh.output
    with open(out / "history.csv") as f:
        assert len(list(csv.DictReader(f))) == 1


def test_training_flushes_denormals(toy, tmp_path) -> None:
    """Denormal floats are flushed to zero while training (late epochs stay fast once the loss saturates)."""
    train_bags, val_bags = toy
    flushed = []
    if not torch.set_flush_denormal(False):
        pytest.skip("this CPU cannot flush denormals")
    assert torch.tensor([1e-323], dtype=torch.float64).item() != 0.0  # denormals are kept by default
    try:
        train_pixels(train_bags, val_bags, small_cfg(backbone="original", finetune=None, model="gated_abmil", epochs=1),
                     tmp_path / "run", on_epoch=lambda r: flushed.append(torch.tensor([1e-323], dtype=torch.float64).item() == 0.0))
    finally:
        torch.set_flush_denormal(False)
    assert flushed == [True]


def test_bad_tile_in_a_worker_is_a_one_line_error_naming_the_file(toy, tmp_path) -> None:
    train_bags, val_bags = toy
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 10)
    broken = [Bag(train_bags[0].bag_id, (*train_bags[0].tile_paths[:3], bad), 0), *train_bags[1:]]
    with pytest.raises(HistomilError, match="broken.png") as exc:
        train_pixels(broken, val_bags, small_cfg(num_workers=1, epochs=1, finetune="none"), tmp_path / "run")
    assert "\n" not in str(exc.value)


def test_config_errors_are_one_line() -> None:
    with pytest.raises(HistomilError, match="epoch: Extra inputs"):
        PixelTrainConfig.parse({"epoch": 3})
    with pytest.raises(HistomilError, match="finetune"):
        PixelTrainConfig.parse({"finetune": "some"})
    cfg = PixelTrainConfig.parse({})
    assert (cfg.model, cfg.finetune, cfg.input_size, cfg.encoder_lr) == ("gated_abmil", "last_blocks", 224, cfg.lr / 10)
    model = build_pixel_model(small_cfg(finetune="none"), 2, TILE)
    with pytest.raises(HistomilError, match="tile images, not cached features"):
        model(torch.zeros(1, 4, 1280))


# --- real tiles and the command ----------------------------------------------------------


@pytest.fixture(scope="module")
def ebhi_bags(ebhi_table: Path, tmp_path_factory) -> Path:
    """A manifest of 6 real-tile bags of 3 (positive bags hold one adenocarcinoma tile)."""
    tumour, normal = [], []
    with open(ebhi_table, newline="") as f:
        for row in csv.DictReader(f):
            (tumour if row["tumor"] == "1" else normal if row["tumor"] == "0" else []).append(row["path"])
    base = ebhi_table.parent
    rows = []
    for i in range(6):
        label = i % 2
        paths = normal[3 * i : 3 * i + 3]
        if label:
            paths[1] = tumour[i]
        rows += [(f"bag{i}", str(base / p), label) for p in paths]
    manifest = tmp_path_factory.mktemp("ebhi") / "manifest.csv"
    with open(manifest, "w", newline="") as f:
        csv.writer(f).writerows([("bag_id", "path", "label"), *rows])
    return manifest


def test_real_ebhi_tiles_frozen_encoder_equals_feature_pipeline(ebhi_bags: Path, tmp_path) -> None:
    """finetune=none sees exactly the embeddings the cached-feature pipeline would store."""
    bags = load_bags(ebhi_bags)
    torch.manual_seed(0)
    model = build_pixel_model(PixelTrainConfig(finetune="none", tile_chunk=2, precision="fp32"), 2, 224).eval()
    prep = model.prep
    tiles = [np.asarray(Image.open(p).convert("RGB")) for p in bags[1].tile_paths]
    with torch.no_grad():
        emb = model.encode(prep(tiles))
    ref = build_encoder("efficientnet_lite0", pretrained=True, precision="fp32").encode(np.stack(tiles))
    np.testing.assert_allclose(emb.numpy(), ref, rtol=1e-4, atol=1e-4)


def test_command_trains_on_real_tiles(ebhi_bags: Path, tmp_path) -> None:
    app = typer.Typer()
    app.command()(train_pixels_cmd)
    out = tmp_path / "run"
    args = [str(ebhi_bags), "--val", str(ebhi_bags), "--out", str(out), "--epochs", "1", "--input-size", "32",
            "--finetune", "all", "--workers", "1", "--tile-chunk", "2", "--channels-last"]  # precision: the default, auto
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "best epoch 1 of 1" in res.output and (out / "model.pt").is_file() and (out / "history.csv").is_file()
    model, meta = load_checkpoint(out / "model.pt")
    resolved = resolve_precision("auto")  # bf16 where this CPU computes it natively, else fp32
    assert meta["train_config"]["precision"] == resolved and model.precision == resolved and model.channels_last
    bad = CliRunner().invoke(app, [*args[:5], "--finetune", "sometimes"])
    assert bad.exit_code == 2 and "error:" in bad.output and "finetune" in bad.output


def test_clam_head_gets_labels_and_its_loss_weighting_end_to_end():
    """A CLAM head trained from pixels sees the bag label (instance loss) and the 0.7/0.3 weighting."""
    from histomil.models.registry import build_model
    from histomil.training.pixel_model import PixelMIL
    from histomil.training.trainer import bag_loss

    torch.manual_seed(0)
    head = build_model("clam_sb", 8, 2)
    encoder = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 8))
    model = PixelMIL(encoder, head)
    model.train()
    x = torch.rand(1, 6, 3, 4, 4)
    y = torch.tensor([1])
    out = model(x, y=y)
    assert "aux_loss" in out.extras and float(out.extras["loss_weight_bag"]) == pytest.approx(0.7)
    ce = torch.nn.functional.cross_entropy(out.logits, y)
    with torch.no_grad():
        assert float(bag_loss(out, y)) == pytest.approx(float(0.7 * ce + out.extras["aux_loss"]), rel=1e-6)
    assert "aux_loss" not in model(x).extras  # no labels, no instance loss
