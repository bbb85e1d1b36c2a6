"""``histomil report``: one self-contained HTML file per run, checked as text and in headless Chromium.

The Chromium test drives the browser over the DevTools protocol on a pipe (``--remote-debugging-pipe``:
JSON messages on file descriptors 3 and 4), so it needs no extra Python package: it collects console
errors and exceptions, asks the page what it shows, and saves a screenshot.
"""

from __future__ import annotations

import base64
import csv
import fcntl
import io
import json
import os
import select
import shutil
import subprocess
import tempfile
import time
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import typer
from tiny_runs import FAST_ENCODER, write_tiny_crossval_config
from typer.testing import CliRunner

from histomil.commands.report import report_cmd
from histomil.errors import HistomilError
from histomil.evaluation.bootstrap import METRICS, bootstrap_ci
from histomil.evaluation.protocol import load_crossval_config, run_crossval
from histomil.features.store import read_feature_bag
from histomil.pipeline import load_config, run_study
from histomil.reports.galleries import choose_bags
from histomil.reports.html import build_report
from histomil.reports.html_blocks import BagRef
from histomil.resources import demo_config_path
from histomil.training.checkpoint import load_checkpoint
from histomil.training.trainer import predict

pytestmark = pytest.mark.usefixtures("fast_encoder")  # the stand-in encoder of tiny_runs.py

# ------------------------------------------------------------------------------ headless Chromium


def find_chromium() -> str | None:
    """The Chromium (or Chrome) executable on PATH, or None."""
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    return None


# Everything the page shows that the test checks, gathered in the page itself.
_PAGE_FACTS = """JSON.stringify({
  title: document.title,
  metricCells: document.querySelectorAll('#metrics-table td[data-metric]').length,
  metricsVisible: (() => { const t = document.getElementById('metrics-table');
                           return !!t && t.getBoundingClientRect().height > 20; })(),
  galleries: Array.from(document.querySelectorAll('section.gallery')).map(g => ({
      bag: g.dataset.bag,
      attention: Array.from(g.querySelectorAll('figure.tile')).map(t => parseFloat(t.dataset.attention)),
      shown: Array.from(g.querySelectorAll('figure.tile img')).filter(i => i.getBoundingClientRect().width > 50).length })),
  images: document.images.length,
  brokenImages: Array.from(document.images).filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.alt),
  height: document.documentElement.scrollHeight })"""


