"""MNIST-bags learning curve of Ilse et al. (2018, Attention-based Deep MIL), mean bag size 10.

A bag holds ``round(N(10, 2))`` (at least 1) MNIST digits drawn uniformly at random, with
replacement, from a digit pool; it is positive when it contains at least one '9'. A LeNet-style
trunk (conv 5x5 20 ch, ReLU, maxpool 2; conv 5x5 50 ch, ReLU, maxpool 2; fc 800 -> 500, ReLU),
attention pooling with hidden size 128 (plain: model ``attention``; gated: ``gated_attention``) and a
linear classifier are trained END TO END from pixels, one bag per step, with Adam (lr 5e-4, betas
0.9/0.999, weight decay 1e-4). Per number of training bags (default 50, 100, 150, 200, 300, 400,
500) and repetition (default 5), fresh training bags and 1,000 fresh test bags are drawn (seeds
derived from ``--seed``, the repetition and the size); reported is the test ROC-AUC, mean over the
repetitions with its standard error, beside the paper's approximate curve.

Protocol details (what is ours, what is Ilse et al.'s):

* Data: only the 10,000 MNIST TEST digits are available (``t10k-*-idx?-ubyte.gz``). They are split
  ONCE (seed ``POOL_SEED`` = 0, stratified by digit) into two disjoint pools of 5,000: training bags
  are drawn only from the training pool, test bags only from the test pool, so no digit image is in
  both a training and a test bag. Ilse et al. drew training bags from the 60,000 MNIST training
  digits and test bags from the 10,000 test digits.
* Pixels: scaled to [0, 1], then normalised with the fixed MNIST constants mean 0.1307, sd 0.3081
  (as Ilse et al.'s code; constants, nothing is estimated from our data).
* Bags: instances sampled uniformly with replacement from the pool as in the public code's
  ``dataloader.py``, so about 64% of the bags are positive. Bag sizes are ROUNDED normal draws;
  the public code truncates (``int()``), which gives a mean of about 9.5 instead of 10. The paper's
  own experiments used a loader (``mnist_bags_loader.py``, added to the repository later) that
  alternates positive and negative bags (50% positive); we do not.
* Head: two logits with softmax and cross-entropy (the same model as the paper's single sigmoid
  output), composed from histomil's ``abmil_small`` / ``gated_abmil_small`` (``SmallABMIL`` with
  ``hidden=(500,)``, i.e. the fc 800 -> 500 + ReLU layer, then ``AttentionPool`` of
  ``histomil.models.layers`` with ``attn_dim=128``, then ``Linear(500, 2)``); the conv trunk lives here.
* Stopping: a FIXED rule, no early stopping, no validation split, no model selection; the test bags
  are used once, after training. Epochs for ``n`` training bags = ``max(--min-epochs,
  ceil(--steps / n))`` (defaults 5 and 1,500: 30 epochs at 50 bags, 8 at 200, 5 at 300-500).
  The public code (``main.py``) trains for a fixed 20 epochs (4,000 steps at its default 200 bags)
  with no validation set and no early stopping; the paper's exact training length per size is not
  reproduced here. Our budget is smaller (fewer steps above 75 bags) so that the whole default run
  (70 trainings) fits in about 25 minutes on one CPU thread.
* Paper reference: attention MIL about 0.77 AUC at 50 training bags, 0.97 at 200 and 0.99 at 500
  (read off the paper's MNIST-bags plot for mean bag size 10; approximate, only these three points).

    python benchmarks/mnist_bags.py --out benchmarks/results/ --threads 1
    python benchmarks/mnist_bags.py --out /tmp/q --quick   # smoke test

Writes to ``--out``: ``mnist_bags.csv`` (one row per model / size / repetition, rewritten atomically
after every row; rows already there with the same settings are kept and not rerun, so an
interrupted run resumes), ``mnist_bags.json`` (summary, settings, machine), ``mnist_bags.md`` (the
table) and ``mnist_bags.png`` (AUC vs number of training bags, error bars = standard error, the
paper's points marked).
"""

