import os
import shutil
import sysconfig
from pathlib import Path

import pytest

# On a GPU, each kernel's first config alone: the search compiles every config at each new
# test shape, minutes in all (with it on, an fp32 test ran past a 120 s limit). The search is
# tested by test_autotune_search_leaves_results_intact_on_gpu, which turns it back on.
os.environ.setdefault("HYBRIDSCALE_AUTOTUNE", "0")

# A few real standard-library modules: real code and English, small enough for CPU tests.
STDLIB_FILES = ["textwrap.py", "shlex.py", "fnmatch.py", "colorsys.py", "bisect.py", "heapq.py"]


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("corpus")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in STDLIB_FILES:
        shutil.copy(stdlib / name, folder / name)
    return folder


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory) -> Path:
    """Shards are reused across tests (the same inputs give the same shards)."""
    return tmp_path_factory.mktemp("data")
