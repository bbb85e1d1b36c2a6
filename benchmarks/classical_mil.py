"""Classical MIL benchmarks (Musk1, Musk2, Elephant) with the protocol of Ilse et al. (2018), Table 1.

Protocol: ``--reps`` repetitions of stratified ``--folds``-fold cross-validation over BAGS (each
repetition reshuffles the folds with its own seed); per fold, features are standardised with the
mean/std of the TRAINING fold's instances only; the small network of the paper (instance fc
256-128-64 with ReLU, attention pooling plain or gated with hidden size 64, linear classifier) is
trained from scratch with Adam (lr 5e-4, betas 0.9/0.999, weight decay 5e-4), one bag per step,
for a FIXED number of epochs (``--epochs``; no early stopping and no model selection, so the test
fold is never looked at before the final evaluation). Reported: test accuracy, mean over all
folds of all repetitions, with the standard error of that mean.

    python benchmarks/classical_mil.py --data ../shared/data/mil --reps 5 --folds 10 --out benchmarks/results/
    python benchmarks/classical_mil.py --data ../shared/data/mil --quick --out /tmp/q   # smoke test

Writes ``classical_mil.csv`` (one row per dataset/model/rep/fold), ``classical_mil.json`` (summary
plus settings and machine) and ``classical_mil.md`` (the summary table) to ``--out``.
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.model_selection import StratifiedKFold, train_test_split
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, write_json, write_text

from histomil.data.mil_csv import load_mil_csv
from histomil.errors import HistomilError
from histomil.features.store import FeatureBag
from histomil.models.registry import build_model

DATASETS = ("musk1", "musk2", "elephant")
MODELS = ("abmil_small", "gated_abmil_small")
PUBLISHED = {  # Ilse et al. 2018, Table 1 (mean accuracy); best published = best row of that table
    "Ilse et al. attention": {"musk1": 0.892, "musk2": 0.858, "elephant": 0.868},
    "Ilse et al. gated attention": {"musk1": 0.900, "musk2": 0.863, "elephant": 0.857},
    "best published (Table 1)": {"musk1": 0.909, "musk2": 0.903, "elephant": 0.872},
}


def standardise(train: list[FeatureBag], test: list[FeatureBag]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(1, N, D) tensors scaled with the training instances' mean and std (constant features -> std 1)."""
    stacked = np.concatenate([b.features for b in train]).astype(np.float64)
    mean, std = stacked.mean(0), stacked.std(0)
    std[std < 1e-12] = 1.0

    def scale(bags: list[FeatureBag]) -> list[torch.Tensor]:
        return [torch.from_numpy(((b.features - mean) / std).astype(np.float32)).unsqueeze(0) for b in bags]

    return scale(train), scale(test)


class Fold(NamedTuple):
    """One test fold of one repetition, standardised with its training fold's statistics."""

    rep: int
    fold: int
    train_x: list[torch.Tensor]
    train_y: np.ndarray
    test_x: list[torch.Tensor]
    test_y: np.ndarray
    seed: int  # seeds the model's initialisation and the order of the training bags


def protocol_folds(bags: list[FeatureBag], reps: int, folds: int, first_rep: int = 0) -> Iterator[Fold]:
    """The protocol's folds: repetition ``rep`` is a stratified ``folds``-fold split shuffled with seed ``rep``."""
    y = np.array([b.label for b in bags])
    for rep in range(first_rep, first_rep + reps):
        skf = StratifiedKFold(n_splits=folds, shuffle=True, random_state=rep)
        for fold, (tr, te) in enumerate(skf.split(np.zeros(len(y)), y)):
            train_x, test_x = standardise([bags[i] for i in tr], [bags[i] for i in te])
            yield Fold(rep, fold, train_x, y[tr], test_x, y[te], seed=1000 * rep + fold)


def _adam(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.Adam(model.parameters(), lr=5e-4, betas=(0.9, 0.999), weight_decay=5e-4)


def _one_epoch(
    model: nn.Module, opt: torch.optim.Optimizer, loss_fn: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor],
    xs: list[torch.Tensor], targets: list[torch.Tensor], rng: np.random.Generator,
) -> None:
    """One pass over the bags in a seeded random order, one bag per Adam step."""
    model.train()
    for i in rng.permutation(len(xs)):
        loss = loss_fn(model, xs[i], targets[i])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def train_and_test(
    make_model: Callable[[], nn.Module], loss_fn: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor],
    predict: Callable[[nn.Module, torch.Tensor], int], train_x: list[torch.Tensor], train_y: np.ndarray,
    test_x: list[torch.Tensor], test_y: np.ndarray, epochs: int, seed: int,
) -> float:
    """The protocol's training loop for any model: seed, build, Adam, ``epochs`` epochs of one bag per step
    in a seeded random order; then the accuracy of ``predict(model, bag)`` (a class index) on the test fold.

    ``loss_fn(model, bag (1, N, D), target (1,))`` computes the model's training loss on one bag.
    """
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = make_model()
    opt = _adam(model)
    targets = [torch.tensor([int(y)]) for y in train_y]
    for _ in range(epochs):
        _one_epoch(model, opt, loss_fn, train_x, targets, rng)
    model.eval()
    with torch.no_grad():
        pred = np.array([predict(model, x) for x in test_x])
    return float((pred == test_y).mean())


