"""End-to-end statistics on sklearn digits (centred raw pixels, k = 10, m = 200, B = 128)."""

from __future__ import annotations

import numpy as np

from samplers.graph import build_proximity_graph
from samplers.plans import BatchPlanner
from samplers.stats import batch_stats


def test_rwr_batches_are_harder_than_uniform_with_fewer_false_negatives_than_knn(digits):
    x, y = digits
    graph = build_proximity_graph(x, k=10, m=200, seed=0)
    exact = build_proximity_graph(x, k=127, m=len(x), seed=0)
    results = {}
    for strategy, g in (("uniform", None), ("rwr", graph), ("knn", exact)):
        planner = BatchPlanner(len(x), 128, 2, seed=0, strategy=strategy, graph=g, restart_prob=0.1)
        plans = np.stack([planner.plan(s) for s in range(3 * planner.steps_per_epoch)])
        results[strategy] = batch_stats(plans, x, y)
    uniform, rwr, knn = results["uniform"], results["rwr"], results["knn"]
    assert abs(uniform["hardness"]) < 0.02 and abs(uniform["same_class_rate"] - 0.1) < 0.01
    assert rwr["hardness"] > uniform["hardness"] + 0.15
    assert rwr["hardness_max"] > uniform["hardness_max"]
    assert uniform["same_class_rate"] + 0.1 < rwr["same_class_rate"] < knn["same_class_rate"] - 0.1
    assert knn["hardness"] > rwr["hardness"]
