"""Ray-aware pieces on one module-scoped local Ray: the store, the embedding pool, the sampler actor."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch

from pipelines.datasets import SampleStore, collect_by_id, to_dataset
from pipelines.embed import embed_store_x
from pipelines.refresh import GraphRefresher, neighbour_overlap
from samplers.actor import SamplerClient, start_sampler
from samplers.graph import build_proximity_graph
from samplers.plans import BatchPlanner
from trainers.models import build_model, save_weights

MODEL_CFG = {"width": 8, "embed_dim": 16, "proj_hidden": 32, "proj_dim": 8}


def embedding_tol(net: torch.nn.Module) -> float:
    """How far two float32 passes of ``net`` (other batch sizes, threads, kernels) may put a unit
    embedding apart: each layer's dot products round by <= fan-in x eps32 / 2 of the output (first
    order), plus 16 for the average pool over the last 4 x 4 map; twice that for two passes."""
    fan_in = sum(m.weight[0].numel() for m in net.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)))
    return (fan_in + 16) * float(np.finfo(np.float32).eps)


@pytest.fixture(scope="module")
def ray_env(ray_local):
    return ray_local


def test_collect_by_id_restores_order_after_shuffle(ray_env):
    x = np.random.default_rng(0).random((300, 1, 4, 4)).astype(np.float32)
    ds = to_dataset(x, np.arange(300) % 7).random_shuffle(seed=1).materialize()
    out = collect_by_id(ds, ["x", "label"])
    assert np.array_equal(out["x"], x) and np.array_equal(out["label"], np.arange(300) % 7)


def test_store_travels_by_reference_to_tasks(ray_env):
    x = np.arange(40, dtype=np.float32).reshape(20, 2)
    store = SampleStore.from_arrays(x=x, label=np.arange(20))

    @ray_env.remote(num_cpus=0)
    def take(s, ids):
        return s.take(ids), s.take(ids, "label")

    got_x, got_y = ray_env.get(take.remote(store, np.array([19, 3, 3])))
    assert np.array_equal(got_x, x[[19, 3, 3]]) and np.array_equal(got_y, [19, 3, 3])


def test_embedding_pool_matches_direct_forward_pass(ray_env, tmp_path):
    torch.manual_seed(0)
    model = build_model(MODEL_CFG, in_channels=1)
    save_weights(model, tmp_path / "model.pt")
    x = np.random.default_rng(1).random((700, 1, 8, 8)).astype(np.float32)
    emb = embed_store_x(x, str(tmp_path), MODEL_CFG, pool_size=2, num_cpus=0.25, batch_size=128)
    model.eval()
    with torch.no_grad():
        direct = torch.nn.functional.normalize(model(torch.from_numpy(x))[1], dim=1).numpy()
    assert emb.shape == (700, 8)
    np.testing.assert_allclose(emb, direct, rtol=0, atol=embedding_tol(model))  # 3.8e-5; a wrong row is ~1 off


@pytest.mark.parametrize("kind", ["classifier", "bimodal"])
def test_embedder_uses_each_networks_graph_embedding(tmp_path, kind):
    # The pool actor's callable, in this process: which part of each network it embeds with. The
    # pool around it (Ray Data, streaming, order by id) is the test above's, the same for every kind.
    from pipelines.embed import Embedder
    from trainers.models import build_network, network_spec

    x = np.random.default_rng(2).random((300, 1, 8, 8)).astype(np.float32)
    spec = network_spec(kind, MODEL_CFG, (1, 8, 8), v_shape=(10,) if kind == "bimodal" else None,
                        num_classes=10 if kind == "classifier" else None)
    torch.manual_seed(0)
    model = build_network(spec)
    save_weights(model, tmp_path / "model.pt")
    embedder = Embedder(str(tmp_path), spec, SampleStore.in_memory(x), device="cpu")
    out = embedder({"id": np.arange(300), "store_id": np.arange(300)[::-1].copy()})
    emb = out["embedding"][::-1]  # rows in store-id order
    model.eval()
    with torch.no_grad():
        features = model.encoder(torch.from_numpy(x)) if kind == "classifier" else model.u_tower(torch.from_numpy(x))[1]
    tol = embedding_tol(model.encoder if kind == "classifier" else model.u_tower)
    np.testing.assert_allclose(emb, torch.nn.functional.normalize(features, dim=1).numpy(), rtol=0, atol=tol)
    assert emb.shape == (300, 16 if kind == "classifier" else 8) and emb.dtype == np.float32
    np.testing.assert_array_equal(out["id"], np.arange(300))


def test_embedding_survives_an_actor_killed_mid_pass(ray_env, tmp_path):
    torch.manual_seed(0)
    model = build_model(MODEL_CFG, in_channels=1)
    save_weights(model, tmp_path / "model.pt")
    x = np.random.default_rng(4).random((500, 1, 8, 8)).astype(np.float32)
    marker = tmp_path / "crashed"
    emb = embed_store_x(x, str(tmp_path), MODEL_CFG, pool_size=1, num_cpus=0.25, batch_size=100,
                        crash_once_marker=str(marker), output_dir=str(tmp_path / "parquet"))
    assert marker.exists()  # an actor really died during the pass
    model.eval()
    with torch.no_grad():
        direct = torch.nn.functional.normalize(model(torch.from_numpy(x))[1], dim=1).numpy()
    # complete, in id order, despite the crash
    np.testing.assert_allclose(emb, direct, rtol=0, atol=embedding_tol(model))
    assert list((tmp_path / "parquet").glob("*.parquet"))


def _graph_file(tmp_path, emb, k, m, seed, name):
    path = tmp_path / name
    build_proximity_graph(emb, k=k, m=m, seed=seed).save(path)
    return str(path)


def test_sampler_actor_rows_and_restart_replay(ray_env, tmp_path):
    n, batch, world = 400, 32, 2
    emb = np.random.default_rng(2).normal(size=(n, 8)).astype(np.float32)
    kwargs = dict(num_nodes=n, global_batch=batch, world_size=world, seed=5, strategy="rwr", restart_prob=0.3)
    state = tmp_path / "state.json"
    actor = start_sampler("sampler-replay", kwargs, str(state))
    v0 = _graph_file(tmp_path, emb, 5, 50, 0, "v0.npz")
    v1 = _graph_file(tmp_path, emb, 5, 50, 1, "v1.npz")
    assert ray_env.get(actor.swap_graph.remote(v0, 0, 0)) == 0
    client0, client1 = SamplerClient(actor, 0, prefetch=3), SamplerClient(actor, 1, prefetch=3)
    before = {}
    for step in range(6):
        row0, ver0 = client0.get(step)
        row1, ver1 = client1.get(step)
        assert ver0 == ver1 == 0
        assert len(np.intersect1d(row0, row1)) == 0  # ranks train on disjoint rows
        np.testing.assert_array_equal(np.concatenate([row0, row1]), ray_env.get(actor.plan.remote(step)).ravel())
        before[step] = (row0, row1)
    # a version comes with its activation step (samplers.protocol); one for a step already served is refused
    served = ray_env.get(actor.state.remote())["max_served"]
    assert served >= 5
    activate = served + 3
    assert ray_env.get(actor.swap_graph.remote(v1, 1, activate, served - 1, 0)) == activate
    with pytest.raises(Exception, match="already served"):
        ray_env.get(actor.swap_graph.remote(v1, 2, 3))
    expected = {step: ray_env.get(actor.plan.remote(step)) for step in range(activate + 4)}

    ray_env.kill(actor, no_restart=False)  # the actor dies; Ray restarts it from its state file
    time.sleep(1.0)
    for step in range(activate + 4):
        again = ray_env.get(actor.plan.remote(step))
        np.testing.assert_array_equal(again, expected[step])
    assert ray_env.get(actor.version_at.remote(activate)) == 1
    assert ray_env.get(actor.version_at.remote(activate - 1)) == 0
    # the actor serves exactly what a fresh pure planner computes for the same versions
    planner = BatchPlanner(**kwargs)
    from samplers.graph import ProximityGraph

    planner.set_graph(ProximityGraph.load(v0).neighbors, version=0, activate_step=0)
    planner.set_graph(ProximityGraph.load(v1).neighbors, version=1, activate_step=activate)
    for step in range(activate + 4):
        np.testing.assert_array_equal(planner.plan(step), expected[step])
    ray_env.kill(actor, no_restart=True)


def test_refresher_builds_persists_swaps_and_re_embeds_only_seen_rows(ray_env, tmp_path):
    """Two refreshes with ``scope: seen``: version 0 embeds every row and activates at step 0; version 1,
    snapshotted at step 10 and active from step 12, re-embeds exactly the rows of the plans of steps 0..9.
    Then the run restarts (a rewind starts attempt 1): a refresh the old attempt started is refused and its
    files deleted; a rewind to before version 1's snapshot drops it, and its number is given again."""
    x = np.random.default_rng(5).random((400, 1, 8, 8)).astype(np.float32)
    store = SampleStore.from_arrays(x=x)
    kwargs = dict(num_nodes=400, global_batch=32, world_size=2, seed=0, strategy="rwr", restart_prob=0.2)
    actor = start_sampler("sampler-refresh", kwargs, str(tmp_path / "state.json"))
    refresher = GraphRefresher.remote(MODEL_CFG, {"k": 5, "m": 40},
                                      {"pool_size": 1, "num_cpus": 0.25, "num_gpus": 0.0, "batch_size": 128,
                                       "scope": "seen"}, str(tmp_path / "graphs"), "sampler-refresh", 0)
    for seed, name in ((0, "a"), (1, "b")):
        torch.manual_seed(seed)
        (tmp_path / name).mkdir()
        save_weights(build_model(MODEL_CFG, in_channels=1), tmp_path / name / "model.pt")
    first = ray_env.get(refresher.refresh.remote(store, str(tmp_path / "a"), 0))
    assert (first["version"], first["activate_step"]) == (0, 0)
    assert first["scope"] == "full" and first["embedded_rows"] == 400  # nothing to keep yet
    seen = np.unique(ray_env.get(actor.plans.remote(0, 10)))  # the plans of steps 0..9
    second = ray_env.get(refresher.refresh.remote(store, str(tmp_path / "b"), 12, 10, 0, 0))
    assert second["version"] == 1 and second["activate_step"] == 12 and not second.get("discarded")
    assert ray_env.get(actor.version_at.remote(11)) == 0 and ray_env.get(actor.version_at.remote(12)) == 1
    assert (tmp_path / "graphs" / "v0001.npz").exists() and (tmp_path / "graphs" / "v0001.json").exists()
    assert second["scope"] == "seen" and second["embedded_rows"] == len(seen) < 400
    old = np.load(tmp_path / "graphs" / "v0000_embeddings.npy")
    new = np.load(tmp_path / "graphs" / "v0001_embeddings.npy")
    # kept rows are copied (no change at all); re-embedded ones come from other weights (changes ~1)
    changed = np.flatnonzero(np.abs(new - old).max(axis=1) > 1e-6)
    np.testing.assert_array_equal(changed, seen)  # exactly the rows seen since the last refresh
    assert 0.0 <= second["neighbour_overlap"] < 1.0  # other weights, other neighbours
    assert -1.0 <= second["drift"] < 0.999

    rewound = ray_env.get(actor.rewind.remote(10))  # a restart from step 10: v1 (snapshot 10) stays
    assert rewound["attempt"] == 1 and [v["version"] for v in rewound["kept"]] == [0, 1] and not rewound["dropped"]
    stale = ray_env.get(refresher.refresh.remote(store, str(tmp_path / "a"), 24, 20, 10, 0))  # from attempt 0
    assert stale["discarded"] and stale["version"] == 2 and "manifest" not in stale
    assert not list((tmp_path / "graphs").glob("v0002*"))  # nothing of it stays
    assert ray_env.get(actor.version_at.remote(10**6)) == 1
    rewound = ray_env.get(actor.rewind.remote(5))  # a restart before v1's snapshot: v1 goes
    assert [v["version"] for v in rewound["dropped"]] == [1] and rewound["attempt"] == 2
    assert ray_env.get(actor.next_version.remote()) == 1  # the replay numbers its versions as the first run did
    ray_env.kill(refresher, no_restart=True)
    ray_env.kill(actor, no_restart=True)


