"""On a CUDA GPU: features, training, checkpoints, torchrun with nccl and out-of-memory batch halving.

Skipped where torch sees no GPU (CI has none); on a GPU machine: ``pytest -s tests/test_cuda.py``
(``-s`` prints the measured differences). The CPU is the reference throughout: a GPU run must give
the CPU's numbers up to the stated tolerances, and a checkpoint trained on the GPU the same
predictions on the CPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from histomil.data.images import read_rgb
from histomil.features.encoders import build_encoder
from histomil.features.tile_encoder import encode_in_batches, fit_tile
from histomil.features.store import write_feature_bag
from toy_bags import make_bags
from torchrun_cli import RANK_VARIABLES, history

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU here (run on a GPU machine)")

DEMO = Path(__file__).resolve().parents[1] / "src" / "histomil" / "example_data" / "ebhi_demo" / "tiles"
CONFIG = "model: gated_abmil\nmodel_kwargs: {dropout: 0.0}\nmax_instances: 8\nlr: 0.001\n"


def demo_tiles(n: int, size: int) -> np.ndarray:
    """``n`` real H&E tiles (the shipped EBHI demo), fitted to ``size`` pixels."""
    paths = sorted(DEMO.rglob("*.jpg"))[:n]
    from histomil.features.tile_encoder import EncoderInfo

    info = EncoderInfo(name="fit", input_size=size, mean=(0.5,) * 3, std=(0.5,) * 3, dim=1)
    return np.stack([fit_tile(read_rgb(p), info) for p in paths])


def relative_error(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(got - ref).max() / np.abs(ref).max())


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


@pytest.mark.parametrize("name", ["efficientnet_lite0", "uni_v1"])
def test_gpu_features_match_the_cpu(name):
    """fp32 on the GPU (TF32 off) equals the CPU's fp32 up to summation order; bf16 stays close."""
    encoder = build_encoder(name, pretrained=name == "efficientnet_lite0", precision="fp32", device="cpu")
    tiles = demo_tiles(32, encoder.info.input_size)
    ref = encoder.encode(tiles, 16)
    gpu = encoder.to("cuda").encode(tiles, 16)
    encoder.precision = "bf16"
    bf16 = encoder.encode(tiles, 16)
    encoder.precision = "fp16"
    fp16 = encoder.encode(tiles, 16)
    err, cos, cos16 = relative_error(gpu, ref), cosine(bf16, ref).min(), cosine(fp16, ref).min()
    print(f"\n{name} on {torch.cuda.get_device_name()}: fp32 max |GPU - CPU| / max |CPU| = {err:.2e}; "
          f"min cosine to CPU fp32: bf16 {cos:.5f}, fp16 {cos16:.5f}")
    assert err < 1e-4
    assert cos > 0.99 and cos16 > 0.99


def test_training_on_the_gpu_follows_the_cpu_and_its_checkpoint_predicts_the_same_on_the_cpu(tmp_path):
    from histomil.evaluation.evaluate import evaluate_sets
    from histomil.training.trainer import TrainConfig, train

    train_bags, _ = make_bags(16, seed=1)
    val_bags, _ = make_bags(8, seed=2, prefix="v")
    cfg = dict(model="gated_abmil", model_kwargs={"dropout": 0.0}, epochs=4, min_epochs=0, seed=3)
    cpu = train(train_bags, val_bags, TrainConfig(**cfg, device="cpu"), tmp_path / "cpu")
    gpu = train(train_bags, val_bags, TrainConfig(**cfg, device="cuda"), tmp_path / "gpu")
    env = json.loads((tmp_path / "gpu" / "environment.json").read_text())
    assert env == {"device": "cuda:0", "device_name": torch.cuda.get_device_name(0), "precision": "fp32"}
    losses = np.array([[r["train_loss"], r["val_loss"]] for r in gpu.history])
    ref = np.array([[r["train_loss"], r["val_loss"]] for r in cpu.history])
    print(f"\nGPU vs CPU training, 4 epochs: max relative loss difference {np.abs(losses / ref - 1).max():.2e}")
    np.testing.assert_allclose(losses, ref, rtol=1e-4)

    test_dir = tmp_path / "test"
    test_dir.mkdir()
    for b in val_bags:
        write_feature_bag(test_dir / f"{b.bag_id}.h5", b)
    probs = {}
    for device in ("cpu", "cuda"):
        evaluate_sets(tmp_path / "gpu" / "model.pt", {"test": test_dir}, tmp_path / f"eval_{device}", device=device)
        lines = (tmp_path / f"eval_{device}" / "predictions_test.csv").read_text().splitlines()[1:]
        probs[device] = np.array([float(line.split(",")[2]) for line in lines])
    np.testing.assert_allclose(probs["cuda"], probs["cpu"], atol=2e-6)


