"""Regenerate histomil's built-in example tiles from EBHI-Seg (../shared/data/ebhi).

Picks whole patients at random (seed 0) into train / val / test (keeping only the tile classes a split still needs, at most 10 tiles per patient and class) until each split holds enough
non-tumour and tumour tiles for bags of 40 with up to 20 witnesses, then copies those tiles
re-encoded as JPEG quality 80 (to keep the package small) with a tiles.csv that fixes the split.
Usage: python scripts/make_example_data.py ../shared/data/ebhi src/histomil/example_data/ebhi_demo
"""

from __future__ import annotations

import csv
import random
import shutil
import sys
from collections import defaultdict
from pathlib import Path

from PIL import Image

MAX_PER_CLASS = 10  # tiles per patient and class: more patients, a smaller package
TARGETS = {"train": (90, 50), "val": (50, 25), "test": (60, 30)}  # (non-tumour, tumour) tiles


def main(src: Path, dst: Path) -> None:
    rows = [r for r in csv.DictReader(open(src / "tiles.csv")) if r["tumor"] in ("0", "1")]
    by_patient: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_patient[r["case_id"]].append(r)
    patients = sorted(by_patient)
    random.Random(0).shuffle(patients)
    chosen: list[tuple[str, dict]] = []
    it = iter(patients)
    for split, (want_neg, want_pos) in TARGETS.items():
        neg = pos = 0
        while neg < want_neg or pos < want_pos:
            p = next(it)
            tiles = by_patient[p]
            need_neg, need_pos = neg < want_neg, pos < want_pos
            keep = [r for r in tiles if r["tumor"] == "1" and need_pos][:MAX_PER_CLASS]
            keep += [r for r in tiles if r["tumor"] == "0" and need_neg][:MAX_PER_CLASS]
            chosen.extend((split, r) for r in keep)
            neg += sum(r["tumor"] == "0" for r in keep)
            pos += sum(r["tumor"] == "1" for r in keep)
    if dst.exists():
        shutil.rmtree(dst)
    (dst / "tiles").mkdir(parents=True)
    with open(dst / "tiles.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "tissue", "case_id", "tumor", "split"])
        for split, r in chosen:
            name = Path(r["path"]).name
            Image.open(src / r["path"]).convert("RGB").save(dst / "tiles" / name, quality=80)
            w.writerow([f"tiles/{name}", r["tissue"], r["case_id"], r["tumor"], split])
    print(f"{len(chosen)} tiles from {len({r['case_id'] for _, r in chosen})} patients written to {dst}")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
