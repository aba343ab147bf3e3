"""The refresh protocol's pure core (samplers.protocol) and the sampler core carrying it out: snapshot and
activation steps fixed in advance, attempts, what a restart keeps and starts again."""

from __future__ import annotations

import json

import numpy as np
import pytest

from samplers.actor import _SamplerCore
from samplers.graph import build_proximity_graph
from samplers.protocol import RefreshSchedule

N, B, W = 600, 48, 4


@pytest.fixture(scope="module")
def graphs(random_bank):
    return {v: build_proximity_graph(random_bank, k=8, m=60, seed=v) for v in range(4)}


def test_sync_activates_at_the_snapshot_and_never_after_the_last_epoch():
    sync = RefreshSchedule(10, 10, every_epochs=3, mode="sync")
    assert sync.boundaries() == [30, 60, 90] and sync.activations() == [30, 60, 90] and sync.lag == 0
    assert RefreshSchedule(10, 6, every_epochs=3, mode="sync").boundaries() == [30]
    assert RefreshSchedule(10, 10, every_epochs=0, mode="sync").boundaries() == []
    assert sync.horizon(0) == 30 and sync.horizon(29) == 30 and sync.horizon(30) == 60 and sync.horizon(95) is None


def test_async_activates_one_period_later_by_default_and_skips_versions_nothing_would_use():
    run = RefreshSchedule(11, 5, every_epochs=1, mode="async")  # 55 steps, period 11, lag 11
    assert run.lag == 11
    # 44 + 11 = 55 is the end: that refresh would never be used, so it is not started
    assert run.boundaries() == [11, 22, 33] and run.activations() == [22, 33, 44]
    assert run.horizon(11) == 22 and run.horizon(21) == 22 and run.horizon(44) is None
    short = RefreshSchedule(11, 5, every_epochs=1, mode="async", lag_steps=3)
    assert short.boundaries() == [11, 22, 33, 44] and short.activations() == [14, 25, 36, 47]
    steps = RefreshSchedule(10, 3, every_epochs=5, every_steps=7, mode="async", lag_steps=2)  # every_steps wins
    assert steps.boundaries() == [7, 14, 21] and steps.activations() == [9, 16, 23]
    assert steps.last_boundary(6) == 0 and steps.last_boundary(14) == 14 and steps.last_boundary(20) == 14
    with pytest.raises(ValueError, match="lag_steps must be >= 1"):
        RefreshSchedule(10, 3, every_epochs=1, lag_steps=0)


def test_a_restart_starts_again_the_refreshes_still_to_be_activated_that_did_not_land():
    run = RefreshSchedule(10, 6, every_epochs=1, mode="async", lag_steps=15)  # snapshots 10..40, active +15
    assert run.boundaries() == [10, 20, 30, 40]
    # resume at 30: snapshot 20 (active 35) and snapshot 30 (active 45) are still to come into use
    assert run.to_restart(30, landed={0, 10}) == [20, 30]
    assert run.to_restart(30, landed={0, 10, 20}) == [30]
    assert run.to_restart(30, landed={0, 10, 20, 30}) == []
    assert RefreshSchedule(10, 6, every_epochs=1, mode="sync").to_restart(30, landed={0}) == []  # sync: landed


def _core(tmp_path, name="state.json"):
    return _SamplerCore(dict(num_nodes=N, global_batch=B, world_size=W, seed=0, strategy="rwr"), str(tmp_path / name))


def test_the_sampler_refuses_a_stale_attempts_version_and_rewinds_by_snapshot_step(graphs, tmp_path):
    core = _core(tmp_path)
    paths = {v: str(graphs[v].save(tmp_path / f"v{v}.npz")) for v in graphs}
    assert core.next_version() == 0
    assert core.swap_graph(paths[0], 0, 0) == 0  # graph v0 (no attempt: the driver's)
    assert core.swap_graph(paths[1], 1, 25, snapshot_step=10, attempt=0) == 25  # snapshotted at 10, used from 25
    assert core.swap_graph(paths[2], 2, 45, snapshot_step=30, attempt=0) == 45
    reference = core.plans(0, 50)
    rewound = core.rewind(20)  # restart from the checkpoint of step 20
    assert rewound["attempt"] == 1
    assert [v["version"] for v in rewound["kept"]] == [0, 1]  # v1's weights (step 10) come before step 20
    assert [v["version"] for v in rewound["dropped"]] == [2] and rewound["dropped"][0]["path"] == paths[2]
    assert core.next_version() == 2  # the replay's next version gets the number the first run gave it
    np.testing.assert_array_equal(core.plans(20, 45), reference[20:45])  # v1 still activates at 25
    assert core.swap_graph(paths[3], 2, 45, snapshot_step=30, attempt=0) is None  # a refresh from before the crash
    assert core.version_at(10**6) == 1
    assert core.swap_graph(paths[2], 2, 45, snapshot_step=30, attempt=1) == 45  # the replay's own
    np.testing.assert_array_equal(core.plans(20, 50), reference[20:50])  # the uninterrupted run's batches
    saved = json.loads((tmp_path / "state.json").read_text())
    assert saved["attempt"] == 1 and [v["snapshot_step"] for v in saved["versions"]] == [0, 10, 30]
    restored = _core(tmp_path)  # a restarted sampler actor keeps the attempt and the history
    assert restored.attempt == 1 and restored.swap_graph(paths[3], 3, 60, 50, attempt=0) is None
    np.testing.assert_array_equal(restored.plans(0, 50), reference)


def test_a_version_cannot_be_activated_at_a_step_already_served(graphs, tmp_path):
    core = _core(tmp_path)
    core.swap_graph(str(graphs[0].save(tmp_path / "v0.npz")), 0, 0)
    core.plans(0, 8)
    with pytest.raises(ValueError, match="already served"):
        core.swap_graph(str(graphs[1].save(tmp_path / "v1.npz")), 1, 7, snapshot_step=5, attempt=0)
