"""Shared fixtures: one capped local Ray per test module that asks for it.

``address="local"`` always starts a private instance, so a cluster left running on the machine can
never hijack the tests; the object store is capped so several test runs fit in memory.
"""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0")
os.environ.setdefault("RAY_TRAIN_ENABLE_STATE_ACTOR_RECONCILIATION", "0")


@pytest.fixture(scope="module")
def ray_local():
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=2, object_store_memory=256 * 1024 * 1024, include_dashboard=False,
             _node_ip_address="127.0.0.1", namespace="hardbatch-tests", log_to_driver=False)
    yield ray
    ray.shutdown()