def test_neighbour_overlap_hand_case():
    old = np.array([[1, 2, 3], [0, 2, 3]])
    new = np.array([[3, 2, 1], [4, 5, 0]])
    assert neighbour_overlap(old, new) == pytest.approx((1.0 + 1 / 3) / 2)


def test_autoscaler_limits_read_the_config_the_autoscaler_publishes(ray_env):
    # What `ray up` publishes in the GCS, written here by hand into the session's head: a 4-CPU head
    # and a GPU node type that scales from 0 to 4 nodes.
    from ray._raylet import GCS_AUTOSCALER_CLUSTER_CONFIG_KEY, GCS_AUTOSCALER_STATE_NAMESPACE
    from ray.core.generated import autoscaler_pb2
    from ray.experimental.internal_kv import _internal_kv_del, _internal_kv_put

    from pipelines.run import autoscaler_limits

    assert autoscaler_limits() == (None, False)  # a head started by hand has no autoscaler
    config = autoscaler_pb2.ClusterConfig()
    for name, resources, low, high in (("head", {"CPU": 4}, 1, 1), ("gpu", {"CPU": 8, "GPU": 1}, 0, 4)):
        group = config.node_group_configs.add(name=name, min_count=low, max_count=high)
        group.resources.update(resources)
    key, space = GCS_AUTOSCALER_CLUSTER_CONFIG_KEY.encode(), GCS_AUTOSCALER_STATE_NAMESPACE.encode()
    _internal_kv_put(key, config.SerializeToString(), namespace=space)
    try:
        assert autoscaler_limits() == ({"CPU": 36.0, "GPU": 4.0}, True)
    finally:
        _internal_kv_del(key, namespace=space)
    assert autoscaler_limits() == (None, False)


