"""The Trainer's logs (the `{'train_runtime': ...}` summary, losses) go to `logging`, never to stdout as dicts."""

from __future__ import annotations

import logging

import pytest
from trainer_fixtures import sift_args, task_dataset, tiny_model

from hf_sift import train_tasks


@pytest.mark.parametrize("disable_tqdm", [True, False])
def test_train_tasks_prints_no_log_dicts(tmp_path, capfd, caplog, disable_tqdm):
    args = sift_args(tmp_path / "runs", logging_strategy="steps", logging_steps=1, disable_tqdm=disable_tqdm)
    with caplog.at_level(logging.INFO, logger="hf_sift"):
        train_tasks(tiny_model(), task_dataset(num_tasks=2), "task", args, tmp_path / "merged")
    out, err = capfd.readouterr()
    assert "train_runtime" not in out + err and "'loss'" not in out + err
    records = [r.getMessage() for r in caplog.records if r.name == "hf_sift.trainer"]
    assert sum("train_runtime=" in m for m in records) == 2  # one summary per task, as a logging record
    assert any(m.startswith("task t0, step 1: loss=") for m in records)
    if not disable_tqdm:  # the progress bars are kept
        assert "3/3" in err
