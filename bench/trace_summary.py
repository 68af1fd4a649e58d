"""Where a traced step's GPU time goes, from a trainer's profile (``TrainOptions.profile_steps``,
Chrome's trace format): per step, the GPU's busy time, its communication (NCCL kernels)
and the part of that no computation overlapped, and the time no kernel ran at all.

    python bench/trace_summary.py TRACE.json [TRACE.json ...]
"""

import argparse
import json
from pathlib import Path

GPU_CATEGORIES = {"kernel", "gpu_memcpy", "gpu_memset"}


def _union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[list[float]] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(s, e) for s, e in merged]


def _length(intervals: list[tuple[float, float]]) -> float:
    return sum(e - s for s, e in intervals)


def _minus(outer: list[tuple[float, float]], inner: list[tuple[float, float]]) -> float:
    """Length of the union ``outer`` not covered by the union ``inner`` (both merged)."""
    covered, j = 0.0, 0
    for start, end in outer:
        while j < len(inner) and inner[j][1] <= start:
            j += 1
        k = j
        while k < len(inner) and inner[k][0] < end:
            covered += min(end, inner[k][1]) - max(start, inner[k][0])
            k += 1
    return _length(outer) - covered


def summarize(path: Path) -> dict:
    """Milliseconds per optimizer step: the GPU span (first to last GPU event), busy
    (any kernel or copy running), communication, communication with no computation beside
    it (exposed), and idle (nothing running)."""
    events = json.loads(Path(path).read_text())["traceEvents"]
    # The CPU's annotation of each optimizer step (the GPU's twin has another category).
    steps = sum(e.get("name", "").startswith("Optimizer.step#") for e in events
                if e.get("cat") == "user_annotation")  # fmt: skip
    gpu = [(e["ts"], e["ts"] + e["dur"], "nccl" in e["name"].lower()) for e in events
           if e.get("cat") in GPU_CATEGORIES and e.get("ph") == "X"]  # fmt: skip
    if not gpu or not steps:
        raise SystemExit(f"{path}: no GPU events or no optimizer step traced")
    busy = _union([(s, e) for s, e, _ in gpu])
    comm = _union([(s, e) for s, e, nccl in gpu if nccl])
    compute = _union([(s, e) for s, e, nccl in gpu if not nccl])
    span = max(e for _, e, _ in gpu) - min(s for s, _, _ in gpu)
    per_step = 1000 * steps  # trace times are microseconds
    return {
        "trace": str(path), "steps": steps, "span_ms": span / per_step,
        "busy_ms": _length(busy) / per_step, "comm_ms": _length(comm) / per_step,
        "exposed_comm_ms": _minus(comm, compute) / per_step,
        "idle_ms": (span - _length(busy)) / per_step,
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("traces", nargs="+", type=Path)
    args = parser.parse_args()
    print("| trace | steps | ms a step | busy | communication | exposed | idle |")
    print("|---|---|---|---|---|---|---|")
    for path in args.traces:
        s = summarize(path)
        ms = (s[k] for k in ("span_ms", "busy_ms", "comm_ms", "exposed_comm_ms", "idle_ms"))
        print(f"| {path} | {s['steps']} | " + " | ".join(f"{v:.1f}" for v in ms) + " |")


if __name__ == "__main__":
    main()