def test_a_refresh_that_never_gets_its_resources_is_abandoned_at_the_end_of_training(ray_env, tmp_path):
    import ray

    from samplers.protocol import RefreshSchedule
    from trainers.loop import _RefreshCaller
    from trainers.progress import ProgressPoster, ProgressRelay
    from trainers.tracking import RunTracker

    relay = ProgressRelay.options(name="relay-final-wait").remote()
    from mlflow.tracking import MlflowClient

    uri = "sqlite:///" + str(tmp_path / "m.db")
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("final-wait")).info.run_id
    tracker = RunTracker(uri, run_id, str(tmp_path / "m.jsonl"))
    caller = _RefreshCaller(None, None, RefreshSchedule(10, 5, every_epochs=1), str(tmp_path / "snapshots"), tracker,
                            ProgressPoster("relay-final-wait"))
    never = ray.remote(resources={"no-such-resource": 1})(lambda: {}).remote()  # never scheduled
    caller.pending = never
    caller.pending_snapshot = tmp_path / "snapshots" / "step_0000040"
    caller.pending_snapshot.mkdir(parents=True)
    caller.pending_boundary = 40
    t0 = time.perf_counter()
    assert caller.finish(block=True, step=50, teardown=True, timeout_s=1.0) == 0.0
    assert time.perf_counter() - t0 < 10 and caller.pending is None
    assert not (tmp_path / "snapshots" / "step_0000040").exists()
    (event,) = ray.get(relay.take.remote())
    assert event["kind"] == "warning" and event["message"].startswith(
        "the graph refresh started at step 40 was still running 1 s after training ended (refresh.final_wait_s)")
    logged = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert logged[-1]["refresh/abandoned"] == 1 and logged[-1]["step"] == 50
    assert [m.step for m in client.get_metric_history(run_id, "refresh/abandoned")] == [50]
    ray.cancel(never)
    ray.kill(relay)
