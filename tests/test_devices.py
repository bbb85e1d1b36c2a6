"""--device: resolution and its errors, what runs record, OOM batch halving, checkpoints across devices.

This machine has no GPU: the CUDA paths are checked through their guards (a GPU asked for and absent,
an index beyond the GPUs there are, which ``auto`` picks when torch reports a GPU).
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from histomil.cli import app
from histomil.devices import check_device_name, device_record, is_out_of_memory, resolve_device, to_device
from histomil.errors import HistomilError
from histomil.features.tile_encoder import EncoderInfo, TileEncoder, encode_in_batches
from histomil.hardware import cpu_name

runner = CliRunner()


def test_resolve_cpu_and_auto_without_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")


def test_auto_picks_the_gpu_when_torch_reports_one(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cuda:1") == torch.device("cuda", 1)


def test_gpu_absent_or_beyond_the_count_is_one_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(HistomilError, match=r"device 'cuda' requested but no CUDA GPU is available.*--device cpu"):
        resolve_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(HistomilError, match=r"'cuda:7' requested but this machine has 1 CUDA GPU\(s\): cuda:0 to cuda:0"):
        resolve_device("cuda:7")


@pytest.mark.parametrize("bad", ["tpu", "gpu", "cuda:x", "mps", ""])
def test_unknown_device_names_are_refused(bad):
    with pytest.raises(HistomilError, match="unknown device"):
        resolve_device(bad)
    with pytest.raises(ValueError, match="unknown device"):
        check_device_name(bad)


def test_config_spellings_accepted():
    assert [check_device_name(n) for n in ("cpu", "cuda", "cuda:3", "auto")] == ["cpu", "cuda", "cuda:3", "auto"]


def test_to_device_on_cpu_keeps_values():
    t = torch.arange(12, dtype=torch.uint8).view(3, 4)
    assert torch.equal(to_device(t, torch.device("cpu")), t)


def test_device_record_names_the_cpu_and_precision():
    assert device_record("cpu", "bf16") == {"device": "cpu", "device_name": cpu_name(), "precision": "bf16"}


def test_out_of_memory_recognised():
    assert is_out_of_memory(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert is_out_of_memory(RuntimeError("CUDA error: out of memory"))
    assert not is_out_of_memory(RuntimeError("shape mismatch"))


class _LimitedMemory(torch.nn.Module):
    """An encoder that runs out of 'GPU memory' on batches above ``limit`` tiles."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit, self.sizes = limit, []

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        self.sizes.append(x.shape[0])
        if x.shape[0] > self.limit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return x.mean(dim=(2, 3))


def test_encoding_halves_the_batch_on_out_of_memory_with_the_same_features():
    info = EncoderInfo(name="limited", input_size=8, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), dim=3)
    tiles = np.random.default_rng(0).integers(0, 256, size=(20, 8, 8, 3), dtype=np.uint8)
    expected = encode_in_batches(TileEncoder(_LimitedMemory(100), info).eval(), tiles, 20)
    backbone = _LimitedMemory(5)
    with pytest.warns(UserWarning, match="ran out of memory: encoding in batches of 5"):
        got = encode_in_batches(TileEncoder(backbone, info).eval(), tiles, 20)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
    assert backbone.sizes == [20, 10, 5, 5, 5, 5]


def test_non_finite_features_are_refused_before_anything_is_written():
    class Overflow(torch.nn.Module):
        def forward_features(self, x):
            out = x.mean(dim=(2, 3))
            out[1, 0] = float("inf")
            return out

    info = EncoderInfo(name="overflowing", input_size=8, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), dim=3)
    tiles = np.zeros((4, 8, 8, 3), np.uint8)
    with pytest.raises(HistomilError, match=r"encoder 'overflowing' \(fp32\) gave non-finite features for 1 of 4 tiles$"):
        encode_in_batches(TileEncoder(Overflow(), info).eval(), tiles, 4)


