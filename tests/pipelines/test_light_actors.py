"""The modules that the run's helper processes load must not import torch.

Every actor is a fresh Python process: the sampler actor, the graph refresher, the progress relay
and the Train controller (which unpickles the run's Train callbacks). Importing torch and
torchvision costs each of them seconds of CPU and about 600 MB, which on a small machine delays the
Train workers that do need them. Only the Train workers and the embedding pool actors import torch.
"""

from __future__ import annotations

import subprocess
import sys

HEAVY = ("torch", "torchvision", "sklearn")


def test_actor_modules_leave_torch_out():
    modules = ["samplers.actor", "pipelines.refresh", "trainers.progress", "trainers.callbacks"]
    code = ("import sys\n"
            f"for name in {modules!r}:\n"
            "    __import__(name)\n"
            f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "[]", out.stdout
