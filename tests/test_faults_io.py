"""Clear failures instead of tracebacks (issue 12, items 5-7): a read-only or full output disk, invalid
config values and options, stdout carrying only results, ``--version``, the extraction summary,
unlabelled bags and unreadable checkpoints.

The disk cases run the real CLI in a subprocess inside its own mount namespace (``unshare``), on a
read-only bind mount or a size-limited tmpfs; the mounts vanish with the subprocess. Where the machine
does not allow mounts (not root, no CAP_SYS_ADMIN), those cases are skipped with the reason. The
permission case runs the CLI on an output folder of mode 0555, as root stripped of the capabilities
that ignore permission bits when the tests run as root.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from tiny_runs import FAST_ENCODER, TINY_CROSSVAL
from typer.testing import CliRunner

from histomil import __version__
from histomil.cli import app
from histomil.config import check_range
from histomil.errors import HistomilError, os_error_line, write_failure
from histomil.features.store import FeatureBag, read_feature_bag, write_feature_bag
from histomil.files import atomic_write
from histomil.resources import example_tile_table
from histomil.training.checkpoint_file import read_checkpoint_dict

pytestmark = pytest.mark.usefixtures("fast_encoder", "one_thread")

TESTS = Path(__file__).resolve().parent


def invoke(*args: object):
    return CliRunner().invoke(app, [str(a) for a in args])


def cli(*args: object) -> str:
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    return result.output


def error_line(result) -> str:
    """The one ``error:`` line of a failed command (exit status 2, no traceback)."""
    assert result.exit_code == 2, (result.output, result.exception)
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, result.stderr
    return lines[0]


# --- inputs shared by the cases -------------------------------------------------------------


def bag_root(folder: Path, n_bags: int = 4, size: int = 3, labelled: int | None = None) -> Path:
    """``n_bags`` folders of ``size`` example tiles, the first ``labelled`` (default all) in labels.csv."""
    tiles = sorted(example_tile_table().parent.rglob("*.jpg"))
    folder.mkdir(parents=True)
    for b in range(n_bags):
        (folder / f"b{b}").mkdir()
        for t in tiles[b * size : (b + 1) * size]:
            shutil.copyfile(t, folder / f"b{b}" / t.name)
    n = n_bags if labelled is None else labelled
    (folder / "labels.csv").write_text("case,y_true\n" + "".join(f"b{b},{b % 2}\n" for b in range(n)))
    return folder


def run_config(folder: Path, **changes: object) -> Path:
    """The tiny study run of tiny_runs (fast encoder) as a run config, with dotted-key ``changes``."""
    raw = {"tiles": str(example_tile_table()), **{k: TINY_CROSSVAL[k] for k in ("study", "features", "train")}}
    raw = json.loads(json.dumps(raw))
    for dotted, value in changes.items():
        node = raw
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    path = folder / "run.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, fast_encoder) -> dict[str, Path]:
    """Bags, their features, a model trained on them, a run config and a small slide."""
    from slide_fixtures import paint, write_pyramid

    root = tmp_path_factory.mktemp("inputs")
    bags = bag_root(root / "bags")
    feats = root / "features"
    cli("features", "extract", bags, feats, "--encoder", FAST_ENCODER, "--precision", "fp32", "--workers", "0")
    model = root / "model"
    cli("train", feats, "--val", feats, "--out", model, "--epochs", "1", "--min-epochs", "0", "--model", "mean_pool")
    slide = write_pyramid(root / "slide.tif", paint(scale=4), mpp=1.0, downsamples=(1, 4))
    return {"bags": bags, "features": feats, "model": model / "model.pt", "config": run_config(root), "slide": slide,
            "root": root}


# --- read-only and full output disks (subprocesses in their own mount namespace) ------------

# Runs each command through the real CLI (CliRunner) in this process, after optionally filling the file
# system of `fill` so that every write of data fails; prints exit code, stderr and the files left.
DRIVER = f"""
import json, os, sys
from pathlib import Path
sys.path.insert(0, {str(TESTS)!r})
from tiny_runs import FAST_ENCODER, colour_stats_encoder
from histomil.features.encoders import ENCODERS
ENCODERS[FAST_ENCODER] = colour_stats_encoder
from typer.testing import CliRunner
from histomil.cli import app
spec = json.loads(sys.argv[1])
root = Path(spec["root"])
if spec.get("fill"):
    fd = os.open(spec["fill"], os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, bytes(4096))
    except OSError:
        os.close(fd)
    small = os.open(spec["fill"] + "-tail", os.O_WRONLY | os.O_CREAT)  # the last bytes of a partial page
    try:
        while True:
            os.write(small, b"x")
    except OSError:
        os.close(small)
