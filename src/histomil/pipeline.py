"""One call from a tile table to an evaluated model: compose bags, extract features, train, evaluate.

The whole run is described by a :class:`StudyRunConfig` (YAML or JSON; unknown keys are rejected),
and every step records its wall time in ``timings.json`` so the README's numbers can be regenerated.
Steps whose outputs already exist and were made from the same inputs and settings are reused, so a
stopped run can simply be started again; a run folder is never resumed with other settings.
With ``train.task: regression`` the model predicts each bag's tumour fraction (the study's targets.csv,
:mod:`histomil.evaluation.study_regression`) and no threshold is fitted.
"""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path
from typing import Callable, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from histomil import config
from histomil.config import changed_since_record
from histomil.data.bags import load_bag_folders
from histomil.data.compose import compose_study, read_study, remove_compose_leftovers
from histomil.data.study_spec import StudySpec
from histomil.data.tile_table import TileTable, read_tile_table
from histomil.devices import check_device_name, resolve_device
from histomil.errors import HistomilError
from histomil.evaluation.study_regression import check_study_task, load_study_bags
from histomil.evaluation.threshold import ThresholdConfig, describe_rule, fit_threshold
from histomil.features import shards
from histomil.features.cache import FeatureCache
from histomil.features.encoders import build_encoder, check_encoder_name
from histomil.features.extract import copy_sidecars, extract_bags
from histomil.features.runtimes import with_runtime
from histomil.features.shards import Shard
from histomil.files import exclusive_output, remove_temp_leftovers, write_json
from histomil.hardware import run_environment
from histomil.training.checkpoint import combine_checkpoints
from histomil.training.trainer import TrainConfig, train

# Settings a resumed run may change: they change how fast it runs, never what it computes.
RESUMABLE_SETTINGS = frozenset({("features", "batch_size"), ("features", "workers"), ("features", "device"), ("train", "device"),
                                ("train", "threads")})


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TileColumns(_Strict):
    path: str = "path"
    label: str = "tumor"
    patient: str = "case_id"
    split: str | None = None


class FeatureConfig(_Strict):
    encoder: str = "efficientnet_lite0"
    weights: str | None = None  # weights file of a preset / timm:<arch> encoder (default: the local Hugging Face cache)
    # auto: bf16 where the CPU computes it natively (AVX512-BF16, AMX), fp32 elsewhere (histomil.hardware)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    # auto: OpenVINO for fp32 on the CPU when installed (histomil[cpu]), torch otherwise (histomil.features.runtimes)
    runtime: Literal["auto", "torch", "openvino", "onnxruntime"] = "auto"
    channels_last: bool = True
    batch_size: int = Field(64, ge=1)
    workers: int = Field(1, ge=0)  # decoding threads; 0 decodes in the main thread
    on_bad_tile: Literal["error", "skip"] = "error"
    device: str = "auto"  # where the encoder runs: cpu, cuda, cuda:N or auto (a CUDA GPU when there is one)

    @field_validator("encoder")
    @classmethod
    def _known_encoder(cls, name: str) -> str:
        return check_encoder_name(name)  # when the config is read, not after bags are composed

    @field_validator("device")
    @classmethod
    def _device_name(cls, name: str) -> str:
        return check_device_name(name)


class StudyRunConfig(_Strict):
    """Everything one study run needs; paths are relative to the config file."""

    tiles: Path
    columns: TileColumns = TileColumns()
    study: StudySpec = StudySpec()
    features: FeatureConfig = FeatureConfig()
    train: TrainConfig = TrainConfig()
    # the decision threshold: a number (fixed), or {rule: youden} / {rule: sensitivity, value: 0.9}
    # chosen on the validation bags only; either way it is stored in model.pt and applied to every test set.
    # Classification only: with train.task regression (the bag's tumour fraction) there is none
    threshold: float | ThresholdConfig = 0.5
    # how many models to train (seeds train.seed, train.seed + 1, ...); more than one: the model is the
    # mean of their probabilities (a seed ensemble), which removes the single-seed knife edge on new
    # patients at that many times the training time (README, "Why the training defaults are what they are")
    ensemble_seeds: int = Field(1, ge=1, le=20)

    @field_validator("threshold")
    @classmethod
    def _threshold_in_range(cls, value: float | ThresholdConfig) -> float | ThresholdConfig:
        if isinstance(value, float) and not 0.0 <= value <= 1.0:
            raise ValueError(f"a fixed threshold must lie in [0, 1], got {value}")
        return value

    @model_validator(mode="after")
    def _check_bag_counts(self) -> StudyRunConfig:
        # 0 bags of a split makes a study that composes and extracts, then fails in training or evaluation
        for key, least in (("train_bags", 1), ("val_bags", 2), ("test_bags", 1)):
            if getattr(self.study, key) < least:
                raise ValueError(f"study.{key} must be at least {least} for a run, got {getattr(self.study, key)}"
                                 + (" (the threshold and early stopping need validation bags)" if key == "val_bags" else ""))
        if not self.study.test_witnesses:
            raise ValueError("study.test_witnesses must list at least one W: each is a test set")
        check_study_task(self.train.task, "threshold" in self.model_fields_set, self.ensemble_seeds)
        return self

    def threshold_rule(self) -> ThresholdConfig:
        """``threshold`` as a rule (a plain number is the fixed rule)."""
        if isinstance(self.threshold, ThresholdConfig):
            return self.threshold
        return ThresholdConfig(rule="fixed", value=float(self.threshold))


