"""Tests of samplers.plans.BatchPlanner: purity, rank slicing, versions, state, strategies."""

from __future__ import annotations

import json

import numpy as np
import pytest

from samplers.graph import build_proximity_graph
from samplers.actor import _SamplerCore
from samplers.plans import BatchPlanner, NoActiveGraphError

N, B, W = 600, 48, 4


@pytest.fixture(scope="module")
def graphs(random_bank):
    return {v: build_proximity_graph(random_bank, k=8, m=60, seed=v) for v in range(3)}


def make(strategy, graphs, **kwargs):
    return BatchPlanner(N, B, W, seed=7, strategy=strategy, graph=graphs[0], **kwargs)


@pytest.mark.parametrize("strategy", ["uniform", "knn", "rwr"])
def test_rows_are_disjoint_and_form_the_global_batch(strategy, graphs):
    planner = make(strategy, graphs)
    assert planner.steps_per_epoch == N // B
    for step in range(0, 40, 3):
        plan = planner.plan(step)
        assert plan.shape == (W, B // W) and plan.dtype == np.int64
        flat = plan.ravel()
        assert len(np.unique(flat)) == B  # rows disjoint, their union is the global batch
        assert flat.min() >= 0 and flat.max() < N
        for r in range(W):
            np.testing.assert_array_equal(plan[r], flat[r * (B // W) : (r + 1) * (B // W)])


@pytest.mark.parametrize("strategy", ["uniform", "knn", "rwr"])
def test_plan_is_independent_of_call_order_and_instances(strategy, graphs):
    fresh = make(strategy, graphs)
    late = fresh.plan(29)
    walked = make(strategy, graphs)
    plans = [walked.plan(s) for s in range(30)]
    np.testing.assert_array_equal(plans[29], late)
    np.testing.assert_array_equal(fresh.plan(29), late)
    other_seed = BatchPlanner(N, B, W, seed=8, strategy=strategy, graph=graphs[0])
    assert not np.array_equal(other_seed.plan(29), late)
    many, filled = make(strategy, graphs).plan_many([29, 3, 3, 0])
    for plan, step in zip(many, [29, 3, 3, 0]):
        np.testing.assert_array_equal(plan, plans[step])
    assert filled.shape == (4,)


def test_uniform_epoch_is_a_permutation_dropping_the_last_incomplete_batch():
    planner = BatchPlanner(100, 16, 2, seed=1, strategy="uniform")
    assert planner.steps_per_epoch == 6
    epoch0 = np.concatenate([planner.plan(s).ravel() for s in range(6)])
    epoch1 = np.concatenate([planner.plan(s).ravel() for s in range(6, 12)])
    assert len(np.unique(epoch0)) == 96 and len(np.unique(epoch1)) == 96
    assert not np.array_equal(epoch0, epoch1)


def test_start_nodes_follow_a_per_epoch_permutation(graphs):
    planner = make("rwr", graphs)
    starts = [planner.plan_with_info(s)[1]["start"] for s in range(planner.steps_per_epoch)]
    assert len(set(starts)) == planner.steps_per_epoch
    assert all(planner.plan(s)[0, 0] == starts[s] for s in range(5))
    next_epoch = [planner.plan_with_info(s)[1]["start"] for s in range(planner.steps_per_epoch, 2 * planner.steps_per_epoch)]
    assert starts != next_epoch


def test_version_switching_at_activate_step(graphs):
    planner = make("rwr", graphs)
    before = [planner.plan(s) for s in range(15)]
    planner.set_graph(graphs[1], version=1, activate_step=10)
    planner.set_graph(graphs[2].neighbors, version=2, activate_step=20)
    assert [planner.active_version(s) for s in (0, 9, 10, 19, 20, 500)] == [0, 0, 1, 1, 2, 2]
    for s in range(10):  # installing a later version leaves earlier steps unchanged
        np.testing.assert_array_equal(planner.plan(s), before[s])
    only_v1 = BatchPlanner(N, B, W, seed=7, strategy="rwr")
    only_v1.set_graph(graphs[1], version=1, activate_step=0)
    for s in (10, 14, 19):
        np.testing.assert_array_equal(planner.plan(s), only_v1.plan(s))
        assert planner.plan_with_info(s)[1]["version"] == 1
    assert not all(np.array_equal(planner.plan(s), before[s]) for s in range(10, 15))
    with pytest.raises(ValueError, match="version"):
        planner.set_graph(graphs[0], version=2, activate_step=30)
    with pytest.raises(ValueError, match="activate_step"):
        planner.set_graph(graphs[0], version=3, activate_step=5)


def test_state_roundtrip_serves_identical_plans(graphs, tmp_path):
    planner = make("rwr", graphs, restart_decay=True, restart_prob=0.3, warmup_epochs=1)
    planner.set_graph(graphs[1], version=1, activate_step=25)
    state = json.loads(json.dumps(planner.state()))
    assert [v["version"] for v in state["versions"]] == [0, 1]
    paths = {v: graphs[v].save(tmp_path / f"v{v}") for v in (0, 1)}
    restored = BatchPlanner.from_state(state, {v: type(graphs[v]).load(p) for v, p in paths.items()})
    for s in (0, 5, 12, 24, 25, 60, 300):
        np.testing.assert_array_equal(restored.plan(s), planner.plan(s))
    # the same tables in another integer dtype or byte order are the same versions
    other = {v: graphs[v].neighbors.astype(dtype) for v, dtype in ((0, np.int64), (1, ">i8"))}
    assert graphs[0].neighbors.dtype == np.int32
    for s in (0, 25, 60):
        np.testing.assert_array_equal(BatchPlanner.from_state(state, other).plan(s), planner.plan(s))
    with pytest.raises(ValueError, match="checksum"):
        BatchPlanner.from_state(state, {0: graphs[0], 1: graphs[2]})
    with pytest.raises(ValueError, match="checksum"):
        BatchPlanner.from_state(state, {0: graphs[0], 1: graphs[2].neighbors.astype(np.int64)})
    with pytest.raises(ValueError, match="missing version 1"):
        BatchPlanner.from_state(state, {0: graphs[0]})


def test_warmup_serves_uniform_plans_and_graph_is_required_after(graphs):
    planner = BatchPlanner(N, B, W, seed=7, strategy="rwr", warmup_epochs=2)
    uniform = BatchPlanner(N, B, W, seed=7, strategy="uniform")
    last_warmup = 2 * planner.steps_per_epoch - 1
    for s in (0, last_warmup):
        np.testing.assert_array_equal(planner.plan(s), uniform.plan(s))
    with pytest.raises(NoActiveGraphError, match="set_graph"):
        planner.plan(last_warmup + 1)
    planner.set_graph(graphs[0], version=0, activate_step=0)
    assert planner.plan_with_info(last_warmup + 1)[1]["strategy"] == "rwr"
    with pytest.raises(NoActiveGraphError):
        BatchPlanner(N, B, W, seed=7, strategy="knn").plan(0)


def test_restart_decay_schedule(graphs):
    planner = BatchPlanner(N, B, W, seed=0, strategy="rwr", graph=graphs[0], restart_prob=0.2, restart_decay=True)
    spe = planner.steps_per_epoch
    alphas = [planner.restart_prob_at(e * spe) for e in range(10)]
    # max(0.2 - 0.1 e / 5, 0.05): a few float64 operations, ~1e-16 relative (assert_allclose's rtol is 1e-7)
    np.testing.assert_allclose(alphas, [0.2, 0.18, 0.16, 0.14, 0.12, 0.10, 0.08, 0.06, 0.05, 0.05])
    assert planner.plan_with_info(3 * spe)[1]["restart_prob"] == pytest.approx(0.14)
    constant = BatchPlanner(N, B, W, seed=0, strategy="rwr", graph=graphs[0], restart_prob=0.2)
    assert constant.restart_prob_at(9 * spe) == 0.2
    assert not np.array_equal(constant.plan(9 * spe), planner.plan(9 * spe))


def test_knn_strategy_takes_nearest_neighbours_then_breadth_first(graphs, random_bank):
    exact = build_proximity_graph(random_bank, k=50, m=N)
    planner = BatchPlanner(N, B, W, seed=3, strategy="knn", graph=exact)
    plan, info = planner.plan_with_info(4)
    np.testing.assert_array_equal(plan.ravel(), np.concatenate([[info["start"]], exact.neighbors[info["start"], : B - 1]]))
    small = BatchPlanner(N, B, W, seed=3, strategy="knn", graph=graphs[0])  # k = 8 < B - 1
    plan, info = small.plan_with_info(4)
    flat = plan.ravel()
    start = info["start"]
    assert len(np.unique(flat)) == B and info["n_filled"] == 0
    np.testing.assert_array_equal(flat[1:9], graphs[0].neighbors[start])
    assert set(flat[9:].tolist()) <= set(graphs[0].neighbors[graphs[0].neighbors[start]].ravel().tolist()) | set(
        graphs[0].neighbors[graphs[0].neighbors[graphs[0].neighbors[start]].ravel()].ravel().tolist()
    )


def test_knn_fills_when_the_component_is_too_small():
    nb = np.random.default_rng(0).integers(3, 100, size=(100, 2))
    nb[:3] = [[1, 2], [2, 0], [0, 1]]
    planner = BatchPlanner(100, 8, 2, seed=0, strategy="knn", graph=nb)
    starts = [planner.plan_with_info(s)[1]["start"] for s in range(planner.steps_per_epoch)]
    step = next((s for s, st in enumerate(starts) if st < 3), None)
    if step is None:  # no start in the closed component this epoch: use the next epochs
        step = next(s for s in range(12, 1000) if planner.plan_with_info(s)[1]["start"] < 3)
    plan, info = planner.plan_with_info(step)
    assert info["n_filled"] == 5 and len(np.unique(plan)) == 8


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"global_batch": 50, "world_size": 4}, "divisible"),
        ({"global_batch": 700}, "global_batch"),
        ({"strategy": "dfs"}, "strategy"),
        ({"restart_prob": 1.0}, "restart_prob"),
        ({"world_size": 0}, "world_size"),
        ({"warmup_epochs": -1}, "warmup_epochs"),
    ],
)
def test_invalid_planner_arguments(kwargs, match):
    args = {"num_nodes": N, "global_batch": B, "world_size": W, "seed": 0, "strategy": "rwr"} | kwargs
    with pytest.raises(ValueError, match=match):
        BatchPlanner(**args)


