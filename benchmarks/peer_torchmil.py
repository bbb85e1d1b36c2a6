"""Peer comparison with torchmil (PyPI ``torchmil`` 1.0.2): speed and classical-MIL accuracy, side by side.

torchmil is a BENCHMARK-ONLY dependency, never one of histomil's: ``make bench-env`` creates
``.venv-bench`` with histomil and ``benchmarks/requirements-peer.txt``; run this script with that
environment's Python. torchmil is only called here, none of its code is copied.

    make bench-env
    .venv-bench/bin/python benchmarks/peer_torchmil.py --data ../shared/data/mil --out benchmarks/results/
    .venv-bench/bin/python benchmarks/peer_torchmil.py --data ../shared/data/mil --quick --datasets musk1 --out /tmp/p

Two parts (``--parts``), both in this process with ``--threads`` intra-op torch threads (default 1):

* **speed**: for each model both libraries have (``PAIRS``: ours by registry name with its registry
  defaults, theirs configured to the same sizes where its API allows; see ``PAIRS`` and the
  Markdown's model table for what still differs) and each bag size ``--sizes`` (random 1280-d
  features, one bag, no mask, the SAME tensor for both): ``infer`` = eval, no grad, each library's
  bag prediction (ours ``model(x)``, theirs ``model.predict(x, return_inst_pred=False)``); ``train``
  = train mode, forward + each library's own loss (ours :func:`bag_loss`, theirs the sum of
  ``compute_loss``'s terms, as torchmil's Trainer adds them) + backward + one Adam step. One cold
  call each, then ``--repeats`` calls each (3 when a cold call took over 5 s), INTERLEAVED (ours,
  theirs, then theirs, ours, ...) so that machine load hits both alike; the median per library and
  the ratio histomil / torchmil (< 1: histomil faster).
* **accuracy**: Musk1, Musk2, Elephant with EXACTLY the protocol of ``classical_mil.py`` (its
  :func:`protocol_folds` -- same folds, seeds and training-fold standardisation -- and its
  :func:`train_and_test` -- same Adam settings, epochs, bag order and seed), ours
  ``abmil_small`` / ``gated_abmil_small`` against torchmil's ``ABMIL`` (plain / gated) with the
  paper's small network as its ``feat_ext`` (fc 256-128-64, ReLU) and ``att_dim=64``, trained on
  its own loss (BCE on one logit; predicted positive when the logit > 0). Reported: mean test
  accuracy ± standard error over all folds of all repetitions per library, the ratio
  histomil / torchmil, and the paired per-fold difference (histomil - torchmil) ± its SE.
  Default: repetitions 0 and 1 (``--reps 2 --first-rep 0``) of 10-fold CV, 30 epochs.

Writes ``peer_torchmil.csv`` (speed rows, then one row per dataset/model/rep/fold), ``peer_torchmil.json``
(settings, machine, model table with parameter counts, rows, summaries) and ``peer_torchmil.md`` to
``--out``, rewritten after every model pair and every dataset. Only ``torchmil`` needs the bench
environment: without it this module still imports, and ``main`` says so in one line (exit 2).
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from classical_mil import DATASETS, protocol_folds, run_fold, summarise, train_and_test
from common import machine, size_cells, training_step, write_json, write_text

from histomil.data.mil_csv import load_mil_csv
from histomil.errors import HistomilError
from histomil.models.registry import build_model

SIZES = (100, 1_000, 10_000)
DIM = 1280
TORCHMIL_VERSION = "1.0.2"  # what benchmarks/requirements-peer.txt pins; the installed one is recorded


# --- the model pairs ---------------------------------------------------------------------


def _fc(in_dim: int, width: int = 512, dropout: float = 0.25) -> nn.Module:
    """Our ``EmbeddingMLP`` layout (Linear + ReLU + Dropout), built from torch layers, as torchmil's ``feat_ext``."""
    return nn.Sequential(nn.Linear(in_dim, width), nn.ReLU(), nn.Dropout(dropout))


