"""GPU utilisation sampled from nvidia-smi while a benchmark runs, and the time of each
kernel a function launches."""

import subprocess
import threading
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile


def kernel_times(fn, repeats: int = 2) -> dict[str, float]:
    """Milliseconds of GPU time per call of ``fn``, by kernel name (fn already warmed up)."""
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(repeats):
            fn()
        torch.cuda.synchronize()
    times = defaultdict(float)
    for event in prof.key_averages():
        if event.device_type == torch.autograd.DeviceType.CUDA and event.device_time_total > 0:
            times[event.key] += event.device_time_total / 1000 / repeats
    return dict(times)


class GpuSampler:
    """utilization.gpu of every GPU, once a second, in a thread: ``samples`` holds one
    list per second (one value per GPU), taken at ``times`` (epoch seconds); none where
    there is no nvidia-smi."""

    def __init__(self) -> None:
        self.samples: list[list[float]] = []
        self.times: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        query = ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"]
        while not self._stop.wait(1.0):
            try:
                out = subprocess.run(query, capture_output=True, text=True, timeout=5).stdout
                self.samples.append([float(v) for v in out.split()])
                self.times.append(time.time())
            except (OSError, ValueError, subprocess.TimeoutExpired):
                return

    def __enter__(self) -> "GpuSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