def render_in_chromium(page: Path, screenshot: Path, width: int = 1280, height: int = 2000,
                       scroll_to: str | None = None, timeout: float = 90.0) -> dict[str, Any]:
    """Open ``page`` in headless Chromium; returns the page facts and console errors, saves a PNG.

    ``errors`` lists console errors, uncaught exceptions and failed loads (the browser's log at
    level error). The screenshot is the ``width`` x ``height`` viewport, from the top of the page
    or from the element that the CSS selector ``scroll_to`` names.
    """
    exe = find_chromium()
    assert exe, "Chromium is not installed"
    profile = tempfile.mkdtemp(prefix="histomil-chromium-")
    to_chrome_r, to_chrome_w = os.pipe()
    from_chrome_r, from_chrome_w = os.pipe()

    def child_fds() -> None:  # DevTools pipe: Chromium reads fd 3, writes fd 4
        a = fcntl.fcntl(to_chrome_r, fcntl.F_DUPFD, 10)
        b = fcntl.fcntl(from_chrome_w, fcntl.F_DUPFD, 10)
        os.dup2(a, 3)
        os.dup2(b, 4)

    args = [
        exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-extensions",
        "--hide-scrollbars", f"--user-data-dir={profile}", "--remote-debugging-pipe",
        f"--window-size={width},{height}", "about:blank",
    ]
    proc = subprocess.Popen(args, preexec_fn=child_fds, pass_fds=(3, 4), stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.close(to_chrome_r)
    os.close(from_chrome_w)
    deadline = time.monotonic() + timeout
    buf = b""
    events: list[dict] = []
    next_id = 0

    def call(method: str, params: dict | None = None, session: str | None = None) -> dict:
        nonlocal buf, next_id
        next_id += 1
        msg: dict[str, Any] = {"id": next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(to_chrome_w, json.dumps(msg).encode() + b"\0")
        while True:
            while b"\0" in buf:
                raw, buf = buf.split(b"\0", 1)
                reply = json.loads(raw)
                if reply.get("id") == next_id:
                    if "error" in reply:
                        raise RuntimeError(f"{method}: {reply['error']}")
                    return reply.get("result", {})
                events.append(reply)
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([from_chrome_r], [], [], left)[0]:
                raise TimeoutError(f"Chromium did not answer {method} within {timeout:.0f} s")
            chunk = os.read(from_chrome_r, 1 << 20)
            if not chunk:
                raise RuntimeError(f"Chromium closed the DevTools pipe during {method}")
            buf += chunk

    def evaluate(expr: str, session: str) -> Any:
        res = call("Runtime.evaluate", {"expression": expr, "returnByValue": True}, session)
        if "exceptionDetails" in res:
            raise RuntimeError(f"page script failed: {res['exceptionDetails']}")
        return res["result"].get("value")

    try:
        target = call("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page.enable", "Runtime.enable", "Log.enable"):
            call(domain, session=session)
        call("Emulation.setDeviceMetricsOverride",
             {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False}, session)
        call("Page.navigate", {"url": page.resolve().as_uri()}, session)
        while not evaluate("document.readyState === 'complete' && Array.from(document.images).every(i => i.complete)",
                           session):
            if time.monotonic() > deadline:
                raise TimeoutError("the page did not finish loading")
            time.sleep(0.1)
        facts = json.loads(evaluate(_PAGE_FACTS, session))
        if scroll_to:
            evaluate(f"document.querySelector({json.dumps(scroll_to)}).scrollIntoView()", session)
        shot = call("Page.captureScreenshot", {"format": "png"}, session)
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        screenshot.write_bytes(base64.b64decode(shot["data"]))
        try:
            call("Browser.close")
        except RuntimeError:
            pass
    finally:
        os.close(to_chrome_w)
        os.close(from_chrome_r)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(profile, ignore_errors=True)
    errors = []
    for e in events:
        m, p = e.get("method"), e.get("params", {})
        if m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
            errors.append("console: " + " ".join(str(a.get("value", a.get("description"))) for a in p.get("args", [])))
        elif m == "Runtime.exceptionThrown":
            errors.append("exception: " + str(p.get("exceptionDetails", {}).get("text")))
        elif m == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
            errors.append(f"log: {p['entry'].get('text')} {p['entry'].get('url', '')}")
    facts["errors"] = errors
    return facts


# ------------------------------------------------------------------------------ tiny runs


FAST_FEATURES = {"features.encoder": FAST_ENCODER, "features.precision": "fp32",
                 "features.channels_last": False, "features.workers": 0}


@pytest.fixture(scope="module")
def study_run(tmp_path_factory, fast_encoder) -> Path:
    """A finished 'histomil demo'-style run: bags of 12 tiles, two test sets of 16 bags."""
    cfg = load_config(demo_config_path(), {
        "study.bag_size": 12, "study.train_bags": 30, "study.val_bags": 12, "study.test_bags": 16,
        "study.train_witnesses": [1, 6], "study.val_witnesses": [1, 6], "study.test_witnesses": [6, 1],
        "train.epochs": 8, "train.min_epochs": 8, "train.batch_size": 2, "train.lr": 0.002, **FAST_FEATURES,
        "threshold": {"rule": "youden"},  # fitted on the validation bags, stored in model.pt
    })
    out = tmp_path_factory.mktemp("study") / "run"
    run_study(cfg, out, log=lambda _m: None)
    return out


@pytest.fixture(scope="module")
def study_report(study_run: Path) -> Path:
    return build_report(study_run)


@pytest.fixture(scope="module")
def crossval_run(tmp_path_factory, fast_encoder) -> Path:
    """A finished 2-fold cross-validation with a held-out set; per-fold feature files removed as usual."""
    root = tmp_path_factory.mktemp("cv")
    cfg_path = write_tiny_crossval_config(root / "cv.yaml")
    out = root / "out"
    run_crossval(load_crossval_config(cfg_path), out, log=lambda _m: None)
    return out


# ------------------------------------------------------------------------------ reading the HTML back


class _Doc(HTMLParser):
    """Every start tag with its attributes, in document order."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str]]] = []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, {k: v or "" for k, v in attrs}))

    def find(self, tag: str, **want: str) -> list[dict[str, str]]:
        return [a for t, a in self.tags if t == tag and all(a.get(k.replace("_", "-")) == v for k, v in want.items())]


def _galleries(doc: _Doc) -> list[dict[str, Any]]:
    """Per gallery section: its attributes and its tiles (figure attributes + the img title) in DOM order."""
    out: list[dict[str, Any]] = []
    for tag, a in doc.tags:
        if tag == "section" and "gallery" in a.get("class", ""):
            out.append({**a, "tiles": []})
        elif tag == "figure" and "tile" in a.get("class", "").split() and out:
            out[-1]["tiles"].append(dict(a))
        elif tag == "img" and out and out[-1]["tiles"] and "title" in a:
            out[-1]["tiles"][-1]["name"] = a["title"]
    return out


def _assert_self_contained(text: str, doc: _Doc) -> None:
    for tag, a in doc.tags:
        assert tag not in ("script", "link", "iframe", "object", "embed"), tag
        for key in ("src", "href"):
            if key in a:
                assert a[key].startswith(("data:", "#")), (tag, key, a[key][:80])
    assert "http://" not in text and "https://" not in text
    assert "url(" not in text and "@import" not in text


# ------------------------------------------------------------------------------ study run


def test_study_report_is_self_contained_with_metrics_and_cis(study_run: Path, study_report: Path):
    assert study_report == study_run / "report.html"
    text = study_report.read_text(encoding="utf-8")
    doc = _Doc(text)
    _assert_self_contained(text, doc)
    assert len(text.encode()) < 5_000_000
    metrics = json.loads((study_run / "evaluation" / "metrics.json").read_text())
    results, threshold = metrics["results"], metrics["threshold"]
    assert list(results) == ["test_12_6", "test_12_1"]
    for name, m in results.items():
        ids, y, p = [], [], []
        with open(study_run / "evaluation" / f"predictions_{name}.csv", newline="") as fh:
            for r in csv.DictReader(fh):
                ids.append(r["bag_id"])
                y.append(int(r["y_true"]))
                p.append(float(r["prob_positive"]))
        ci = bootstrap_ci(np.array(y), np.array(p), threshold, 1000, seed=0)
        for k in METRICS:
            (cell,) = doc.find("td", data_set=name, data_metric=k)
            if m[k] is None:
                assert cell["data-value"] == ""
                continue
            assert float(cell["data-value"]) == m[k]  # the table shows metrics.json's numbers
            assert float(cell["data-low"]) == pytest.approx(ci[k]["low"])
            assert float(cell["data-high"]) == pytest.approx(ci[k]["high"])
            assert float(cell["data-low"]) <= m[k] + 1e-9 <= float(cell["data-high"]) + 2e-9
            assert ci[k]["value"] == pytest.approx(m[k], abs=1e-9)  # intervals belong to the same predictions
            assert f"{m[k]:.3f}" in text
        (ece,) = doc.find("td", data_set=name, data_metric="ece")
        assert 0.0 <= float(ece["data-value"]) <= 1.0
        # tile-level truth: the attention table is there too
        (top1,) = doc.find("td", data_set=name, data_metric="top1_hit")
        assert float(top1["data-value"]) == m["attention"]["top1_hit"]


def test_study_report_writes_every_plot_as_png_and_inlines_the_same(study_run: Path, study_report: Path):
    text = study_report.read_text(encoding="utf-8")
    figs = study_run / "report_figures"
    names = sorted(p.name for p in figs.glob("*.png"))
    assert names == sorted(["training_curves.png", "roc_pr.png", "reliability.png",
                            "confusion_test_12_6.png", "confusion_test_12_1.png"])
    for png in figs.glob("*.png"):
        data = png.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
        assert base64.b64encode(data).decode() in text  # the HTML embeds exactly the file written


def test_study_galleries_are_sorted_by_the_models_attention_with_tile_truth(study_run: Path, study_report: Path):
    doc = _Doc(study_report.read_text(encoding="utf-8"))
    galleries = _galleries(doc)
    assert len(galleries) == 6
    model, _ = load_checkpoint(study_run / "model" / "model.pt")
    for g in galleries:
        set_name, bag_id = g["data-bag"].split("/")
        tiles = g["tiles"]
        assert len(tiles) == 12  # all tiles of a 12-tile bag (under the 40-tile limit)
        att = [float(t["data-attention"]) for t in tiles]
        assert att == sorted(att, reverse=True)
        assert [int(t["data-rank"]) for t in tiles] == list(range(1, 13))
        # the same attention as the saved model gives on the bag's feature file
        fb = read_feature_bag(study_run / "features" / set_name / f"{bag_id}.h5")
        (prob, expected), = predict(model, [fb])
        by_name = {Path(p).name: float(a) for p, a in zip(fb.tile_paths, expected)}
        assert {t["name"]: float(t["data-attention"]) for t in tiles} == pytest.approx(by_name, abs=1e-6)
        assert float(g["data-model-prob"]) == pytest.approx(prob[1], abs=1e-9)
        assert float(g["data-prob"]) == pytest.approx(prob[1], abs=1e-5)  # as in the predictions file
        # tile truth from tiles.csv; tumour tiles carry the 'tumour' class (red border)
        with open(study_run / "bags" / set_name / "tiles.csv", newline="") as fh:
            truth = {Path(r["path"]).name: int(r["tile_label"]) for r in csv.DictReader(fh) if r["case"] == bag_id}
        assert {t["name"] for t in tiles} == set(truth)
        for t in tiles:
            assert int(t["data-truth"]) == truth[t["name"]]
            assert ("tumour" in t["class"].split()) == (truth[t["name"]] == 1)
        assert (sum(truth.values()) > 0) == (g["data-y"] == "1")  # tumour tiles exactly in tumour bags
    # which bags: the most confident correct tumour bag first, then the most confident non-tumour bag;
    # 'most wrong' ones are misclassified, worst first
    threshold = json.loads((study_run / "evaluation" / "metrics.json").read_text())["threshold"]
    rows = []
    for name in ("test_12_6", "test_12_1"):
        with open(study_run / "evaluation" / f"predictions_{name}.csv", newline="") as fh:
            rows += [(f"{name}/{r['bag_id']}", int(r["y_true"]), float(r["prob_positive"])) for r in csv.DictReader(fh)]
    pos_ok = sorted((r for r in rows if r[1] == 1 and r[2] >= threshold), key=lambda r: -r[2])
    neg_ok = sorted((r for r in rows if r[1] == 0 and r[2] < threshold), key=lambda r: r[2])
    wrong = sorted((r for r in rows if (r[2] >= threshold) != (r[1] == 1)), key=lambda r: -abs(r[1] - r[2]))
    alternating = [x[i][0] for i in range(len(rows)) for x in (pos_ok, neg_ok) if i < len(x)]
    n_wrong = min(3, len(wrong))
    assert [g["data-bag"] for g in galleries] == alternating[: 6 - n_wrong] + [r[0] for r in wrong[:n_wrong]]
    assert [g["data-reason"] for g in galleries] == ["most confident (correct)"] * (6 - n_wrong) + ["most wrong"] * n_wrong
    assert pos_ok and neg_ok and wrong  # this small run exercises every kind of pick
    # the thumbnails are small JPEGs, one per tile
    first = next(a for t, a in doc.tags if t == "img" and a.get("title") == galleries[0]["tiles"][0]["name"])
    from PIL import Image

    im = Image.open(io.BytesIO(base64.b64decode(first["src"].split(",", 1)[1])))
    assert im.format == "JPEG" and max(im.size) == 96


def test_named_bag_max_tiles_and_out_path(study_run: Path, tmp_path):
    out = tmp_path / "elsewhere" / "r.html"
    path = build_report(study_run, out, bags=["test_12_1/3"], max_bags=0, max_tiles=5, n_resamples=100)
    assert path == out and (tmp_path / "elsewhere" / "r_figures" / "roc_pr.png").is_file()
    (g,) = _galleries(_Doc(out.read_text(encoding="utf-8")))
    assert g["data-bag"] == "test_12_1/3" and len(g["tiles"]) == 5
    model, _ = load_checkpoint(study_run / "model" / "model.pt")
    fb = read_feature_bag(study_run / "features" / "test_12_1" / "3.h5")
    (_, att), = predict(model, [fb])
    assert [float(t["data-attention"]) for t in g["tiles"]] == pytest.approx(sorted(att, reverse=True)[:5], abs=1e-6)
    assert "the top 5 of 12 tiles" in out.read_text(encoding="utf-8")


# ------------------------------------------------------------------------------ choosing bags


def _ref(name: str, y: int, p: float, t: float = 0.5) -> BagRef:
    set_name, bag_id = name.split("/")
    return BagRef("", set_name, bag_id, y, p, t, Path("m.pt"), None, None, None)


def test_choose_bags_named_confident_and_wrong():
    c = [_ref("a/0", 1, 0.99), _ref("a/1", 0, 0.02), _ref("a/2", 1, 0.999), _ref("a/3", 0, 0.9),
         _ref("b/0", 1, 0.1), _ref("b/1", 0, 0.6), _ref("b/2", 0, 0.001), _ref("b/3", 1, 0.7)]
    got = choose_bags(c, ["b/3"], 5)
    assert [(b.name, b.reason) for b in got] == [
        ("b/3", "named"),
        ("a/2", "most confident (correct)"),  # most confident tumour bag
        ("b/2", "most confident (correct)"),  # most confident non-tumour bag
        ("a/0", "most confident (correct)"),
        ("a/3", "most wrong"),  # p = 0.9 for a negative bag
        ("b/0", "most wrong"),  # p = 0.1 for a positive bag
    ]
    # no misclassified bag: all picks are confident ones; a bare bag id finds the first set holding it
    right = [b for b in c if b.correct]
    assert [b.reason for b in choose_bags(right, [], 3)] == ["most confident (correct)"] * 3
    assert choose_bags(c, ["1"], 0)[0].name == "a/1"
    with pytest.raises(HistomilError, match=r"--bag 'c/9': no such bag .*test sets: a, b"):
        choose_bags(c, ["c/9"], 2)


# ------------------------------------------------------------------------------ cross-validation


def test_crossval_report_table_curves_and_galleries_from_the_tile_cache(crossval_run: Path):
    summary = json.loads((crossval_run / "crossval.json").read_text())
    assert not (crossval_run / "seed_0" / "fold_0" / "features").exists()  # feature files were removed
    path = build_report(crossval_run, max_bags=2)
    text = path.read_text(encoding="utf-8")
    doc = _Doc(text)
    _assert_self_contained(text, doc)
    for name, s in summary["test_sets"].items():
        for k in METRICS:
            (cell,) = doc.find("td", data_set=name, data_metric=k)
            st = s["metrics"][k]
            for attr, key in (("data-value", "mean"), ("data-low", "low"), ("data-high", "high")):
                if st[key] is None:
                    assert cell[attr] == ""
                else:
                    assert float(cell[attr]) == st[key]
            if st["std"] is not None:
                assert f"{st['mean']:.3f} ± {st['std']:.3f}" in text
        (ece,) = doc.find("td", data_set=name, data_metric="ece_pooled")
        assert float(ece["data-value"]) == s["ece"]["pooled"]
    figs = sorted(p.name for p in (crossval_run / "report_figures").glob("*.png"))
    assert figs == sorted(["training_curves.png", "roc_per_run.png", "roc_pr_pooled.png", "reliability.png"]
                          + [f"confusion_{n}.png" for n in summary["test_sets"]])
    galleries = _galleries(doc)
    assert [g["data-reason"] for g in galleries] == ["most confident (correct)", "most wrong"]
    for g in galleries:
        run, set_name, bag_id = g["data-bag"].rsplit("/", 2)
        assert run in ("seed_0/fold_0", "seed_0/fold_1")
        att = [float(t["data-attention"]) for t in g["tiles"]]
        assert len(att) == 10 and att == sorted(att, reverse=True)
        assert sum(att) == pytest.approx(1.0, abs=1e-4)  # softmax attention over the whole bag
        # features rebuilt from the tile cache give the probability recorded when the fold was evaluated
        assert float(g["data-model-prob"]) == pytest.approx(float(g["data-prob"]), abs=1e-6)
        with open(crossval_run / run / f"predictions_{set_name}.csv", newline="") as fh:
            (row,) = [r for r in csv.DictReader(fh) if r["bag_id"] == bag_id]
        assert float(g["data-prob"]) == float(row["prob_positive"])
        assert ("misclassified" in text) and (int(row["y_pred"]) != int(row["y_true"])) == (g["data-reason"] == "most wrong")
    # a named bag of a given run, and a bag whose tiles are gone: the report says so instead of failing
    run, set_name, bag_id = galleries[0]["data-bag"].rsplit("/", 2)
    pruned = crossval_run / "seed_0" / "fold_1" / "bags" / "test_10_5" / "2"
    shutil.move(pruned, pruned.with_name("moved"))
    try:
        path = build_report(crossval_run, crossval_run / "named.html", bags=["seed_0/fold_1/test_10_5/2"], max_bags=0)
    finally:
        shutil.move(pruned.with_name("moved"), pruned)
    (g,) = _galleries(_Doc(path.read_text(encoding="utf-8")))
    assert g["data-bag"] == "seed_0/fold_1/test_10_5/2" and g["tiles"] == []
    assert "no gallery: its feature file and its tile folder were both removed" in path.read_text(encoding="utf-8")


# ------------------------------------------------------------------------------ command line and errors


def _cli() -> typer.Typer:
    app = typer.Typer()
    app.command("report")(report_cmd)
    app.command("other")(lambda: None)  # two commands, so 'report' is addressed by name as in the real CLI
    return app


def test_cli_writes_the_report_and_reports_bad_input_in_one_line(study_run: Path, tmp_path):
    runner = CliRunner()
    app = _cli()
    out = tmp_path / "cli.html"
    result = runner.invoke(app, ["report", str(study_run), "--out", str(out), "--max-bags", "1", "--bag", "test_12_6/0"])
    assert result.exit_code == 0, result.output
    assert out.is_file() and str(out) in result.output.replace("\n", "")
    assert len(_galleries(_Doc(out.read_text(encoding="utf-8")))) == 2

    def fails(*args: str) -> str:
        r = runner.invoke(app, ["report", *args])
        assert r.exit_code == 2, r.output
        assert "Traceback" not in r.output and r.output.strip().count("\n") == 0, r.output
        return r.output

    assert "run folder not found" in fails(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    assert "not a finished histomil run" in fails(str(tmp_path / "empty"))
    assert "no such bag" in fails(str(study_run), "--out", str(out), "--bag", "test_12_6/999")
    broken = tmp_path / "broken"
    shutil.copytree(study_run, broken, symlinks=True, ignore=shutil.ignore_patterns("report*"))
    (broken / "evaluation" / "predictions_test_12_1.csv").write_text("bag_id,y_true\n0,1\n")
    msg = fails(str(broken))
    assert "predictions_test_12_1.csv" in msg and "prob_positive" in msg
    (broken / "evaluation" / "metrics.json").write_text("{not json")
    assert "metrics.json: unreadable JSON" in fails(str(broken))
    assert not (broken / "report.html").exists() and not (broken / "report_figures").exists()


# ------------------------------------------------------------------------------ headless Chromium


@pytest.mark.skipif(find_chromium() is None, reason="Chromium is not installed (apt-get install chromium); .ci/run installs it")
def test_report_renders_in_headless_chromium(study_run: Path, study_report: Path, tmp_path):
    shot = tmp_path / "report.png"
    facts = render_in_chromium(study_report, shot, 1280, 2000)
    assert facts["errors"] == []
    assert facts["title"] == f"histomil report: {study_run.name}"
    assert facts["metricsVisible"] and facts["metricCells"] == 2 * (len(METRICS) + 1)
    doc_galleries = _galleries(_Doc(study_report.read_text(encoding="utf-8")))
    assert [g["bag"] for g in facts["galleries"]] == [g["data-bag"] for g in doc_galleries]
    for g in facts["galleries"]:
        assert len(g["attention"]) == g["shown"] == 12  # every tile drawn, as a thumbnail wider than 50 px
        assert g["attention"] == sorted(g["attention"], reverse=True)
    assert facts["brokenImages"] == [] and facts["images"] == 5 + 6 * 12
    from PIL import Image

    with Image.open(shot) as im:
        assert im.size == (1280, 2000)
        assert np.asarray(im.convert("L")).std() > 10  # something was drawn