out = {{}}
for name, args in spec["commands"]:
    r = CliRunner().invoke(app, args)
    files = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and not p.name.startswith("filler"))
    out[name] = dict(code=r.exit_code, stderr=r.stderr, stdout=r.stdout, files=files,
                     exception=None if r.exit_code in (0, 2) else repr(r.exception))
print(json.dumps(out))
"""


def commands(root: Path, inputs: dict[str, Path]) -> list[tuple[str, list[str]]]:
    """The six writing commands of item 5, each with its output under ``root``."""
    fast = ["--encoder", FAST_ENCODER, "--precision", "fp32", "--workers", "0"]
    cmds = [
        ("features extract", ["features", "extract", inputs["bags"], root / "extract", *fast]),
        # the tile cache elsewhere: the feature files themselves (h5py) meet the disk
        ("features extract, cache elsewhere", ["features", "extract", inputs["bags"], root / "extract2", *fast,
                                               "--cache", inputs["root"] / "cache-elsewhere"]),
        ("train", ["train", inputs["features"], "--val", inputs["features"], "--out", root / "train", "--epochs", "1",
                   "--min-epochs", "0", "--model", "mean_pool"]),
        ("bags make", ["bags", "make", example_tile_table(), root / "study", "--bag-size", "5", "--train-bags", "4",
                       "--val-bags", "2", "--test-bags", "2", "--train-witnesses", "2", "--val-witnesses", "2",
                       "--test-witnesses", "2", "--split-col", "split"]),
        ("run", ["run", inputs["config"], "--out", root / "run"]),
        ("tile", ["tile", inputs["slide"], "--out", root / "tiles", "--mpp", "4", "--tile-size", "64"]),
        ("predict", ["predict", inputs["model"], inputs["features"], "--out", root / "predictions.csv"]),
    ]
    return [(name, [str(a) for a in args]) for name, args in cmds]


def in_namespace(mount: str, spec: dict) -> dict:
    """Run DRIVER in a private mount namespace after the shell ``mount`` commands; skip where not allowed."""
    if shutil.which("unshare") is None:
        pytest.skip("no 'unshare' on this machine: cannot make a read-only or full file system for the test")
    probe = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", mount],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot mount here (needs root or CAP_SYS_ADMIN): {probe.stderr.strip()}")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    proc = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", f'{mount} && exec "$0" -c "$1" "$2"',
         sys.executable, DRIVER, json.dumps(spec)],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def assert_clear_failures(results: dict, root: Path, problem: str) -> None:
    """Every command: exit 2, one ``error:`` line naming a path under ``root`` and ``problem``, no traceback,
    no temp file and no visible (half-written) file left."""
    assert set(results) == {"features extract", "features extract, cache elsewhere", "train", "bags make", "run", "tile",
                            "predict"}
    for name, r in results.items():
        assert r["code"] == 2, (name, r["exception"], r["stderr"][-2000:])
        assert "Traceback" not in r["stderr"] + r["stdout"], name
        lines = [line for line in r["stderr"].splitlines() if line.startswith("error: ")]
        assert len(lines) == 1, (name, r["stderr"])
        assert str(root) in lines[0] and problem in lines[0].lower(), (name, lines[0])
        assert not [f for f in r["files"] if f.endswith(".tmp") or ".tmp" in f], (name, r["files"])
        visible = [f for f in r["files"] if not any(part.startswith(".") for part in Path(f).parts)]
        assert not visible, (name, visible)


def test_read_only_output_folder(inputs, tmp_path: Path):
    """Root ignores permission bits, so the folder is a read-only bind mount of itself."""
    root = tmp_path / "ro"
    (root / "extract").mkdir(parents=True)  # one output folder that exists, the others must be made
    mount = f"mount --bind {root} {root} && mount -o remount,ro,bind {root}"
    results = in_namespace(mount, {"root": str(root), "commands": commands(root, inputs)})
    assert_clear_failures(results, root, "read-only file system")


def test_full_disk(inputs, tmp_path: Path):
    """A 1 MiB tmpfs filled up before each command: every write of data fails with ENOSPC, however the
    writer (Python, h5py, torch) reports it."""
    root = tmp_path / "full"
    root.mkdir()
    mount = f"mount -t tmpfs -o size=1m tmpfs {root}"
    results = in_namespace(mount, {"root": str(root), "fill": str(root / "filler"), "commands": commands(root, inputs)})
    assert_clear_failures(results, root, "no space left on device")


#: root without the capabilities that let it ignore permission bits (setpriv, util-linux): what an
#: unprivileged user meets, while the interpreter and the inputs stay readable
WITHOUT_OVERRIDE = ["setpriv", "--bounding-set=-dac_override,-dac_read_search,-fowner"]


def unprivileged(command: list[str]) -> list[str]:
    """``command`` as run by a user whom permission bits stop: as it is when this is not root, else under
    root stripped of its permission-override capabilities (skips where that cannot be done)."""
    if os.geteuid() != 0:
        return command
    if shutil.which("setpriv") is None:
        pytest.skip("running as root and no 'setpriv' to drop the capability that ignores permission bits")
    return [*WITHOUT_OVERRIDE, *command]


def test_permission_denied_output_folder(inputs, tmp_path: Path):
    """A folder without write permission (mode 0555): every writing command ends with one line naming the
    path and 'permission denied', no traceback, nothing half-written."""
    probe = subprocess.run(unprivileged([sys.executable, "-c", "import histomil"]), capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot run histomil without permission overrides here: {probe.stderr.strip()[-200:]}")
    root = tmp_path / "denied"
    (root / "extract").mkdir(parents=True)  # one output folder that exists, the others must be made
    for p in (root / "extract", root):
        os.chmod(p, 0o555)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    try:
        proc = subprocess.run(unprivileged([sys.executable, "-c", DRIVER, json.dumps({"root": str(root),
                                                                                     "commands": commands(root, inputs)})]),
                              capture_output=True, text=True, env=env, timeout=300)
    finally:
        for p in (root, root / "extract"):
            os.chmod(p, 0o755)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_clear_failures(json.loads(proc.stdout.strip().splitlines()[-1]), root, "permission denied")


# --- the writers' side, in process ----------------------------------------------------------


def test_atomic_write_names_the_output_and_removes_its_temp_file(tmp_path: Path, monkeypatch):
    final = tmp_path / "out" / "bag.h5"
    # Python's write errors name no file; h5py puts errno and the temp file's name into its text
    for exc in (OSError(errno.ENOSPC, "No space left on device"),
                RuntimeError("Can't decrement id ref count (file write failed: time = x, filename = '{tmp}', "
                             "file descriptor = 3, errno = 28, error message = 'No space left on device')")):
        with pytest.raises(OSError) as caught, atomic_write(final) as tmp:
            tmp.write_bytes(b"half")
            raise type(exc)(*[a.format(tmp=tmp) if isinstance(a, str) else a for a in exc.args])
        assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(final)
        assert os_error_line(caught.value) == f"{final}: no space left on device"
        assert list(final.parent.iterdir()) == []


def test_torch_save_on_a_full_disk_is_named_by_the_disk_state(tmp_path: Path, monkeypatch):
    """torch says only 'unexpected pos ...': the file system's free space tells what happened."""
    final = tmp_path / "last.pt"

    class Full:
        f_flag, f_bavail = 0, 0

    monkeypatch.setattr(os, "statvfs", lambda folder: Full())
    with pytest.raises(OSError) as caught, atomic_write(final):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
    assert (caught.value.errno, caught.value.filename) == (errno.ENOSPC, str(final))
    assert list(tmp_path.iterdir()) == []