def test_graph_of_the_wrong_size_is_rejected(graphs):
    planner = BatchPlanner(N + 1, B, W, seed=0, strategy="rwr")
    with pytest.raises(ValueError, match="shape"):
        planner.set_graph(graphs[0], version=0, activate_step=0)
    bad = graphs[0].neighbors.astype(np.int64).copy()
    bad[0, 0] = N
    with pytest.raises(ValueError, match="ids"):
        BatchPlanner(N, B, W, seed=0, strategy="rwr", graph=bad)


@pytest.mark.parametrize("strategy", ["rwr", "uniform"])
def test_sampler_core_counts_the_ids_of_the_uniform_fill(strategy):
    # Nodes 0-2 form a closed component: a walk started there collects 3 of the 8 ids, reaches its
    # step cap and draws the other 5 uniformly. The sampler actor's core reports those fills per step.
    nb = np.random.default_rng(0).integers(3, 100, size=(100, 2))
    nb[:3] = [[1, 2], [2, 0], [0, 1]]
    core = _SamplerCore(dict(num_nodes=100, global_batch=8, world_size=2, seed=0, strategy=strategy, graph=nb))
    planner = BatchPlanner(100, 8, 2, seed=0, strategy=strategy, graph=nb)
    stop = 20 * planner.steps_per_epoch
    plans, filled = core.plans_with_fill(0, stop)
    infos = [planner.plan_with_info(s)[1] for s in range(stop)]
    np.testing.assert_array_equal(filled, [info["n_filled"] for info in infos])
    np.testing.assert_array_equal(plans, core.plans(0, stop))
    np.testing.assert_array_equal(plans[4], planner.plan(4))
    if strategy == "rwr":
        closed = np.array([info["start"] < 3 for info in infos])
        assert closed.sum() >= 2 and (filled[closed] == 5).all()  # about 12 * 3 / 100 starts per epoch
    else:
        assert not filled.any()


