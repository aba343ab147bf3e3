"""Benchmark: forward + backward time of the hardbatch losses on CPU.

Compares :func:`trainers.losses.info_nce` with ``pytorch_metric_learning.losses.NTXentLoss``
(measured in the same run, same inputs; the two values are checked to agree) and reports SSCL,
MVEB, CLIP and soft-target InfoNCE relative to our InfoNCE.

Run from the repository root::

    PYTHONPATH=. .venv/bin/python bench/losses.py                 # print the table
    PYTHONPATH=. .venv/bin/python bench/losses.py --write         # also refresh results_losses.md

Targets: info_nce no slower than NTXentLoss; sscl and mveb within 3x of info_nce at B = 256.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

from trainers.losses import (
    bimodal_loss,
    info_nce,
    label_smoothing_targets,
    mveb_loss,
    normalize,
    soft_target_info_nce,
    sscl_loss,
)

RESULTS = Path(__file__).with_name("results_losses.md")


PML_MAX_BYTES = 4 * 2**30


def pml_mask_bytes(batch: int) -> int:
    """Bytes of the ``[2B, 2B (2B - 2)]`` float32 mask NTXentLoss builds (O(B^3) memory)."""
    return 4 * (2 * batch) * (2 * batch) * (2 * batch - 2)


def naive_nt_xent(z_a: torch.Tensor, z_b: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """Textbook NT-Xent (exp / sum form with a boolean negatives mask): a second baseline."""
    o = torch.nn.functional.normalize(torch.cat([z_a, z_b]), dim=1)
    n = o.shape[0]
    sim = torch.exp(o @ o.T / temperature)
    pos = torch.exp((o * o.roll(n // 2, dims=0)).sum(1) / temperature)
    not_self = ~torch.eye(n, dtype=torch.bool)
    denominator = (sim * not_self).sum(1)
    return -torch.log(pos / denominator).mean()


def time_interleaved(
    cases: dict[str, tuple[Callable[[], torch.Tensor], list[torch.Tensor]]], repeats: int
) -> dict[str, float]:
    """Median wall time (ms) of ``fn().backward()`` per case.

    The cases run round-robin (one call of each per round, after one warm-up round) so that
    background load on the machine (2 shared cores) affects every case alike.
    """
    samples: dict[str, list[float]] = {name: [] for name in cases}
    for round_ in range(repeats + 1):
        for name, (fn, inputs) in cases.items():
            for x in inputs:
                x.grad = None
            start = time.perf_counter()
            fn().backward()
            if round_ > 0:
                samples[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(values) for name, values in samples.items()}


def bench(batch: int, dim: int, repeats: int) -> dict[str, float]:
    """Time every loss at one batch size; returns ms per forward + backward (NaN: not run)."""
    from pytorch_metric_learning.losses import NTXentLoss

    gen = torch.Generator().manual_seed(batch)
    z_a = torch.randn(batch, dim, generator=gen, requires_grad=True)
    z_b = torch.randn(batch, dim, generator=gen, requires_grad=True)
    inputs = [z_a, z_b]
    labels = torch.arange(batch).repeat(2)
    pml = NTXentLoss(temperature=0.1)
    run_pml = pml_mask_bytes(batch) <= PML_MAX_BYTES
    ours = info_nce(z_a, z_b, 0.1)
    references = [naive_nt_xent(z_a, z_b, 0.1)]
    if run_pml:
        references.append(pml(torch.cat([z_a, z_b]), labels))
    for value in references:
        if not torch.allclose(ours, value, rtol=1e-5, atol=1e-5):
            raise RuntimeError(f"info_nce {ours.item()} != reference {value.item()}")

    num_classes = 100
    logits = torch.randn(batch, num_classes, generator=gen, requires_grad=True)
    targets = label_smoothing_targets(torch.randint(num_classes, (batch,), generator=gen), num_classes)
    t_1, t_2 = normalize(torch.randn(2, batch, dim, generator=gen))
    sscl_gen = torch.Generator().manual_seed(0)

    cases: dict[str, tuple[Callable[[], torch.Tensor], list[torch.Tensor]]] = {
        "naive NT-Xent": (lambda: naive_nt_xent(z_a, z_b, 0.1), inputs),
        "info_nce": (lambda: info_nce(z_a, z_b, 0.1), inputs),
        "sscl (defaults)": (lambda: sscl_loss(z_a, z_b, generator=sscl_gen), inputs),
        "mveb (2 views)": (
            lambda: mveb_loss([normalize(z_a), normalize(z_b)], [t_1, t_2]),
            inputs,
        ),
        "clip (cosine)": (lambda: bimodal_loss(z_a, z_b), inputs),
        "soft_infonce (C=100)": (lambda: soft_target_info_nce(logits, targets), [logits]),
    }
    times = time_interleaved(cases, repeats)
    # NTXentLoss allocates O(B^3) memory per call, which evicts caches and makes the next
    # allocations page-fault; interleaving it would slow the other cases down, so it runs alone.
    pml_case = {"pml NTXentLoss": (lambda: pml(torch.cat([z_a, z_b]), labels), inputs)}
    times.update(time_interleaved(pml_case, max(3, repeats // 4)) if run_pml else {})
    times.setdefault("pml NTXentLoss", float("nan"))
    return times


def _ratio(a: float, b: float) -> str:
    return "n/a" if math.isnan(a) or math.isnan(b) else f"{a / b:.3g}"


def render(results: dict[int, dict[str, float]]) -> str:
    """Markdown table: ms per forward + backward and ratios to info_nce and to NTXentLoss."""
    batches = sorted(results)
    header = "| loss | " + " | ".join(
        f"B={b} ms | B={b} / info_nce | B={b} / pml" for b in batches
    ) + " |"
    rows = [header, "|---|" + "---:|---:|---:|" * len(batches)]
    names = ["pml NTXentLoss"] + [n for n in results[batches[0]] if n != "pml NTXentLoss"]
    for name in names:
        cells = []
        for b in batches:
            r = results[b]
            ms = "not run" if math.isnan(r[name]) else f"{r[name]:.2f}"
            cells.append(
                f"{ms} | {_ratio(r[name], r['info_nce'])} | {_ratio(r[name], r['pml NTXentLoss'])}"
            )
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main() -> None:
    """Run the benchmark, print the table, optionally write ``bench/results_losses.md``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--write", action="store_true", help="write bench/results_losses.md")
    args = parser.parse_args()

    load = os.getloadavg()
    results = {b: bench(b, args.dim, args.repeats) for b in args.batches}
    table = render(results)
    machine = (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, D = {args.dim}, "
        f"median of {args.repeats} runs, load average before the run "
        f"{load[0]:.1f} (the 2 cores are shared with other jobs)"
    )
    print(machine)
    print(table)
    if args.write:
        RESULTS.write_text(
            "## Loss benchmark (forward + backward, CPU)\n\n"
            f"Machine: {machine}.\n"
            "Command: `PYTHONPATH=. .venv/bin/python bench/losses.py --write`.\n"
            "Reference: `pytorch_metric_learning.losses.NTXentLoss(temperature=0.1)` on the same "
            "inputs (values checked equal); it builds a [2B, 2B(2B-2)] float32 mask (O(B^3) memory, "
            f"{pml_mask_bytes(1024) / 2**30:.0f} GiB at B = 1024), so it is not run above "
            f"{PML_MAX_BYTES / 2**30:.0f} GiB. `naive NT-Xent` is a textbook exp/sum implementation "
            "(second baseline, also checked equal). Cases run round-robin so background load hits "
            "all alike. Targets: info_nce / pml <= 1; sscl and mveb / info_nce <= 3 at B = 256.\n\n"
            f"{table}\n"
        )


if __name__ == "__main__":
    main()