def select_epochs(
    make_model: Callable[[], nn.Module], loss_fn: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor],
    train_x: list[torch.Tensor], train_y: np.ndarray, max_epochs: int, patience: int, seed: int,
) -> int:
    """The number of epochs chosen INSIDE the training fold: hold out a stratified 20% of its bags, train on
    the rest and return the epoch with the lowest held-out loss (stopping after ``patience`` epochs without
    improvement). The test fold plays no part."""
    inner_tr, inner_va = train_test_split(np.arange(len(train_y)), test_size=0.2, stratify=train_y, random_state=seed)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = make_model()
    opt = _adam(model)
    xs, ts = [train_x[i] for i in inner_tr], [torch.tensor([int(train_y[i])]) for i in inner_tr]
    vx, vt = [train_x[i] for i in inner_va], [torch.tensor([int(train_y[i])]) for i in inner_va]
    best, best_epoch = math.inf, 1
    for epoch in range(1, max_epochs + 1):
        _one_epoch(model, opt, loss_fn, xs, ts, rng)
        model.eval()
        with torch.no_grad():
            val = float(np.mean([float(loss_fn(model, x, t)) for x, t in zip(vx, vt)]))
        if val < best - 1e-6:
            best, best_epoch = val, epoch
        elif epoch - best_epoch >= patience:
            break
    return best_epoch


def run_fold(
    model_name: str, train_x: list[torch.Tensor], train_y: np.ndarray, test_x: list[torch.Tensor], test_y: np.ndarray,
    epochs: int, seed: int, dropout: float, select: str = "fixed", max_epochs: int = 100, patience: int = 15,
    label_smoothing: float = 0.0,
) -> tuple[float, int]:
    """Train one registry model on one training fold; (its accuracy on the test fold, epochs trained).

    ``select="fixed"`` trains ``epochs`` epochs; ``select="inner"`` first chooses the epoch count with
    :func:`select_epochs` inside the training fold, then trains on the whole training fold for that long.
    """
    def make() -> nn.Module:
        return build_model(model_name, train_x[0].shape[-1], 2, dropout=dropout)

    def loss(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(model(x).logits, target, label_smoothing=label_smoothing)

    if select == "inner":
        epochs = select_epochs(make, loss, train_x, train_y, max_epochs, patience, seed)
    acc = train_and_test(make, loss, lambda model, x: int(model(x).logits.argmax(-1)),
                         train_x, train_y, test_x, test_y, epochs, seed)
    return acc, epochs


def summarise(rows: list[dict], folds: int) -> list[dict]:
    """Per dataset and model: mean test accuracy over all folds of all repetitions, with its standard error."""
    out = []
    for ds in dict.fromkeys(r["dataset"] for r in rows):
        for m in dict.fromkeys(r["model"] for r in rows if r["dataset"] == ds):
            acc = np.array([r["accuracy"] for r in rows if r["dataset"] == ds and r["model"] == m])
            reps = sorted({int(r["rep"]) for r in rows if r["dataset"] == ds and r["model"] == m})
            rep_means = [
                np.mean([r["accuracy"] for r in rows if r["dataset"] == ds and r["model"] == m and int(r["rep"]) == k])
                for k in reps
            ]
            out.append({
                "dataset": ds, "model": m, "protocol": f"{len(reps)} x {folds}-fold", "n_folds_total": int(acc.size),
                "accuracy_mean": float(acc.mean()),
                "accuracy_se": float(acc.std(ddof=1) / math.sqrt(acc.size)) if acc.size > 1 else float("nan"),
                "rep_means": [float(x) for x in rep_means],
            })
    return out


def markdown(summary: list[dict], datasets: list[str]) -> str:
    """Our rows (mean ± SE) beside the published ones."""
    head = "| method | protocol | " + " | ".join(datasets) + " |\n|---|---|" + "---|" * len(datasets) + "\n"
    lines = []
    for m in dict.fromkeys(s["model"] for s in summary):
        cells = []
        proto = ""
        for ds in datasets:
            s = next((s for s in summary if s["model"] == m and s["dataset"] == ds), None)
            cells.append(f"{s['accuracy_mean']:.3f} ± {s['accuracy_se']:.3f}" if s else "—")
            proto = s["protocol"] if s else proto
        lines.append(f"| histomil {m} (ours) | {proto} | " + " | ".join(cells) + " |")
    for name, accs in PUBLISHED.items():  # a data set outside the paper's table gets "—"
        if any(d in accs for d in datasets):
            lines.append(f"| {name} | 5 x 10-fold | " + " | ".join(f"{accs[d]:.3f}" if d in accs else "—" for d in datasets) + " |")
    return head + "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, required=True, help="folder with musk1.csv, musk2.csv, elephant.csv")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--folds", type=int, default=10)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--label-smoothing", type=float, default=0.0,
                   help="label smoothing of the bag loss (histomil's trainer defaults to 0.1; the paper's protocol has none)")
    p.add_argument("--select", choices=["fixed", "inner"], default="fixed",
                   help="fixed: --epochs epochs; inner: choose the epochs on a 20%% split of each training fold")
    p.add_argument("--max-epochs", type=int, default=100, help="--select inner: most epochs tried")
    p.add_argument("--patience", type=int, default=15, help="--select inner: epochs without improvement before stopping")
    p.add_argument("--datasets", nargs="+", default=list(DATASETS))
    p.add_argument("--models", nargs="+", default=list(MODELS))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--first-rep", type=int, default=0, help="index (and CV seed) of the first repetition")
    p.add_argument("--merge", type=Path, nargs="+", help="only summarise these per-fold CSVs (from runs with different --first-rep)")
    p.add_argument("--quick", action="store_true", help="1 rep, 2 folds, 2 epochs (smoke test)")
    a = p.parse_args(argv)
    if a.quick:
        a.reps, a.folds, a.epochs = 1, 2, 2
    torch.set_num_threads(a.threads)
    t_start = time.perf_counter()
    if a.merge:
        rows = [dict(r, rep=int(r["rep"]), fold=int(r["fold"]), accuracy=float(r["accuracy"]))
                for f in a.merge for r in csv.DictReader(Path(f).read_text().splitlines())]
        a.datasets = [d for d in a.datasets if any(r["dataset"] == d for r in rows)]
    else:
        rows = run_all(a)
        if rows is None:
            return 2
    return write_outputs(a, rows, t_start)