def test_other_failures_inside_a_write_pass_unchanged(tmp_path: Path):
    """An error about another file, or a programming error, is not relabelled as a failed write."""
    with pytest.raises(FileNotFoundError) as caught, atomic_write(tmp_path / "a.h5"):
        open(tmp_path / "missing-input.csv")
    assert caught.value.filename == str(tmp_path / "missing-input.csv")
    with pytest.raises(RuntimeError, match="a bug"), atomic_write(tmp_path / "b.h5"):
        raise RuntimeError("a bug")  # the disk is neither full nor read-only
    assert write_failure(ValueError("x"), tmp_path / "c.h5") is None
    assert list(tmp_path.iterdir()) == []


# --- configs and options are checked before any work ----------------------------------------

BAD_RUN_VALUES = [
    ("features.batch_size", 0, "features.batch_size", "greater than or equal to 1 (got 0)"),
    ("features.batch_size", -4, "features.batch_size", "greater than or equal to 1 (got -4)"),
    ("features.workers", -1, "features.workers", "greater than or equal to 0 (got -1)"),
    ("threshold", 1.5, "threshold", "must lie in [0, 1], got 1.5"),
    ("threshold", -0.1, "threshold", "must lie in [0, 1], got -0.1"),
    ("study.test_bags", 0, "study.test_bags", "at least 1 for a run, got 0"),
    ("study.train_bags", 0, "study.train_bags", "at least 1 for a run, got 0"),
    ("study.val_bags", 0, "study.val_bags", "at least 2 for a run, got 0"),
    ("train.model", "gated_abmill", "train.model", "unknown model 'gated_abmill'; allowed: abmil,"),
    ("features.encoder", "resnet50", "features.encoder", "unknown encoder 'resnet50'; allowed:"),
]


