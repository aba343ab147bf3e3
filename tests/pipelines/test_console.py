"""The driver's console: what a user reads while a run trains."""

from __future__ import annotations

import io
import logging

from pipelines.console import HARMLESS, Console, clock
from trainers.progress import quiet_logging


class FakeClock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def _console(live: bool) -> tuple[Console, io.StringIO, FakeClock]:
    stream, now = io.StringIO(), FakeClock()
    return Console(epochs=4, steps_per_epoch=10, batch_size=128, stream=stream, live=live, now=now), stream, now


def _window(epoch: int, step: int, loss: float, speed: float = 500.0, version: int = 0) -> dict:
    return {"kind": "window", "epoch": epoch, "step": step, "steps": 5, "seconds": 4.0, "loss": loss,
            "samples_per_s": speed, "version": version}


def test_clock():
    assert (clock(0), clock(75), clock(3725), clock(-3)) == ("0:00", "1:15", "1:02:05", "0:00")


def test_log_mode_prints_one_line_per_epoch_with_eta_and_the_evaluation():
    console, stream, now = _console(live=False)
    now.t += 4.0
    console.handle(_window(0, 5, 4.0, speed=400.0))
    now.t += 4.0
    console.handle(_window(0, 10, 3.0, speed=600.0))
    assert stream.getvalue() == ""  # windows are folded into the epoch line in a log
    console.handle({"kind": "epoch", "epoch": 0, "step": 10,
                    "metrics": {"eval/knn_acc": 0.91234, "sampler/hardness": 0.5, "eval/alignment": 1.0}})
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("[hardbatch] epoch 1/4") and "step 10/40" in lines[0]
    assert "loss 3.5000" in lines[0]  # the epoch's mean over its windows
    assert "500 samples/s" in lines[0] and "graph v0" in lines[0]
    # the clock starts where the first window started (4 s before it was posted): 10 steps took
    # 8 s, 30 remain -> 24 s
    assert "0:08 elapsed" in lines[0] and "ETA 0:24" in lines[0]
    assert lines[1] == "[hardbatch]   eval/knn_acc 0.9123  sampler/hardness 0.5000"  # headline metrics only
    assert "\r" not in stream.getvalue()


def test_live_mode_redraws_one_bar_and_ends_the_line_for_events():
    console, stream, now = _console(live=True)
    now.t += 2.0
    console.handle(_window(1, 15, 2.0, version=-1))
    text = stream.getvalue()
    assert text.startswith("\r[hardbatch] epoch 2/4  [#########...............]  step 15/40")
    assert "no graph" in text and "\n" not in text
    console.handle({"kind": "refresh", "version": 1, "activate_step": 22, "embed_seconds": 5.0,
                    "graph_seconds": 0.25, "stall_seconds": 0.003})
    console.handle({"kind": "refresh", "version": 2, "activate_step": 40, "embed_seconds": 5.0,
                    "graph_seconds": 0.25, "stall_seconds": None})
    console.close()
    lines = stream.getvalue().split("\r\x1b[K")[-1].splitlines()
    assert lines[0] == ("[hardbatch] graph v1 ready: embedding 5.0 s, build 0.25 s; active from step 22 "
                        "(training stalled 0.00 s)")
    assert "landed after the last step" in lines[1]


def test_restart_and_failure_are_announced_and_restart_resets_the_eta_clock():
    console, stream, now = _console(live=False)
    console.handle({"kind": "failure", "errors": {"0": "RuntimeError: Connection reset by peer",
                                                  "1": "ActorDiedError: The actor died unexpectedly"}})
    console.handle({"kind": "start", "epoch": 2})
    now.t += 10.0
    console.handle(_window(2, 25, 1.0))  # its 5 steps took 4 s
    now.t += 6.0
    console.handle({"kind": "epoch", "epoch": 2, "step": 30, "metrics": {}})
    lines = stream.getvalue().splitlines()
    # the dead process first: it is the cause of the other rank's error
    assert ("worker failure: rank 1 ActorDiedError: The actor died unexpectedly; "
            "rank 0 RuntimeError: Connection reset by peer") in lines[0]
    assert "resuming from the checkpoint of epoch 2: training epochs 3..4" in lines[1]
    # speed counted from the resumed step 20: 10 steps in 10 s, 10 left -> 10 s
    assert "0:10 elapsed" in lines[2] and "ETA 0:10" in lines[2]
    console.handle({"kind": "warning", "message": "MLflow is unreachable"})
    assert stream.getvalue().splitlines()[-1] == "[hardbatch] warning: MLflow is unreachable"


def test_unknown_events_are_ignored():
    console, stream, _ = _console(live=False)
    console.handle({"kind": "something-new"})
    assert stream.getvalue() == ""


def test_harmless_patterns_match_rays_line_and_nothing_of_ours():
    line = ("[2026-12-04 16:42:55,021 E 15861 15861] core_worker.cc:2465: Actor with class name: "
            "'MapWorker(MapBatches(Embedder))' and ID: '39aa' has constructor arguments in the object store "
            "and max_restarts > 0. If the arguments in the object store go out of scope")
    assert any(p.search(line) for p in HARMLESS)
    for ours in ("Traceback (most recent call last):", "RuntimeError: worker died",
                 "UserWarning: MLflow log_batch failed after 3 attempts"):
        assert not any(p.search(ours) for p in HARMLESS)


def test_quiet_logging_turns_info_down_unless_verbose(monkeypatch):
    monkeypatch.delenv("HARDBATCH_VERBOSE", raising=False)
    for name in ("ray", "ray.train", "mlflow"):
        monkeypatch.setattr(logging.getLogger(name), "level", logging.INFO)
    quiet_logging(verbose=True)
    assert logging.getLogger("ray.train").level == logging.INFO
    quiet_logging()
    assert all(logging.getLogger(n).level == logging.WARNING for n in ("ray", "ray.train", "mlflow"))


def test_a_restart_without_checkpoint_says_so_and_a_first_start_says_nothing():
    console, stream, _ = _console(live=False)
    console.handle({"kind": "start", "epoch": 0})
    assert stream.getvalue() == ""
    console.handle({"kind": "failure", "errors": {1: "WorkerHealthCheckFailedError: A worker health check failed."}})
    console.handle({"kind": "start", "epoch": 0})
    assert stream.getvalue().splitlines()[-1] == (
        "[hardbatch] restarting from the first epoch: no checkpoint had been saved yet")