from __future__ import annotations

import argparse
import csv
import gzip
import io
import math
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import train_test_split
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, write_json, write_text

from histomil.errors import HistomilError
from histomil.files import atomic_write
from histomil.models.base import MILOutput
from histomil.models.registry import build_model

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"
IMAGES_FILE = "t10k-images-idx3-ubyte.gz"
LABELS_FILE = "t10k-labels-idx1-ubyte.gz"
IDX_IMAGES_MAGIC, IDX_LABELS_MAGIC = 0x00000803, 0x00000801  # idx: 0, 0, dtype 0x08 (ubyte), ndim
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
TARGET_DIGIT = 9
POOL_SEED = 0
BAG_MEAN, BAG_SD = 10.0, 2.0
SIZES = (50, 100, 150, 200, 300, 400, 500)
MODELS = {"attention": "abmil_small", "gated_attention": "gated_abmil_small"}  # ours -> histomil head
PAPER = {50: 0.77, 200: 0.97, 500: 0.99}  # Ilse et al. 2018, MNIST-bags plot (mean bag size 10), attention, approx. AUC
LR, BETAS, WEIGHT_DECAY = 5e-4, (0.9, 0.999), 1e-4
FIELDS = ["model", "n_train", "rep", "seed", "epochs", "steps", "n_test", "train_pos_frac", "test_pos_frac",
          "auc", "accuracy", "seconds"]


# --------------------------------------------------------------------------------------------- data
def read_idx(path: Path, magic: int) -> np.ndarray:
    """A gzip-compressed idx file of unsigned bytes (the MNIST format); bad input -> HistomilError."""
    path = Path(path)
    if not path.is_file():
        raise HistomilError(f"{path}: file not found")
    try:
        with gzip.open(path, "rb") as fh:
            raw = fh.read()
    except (OSError, EOFError, zlib.error) as exc:
        raise HistomilError(f"{path}: not a readable gzip file ({exc})") from None
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise HistomilError(f"{path}: too short for an idx header ({len(raw)} bytes)")
    found = int.from_bytes(raw[:4], "big")
    if found != magic:
        raise HistomilError(f"{path}: wrong idx magic number {found:#010x}, expected {magic:#010x}")
    dims = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, dtype=np.uint8, offset=header)
    if data.size != math.prod(dims):
        raise HistomilError(f"{path}: header says {'x'.join(map(str, dims))} values but the file holds {data.size}")
    return data.reshape(dims)


