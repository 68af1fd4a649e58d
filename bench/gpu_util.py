"""GPU utilisation sampled from nvidia-smi while a benchmark runs."""

import subprocess
import threading


class GpuSampler:
    """utilization.gpu of every GPU, once a second, in a thread: ``samples`` holds one
    list per second (one value per GPU); none where there is no nvidia-smi."""

    def __init__(self) -> None:
        self.samples: list[list[float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        query = ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"]
        while not self._stop.wait(1.0):
            try:
                out = subprocess.run(query, capture_output=True, text=True, timeout=5).stdout
                self.samples.append([float(v) for v in out.split()])
            except (OSError, ValueError, subprocess.TimeoutExpired):
                return

    def __enter__(self) -> "GpuSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