class TorchmilPoolMIL(nn.Module):
    """torchmil has mean/max pooling LAYERS (``torchmil.nn.MeanPool`` / ``MaxPool``) but no MIL model around
    them; this adapter (ours) puts our fc before and one logit after, and trains on BCE like torchmil's models."""

    def __init__(self, in_dim: int, pool: nn.Module, width: int = 512) -> None:
        super().__init__()
        self.feat_ext = _fc(in_dim, width)
        self.pool = pool
        self.classifier = nn.Linear(width, 1)
        self.criterion = nn.BCEWithLogitsLoss()

    def forward(self, X: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.classifier(self.pool(self.feat_ext(X), mask)).squeeze(-1)

    def compute_loss(self, Y: torch.Tensor, X: torch.Tensor, mask: torch.Tensor | None = None):
        pred = self(X, mask)
        return pred, {"BCEWithLogitsLoss": self.criterion(pred.float(), Y.float())}

    def predict(self, X: torch.Tensor, mask: torch.Tensor | None = None, return_inst_pred: bool = False) -> torch.Tensor:
        return self(X, mask)


def _tm():
    import torchmil.models

    return torchmil.models


def _tm_nn():
    import torchmil.nn

    return torchmil.nn


# name -> (our registry name, torchmil builder(in_dim), torchmil class (text), configuration, what still differs)
PAIRS: dict[str, dict[str, Any]] = {
    "abmil": {
        "ours": "abmil",
        "theirs": lambda d: _tm().ABMIL(in_shape=(d,), att_dim=128, gated=False, feat_ext=_fc(d)),
        "theirs_name": "torchmil.models.ABMIL",
        "config": "both: fc 1280->512 + ReLU + dropout 0.25, tanh attention hidden 128; torchmil via "
                  "feat_ext=Linear/ReLU/Dropout, att_dim=128, gated=False",
        "differences": "ours: 2 logits + cross-entropy, dropout 0.25 also on the attention hidden layer; "
                       "torchmil: 1 logit + BCE, no attention dropout, no bias on the attention output",
    },
    "gated_abmil": {
        "ours": "gated_abmil",
        "theirs": lambda d: _tm().ABMIL(in_shape=(d,), att_dim=128, gated=True, feat_ext=_fc(d)),
        "theirs_name": "torchmil.models.ABMIL(gated=True)",
        "config": "as abmil, gated attention (tanh x sigmoid, hidden 128)",
        "differences": "as abmil",
    },
    "clam_sb": {
        "ours": "clam_sb",
        "theirs": lambda d: _tm().CLAM_SB(in_shape=(d,), att_dim=256, gated=True, k_sample=8,
                                          inst_loss_name="SmoothTop1SVM", feat_ext=_fc(d)),
        "theirs_name": "torchmil.models.CLAM_SB",
        "config": "both: fc 1280->512 + ReLU + dropout 0.25, gated attention hidden 256, k_sample 8, "
                  "smooth top-1 SVM instance loss, one instance classifier per class",
        "differences": "ours: 2 logits, loss 0.7 x CE + 0.3 x instance loss, dropout 0.25 in the attention net, "
                       "out-of-class top-k only (mutually exclusive); torchmil: 1 logit, loss BCE + instance loss "
                       "(unweighted sum, as its Trainer adds compute_loss's terms), no attention dropout",
    },
    "dsmil": {
        "ours": "dsmil",
        "theirs": lambda d: _tm().DSMIL(in_shape=(d,), att_dim=128, nonlinear_q=True, nonlinear_v=True, dropout=0.0),
        "theirs_name": "torchmil.models.DSMIL(nonlinear_q, nonlinear_v)",
        "config": "both: query MLP to 128 (2 layers), value Linear 1280->1280, linear instance classifier, "
                  "scaled dot product with the critical instance's query",
        "differences": "ours: query Linear-Tanh-Linear, value without ReLU, 2 classes with a Conv1d bag "
                       "classifier, CE on the averaged streams; torchmil: query Linear-ReLU-Linear-Tanh, value "
                       "+ ReLU, 1 logit per stream, loss BCE(bag) + BCE(max instance)",
    },
    "transmil": {
        "ours": "transmil",
        "theirs": lambda d: _tm().TransMIL(in_shape=(d,), att_dim=512, n_layers=2, n_heads=8, n_landmarks=256,
                                           pinv_iterations=6, dropout=0.1, use_mlp=False),
        "theirs_name": "torchmil.models.TransMIL",
        "config": "both: fc 1280->512, class token, squaring, 2 Nystrom layers (8 heads, 256 landmarks, "
                  "6 pinv iterations) around PPEG (7/5/3 depthwise convs), LayerNorm, linear head",
        "differences": "ours: ReLU after fc, attention output projection Linear 512->512 + dropout 0.1 (the "
                       "extra ~525k parameters), depthwise residual conv (kernel 33) on V, EXACT softmax attention "
                       "when the sequence is <= 256 tokens; torchmil: no ReLU, no output projection, no residual "
                       "conv, no dropout (its dropout only acts in the unused MLP), always Nystrom (pads the "
                       "sequence to a multiple of 256), 1 logit + BCE",
    },
    "mean_pool": {
        "ours": "mean_pool",
        "theirs": lambda d: TorchmilPoolMIL(d, _tm_nn().MeanPool()),
        "theirs_name": "torchmil.nn.MeanPool in an adapter",
        "config": "both: fc 1280->512 + ReLU + dropout 0.25, mean over instances, linear head",
        "differences": "torchmil has no mean-pool MIL model: ours fc + torchmil.nn.MeanPool + Linear(512, 1) + BCE; "
                       "ours also returns the uniform attention",
    },
    "max_pool": {
        "ours": "max_pool",
        "theirs": lambda d: TorchmilPoolMIL(d, _tm_nn().MaxPool()),
        "theirs_name": "torchmil.nn.MaxPool in an adapter",
        "config": "both: fc 1280->512 + ReLU + dropout 0.25, per-dimension max over instances, linear head",
        "differences": "torchmil has no max-pool MIL model: ours fc + torchmil.nn.MaxPool + Linear(512, 1) + BCE; "
                       "ours also computes each instance's share of the max (its attention map)",
    },
}


def small_feat_ext(in_dim: int, hidden: tuple[int, ...] = (256, 128, 64)) -> nn.Module:
    """The paper's instance network (fc 256-128-64, ReLU, no dropout) as torchmil's ``feat_ext``."""
    layers: list[nn.Module] = []
    for width in hidden:
        layers += [nn.Linear(in_dim, width), nn.ReLU()]
        in_dim = width
    return nn.Sequential(*layers)


# accuracy pairs: our registry model -> torchmil builder(in_dim) and name
SMALL_PAIRS: dict[str, dict[str, Any]] = {
    "abmil_small": {
        "theirs": lambda d: _tm().ABMIL(in_shape=(d,), att_dim=64, gated=False, feat_ext=small_feat_ext(d)),
        "theirs_name": "torchmil ABMIL(feat_ext=fc 256-128-64, att_dim=64)",
    },
    "gated_abmil_small": {
        "theirs": lambda d: _tm().ABMIL(in_shape=(d,), att_dim=64, gated=True, feat_ext=small_feat_ext(d)),
        "theirs_name": "torchmil ABMIL(feat_ext=fc 256-128-64, att_dim=64, gated=True)",
    },
}
SMALL_DIFFERENCES = ("ours: 2 logits + cross-entropy (argmax); torchmil: 1 logit + BCE (positive when logit > 0), "
                     "no bias on the attention output layer; same layers and sizes otherwise, no dropout in either")


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --- one library's calls -----------------------------------------------------------------


def ours_calls(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, Callable[[], None]]:
    """histomil: ``infer`` and ``train`` (forward, :func:`bag_loss`, backward, Adam step) on bag ``x``."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)

    def infer() -> None:
        model.eval()
        with torch.no_grad():
            model(x)

    def train() -> None:
        training_step(model, opt, x, y)

    return {"infer": infer, "train": train}


def theirs_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """torchmil's training loss on one bag: the sum of ``compute_loss``'s terms (its Trainer's default)."""
    _, losses = model.compute_loss(y.float(), x)
    return sum(losses.values())


def theirs_calls(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, Callable[[], None]]:
    """torchmil: ``infer`` (``predict``, bag logits only) and ``train`` (its own loss, backward, Adam step)."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)

    def infer() -> None:
        model.eval()
        with torch.no_grad():
            model.predict(x, return_inst_pred=False)

    def train() -> None:
        model.train()
        loss = theirs_loss(model, x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return {"infer": infer, "train": train}


def _timed(call: Callable[[], None]) -> float:
    t0 = time.perf_counter()
    call()
    return time.perf_counter() - t0


def interleaved(ours: Callable[[], None], theirs: Callable[[], None], repeats: int, slow: float = 5.0) -> dict[str, Any]:
    """One cold call each, then ``repeats`` (3 if a cold call took over ``slow`` s) alternating calls; medians."""
    cold_o, cold_t = _timed(ours), _timed(theirs)
    if max(cold_o, cold_t) > slow:
        repeats = min(repeats, 3)
    t_o: list[float] = []
    t_t: list[float] = []
    for r in range(repeats):
        if r % 2 == 0:
            t_o.append(_timed(ours))
            t_t.append(_timed(theirs))
        else:
            t_t.append(_timed(theirs))
            t_o.append(_timed(ours))
    mo, mt = statistics.median(t_o), statistics.median(t_t)
    return {"ours_seconds": mo, "theirs_seconds": mt, "ratio": mo / mt if mt > 0 else float("nan"),
            "ours_cold_seconds": cold_o, "theirs_cold_seconds": cold_t, "repeats": repeats}


def model_table(pairs: list[str], dim: int) -> list[dict[str, Any]]:
    """Per pair: both models' classes, parameter counts at ``dim``-d input, configuration and differences."""
    out = []
    for name in pairs:
        spec = PAIRS[name]
        torch.manual_seed(0)
        out.append({"pair": name, "ours": f"histomil {spec['ours']} (registry defaults)",
                    "ours_params": n_params(build_model(spec["ours"], dim, 2)),
                    "theirs": spec["theirs_name"], "theirs_params": n_params(spec["theirs"](dim)),
                    "config": spec["config"], "differences": spec["differences"]})
    return out


def run_speed(a: argparse.Namespace, rows: list[dict], on_progress: Callable[[], None]) -> None:
    """Every pair x size x mode, interleaved; appends rows (``status`` says why one failed)."""
    for name in a.models:
        spec = PAIRS[name]
        for n in sorted(a.sizes):
            torch.manual_seed(0)
            x = torch.randn(1, n, a.dim)
            y = torch.tensor([1])
            torch.manual_seed(1)
            ours_model = build_model(spec["ours"], a.dim, 2)
            torch.manual_seed(1)
            theirs_model = spec["theirs"](a.dim)
            ours, theirs = ours_calls(ours_model, x, y), theirs_calls(theirs_model, x, y)
            for mode in a.modes:
                row: dict[str, Any] = {"part": "speed", "pair": name, "n": n, "mode": mode, "threads": a.threads}
                try:
                    row.update(interleaved(ours[mode], theirs[mode], a.repeats), status="ok")
                except Exception as exc:  # noqa: BLE001 - a peer's failure is a result, not a crash
                    row["status"] = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
                rows.append(row)
                msg = (f"histomil {row['ours_seconds']:.4f} s, torchmil {row['theirs_seconds']:.4f} s, "
                       f"ratio {row['ratio']:.2f}") if row["status"] == "ok" else row["status"]
                print(f"speed {name} {mode} N={n}: {msg}", flush=True)
            del ours_model, theirs_model, ours, theirs, x
        on_progress()


# --- accuracy ----------------------------------------------------------------------------


def theirs_fold(name: str, f: Any, epochs: int) -> float:
    """torchmil's small ABMIL on one fold, through classical_mil's own training loop."""
    builder = SMALL_PAIRS[name]["theirs"]
    return train_and_test(
        lambda: builder(f.train_x[0].shape[-1]),
        theirs_loss,
        lambda model, x: int(float(model.predict(x, return_inst_pred=False).reshape(-1)[0]) > 0.0),
        f.train_x, f.train_y, f.test_x, f.test_y, epochs, f.seed,
    )


def run_accuracy(a: argparse.Namespace, rows: list[dict], on_progress: Callable[[], None]) -> None:
    """Every dataset x rep x fold x small pair: ours then theirs (order alternating by fold), same fold and seed."""
    for ds in a.datasets:
        bags = load_mil_csv(a.data / f"{ds}.csv")
        for f in protocol_folds(bags, a.reps, a.folds, a.first_rep):
            for m in a.acc_models:
                res: dict[str, float] = {}

                def do(lib: str, m: str = m, f: Any = f, res: dict = res) -> None:
                    t0 = time.perf_counter()
                    acc = (run_fold(m, f.train_x, f.train_y, f.test_x, f.test_y, a.epochs, seed=f.seed, dropout=0.0)[0]
                           if lib == "ours" else theirs_fold(m, f, a.epochs))
                    res[f"{lib}_accuracy"], res[f"{lib}_seconds"] = acc, round(time.perf_counter() - t0, 3)

                for lib in (("ours", "theirs") if f.fold % 2 == 0 else ("theirs", "ours")):
                    do(lib)
                row = {"part": "accuracy", "pair": m, "dataset": ds, "rep": f.rep, "fold": f.fold,
                       "n_test": len(f.test_y), **res, "status": "ok"}
                rows.append(row)
                print(f"accuracy {ds} {m} rep {f.rep} fold {f.fold}: histomil {res['ours_accuracy']:.3f} "
                      f"({res['ours_seconds']:.1f} s), torchmil {res['theirs_accuracy']:.3f} "
                      f"({res['theirs_seconds']:.1f} s)", flush=True)
        on_progress()


def accuracy_summary(rows: list[dict], folds: int) -> list[dict]:
    """Per dataset and pair: each library's mean ± SE (classical_mil's :func:`summarise`), ratio, paired difference."""
    acc = [r for r in rows if r["part"] == "accuracy"]
    long = [{"dataset": r["dataset"], "model": f"{lib}:{r['pair']}", "rep": r["rep"], "accuracy": r[f"{lib}_accuracy"]}
            for r in acc for lib in ("ours", "theirs")]
    per = {(s["dataset"], s["model"]): s for s in summarise(long, folds)} if long else {}
    out = []
    for ds in dict.fromkeys(r["dataset"] for r in acc):
        for m in dict.fromkeys(r["pair"] for r in acc if r["dataset"] == ds):
            o, t = per[(ds, f"ours:{m}")], per[(ds, f"theirs:{m}")]
            diff = np.array([r["ours_accuracy"] - r["theirs_accuracy"] for r in acc if r["dataset"] == ds and r["pair"] == m])
            secs = {lib: float(np.mean([r[f"{lib}_seconds"] for r in acc if r["dataset"] == ds and r["pair"] == m]))
                    for lib in ("ours", "theirs")}
            out.append({
                "dataset": ds, "pair": m, "theirs": SMALL_PAIRS[m]["theirs_name"], "protocol": o["protocol"],
                "n_folds_total": o["n_folds_total"],
                "ours_mean": o["accuracy_mean"], "ours_se": o["accuracy_se"], "ours_rep_means": o["rep_means"],
                "theirs_mean": t["accuracy_mean"], "theirs_se": t["accuracy_se"], "theirs_rep_means": t["rep_means"],
                "ratio": o["accuracy_mean"] / t["accuracy_mean"] if t["accuracy_mean"] > 0 else float("nan"),
                "paired_diff_mean": float(diff.mean()),
                "paired_diff_se": float(diff.std(ddof=1) / math.sqrt(diff.size)) if diff.size > 1 else float("nan"),
                "ours_seconds_per_fold": secs["ours"], "theirs_seconds_per_fold": secs["theirs"],
            })
    return out


# --- outputs -----------------------------------------------------------------------------


def markdown(rows: list[dict], models: list[dict], acc_summary: list[dict], settings: dict[str, Any]) -> str:
    """Model table, speed tables (histomil / torchmil seconds and their ratio) and the accuracy table."""
    out = [f"# histomil vs torchmil {settings.get('torchmil_version', '?')}\n",
           f"torch {settings.get('torch', '?')}, {settings.get('threads')} intra-op thread(s), CPU.\n"]
    if models:
        out += [f"## Models (parameters at {settings['dim']}-d input, 2 classes for histomil, 1 logit for torchmil)\n",
                "| pair | histomil | params | torchmil | params | configured alike | still different |",
                "|---|---|---|---|---|---|---|"]
        out += [f"| {m['pair']} | {m['ours']} | {m['ours_params']:,} | {m['theirs']} | {m['theirs_params']:,} | "
                f"{m['config']} | {m['differences']} |" for m in models]
        out.append("")
    speed = [r for r in rows if r["part"] == "speed"]
    if speed:
        sizes = sorted({r["n"] for r in speed})
        out.append("## Speed: median seconds, histomil / torchmil (ratio histomil ÷ torchmil; < 1 = histomil faster)\n")
        for mode in ("infer", "train"):
            if not any(r["mode"] == mode for r in speed):
                continue
            out.append(f"**{'inference (eval, no grad)' if mode == 'infer' else 'one training step (forward + own loss + backward + Adam)'}**\n")
            out.append("| model | " + " | ".join(f"N={n:,}" for n in sizes) + " |")
            out.append("|---|" + "---|" * len(sizes))
            for m in dict.fromkeys(r["pair"] for r in speed if r["mode"] == mode):
                cells = size_cells(speed, "pair", m, mode, sizes,
                                   lambda r: f"{r['ours_seconds']:.3g} / {r['theirs_seconds']:.3g} (**{r['ratio']:.2f}**)")
                out.append(f"| {m} | " + " | ".join(cells) + " |")
            out.append("")
    if acc_summary:
        s0 = acc_summary[0]
        out.append(f"## Accuracy: classical MIL, {s0['protocol']} CV, {settings.get('epochs')} epochs, classical_mil.py's "
                   "folds, standardisation, optimizer and loop for both\n")
        out.append(f"histomil `abmil_small` / `gated_abmil_small` vs torchmil `ABMIL` with the same instance network "
                   f"(fc 256-128-64) and attention hidden 64. {SMALL_DIFFERENCES}. ± = standard error over folds; "
                   "paired = per-fold difference histomil - torchmil (same folds, same seeds).\n")
        out.append("| dataset | model | histomil | torchmil | ratio | paired diff | s/fold histomil / torchmil |")
        out.append("|---|---|---|---|---|---|---|")
        for s in acc_summary:
            out.append(f"| {s['dataset']} | {s['pair']} | {s['ours_mean']:.3f} ± {s['ours_se']:.3f} | "
                       f"{s['theirs_mean']:.3f} ± {s['theirs_se']:.3f} | {s['ratio']:.3f} | "
                       f"{round(s['paired_diff_mean'], 3) + 0.0:+.3f} ± {s['paired_diff_se']:.3f} | "  # no "-0.000"
                       f"{s['ours_seconds_per_fold']:.1f} / {s['theirs_seconds_per_fold']:.1f} |")
        out.append("")
    return "\n".join(out) + "\n"


FIELDS = ["part", "pair", "mode", "n", "threads", "dataset", "rep", "fold", "n_test", "status",
          "ours_seconds", "theirs_seconds", "ratio", "ours_cold_seconds", "theirs_cold_seconds", "repeats",
          "ours_accuracy", "theirs_accuracy"]


def write_outputs(a: argparse.Namespace, rows: list[dict], models: list[dict], settings: dict[str, Any],
                  t_start: float) -> None:
    """(Re)write peer_torchmil.csv/.json/.md from everything measured so far."""
    a.out.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=FIELDS, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    write_text(a.out / "peer_torchmil.csv", buf.getvalue())
    acc = accuracy_summary(rows, a.folds)
    write_json(a.out / "peer_torchmil.json", {
        "settings": settings, "machine": machine(), "models": models,
        "small_models": {m: {"ours": m, "theirs": SMALL_PAIRS[m]["theirs_name"], "differences": SMALL_DIFFERENCES}
                         for m in a.acc_models},
        "speed": [r for r in rows if r["part"] == "speed"], "accuracy_summary": acc,
        "accuracy_rows": [r for r in rows if r["part"] == "accuracy"],
        "total_seconds": round(time.perf_counter() - t_start, 1)})
    write_text(a.out / "peer_torchmil.md", markdown(rows, models, acc, settings))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--parts", nargs="+", default=["speed", "accuracy"], choices=["speed", "accuracy"])
    p.add_argument("--data", type=Path, help="folder with musk1.csv, musk2.csv, elephant.csv (accuracy part)")
    p.add_argument("--threads", type=int, default=1)
    # speed
    p.add_argument("--models", nargs="+", default=list(PAIRS), choices=list(PAIRS), help="speed: model pairs")
    p.add_argument("--sizes", type=int, nargs="+", default=list(SIZES), help="speed: instances per bag")
    p.add_argument("--modes", nargs="+", default=["infer", "train"], choices=["infer", "train"])
    p.add_argument("--repeats", type=int, default=5, help="speed: timed calls per library after the cold one")
    p.add_argument("--dim", type=int, default=DIM)
    # accuracy (classical_mil.py's protocol)
    p.add_argument("--datasets", nargs="+", default=list(DATASETS))
    p.add_argument("--acc-models", nargs="+", default=list(SMALL_PAIRS), choices=list(SMALL_PAIRS))
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--first-rep", type=int, default=0, help="index (and CV seed) of the first repetition")
    p.add_argument("--folds", type=int, default=10)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--quick", action="store_true", help="speed: N=64, 1 repeat; accuracy: 1 rep, 2 folds, 2 epochs")
    a = p.parse_args(argv)
    if a.quick:
        a.sizes, a.repeats, a.reps, a.folds, a.epochs = [64], 1, 1, 2, 2
    if "accuracy" in a.parts and a.data is None:
        p.error("--data is required for the accuracy part")
    try:
        from importlib.metadata import version

        import torchmil  # noqa: F401

        tm_version = version("torchmil")
    except ImportError:
        print("error: torchmil is not installed here: run `make bench-env` and use .venv-bench/bin/python", file=sys.stderr)
        return 2
    torch.set_num_threads(a.threads)
    t_start = time.perf_counter()
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()}
    settings.update(torchmil_version=tm_version, torch=torch.__version__, speed_input="random N(0,1) features, one bag, no mask",
                    accuracy_protocol="classical_mil.py: protocol_folds + train_and_test (Adam lr 5e-4, betas 0.9/0.999, "
                                      "weight decay 5e-4, one bag per step, fixed epochs, no early stopping)")
    rows: list[dict] = []
    models = model_table(a.models, a.dim) if "speed" in a.parts else []

    def progress() -> None:
        write_outputs(a, rows, models, settings, t_start)

    try:
        if "speed" in a.parts:
            run_speed(a, rows, progress)
        if "accuracy" in a.parts:
            run_accuracy(a, rows, progress)
    except HistomilError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    progress()
    print(markdown(rows, models, accuracy_summary(rows, a.folds), settings))
    return 0 if all(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