def load_mnist(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """``(images (N, 28, 28) uint8, labels (N,) uint8)`` from the two t10k idx files in ``folder``."""
    folder = Path(folder)
    images = read_idx(folder / IMAGES_FILE, IDX_IMAGES_MAGIC)
    labels = read_idx(folder / LABELS_FILE, IDX_LABELS_MAGIC)
    if images.shape[1:] != (28, 28):
        raise HistomilError(f"{folder / IMAGES_FILE}: images are {images.shape[1]}x{images.shape[2]}, expected 28x28")
    if len(images) != len(labels):
        raise HistomilError(f"{folder / LABELS_FILE}: {len(labels)} labels for {len(images)} images in {IMAGES_FILE}")
    if labels.size and int(labels.max()) > 9:
        raise HistomilError(f"{folder / LABELS_FILE}: label {int(labels.max())} is not a digit 0-9")
    if not (labels == TARGET_DIGIT).any() or not (labels != TARGET_DIGIT).any():
        raise HistomilError(f"{folder / LABELS_FILE}: needs both digit {TARGET_DIGIT} and other digits")
    return images, labels


def split_pools(labels: np.ndarray, seed: int = POOL_SEED) -> tuple[np.ndarray, np.ndarray]:
    """The fixed split of all digits into (training pool, test pool): disjoint, sorted index arrays
    covering every digit once, half each, stratified by digit."""
    idx = np.arange(len(labels))
    train, test = train_test_split(idx, test_size=0.5, stratify=labels, random_state=seed)
    return np.sort(train), np.sort(test)


def make_bags(
    labels: np.ndarray, pool: np.ndarray, n_bags: int, rng: np.random.Generator,
    mean: float = BAG_MEAN, sd: float = BAG_SD,
) -> tuple[list[np.ndarray], np.ndarray]:
    """``n_bags`` bags of digit indices drawn from ``pool`` (with replacement, as Ilse et al.), sizes
    ``max(1, round(N(mean, sd)))``; labels 1 where a bag holds the target digit."""
    sizes = np.maximum(1, np.rint(rng.normal(mean, sd, n_bags))).astype(int)
    bags = [pool[rng.integers(0, len(pool), s)] for s in sizes]
    y = np.array([int((labels[b] == TARGET_DIGIT).any()) for b in bags], dtype=int)
    return bags, y


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """(N, 1, 28, 28) float32: pixels / 255, then normalised with the fixed MNIST mean and sd."""
    x = torch.from_numpy(images.astype(np.float32) / 255.0)
    return ((x - MNIST_MEAN) / MNIST_STD).unsqueeze(1).contiguous()


def _rng(seed: int, rep: int, stream: int, n: int = 0) -> np.random.Generator:
    """Independent, reproducible streams: 1 = training bags, 2 = test bags, 3 = torch init, 4 = order."""
    return np.random.default_rng([seed, rep, stream, n])


def epochs_for(n_train: int, steps: int, min_epochs: int) -> int:
    """The fixed stopping rule: at least ``min_epochs`` epochs and at least ``steps`` gradient steps."""
    return max(min_epochs, math.ceil(steps / n_train))


# -------------------------------------------------------------------------------------------- model
class LeNetAttentionMIL(nn.Module):
    """Ilse et al.'s MNIST-bags network: LeNet conv trunk + histomil ``SmallABMIL`` head.

    ``forward(x (B, N, 1, 28, 28), mask (B, N) | None) -> MILOutput``. The head is
    ``abmil_small`` / ``gated_abmil_small`` with ``hidden=(500,)`` (fc 800 -> 500, ReLU) and
    ``attn_dim=128`` (attention pooling of ``histomil.models.layers.AttentionPool``), then Linear(500, 2).
    """

    def __init__(self, model: str) -> None:
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Conv2d(1, 20, kernel_size=5), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(20, 50, kernel_size=5), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(),  # 50 x 4 x 4 = 800
        )
        self.head = build_model(MODELS[model], 800, 2, hidden=(500,), attn_dim=128)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> MILOutput:
        b, n = x.shape[:2]
        return self.head(self.trunk(x.reshape(b * n, *x.shape[2:])).reshape(b, n, -1), mask)

    @torch.no_grad()
    def predict(self, images: torch.Tensor, bags: list[np.ndarray], chunk: int = 2048) -> np.ndarray:
        """P(positive) per bag: the trunk over all instances in chunks, then the head on padded bags."""
        flat = torch.from_numpy(np.concatenate(bags))
        feats = torch.cat([self.trunk(images[c]) for c in flat.split(chunk)])
        sizes = [len(b) for b in bags]
        padded = nn.utils.rnn.pad_sequence(list(feats.split(sizes)), batch_first=True)
        mask = torch.arange(padded.shape[1])[None, :] < torch.tensor(sizes)[:, None]
        return self.head(padded, mask).probs[:, 1].numpy()