def test_fp16_is_for_gpus_only(tmp_path):
    from histomil.features.encoders import build_encoder

    with pytest.raises(HistomilError, match="precision fp16 runs only on a CUDA GPU; use bf16 or fp32 here"):
        build_encoder("efficientnet_lite0", precision="fp16", device="cpu")
    (tmp_path / "bags" / "a").mkdir(parents=True)
    result = runner.invoke(app, ["features", "extract", str(tmp_path / "bags"), str(tmp_path / "out"), "--precision", "fp16"])
    assert result.exit_code == 2 and [ln for ln in result.output.splitlines() if ln.strip()] == [
        "error: precision fp16 runs only on a CUDA GPU; use bf16 or fp32 here"]


def test_other_errors_are_not_retried():
    class Broken(torch.nn.Module):
        def forward_features(self, x):
            raise RuntimeError("shape mismatch")

    info = EncoderInfo(name="broken", input_size=8, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), dim=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(RuntimeError, match="shape mismatch"):
            encode_in_batches(TileEncoder(Broken(), info).eval(), np.zeros((4, 8, 8, 3), np.uint8), 4)


@pytest.mark.parametrize("command", [
    ["features", "extract", "SRC", "OUT"],
    ["features", "slides", "SRC", "--out", "OUT"],
    ["predict", "MODEL", "SRC", "--out", "OUT/p.csv"],
    ["evaluate", "MODEL", "SRC", "--out", "OUT"],
    ["predict-slides", "MODEL", "SRC", "--out", "OUT"],
    ["heatmap", "MODEL", "SRC", "--out", "OUT"],
    ["train", "SRC", "--val", "SRC", "--out", "OUT"],
])
def test_commands_refuse_an_absent_gpu_in_one_line(tmp_path, monkeypatch, command):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    from toy_bags import make_bags

    from histomil.features.store import write_feature_bag
    from histomil.models.registry import build_model
    from histomil.training.checkpoint_file import save_checkpoint

    src = tmp_path / "src"
    src.mkdir()
    bags, _ = make_bags(2, seed=0)
    for b in bags:
        write_feature_bag(src / f"{b.bag_id}.h5", b)
    model = tmp_path / "model.pt"
    save_checkpoint(model, build_model("abmil", 16), "abmil", {}, 2, None, None)
    args = [str(src) if a == "SRC" else str(model) if a == "MODEL" else a.replace("OUT", str(tmp_path / "out")) for a in command]
    result = runner.invoke(app, [*args, "--device", "cuda:1"])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines == ["error: device 'cuda:1' requested but no CUDA GPU is available "
                     f"(torch {torch.__version__}, CUDA build {torch.version.cuda or 'none'}); use --device cpu or auto"]


def test_checkpoint_loads_on_the_device_asked_for(tmp_path):
    """Checkpoints are read with map_location='cpu' and then moved: one trained on a GPU loads here."""
    from histomil.models.registry import build_model
    from histomil.training.checkpoint import load_checkpoint
    from histomil.training.checkpoint_file import save_checkpoint

    torch.manual_seed(0)
    net = build_model("gated_abmil", 16)
    path = save_checkpoint(tmp_path / "model.pt", net, "gated_abmil", {}, 2, None, None)
    model, _meta = load_checkpoint(path, resolve_device("auto"))
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    for a, b in zip(net.state_dict().values(), model.state_dict().values()):
        assert torch.equal(a, b)


def test_training_and_evaluation_record_the_device(tmp_path):
    from toy_bags import make_bags

    from histomil.evaluation.evaluate import evaluate_sets
    from histomil.features.store import write_feature_bag
    from histomil.training.trainer import TrainConfig, train

    train_bags, _ = make_bags(12, seed=1)
    val_bags, _ = make_bags(8, seed=2, prefix="v")
    train(train_bags, val_bags, TrainConfig(model="abmil", epochs=2, device="auto"), tmp_path / "run")
    env = json.loads((tmp_path / "run" / "environment.json").read_text())
    assert env == {"device": "cpu", "device_name": cpu_name(), "precision": "fp32"}
    test_dir = tmp_path / "test"
    test_dir.mkdir()
    for b in val_bags:
        write_feature_bag(test_dir / f"{b.bag_id}.h5", b)
    evaluate_sets(tmp_path / "run" / "model.pt", {"test": test_dir}, tmp_path / "eval", device="cpu")
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["environment"] == {"device": "cpu", "device_name": cpu_name(), "precision": "fp32"}