@pytest.mark.parametrize("key, value, named, problem", BAD_RUN_VALUES, ids=[f"{k}={v}" for k, v, _, _ in BAD_RUN_VALUES])
def test_run_config_is_validated_before_any_work(tmp_path: Path, key, value, named, problem):
    config, out = run_config(tmp_path, **{key: value}), tmp_path / "run"
    line = error_line(invoke("run", config, "--out", out))
    assert line.startswith(f"error: {config}: {named}") and problem in line, line
    assert not out.exists()  # nothing composed, extracted or written
    # the same check for the same key set on the command line
    line = error_line(invoke("run", run_config(tmp_path), "--out", out, "--set", f"{key}={value}"))
    assert named in line and problem in line and not out.exists()


def test_demo_and_crossval_configs_are_validated_before_any_work(tmp_path: Path):
    out = tmp_path / "demo"
    assert "features.batch_size" in error_line(invoke("demo", "--out", out, "--set", "features.batch_size=0"))
    config = tmp_path / "cv.yaml"
    config.write_text(yaml.safe_dump({"tiles": str(example_tile_table()), **TINY_CROSSVAL, "train": {"model": "nope"}}))
    line = error_line(invoke("crossval", config, "--out", out))
    assert "train.model: unknown model 'nope'" in line
    assert not out.exists()