def train_and_test(
    model_name: str, images: torch.Tensor, train: tuple[list[np.ndarray], np.ndarray],
    test: tuple[list[np.ndarray], np.ndarray], epochs: int, seed: int, rep: int,
) -> dict:
    """Train one model on the training bags for ``epochs`` epochs (one bag per step); test AUC/accuracy."""
    train_bags, train_y = train
    test_bags, test_y = test
    n = len(train_bags)
    torch.manual_seed(int(_rng(seed, rep, 3, n).integers(2**31)))
    order_rng = _rng(seed, rep, 4, n)
    model = LeNetAttentionMIL(model_name)
    # foreach: the same Adam update, a few times faster than the per-tensor loop on one CPU thread
    opt = torch.optim.Adam(model.parameters(), lr=LR, betas=BETAS, weight_decay=WEIGHT_DECAY, foreach=True)
    xs = [images[torch.from_numpy(b)].unsqueeze(0) for b in train_bags]
    ys = [torch.tensor([int(y)]) for y in train_y]
    model.train()
    for _ in range(epochs):
        for i in order_rng.permutation(n):
            loss = F.cross_entropy(model(xs[i]).logits, ys[i])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    model.eval()
    p = model.predict(images, test_bags)
    both = 0 < test_y.sum() < len(test_y)
    return {"auc": float(roc_auc_score(test_y, p)) if both else float("nan"),
            "accuracy": float(((p >= 0.5).astype(int) == test_y).mean()), "steps": epochs * n}


# ----------------------------------------------------------------------------------------- running
def read_rows(path: Path) -> list[dict]:
    """Rows of an existing mnist_bags.csv (for resuming); none when the file does not exist."""
    if not path.is_file():
        return []
    try:
        rows = list(csv.DictReader(path.read_text(encoding="utf-8").splitlines()))
        if rows and set(FIELDS) - set(rows[0]):
            raise ValueError(f"missing column(s) {', '.join(sorted(set(FIELDS) - set(rows[0])))}")
        ints = ("n_train", "rep", "seed", "epochs", "steps", "n_test")
        return [{k: (int(r[k]) if k in ints else r[k] if k == "model" else float(r[k])) for k in FIELDS} for r in rows]
    except (ValueError, TypeError, UnicodeDecodeError) as exc:
        raise HistomilError(f"{path}: cannot resume from this file ({exc}); delete it or use another --out") from None


def check_resumable(rows: list[dict], a: argparse.Namespace, path: Path) -> None:
    """Every kept row must come from the same settings as this run (seed, test bags, epoch rule)."""
    for r in rows:
        want = epochs_for(r["n_train"], a.steps, a.min_epochs)
        if r["model"] not in MODELS or r["seed"] != a.seed or r["n_test"] != a.test_bags or r["epochs"] != want:
            raise HistomilError(
                f"{path}: row model={r['model']} n_train={r['n_train']} rep={r['rep']} was made with other settings "
                f"(seed {r['seed']}, {r['n_test']} test bags, {r['epochs']} epochs; this run: seed {a.seed}, "
                f"{a.test_bags} test bags, {want} epochs); delete it or use another --out"
            )


def csv_text(rows: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=FIELDS)
    w.writeheader()
    w.writerows(sorted(rows, key=lambda r: (list(MODELS).index(r["model"]), r["n_train"], r["rep"])))
    return buf.getvalue()


def run_all(
    a: argparse.Namespace, images: torch.Tensor, labels: np.ndarray, pools: tuple[np.ndarray, np.ndarray]
) -> list[dict]:
    """Every repetition x size x model not already in ``--out``/mnist_bags.csv; the CSV is rewritten after each row."""
    path = a.out / "mnist_bags.csv"
    rows = read_rows(path)
    check_resumable(rows, a, path)
    done = {(r["model"], r["n_train"], r["rep"]) for r in rows}
    if rows:
        print(f"resuming: {len(rows)} row(s) already in {path}", flush=True)
    train_pool, test_pool = pools
    for rep in range(a.reps):
        todo = [(n, m) for n in a.sizes for m in a.models if (m, n, rep) not in done]
        if not todo:
            continue
        test = make_bags(labels, test_pool, a.test_bags, _rng(a.seed, rep, 2))
        for n in dict.fromkeys(n for n, _ in todo):
            train = make_bags(labels, train_pool, n, _rng(a.seed, rep, 1, n))
            epochs = epochs_for(n, a.steps, a.min_epochs)
            for m in [m for nn_, m in todo if nn_ == n]:
                t0 = time.perf_counter()
                res = train_and_test(m, images, train, test, epochs, a.seed, rep)
                rows.append({"model": m, "n_train": n, "rep": rep, "seed": a.seed, "epochs": epochs,
                             "steps": res["steps"], "n_test": a.test_bags,
                             "train_pos_frac": round(float(train[1].mean()), 4),
                             "test_pos_frac": round(float(test[1].mean()), 4),
                             "auc": round(res["auc"], 6), "accuracy": round(res["accuracy"], 6),
                             "seconds": round(time.perf_counter() - t0, 2)})
                write_text(path, csv_text(rows))
                print(f"{m} n_train {n} rep {rep}: auc {res['auc']:.4f} acc {res['accuracy']:.3f} "
                      f"({epochs} epochs, {rows[-1]['seconds']:.1f} s)", flush=True)
    return rows