def test_torchrun_with_nccl_equals_a_plain_gpu_process(tmp_path):
    """One rank under torchrun takes the DDP path (nccl, the GPU of LOCAL_RANK) and trains as a plain run."""
    for name, n, seed in (("train", 12, 1), ("val", 8, 2)):
        (tmp_path / name).mkdir()
        for b in make_bags(n, seed=seed, prefix=name[0])[0]:
            write_feature_bag(tmp_path / name / f"{b.bag_id}.h5", b)
    (tmp_path / "cfg.yaml").write_text(CONFIG)
    args = ["train", tmp_path / "train", "--val", tmp_path / "val", "--config", tmp_path / "cfg.yaml", "--epochs", 3,
            "--min-epochs", 0, "--seed", 3, "--device", "cuda"]
    env = {k: v for k, v in os.environ.items() if k not in RANK_VARIABLES}
    env["HF_HUB_OFFLINE"] = "1"
    runs = {}
    for name, launcher in (("plain", []), ("ddp", ["-m", "torch.distributed.run", "--nproc-per-node", "1", "--standalone"])):
        cmd = [sys.executable, *launcher, "-m", "histomil", *map(str, args), "--out", str(tmp_path / name)]
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        runs[name] = history(tmp_path / name)
        assert json.loads((tmp_path / name / "environment.json").read_text())["device"] == "cuda:0"
    for a, b in zip(runs["ddp"], runs["plain"], strict=True):
        for key in ("train_loss", "val_loss"):
            assert a[key] == pytest.approx(b[key], rel=1e-5)


def test_out_of_memory_halves_the_batch_on_a_real_gpu():
    """A ViT-B/16 batch of 2048 tiles does not fit in 3 GiB: the batch is halved until it fits and the
    features equal those of small batches (bf16: up to the kernels' batch effects)."""
    torch.manual_seed(0)
    encoder = build_encoder("timm:vit_base_patch16_224", pretrained=False, precision="bf16", device="cuda")
    rng = np.random.default_rng(0)
    tiles = rng.integers(0, 256, size=(2048, 224, 224, 3), dtype=np.uint8)
    ref = encode_in_batches(encoder, tiles, 128)
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(3 * 2**30 / total)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = encode_in_batches(encoder, tiles, 2048)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    halvings = [str(w.message) for w in caught if "ran out of memory" in str(w.message)]
    print(f"\nOOM halving under a 3 GiB cap: {halvings}; min cosine to batch-128 features "
          f"{cosine(got, ref).min():.5f}")
    assert halvings and halvings[0].endswith("batches of 1024")
    assert cosine(got, ref).min() > 0.999


def test_pixel_training_runs_on_the_gpu(tmp_path):
    """End-to-end training from pixels on the GPU: the encoder and head train, the checkpoint loads on the CPU."""
    from histomil.data.bags import load_bags
    from histomil.training.checkpoint import load_checkpoint
    from histomil.training.pixels import PixelTrainConfig, predict_pixels, train_pixels

    rng = np.random.default_rng(0)
    from PIL import Image

    for split, n in (("train", 6), ("val", 4)):
        rows = ["case,y_true"]
        for i in range(n):
            folder = tmp_path / split / str(i)
            folder.mkdir(parents=True)
            for j in range(4):
                tile = np.clip(rng.normal([220, 170, 200], 12, size=(64, 64, 3)), 0, 255)
                if i % 2 and j == 0:
                    tile[10:40, 10:40] = [70, 30, 110]
                Image.fromarray(tile.astype(np.uint8)).save(folder / f"t{j}.png")
            rows.append(f"{i},{i % 2}")
        (tmp_path / split / "labels.csv").write_text("\n".join(rows) + "\n")
    train_bags, val_bags = load_bags(tmp_path / "train"), load_bags(tmp_path / "val")
    cfg = PixelTrainConfig(input_size=64, pretrained=True, finetune="all", epochs=3, min_epochs=0, seed=5,
                           num_workers=0, precision="bf16", device="cuda")
    result = train_pixels(train_bags, val_bags, cfg, tmp_path / "run")
    assert result.epochs_run == 3
    env = json.loads((tmp_path / "run" / "environment.json").read_text())
    assert env["device"] == "cuda:0" and env["precision"] == "bf16"
    model, _ = load_checkpoint(result.model_path)
    probs = np.stack([p for p, _ in predict_pixels(model, val_bags, num_workers=0)])
    assert np.allclose(probs.sum(1), 1.0, atol=1e-5)
    y = np.array([b.label for b in val_bags])
    loss = -np.mean(np.log(probs[np.arange(len(y)), y]))
    print(f"\npixel training on the GPU (bf16): best val loss {result.best_metrics['val_loss']:.4f}, "
          f"the checkpoint on the CPU (bf16 -> its own precision) {loss:.4f}")
    assert loss == pytest.approx(result.best_metrics["val_loss"], rel=0.05)