def load_config(path: str | Path, overrides: dict | None = None) -> StudyRunConfig:
    """Read and validate a YAML/JSON run config; errors name the file and the bad key."""
    return config.load_config(StudyRunConfig, path, overrides)


def split_names(study_dir: Path) -> list[str]:
    """The splits of a composed study, in the order study.json lists them."""
    if not (study_dir / "study.json").is_file():
        raise HistomilError(f"{study_dir}: not a study folder (no study.json); make one with 'histomil bags make'")
    return [s["name"] for s in read_study(study_dir)["splits"]]


def _prefixed(progress: Callable[[str, int, int], None] | None, prefix: str) -> Callable[[str, int, int], None] | None:
    """A progress callback that prefixes each stage name (e.g. with the split)."""
    if progress is None:
        return None
    return lambda stage, done, total: progress(f"{prefix} {stage}", done, total)


def extract_study(
    study_dir: Path,
    out_dir: Path,
    cfg: FeatureConfig,
    cache_dir: Path | None = None,
    log: Callable[[str], None] | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    shard: Shard | None = None,
) -> dict[str, object]:
    """Extract features for every split of a study with one shared tile cache; feature files of bags
    no longer in the study (it was composed again) are deleted. With ``shard``, only its share of
    each split's bags; the split's labels are written once every shard has finished
    (:mod:`histomil.features.shards`)."""
    encoder = with_runtime(build_encoder(cfg.encoder, precision=cfg.precision, channels_last=cfg.channels_last, weights=cfg.weights,
                                         device=cfg.device), cfg.runtime)
    cache = FeatureCache.for_encoder(cache_dir or out_dir / "cache", encoder)
    summaries = {}
    splits = split_names(study_dir)
    for name in splits if shard is not None else []:
        shards.begin(out_dir / name, shard)  # every split incomplete until this shard has done it
    for name in splits:
        bags = load_bag_folders(study_dir / name, require_labels=True, on_bad_tile=cfg.on_bad_tile, log=log)
        ids = {f"{b.bag_id}.h5" for b in bags}
        for stale in (out_dir / name).glob("*.h5") if (out_dir / name).is_dir() else []:
            if stale.name not in ids:  # a bag of an earlier composition of the study: must not be trained on
                stale.unlink()
        split_progress = _prefixed(progress, f"{name}:")
        mine = shard.take(bags, key=lambda b: b.bag_id) if shard is not None else bags
        summaries[name] = extract_bags(
            mine, out_dir / name, encoder, cache, cfg.batch_size, cfg.workers, cfg.on_bad_tile, log=log, progress=split_progress,
            shard=shard,
        )
        if shard is None:
            copy_sidecars(study_dir / name, out_dir / name)
            shards.forget_shards(out_dir / name)
        else:
            shards.finish(out_dir / name, shard, [b.bag_id for b in mine])
            shards.merge_when_complete(out_dir / name, lambda _items, split=name: copy_sidecars(study_dir / split, out_dir / split))
    return summaries


def run_study(
    cfg: StudyRunConfig,
    out_dir: str | Path,
    log: Callable[[str], None] = print,
    progress: Callable[[str, int, int], None] | None = None,
) -> dict:
    """Compose, extract, train and evaluate; returns the evaluation results per test set.

    Run again on the same ``out_dir``, it resumes: the bags are kept when the tile table is unchanged,
    feature files when their tiles are (:func:`extract_bags`), training when its data is (else it starts
    afresh), and evaluation is redone. Changed settings are refused (:func:`check_resume`)."""
    out_dir = Path(out_dir)
    with exclusive_output(out_dir, "run"):
        remove_temp_leftovers(out_dir, "*.json")
        remove_compose_leftovers(out_dir / "bags")
        check_resume(out_dir, cfg)  # before anything is written: config.json describes the run that happened
        return _run_study(cfg, out_dir, log, progress)


