"""What a run that failed for good says (pipelines.run.describe_failure): each failed rank's error,
the checkpoint a resume starts from (read from Ray Train's own record, never a half-written
directory), and a storage problem named as one."""

from __future__ import annotations

import json
import pickle

from ray.train import WorkerGroupError

from pipelines.run import describe_failure, last_checkpoint
from trainers.loop import CheckpointWriteError


def _registered(run_dir, *names: str) -> None:
    """A checkpoint manager snapshot as Ray Train 2.60 writes it, with ``names`` registered."""
    train = run_dir / "train"
    train.mkdir(parents=True)
    results = [{"version": 0, "checkpoint_dir_name": n, "metrics": {}} for n in names]
    (train / "checkpoint_manager_snapshot.json").write_text(json.dumps(
        {"ray_version": "2.60.0", "checkpoint_results": results,
         "latest_checkpoint_result": results[-1] if results else None}))
    for name in names:
        (train / name).mkdir()


def test_a_checkpoint_that_cannot_be_written_names_the_storage_and_the_intact_checkpoint(tmp_path):
    run_dir = tmp_path / "crash"
    _registered(run_dir, "epoch_0000", "epoch_0001")
    (run_dir / "train" / "epoch_0002").mkdir()  # half-written when the disk filled: never registered
    error = CheckpointWriteError("cannot write the checkpoint of epoch 3 (epoch_0002): OSError: [Errno 28] "
                                 "No space left on device")
    error = pickle.loads(pickle.dumps(WorkerGroupError("rank 0 failed", {0: error})))  # as it reaches the driver
    text = describe_failure(error, run_dir, "crash")
    assert text.startswith("run crash failed: rank 0 CheckpointWriteError: cannot write the checkpoint of epoch 3 "
                           "(epoch_0002): OSError: [Errno 28] No space left on device.")
    assert f"the checkpoint of epoch 2 ({run_dir / 'train' / 'epoch_0001'}) is intact" in text
    assert "once the storage takes writes again, the same command (tracking.run_name=crash) resumes" in text
    assert last_checkpoint(run_dir) == "epoch_0001"


def test_other_failures_list_every_rank_and_say_when_nothing_can_be_resumed(tmp_path):
    failures = {1: RuntimeError("boom\nsecond line"), 0: ValueError("")}
    text = describe_failure(WorkerGroupError("two ranks", failures), tmp_path / "none", "fresh")
    assert text.startswith("run fresh failed: rank 1 RuntimeError: boom; rank 0 ValueError: .")
    assert "second line" not in text and "storage" not in text
    assert text.endswith("no checkpoint was written; the same command starts the run again")
    run_dir = tmp_path / "some"
    _registered(run_dir, "epoch_0004")
    assert "the checkpoint of epoch 5" in describe_failure(RuntimeError("controller"), run_dir, "some")
    (run_dir / "train" / "checkpoint_manager_snapshot.json").write_text("{not json")
    assert last_checkpoint(run_dir) is None