BAD_OPTIONS = [
    (["features", "extract", "{bags}", "{out}", "--batch-size", "0"], "--batch-size: Input should be greater than or equal to 1 (got 0)"),
    (["features", "extract", "{bags}", "{out}", "--workers", "-2"], "--workers: Input should be greater than or equal to 0 (got -2)"),
    (["features", "extract", "{bags}", "{out}", "--encoder", "vit"], "--encoder: unknown encoder 'vit'; allowed:"),
    (["train", "{features}", "--val", "{features}", "--out", "{out}", "--batch-size", "0"], "--batch-size: Input should be greater than or equal to 1 (got 0)"),
    (["train", "{features}", "--val", "{features}", "--out", "{out}", "--model", "nope"], "--model: unknown model 'nope'"),
    (["evaluate", "{model}", "{features}", "--out", "{out}", "--threshold", "1.5"], "--threshold must lie in [0, 1], got 1.5"),
    (["predict", "{model}", "{features}", "--out", "{out}", "--threshold", "-0.2"], "--threshold must lie in [0, 1], got -0.2"),
    (["predict", "{model}", "{features}", "--out", "{out}", "--top-k", "-1"], "--top-k must be at least 0, got -1"),
    (["compare", "{features}", "--out", "{out}", "--threshold", "2"], "--threshold must lie in [0, 1], got 2"),
    (["train-pixels", "{bags}", "--val", "{bags}", "--out", "{out}", "--model", "gated"], "model: unknown model 'gated'; allowed:"),
    (["features", "slides", "{slide}", "--out", "{out}", "--batch-size", "0"], "--batch-size must be at least 1, got 0"),
    (["predict-slides", "{model}", "{slide}", "--out", "{out}", "--threshold", "3"], "--threshold must lie in [0, 1], got 3"),
]


@pytest.mark.parametrize("args, message", BAD_OPTIONS, ids=[" ".join(a[:2] + a[-2:]) for a, _ in BAD_OPTIONS])
def test_bad_options_are_refused_in_one_line(inputs, tmp_path: Path, args, message):
    out = tmp_path / "out"
    line = error_line(invoke(*[a.format(out=out, **inputs) for a in args]))
    assert message in line, line
    assert not out.exists()


def test_check_range():
    check_range("--x", None, 0, 1)
    check_range("--x", 0.0, 0, 1)
    with pytest.raises(HistomilError, match=r"--x must lie in \[0, 1\], got nan"):
        check_range("--x", float("nan"), 0, 1)
    with pytest.raises(HistomilError, match="--n must be at most 3, got 4"):
        check_range("--n", 4, high=3)


# --- small ones ------------------------------------------------------------------------------


def test_version():
    result = invoke("--version")
    assert result.exit_code == 0 and result.stdout == f"histomil {__version__}\n"


