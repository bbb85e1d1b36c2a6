"""Heatmaps (score scales, placement, PNG), QuPath GeoJSON, and slide prediction end to end."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib import colormaps
from PIL import Image
from slide_fixtures import RECT_A, make_slide
from torch import nn
from typer.testing import CliRunner

from histomil.errors import HistomilError
from histomil.features.encoders import EncoderInfo, TileEncoder
from histomil.features.store import read_feature_bag
from histomil.models.registry import build_model
from histomil.slides import TilingSpec
from histomil.slides.heatmap import (
    bag_scores,
    heatmap_overlay,
    render_heatmap,
    scale_scores,
    score_canvas,
    tiles_geojson,
    write_geojson,
    write_slide_heatmap,
)
from histomil.hardware import cpu_name, resolve_precision
from histomil.slides.predict_slides import predict_slides
from histomil.training.checkpoint import save_checkpoint

CMU = "wsi/CMU-1-Small-Region.svs"
SPEC = TilingSpec(tile_size=64, mpp=1.0, mask_size=512)  # 256 level-0 px per tile on the synthetic slide


class QuadrantMeans(nn.Module):
    """Fast exact stand-in encoder: per-channel means of the four quadrants."""

    num_features = 12

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        return x.reshape(b, c, 2, h // 2, 2, w // 2).mean(dim=(3, 5)).flatten(1)


FAKE_INFO = EncoderInfo("quadrant_means", 32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), 12)


def fake_encoder() -> TileEncoder:
    return TileEncoder(QuadrantMeans(), FAKE_INFO).eval()


def tiny_checkpoint(path: Path, in_dim: int, encoder_info: dict, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    kwargs = {"embed_dim": 16, "attn_dim": 8, "dropout": 0.0}
    model = build_model("gated_abmil", in_dim=in_dim, **kwargs)
    return save_checkpoint(path, model, "gated_abmil", kwargs, 2, encoder_info, None)


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_slide(tmp_path_factory.mktemp("slides"))


@pytest.fixture(scope="module")
def fake_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("model") / "model.pt", 12, {**FAKE_INFO.to_dict(), "precision": "fp32"})


# ------------------------------------------------------------------------------------ scales


def test_rank_scale_is_monotone_and_spreads_softmax_attention() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(size=2000)
    logits[7] = 12.0  # one dominant tile, as trained attention often has
    att = np.exp(logits) / np.exp(logits).sum()
    rank, linear = scale_scores(att, "rank"), scale_scores(att, "linear")
    order = np.argsort(att)
    assert np.all(np.diff(rank[order]) > 0)  # strictly monotone (no ties here)
    assert rank.min() == 0.0 and rank.max() == 1.0 and rank[7] == 1.0
    assert np.median(rank) == pytest.approx(0.5, abs=1e-3)
    assert np.median(linear) < 0.001  # linear: everything but one tile looks cold
    np.testing.assert_allclose(linear, (att - att.min()) / (att.max() - att.min()))


def test_scale_ties_constants_and_errors() -> None:
    np.testing.assert_allclose(scale_scores([1.0, 2.0, 2.0, 3.0], "rank"), [0.0, 0.5, 0.5, 1.0])
    np.testing.assert_allclose(scale_scores([4.0, 4.0, 4.0], "rank"), [0.5, 0.5, 0.5])
    np.testing.assert_allclose(scale_scores([4.0], "linear"), [0.5])
    with pytest.raises(HistomilError, match="unknown heatmap scale 'log'"):
        scale_scores([1.0, 2.0], "log")  # type: ignore[arg-type]
    with pytest.raises(HistomilError, match="1 of 2 are NaN"):
        scale_scores([1.0, np.nan])


# ---------------------------------------------------------------------------------- drawing


def grid_coords(n: int, step: int) -> np.ndarray:
    return np.array([[x, y] for y in range(0, n * step, step) for x in range(0, n * step, step)], dtype=np.int64)


def test_canvas_puts_each_score_on_its_tile() -> None:
    # a 4 x 4 grid of 256-px tiles on a 1024-px slide, overview 128 px: each tile is 32 x 32 overview pixels
    coords = grid_coords(4, 256)
    scores = np.arange(16, dtype=float)
    scores[[5, 15]] = scores[[15, 5]]  # the highest score sits on tile 5: x 256..512, y 256..512
    canvas = score_canvas((128, 128), (1024, 1024), coords, 256, scores)
    assert np.isfinite(canvas).all()
    hot = np.argwhere(canvas == canvas.max())
    assert hot[:, 0].min() == 32 and hot[:, 0].max() == 63 and hot[:, 1].min() == 32 and hot[:, 1].max() == 63
    assert canvas[0, 0] == 0 and canvas[127, 127] == 5  # corners: tile 0 and tile 15 (now score 5)
    # fewer tiles: the rest of the overview stays empty (NaN), not cold
    part = score_canvas((128, 128), (1024, 1024), coords[:2], 256, [1.0, 2.0])
    assert np.isfinite(part).sum() == 2 * 32 * 32 and np.isnan(part[100, 100])


def test_overlapping_tiles_average() -> None:
    canvas = score_canvas((10, 20), (200, 100), np.array([[0, 0], [50, 0]]), 100, [0.0, 1.0])
    assert canvas[0, 2] == 0.0 and canvas[0, 7] == 0.5 and canvas[0, 12] == 1.0 and np.isnan(canvas[0, 17])


def test_overlay_colours_hot_tiles_and_keeps_background() -> None:
    thumb = np.full((64, 64, 3), 200, np.uint8)
    canvas = np.full((64, 64), np.nan)
    canvas[:32, :32] = 1.0
    canvas[32:, 32:] = 0.0
    out = heatmap_overlay(thumb, canvas, cmap="turbo", alpha=0.5)
    hot = np.array(colormaps["turbo"](1.0)[:3]) * 255
    cold = np.array(colormaps["turbo"](0.0)[:3]) * 255
    np.testing.assert_allclose(out[5, 5], 0.5 * 200 + 0.5 * hot, atol=1)
    np.testing.assert_allclose(out[50, 50], 0.5 * 200 + 0.5 * cold, atol=1)
    assert (out[5, 50] == 200).all()


def test_render_png_is_valid(tmp_path: Path) -> None:
    coords = grid_coords(4, 256)
    thumb = np.full((128, 128, 3), 230, np.uint8)
    mask = np.zeros((128, 128), bool)
    mask[10:100, 10:100] = True
    for scale in ("rank", "linear"):
        out = render_heatmap(tmp_path / f"h_{scale}.png", thumb, (1024, 1024), coords, 256, np.arange(16.0), scale,
                             mask=mask, title="slide: p = 0.9")
        with Image.open(out) as im:
            im.load()
            assert im.format == "PNG" and im.width == 800 and im.height > 300
            arr = np.asarray(im.convert("RGB")).astype(int)
        # the hottest colour of the map appears (tiles and colour bar)
        hot = (np.array(colormaps["turbo"](1.0)[:3]) * 255).astype(int)
        assert (np.abs(arr - hot).sum(axis=2) < 30).sum() > 50
    assert sorted(p.name for p in tmp_path.iterdir()) == ["h_linear.png", "h_rank.png"]  # no temp files left


# ---------------------------------------------------------------------------------- GeoJSON


def test_geojson_tiles_in_level0_pixels(tmp_path: Path) -> None:
    coords = np.array([[0, 0], [512, 0], [512, 1024]])
    scores = np.array([0.2, 0.7, 0.1])
    path = write_geojson(tmp_path / "t.geojson", tiles_geojson(coords, 512, scores))
    data = json.loads(path.read_text())
    assert data["type"] == "FeatureCollection" and len(data["features"]) == 3
    f = data["features"][2]
    assert f["type"] == "Feature" and f["geometry"]["type"] == "Polygon"
    assert f["geometry"]["coordinates"] == [[[512, 1024], [1024, 1024], [1024, 1536], [512, 1536], [512, 1024]]]
    props = [g["properties"] for g in data["features"]]
    assert [p["rank"] for p in props] == [2, 1, 3]
    assert [p["percentile"] for p in props] == [0.5, 1.0, 0.0]
    assert props[1]["objectType"] == "tile" and props[1]["name"] == "512_0"
    assert props[1]["measurements"] == {"attention": 0.7, "attention percentile": 1.0}
    assert props[1]["classification"]["name"] == "attention 90-100%" and len(props[1]["classification"]["color"]) == 3


def test_slide_heatmap_on_synthetic_slide(synth: Path, tmp_path: Path) -> None:
    # tiles over the pink rectangle A; the score grows to the right, the hottest tile is the right-most
    x0, y0, x1, _ = RECT_A
    coords = np.array([[x, y0] for x in range(x0, x1 - 255, 256)])
    scores = coords[:, 0].astype(float)
    png, geo = write_slide_heatmap(synth, coords, scores, tmp_path / "h.png", tmp_path / "t.geojson",
                                   patch_size_level0=256, spec=SPEC)
    assert Image.open(png).format == "PNG"
    data = json.loads(geo.read_text())
    top = min(data["features"], key=lambda f: f["properties"]["rank"])
    assert top["geometry"]["coordinates"][0][0] == [int(coords[-1, 0]), y0]


# ---------------------------------------------------------------------------------- prediction


def test_predict_slides_csv_heatmaps_and_resume(synth: Path, fake_ckpt: Path, tmp_path: Path) -> None:
    bad = tmp_path / "broken.svs"
    bad.write_bytes(b"not a slide")
    out = tmp_path / "pred"
    rows = predict_slides(fake_ckpt, [synth, bad], out, SPEC, encoder=fake_encoder(), top_k=3, on_bad_slide="skip")
    with (out / "predictions.csv").open() as f:
        table = list(csv.DictReader(f))
    assert [r["slide"] for r in table] == ["synthetic", "broken"]
    good, skipped = table
    assert skipped["prob_positive"] == "" and "broken.svs" in skipped["error"]
    bag = read_feature_bag(out / good["features"])
    assert int(good["n_tiles"]) == len(bag) > 20
    from histomil.training.checkpoint import load_checkpoint

    model, _ = load_checkpoint(fake_ckpt)
    probs, scores, kind = bag_scores(model, bag)
    assert kind == "attention" and float(good["prob_positive"]) == pytest.approx(probs[1], abs=1e-6)
    assert int(good["predicted_class"]) == int(probs[1] >= 0.5)
    top = [bag.tile_paths[j] for j in np.argsort(-scores, kind="stable")[:3]]  # ties: flat pink tiles
    assert good["top_tiles"].split(";") == top and all("_" in t for t in top)
    assert float(good["top_scores"].split(";")[0]) == pytest.approx(scores.max(), rel=1e-5)
    assert (out / good["heatmap"]).is_file() and (out / good["geojson"]).is_file()
    assert len(json.loads((out / good["geojson"]).read_text())["features"]) == len(bag)
    assert rows[0]["slide"] == "synthetic"
    # a re-run reuses the feature file
    stamp = (out / good["features"]).stat().st_mtime_ns
    predict_slides(fake_ckpt, [synth], out, SPEC, encoder=fake_encoder(), heatmaps=False, csv_path=tmp_path / "p2.csv")
    assert (out / good["features"]).stat().st_mtime_ns == stamp
    with (tmp_path / "p2.csv").open() as f:
        again = list(csv.DictReader(f))
    assert again[0]["prob_positive"] == good["prob_positive"] and again[0]["heatmap"] == ""


def test_predict_refuses_a_different_encoder(synth: Path, tmp_path: Path) -> None:
    other = tiny_checkpoint(tmp_path / "m.pt", 1280, {"name": "efficientnet_lite0", "input_size": 224, "dim": 1280})
    with pytest.raises(HistomilError, match="1280-d features but encoder quadrant_means gives 12-d"):
        predict_slides(other, [synth], tmp_path / "o", SPEC, encoder=fake_encoder())
    same_dim = tiny_checkpoint(tmp_path / "n.pt", 12, {"name": "another", "input_size": 32, "dim": 12})
    with pytest.raises(HistomilError, match="trained on features of another"):
        predict_slides(same_dim, [synth], tmp_path / "o", SPEC, encoder=fake_encoder())
    none = tiny_checkpoint(tmp_path / "z.pt", 12, None)
    with pytest.raises(HistomilError, match="does not record its encoder"):
        predict_slides(none, [synth], tmp_path / "o", SPEC)


def test_predict_real_slide_with_checkpoint_encoder(shared_data: Path, tmp_path: Path) -> None:
    info = {"name": "efficientnet_lite0", "input_size": 224, "mean": [0.5] * 3, "std": [0.5] * 3, "dim": 1280,
            "precision": "bf16"}
    ckpt = tiny_checkpoint(tmp_path / "model.pt", 1280, info)
    spec = TilingSpec(mpp=1.0)  # few tiles: fast
    rows = predict_slides(ckpt, [shared_data / CMU], tmp_path / "out", spec)
    row = rows[0]
    assert row["slide"] == "CMU-1-Small-Region" and 6 <= row["n_tiles"] <= 24 and 0 <= row["prob_positive"] <= 1
    bag = read_feature_bag(tmp_path / "out" / row["features"])
    # the checkpoint's features were bf16, but prediction runs in what this machine computes fast
    assert bag.attrs["encoder"] == "efficientnet_lite0" and bag.attrs["precision"] == resolve_precision("auto")
    assert bag.attrs["device_name"] == cpu_name() and bag.attrs["bf16"] in ("native", "emulated")
    geo = json.loads((tmp_path / "out" / row["geojson"]).read_text())
    x, y = (int(v) for v in row["top_tiles"].split(";")[0].split("_"))
    top = next(f for f in geo["features"] if f["properties"]["rank"] == 1)
    assert top["geometry"]["coordinates"][0][0] == [x, y]
    assert top["geometry"]["coordinates"][0][2] == [x + 449, y + 449]  # 224 px at 1 um/px on a 0.499 um/px scan


# ------------------------------------------------------------------------------------ commands


def _app():
    import typer

    from histomil.commands.slides import heatmap_cmd, predict_slides_cmd

    app = typer.Typer()
    app.command("heatmap")(heatmap_cmd)
    app.command("predict")(predict_slides_cmd)
    return app


def test_commands_reject_bad_options_in_one_line(synth: Path, fake_ckpt: Path, tmp_path: Path) -> None:
    r = CliRunner().invoke(_app(), ["heatmap", str(fake_ckpt), str(synth), "--out", str(tmp_path), "--scale", "log"])
    assert r.exit_code == 2 and "--scale must be one of rank, linear" in r.output
    r = CliRunner().invoke(_app(), ["heatmap", str(fake_ckpt), str(synth.parent), "--out", str(tmp_path)])
    assert r.exit_code == 2 and "is a folder" in r.output
    # the model's encoder (quadrant_means) is not a registered encoder: a one-line error, not a traceback
    r = CliRunner().invoke(_app(), ["predict", str(fake_ckpt), str(synth), "--out", str(tmp_path / "p.csv")])
    assert r.exit_code == 2 and "unknown encoder 'quadrant_means'" in r.output


def test_predict_command_with_csv_out(shared_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from histomil.features import encoders

    monkeypatch.setitem(encoders.ENCODERS, "quadrant_means", lambda **kw: fake_encoder())
    ckpt = tiny_checkpoint(tmp_path / "model.pt", 12, {**FAKE_INFO.to_dict(), "precision": "fp32"})
    r = CliRunner().invoke(_app(), ["predict", str(ckpt), str(shared_data / CMU), "--out", str(tmp_path / "res.csv"),
                                    "--top-k", "2", "--workers", "0"])
    assert r.exit_code == 0, r.output
    assert "1 slides predicted" in r.output
    with (tmp_path / "res.csv").open() as f:
        row = next(csv.DictReader(f))
    assert len(row["top_tiles"].split(";")) == 2
    assert (tmp_path / "res" / row["heatmap"]).is_file()
    r = CliRunner().invoke(_app(), ["heatmap", str(ckpt), str(shared_data / CMU), "--out", str(tmp_path / "hm"),
                                    "--scale", "linear", "--workers", "0"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "hm" / "heatmaps" / "CMU-1-Small-Region_heatmap.png").is_file()