def _se(x: np.ndarray) -> float:
    return float(x.std(ddof=1) / math.sqrt(x.size)) if x.size > 1 else float("nan")


def summarise(rows: list[dict]) -> list[dict]:
    """Per model and number of training bags: mean test AUC / accuracy over repetitions, with standard errors."""
    out = []
    for m in [m for m in MODELS if any(r["model"] == m for r in rows)]:
        for n in sorted({r["n_train"] for r in rows if r["model"] == m}):
            sel = [r for r in rows if r["model"] == m and r["n_train"] == n]
            auc = np.array([r["auc"] for r in sel], dtype=float)
            acc = np.array([r["accuracy"] for r in sel], dtype=float)
            out.append({
                "model": m, "n_train": n, "n_reps": len(sel), "epochs": sel[0]["epochs"],
                "auc_mean": float(auc.mean()), "auc_se": _se(auc),
                "accuracy_mean": float(acc.mean()), "accuracy_se": _se(acc),
                "train_pos_frac_mean": float(np.mean([r["train_pos_frac"] for r in sel])),
                "test_pos_frac_mean": float(np.mean([r["test_pos_frac"] for r in sel])),
                "seconds_mean": float(np.mean([r["seconds"] for r in sel])),
            })
    return out


def _cell(s: dict | None) -> str:
    if s is None:
        return "—"
    se = "" if math.isnan(s["auc_se"]) else f" ± {s['auc_se']:.3f}"
    return f"{s['auc_mean']:.3f}{se} ({s['n_reps']})"


def markdown(summary: list[dict], a: argparse.Namespace) -> str:
    models = list(dict.fromkeys(s["model"] for s in summary))
    sizes = sorted({s["n_train"] for s in summary})
    head = ("| training bags | epochs | " + " | ".join(f"{m} (ours)" for m in models)
            + " | Ilse et al. attention (approx.) |\n|---|---|" + "---|" * (len(models) + 1) + "\n")
    lines = []
    for n in sizes:
        cells = [_cell(next((s for s in summary if s["model"] == m and s["n_train"] == n), None)) for m in models]
        paper = f"{PAPER[n]:.2f}" if n in PAPER else "—"
        lines.append(f"| {n} | {epochs_for(n, a.steps, a.min_epochs)} | " + " | ".join(cells) + f" | {paper} |")
    note = (f"\nTest ROC-AUC on {a.test_bags} test bags per repetition: mean ± standard error over repetitions "
            f"(number of repetitions in brackets). Epochs = max({a.min_epochs}, ceil({a.steps} / bags)); "
            "no early stopping. Training and test bags come from disjoint halves of the 10,000 MNIST test digits. "
            "Paper values: Ilse et al. 2018, attention MIL, read off their MNIST-bags plot (approximate).\n")
    return head + "\n".join(lines) + "\n" + note


