"""Rank detection and deterministic sharding for torchrun (histomil.training.distributed)."""

from __future__ import annotations

import numpy as np
import pytest

from histomil.errors import HistomilError
from histomil.training import distributed as d


def test_world_without_torchrun_is_one_process(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    w = d.world()
    assert (w.rank, w.world_size, w.local_rank, w.distributed, w.is_main) == (0, 1, 0, False, True)
    assert d.is_main() and not d.active()
    assert d.all_gather(5) == [5] and d.broadcast("x") == "x"
    d.barrier()  # no-op


def test_world_reads_torchrun_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    w = d.world()
    assert (w.rank, w.world_size, w.local_rank, w.distributed, w.is_main) == (3, 4, 1, True, False)


@pytest.mark.parametrize("env", [{"RANK": "x", "WORLD_SIZE": "2"}, {"RANK": "2", "WORLD_SIZE": "2"}, {"RANK": "0"}])
def test_world_refuses_inconsistent_env(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> None:
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(HistomilError, match="environment"):
        d.world()


@pytest.mark.parametrize("n,world_size", [(10, 3), (9, 3), (1, 2), (7, 1)])
def test_shards_cover_every_index_with_equal_lengths(n: int, world_size: int) -> None:
    shards = [d.shard_indices(n, r, world_size, seed=4, epoch=2) for r in range(world_size)]
    assert len({len(s) for s in shards}) == 1 and len(shards[0]) == -(-n // world_size)
    assert set(np.concatenate(shards).tolist()) == set(range(n))
    unpadded = [d.shard_indices(n, r, world_size, seed=4, epoch=2, pad=False) for r in range(world_size)]
    assert sorted(np.concatenate(unpadded).tolist()) == list(range(n))  # disjoint without padding


def test_shards_are_deterministic_and_change_with_epoch() -> None:
    a = d.shard_indices(100, 1, 4, seed=0, epoch=0)
    assert np.array_equal(a, d.shard_indices(100, 1, 4, seed=0, epoch=0))
    assert not np.array_equal(a, d.shard_indices(100, 1, 4, seed=0, epoch=1))
    assert np.array_equal(d.shard_indices(6, 1, 2), [1, 3, 5])  # no seed: natural order
    with pytest.raises(HistomilError, match="rank"):
        d.shard_indices(5, 2, 2)


def test_local_only_sets_the_process_group_aside(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert not d.is_main() and d.jobs_of_rank(7) == [1, 4]
    with d.local_only():
        assert d.is_main() and not d.active() and d.jobs_of_rank(3) == [0, 1, 2]
    assert not d.is_main()


def test_commands_that_do_not_shard_refuse_torchrun(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    from feature_files import invoke

    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    # (train-pixels trains under torchrun since: tests/test_ddp_pixels.py)
    (tmp_path / "cv.yaml").write_text("study: {}\n")
    result = invoke("crossval", tmp_path / "cv.yaml", "--out", tmp_path / "cv")
    assert result.exit_code != 0 and "runs as one process" in result.output