def test_stdout_carries_only_results(inputs, tmp_path: Path):
    """``histomil predict ... > file``: the file gets the result line only; the skip warning of a bad
    tile, log lines and progress bars go to stderr (a real subprocess, real pipes)."""
    bags = bag_root(tmp_path / "bags", labelled=0)
    (bags / "labels.csv").unlink()
    (bags / "b1" / "broken.jpg").write_bytes(b"not a jpeg")
    out = tmp_path / "p.csv"
    driver = (f"import sys; sys.path.insert(0, {str(TESTS)!r})\n"
              "from tiny_runs import FAST_ENCODER, colour_stats_encoder\n"
              "from histomil.features.encoders import ENCODERS\n"
              "ENCODERS[FAST_ENCODER] = colour_stats_encoder\n"
              "from histomil.cli import app\n"
              "app(sys.argv[1:], prog_name='histomil')\n")
    proc = subprocess.run([sys.executable, "-c", driver, "predict", str(inputs["model"]), str(bags), "--out", str(out),
                           "--on-bad-tile", "skip", "--precision", "fp32"], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [f"4 bags predicted ({proc.stdout.split('(')[1].split(' ')[0]} positive); written to {out}"]
    assert "broken.jpg" in proc.stderr and "broken.jpg" not in proc.stdout
    assert out.read_text().count("\n") == 5  # header and 4 bags


def test_extraction_summary_does_not_count_skipped_tiles_as_encoded(tmp_path: Path):
    bags = bag_root(tmp_path / "bags")
    (bags / "b0" / "broken.jpg").write_bytes(b"not a jpeg")
    result = invoke("features", "extract", bags, tmp_path / "f", "--encoder", FAST_ENCODER, "--precision", "fp32",
                    "--workers", "0", "--on-bad-tile", "skip")
    assert result.exit_code == 0, result.output
    assert "4 bags (4 written, 0 already done), 13 distinct tiles, 12 encoded, 1 bad tiles skipped" in result.stdout


def test_unlabelled_bags_are_reported_once_with_their_count(tmp_path: Path):
    bags = bag_root(tmp_path / "bags", labelled=1)
    result = invoke("features", "extract", bags, tmp_path / "f", "--encoder", FAST_ENCODER, "--precision", "fp32",
                    "--workers", "0")
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1 and f"{bags}: 3 of 4 bags have no label" in warnings[0]
    assert [read_feature_bag(tmp_path / "f" / f"b{i}.h5").label for i in range(4)] == [0, None, None, None]


class NotAllowed:
    """A class weights-only loading refuses to unpickle."""


def test_unreadable_checkpoints_are_one_clean_line(tmp_path: Path):
    pickled = tmp_path / "pickled.pt"
    torch.save({"x": NotAllowed()}, pickled)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(pickled.read_bytes()[:300])
    text = tmp_path / "text.pt"
    text.write_text("hello")
    for path, problem in ((pickled, "holds Python objects other than tensors and plain values: Unsupported global"),
                          (truncated, "failed finding central directory"),
                          (text, "truncated, corrupt or not a torch file")):
        with pytest.raises(HistomilError) as caught:
            read_checkpoint_dict(path)
        message = str(caught.value)
        assert message.startswith(f"{path}: not a readable checkpoint (") and problem in message, message
        assert "\x1b" not in message and "weights_only" not in message
    line = error_line(invoke("predict", text, tmp_path, "--out", tmp_path / "p.csv"))
    assert str(text) in line


def test_feature_files_written_before_a_failure_stay_whole(tmp_path: Path):
    """A failed write leaves the previous version of the file in place, never half of the new one."""
    path = tmp_path / "b.h5"
    old = FeatureBag("b", np.ones((2, 3), np.float32), ["t0", "t1"], label=1)
    write_feature_bag(path, old)
    with pytest.raises(OSError), atomic_write(path) as tmp:
        tmp.write_bytes(b"partial")
        raise OSError(errno.EDQUOT, "Disk quota exceeded")
    assert np.array_equal(read_feature_bag(path).features, old.features)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.h5"]


def test_os_errors_become_one_line_naming_a_path(tmp_path: Path, capsys):
    """At the CLI root: the error's own file name, else the one h5py wrote into its text, else the
    command's ``out`` (Python's write errors name no file); never a traceback."""
    import typer

    from histomil.ui import user_errors

    @user_errors
    def command(source: Path, out: Path, exc: OSError) -> None:
        raise exc

    h5py_text = ("Unable to synchronously create file (unable to open file: name = '/data/x.h5', errno = 30, "
                 "error message = 'Read-only file system', flags = 13, o_flags = 242)")
    cases = [
        (OSError(errno.EACCES, "Permission denied", str(tmp_path / "a.csv")), f"error: {tmp_path / 'a.csv'}: permission denied"),
        (OSError(h5py_text), "error: /data/x.h5: read-only file system"),
        (OSError(errno.EDQUOT, "Disk quota exceeded"), f"error: {tmp_path / 'out'}: disk quota exceeded"),
    ]
    for exc, expected in cases:
        with pytest.raises(typer.Exit) as caught:
            command(tmp_path / "in", out=tmp_path / "out", exc=exc)
        assert caught.value.exit_code == 2
        captured = capsys.readouterr()
        assert captured.err.strip() == expected and captured.out == ""