def plot(summary: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for k, m in enumerate(dict.fromkeys(s["model"] for s in summary)):
        sel = [s for s in summary if s["model"] == m]
        x = np.array([s["n_train"] for s in sel], dtype=float) * (1 + 0.012 * (2 * k - 1))  # small dodge
        se = [0.0 if math.isnan(s["auc_se"]) else s["auc_se"] for s in sel]
        ax.errorbar(x, [s["auc_mean"] for s in sel], yerr=se, marker="o", capsize=3, label=f"{m} (histomil)")
    ax.plot(list(PAPER), list(PAPER.values()), "k*", markersize=11, linestyle="none",
            label="Ilse et al. 2018 attention (approx.)")
    ax.set_xlabel("number of training bags")
    ax.set_ylabel("test ROC-AUC")
    ax.set_title("MNIST-bags (mean bag size 10): AUC ± SE over repetitions")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    with atomic_write(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help=f"folder with {IMAGES_FILE} and {LABELS_FILE}")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--sizes", type=int, nargs="+", default=list(SIZES), help="numbers of training bags")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--models", nargs="+", default=list(MODELS), help=f"any of: {', '.join(MODELS)}")
    p.add_argument("--test-bags", type=int, default=1000)
    p.add_argument("--steps", type=int, default=1500, help="minimum gradient steps per training (epoch rule)")
    p.add_argument("--min-epochs", type=int, default=5, help="minimum epochs per training (epoch rule)")
    p.add_argument("--seed", type=int, default=0, help="base seed of the bags and the initialisation")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="20 training bags, 1 rep, 2 epochs, 100 test bags (smoke test)")
    a = p.parse_args(argv)
    if a.quick:
        a.sizes, a.reps, a.test_bags, a.steps, a.min_epochs = [20], 1, 100, 40, 1
    torch.set_num_threads(a.threads)
    t_start = time.perf_counter()
    try:
        bad = [m for m in a.models if m not in MODELS]
        if bad:
            raise HistomilError(f"unknown model(s) {', '.join(bad)}; choose from {', '.join(MODELS)}")
        if min(a.sizes) < 1 or a.reps < 1 or a.test_bags < 2 or a.steps < 1 or a.min_epochs < 1 or a.threads < 1:
            raise HistomilError("--sizes, --reps, --steps, --min-epochs and --threads must be >= 1, --test-bags >= 2")
        a.sizes = sorted(set(a.sizes))
        a.models = list(dict.fromkeys(a.models))
        images_u8, labels = load_mnist(a.data)
        pools = split_pools(labels)
        a.out.mkdir(parents=True, exist_ok=True)
        rows = run_all(a, to_tensor(images_u8), labels, pools)
    except HistomilError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    summary = summarise(rows)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()}
    settings.update(
        data_split=f"the {len(labels)} MNIST test digits split once (seed {POOL_SEED}, stratified by digit) into a "
                   f"training pool of {len(pools[0])} and a disjoint test pool of {len(pools[1])}",
        bags=f"size max(1, round(N({BAG_MEAN:g}, {BAG_SD:g}))), digits drawn uniformly with replacement from the pool, "
             f"positive iff a {TARGET_DIGIT} is in the bag",
        normalisation=f"pixels / 255, then (x - {MNIST_MEAN}) / {MNIST_STD}",
        model="LeNet trunk (conv5x5 20, ReLU, maxpool2, conv5x5 50, ReLU, maxpool2) + histomil SmallABMIL "
              "(fc 800->500 ReLU, attention pooling hidden 128, Linear 500->2)",
        optimizer=f"Adam lr {LR} betas {BETAS} weight_decay {WEIGHT_DECAY}", batch="1 bag",
        stopping="fixed: epochs = max(min_epochs, ceil(steps / n_train)); no early stopping, no validation, "
                 "test bags unseen until the end",
        epochs_per_size={n: epochs_for(n, a.steps, a.min_epochs) for n in a.sizes},
    )
    write_json(a.out / "mnist_bags.json", {
        "settings": settings, "machine": machine(), "summary": summary,
        "paper_reference": {"source": "Ilse et al. 2018, MNIST-bags plot (mean bag size 10), attention MIL, "
                                      "approximate AUC read off the figure", "auc": PAPER},
        "total_seconds": round(time.perf_counter() - t_start, 1),
    })
    table = markdown(summary, a)
    write_text(a.out / "mnist_bags.md", "# MNIST-bags learning curve\n\n" + table)
    plot(summary, a.out / "mnist_bags.png")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