def run_all(a: argparse.Namespace) -> list[dict] | None:
    """Every dataset x repetition x fold x model; None after a HistomilError (printed)."""
    rows: list[dict] = []
    try:
        for ds in a.datasets:
            bags = load_mil_csv(a.data / f"{ds}.csv")
            for f in protocol_folds(bags, a.reps, a.folds, a.first_rep):
                for m in a.models:
                    t0 = time.perf_counter()
                    acc, epochs = run_fold(m, f.train_x, f.train_y, f.test_x, f.test_y, a.epochs, seed=f.seed,
                                           dropout=a.dropout, select=a.select, max_epochs=a.max_epochs, patience=a.patience,
                                           label_smoothing=a.label_smoothing)
                    label = (m if a.select == "fixed" else f"{m}+inner") + (f"+ls{a.label_smoothing:g}" if a.label_smoothing else "")
                    rows.append({"dataset": ds, "model": label, "rep": f.rep, "fold": f.fold, "n_test": len(f.test_y),
                                 "accuracy": acc, "epochs": epochs, "seconds": round(time.perf_counter() - t0, 3)})
                    print(f"{ds} {label} rep {f.rep} fold {f.fold}: acc {acc:.3f}, {epochs} epochs "
                          f"({rows[-1]['seconds']:.1f} s)", flush=True)
    except HistomilError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return None
    return rows


def write_outputs(a: argparse.Namespace, rows: list[dict], t_start: float) -> int:
    summary = summarise(rows, a.folds)
    a.out.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
    write_text(a.out / "classical_mil.csv", buf.getvalue())
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()}
    if a.merge:  # the runs' own settings live in their JSON files; only the merge inputs are known here
        settings = {"merged_from": [str(f) for f in a.merge], "folds": a.folds}
    else:
        selection = ("fixed epochs, no early stopping" if a.select == "fixed" else
                     "epochs chosen per training fold: lowest loss on a stratified 20% inner split (max "
                     f"{a.max_epochs}, patience {a.patience}), then retrained on the whole training fold")
        settings.update(optimizer="Adam lr 5e-4 betas (0.9, 0.999) weight_decay 5e-4", batch="1 bag",
                        selection=selection + "; test fold unseen until the end")
    write_json(a.out / "classical_mil.json", {"settings": settings, "machine": machine(), "summary": summary,
                                               "total_seconds": round(time.perf_counter() - t_start, 1)})
    write_text(a.out / "classical_mil.md", markdown(summary, a.datasets))
    print(markdown(summary, a.datasets))
    return 0


if __name__ == "__main__":
    sys.exit(main())