def check_resume(out_dir: Path, cfg: StudyRunConfig) -> None:
    """Refuse to continue a run folder made with other settings (its ``config.json``), naming the keys
    that changed; only :data:`RESUMABLE_SETTINGS` may differ. Hardware (``environment.json``) never blocks."""
    now = json.loads(cfg.model_dump_json())
    changed = [".".join(k) for k in changed_since_record(out_dir / "config.json", StudyRunConfig, now, RESUMABLE_SETTINGS,
                                                         "{path}: not a readable run config ({exc}); use another --out")]
    if changed:
        raise HistomilError(
            f"{out_dir}: was made with a different config ({', '.join(changed)} changed);"
            " use another --out, or restore the old settings to resume"
        )


def _check_tile_table(study_dir: Path, table: TileTable) -> None:
    """Refuse bags composed from an earlier version of the tile table (study.json's digest)."""
    recorded = read_study(study_dir).get("tile_table_digest")
    if recorded is None:  # composed before studies recorded it
        warnings.warn(f"{study_dir}: composed by an older histomil that recorded no tile table digest; "
                      f"cannot tell whether {table.source} changed since", stacklevel=2)
    elif recorded != table.digest():
        raise HistomilError(
            f"{table.source}: the tile table changed (paths, labels, patients or splits) since {study_dir} was composed;"
            " use another --out, or restore the table to resume"
        )


def _run_study(
    cfg: StudyRunConfig,
    out_dir: Path,
    log: Callable[[str], None],
    progress: Callable[[str, int, int], None] | None,
) -> dict:
    """:func:`run_study` once it holds ``out_dir`` and the settings match."""
    from histomil.evaluation.evaluate import evaluate_sets

    write_json(out_dir / "config.json", json.loads(cfg.model_dump_json()))
    environment = run_environment(cfg.features.precision, resolve_device(cfg.features.device))
    write_json(out_dir / "environment.json", environment)
    log(f"features in {environment['precision']} on {environment['device_name']} "
        f"({environment['device_capability']}, bf16 {environment['bf16']})")
    timings_path = out_dir / "timings.json"
    timings: dict[str, float] = json.loads(timings_path.read_text()) if timings_path.exists() else {}

    def timed(step: str, fn: Callable[[], object]) -> object:
        t0 = time.perf_counter()
        result = fn()
        timings[step] = round(time.perf_counter() - t0, 2)
        write_json(timings_path, timings)
        log(f"{step}: {timings[step]:.1f} s")
        return result

    study_dir, feat_dir, run_dir = out_dir / "bags", out_dir / "features", out_dir / "model"
    table = read_tile_table(cfg.tiles, cfg.columns.path, cfg.columns.label, cfg.columns.patient, cfg.columns.split)
    if (study_dir / "study.json").exists():
        _check_tile_table(study_dir, table)
    else:
        timed("compose bags", lambda: compose_study(table, cfg.study, study_dir, progress=_prefixed(progress, "composing")))
    timed("extract features", lambda: extract_study(study_dir, feat_dir, cfg.features, log=log, progress=progress))
    names = split_names(study_dir)
    tests = {n: feat_dir / n for n in names if n.startswith("test")}

    def fit() -> object:
        task = cfg.train.task  # classification: the bag's class; regression: its tumour fraction (targets.csv)
        train_bags, val_bags = (load_study_bags(feat_dir / split, task) for split in ("train", "val"))
        encoder_info = dict(train_bags[0].attrs)  # encoder, resolved precision and hardware (from extraction)
        on_epoch = (lambda row: progress("training epochs", int(row["epoch"]), cfg.train.epochs)) if progress else None
        if cfg.ensemble_seeds == 1:
            model_path = train(train_bags, val_bags, cfg.train, run_dir, encoder_info=encoder_info, on_epoch=on_epoch,
                               resume=True).model_path
        else:
            members = []
            for seed in range(cfg.train.seed, cfg.train.seed + cfg.ensemble_seeds):
                log(f"ensemble member: seed {seed}")
                member_cfg = cfg.train.model_copy(update={"seed": seed})
                members.append(train(train_bags, val_bags, member_cfg, run_dir / f"seed-{seed}", encoder_info=encoder_info,
                                     on_epoch=on_epoch, resume=True).model_path)
            model_path = combine_checkpoints(members, run_dir / "model.pt")
        if task != "classification":  # a value is predicted, not a class: no threshold
            return model_path
        threshold, _ = fit_threshold(model_path, val_bags, cfg.threshold_rule())  # validation bags only
        log(f"decision threshold {threshold:.4g} ({describe_rule(cfg.threshold_rule().rule, cfg.threshold_rule().value)})")
        return model_path

    timed("train", fit)
    # threshold None: the one stored in model.pt (fit above on validation), unchanged for every test set
    results = timed("evaluate", lambda: evaluate_sets(run_dir / "model.pt", tests, out_dir / "evaluation", None, progress))
    return results  # type: ignore[return-value]