def test_sampler_core_prunes_versions_no_later_step_uses_and_restores_without_them(graphs, tmp_path):
    state = tmp_path / "sampler_state.json"
    core = _SamplerCore(dict(num_nodes=N, global_batch=B, world_size=W, seed=0, strategy="rwr"), str(state))
    for version, step in ((0, 0), (1, 10), (2, 20)):
        core.swap_graph(str(graphs[version].save(tmp_path / f"v{version}.npz")), version, step)
    before = core.plans(10, 40)
    assert core.prune(9) == []  # step 9 still uses version 0
    dropped = core.prune(15)  # steps >= 15 use versions 1 and 2 only
    assert [v["version"] for v in dropped] == [0] and dropped[0]["path"] == str(tmp_path / "v0.npz")
    np.testing.assert_array_equal(core.plans(15, 40), before[5:])
    assert [v["version"] for v in json.loads(state.read_text())["versions"]] == [1, 2]
    (tmp_path / "v0.npz").unlink()  # what the trainer then deletes
    restored = _SamplerCore(dict(num_nodes=N, global_batch=B, world_size=W, seed=0, strategy="rwr"), str(state))
    np.testing.assert_array_equal(restored.plans(15, 40), before[5:])
    assert [v["version"] for v in core.prune(10**6)] == [1] and core.version_at(10**6) == 2  # the newest stays
    np.testing.assert_array_equal(core.plans(20, 40), before[10:])


@pytest.mark.parametrize("epoch, keep, refresh_floor, expected", [
    (5, None, 30, 0),   # keep everything
    (5, 3, None, 30),   # epochs 3..5 kept (steps 40..60), one more in reserve: step 30 = epoch 2's checkpoint
    (5, 3, 20, 20),     # a refresh may still ask for the plans from step 20 on
    (1, 3, None, 0),
    (5, 1, None, 50),
])
def test_retention_floor_keeps_one_checkpoint_in_reserve(epoch, keep, refresh_floor, expected):
    from trainers.loop import retention_floor

    assert retention_floor(epoch, 10, keep, refresh_floor) == expected
