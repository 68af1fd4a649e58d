"""A study on a real Ray cluster of two nodes on this machine (`ray start`): the driver joins
it with `--address` and ships the project to the workers (Ray's runtime_env working_dir);
the nodes run from a folder outside the project, without PYTHONPATH."""

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from test_study import write_spec

from runners.spec import load_spec

ROOT = Path(__file__).resolve().parent.parent
RAY = Path(sys.executable).parent / "ray"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_ports() -> list[str]:
    """Ports of their own for one node's agents: two nodes on one host must not share them."""
    names = ["node-manager-port", "object-manager-port", "dashboard-agent-listen-port",
             "dashboard-agent-grpc-port", "runtime-env-agent-port",
             "metrics-export-port"]  # fmt: skip
    return [f"--{name}={free_port()}" for name in names]


@pytest.fixture
def two_nodes():
    """A head and a second node, each with one CPU and a resource naming it. Started with
    --block, so ending each `ray start` (by its pid) ends that node's processes, and no
    other Ray on this machine."""
    temp = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))  # short: Ray's socket paths
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RAY_ADDRESS")}
    env["RAY_AUTH_MODE"] = "disabled"  # a cluster of this machine alone, for this test
    port = free_port()
    common = ["--num-cpus=1", "--num-gpus=0", "--object-store-memory=200000000", "--block",
              "--disable-usage-stats"]  # fmt: skip
    head = subprocess.Popen(
        [str(RAY), "start", "--head", f"--port={port}", "--include-dashboard=false",
         f"--temp-dir={temp}", '--resources={"node_a": 1}', *common, *node_ports()],
        cwd=temp, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    address = f"127.0.0.1:{port}"
    nodes = [head]
    try:
        wait_for_nodes(address, 1, env)
        nodes.append(subprocess.Popen(
            [str(RAY), "start", f"--address={address}", '--resources={"node_b": 1}',
             *common, *node_ports()],
            cwd=temp, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        ))  # fmt: skip
        wait_for_nodes(address, 2, env)
        yield address
    finally:
        for node in reversed(nodes):
            node.send_signal(signal.SIGTERM)
            node.wait(timeout=60)
        shutil.rmtree(temp, ignore_errors=True)


def wait_for_nodes(address: str, count: int, env: dict) -> None:
    probe = f"import ray; ray.init(address='{address}'); print(len(ray.nodes()))"
    deadline = time.time() + 90
    while time.time() < deadline:
        with contextlib.suppress(subprocess.TimeoutExpired):
            done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True,
                                  text=True, cwd="/tmp", timeout=30)  # fmt: skip
            if done.returncode == 0 and done.stdout.strip().endswith(str(count)):
                return
        time.sleep(1)
    raise AssertionError(f"the cluster at {address} never had {count} nodes")


def test_study_runs_on_both_nodes_of_a_cluster(tmp_path, corpus_dir, two_nodes):
    path = write_spec(tmp_path, corpus_dir, "cluster", ["M*-", "*-", "MM", "m-"], steps=20)
    results = tmp_path / "results"
    cmd = [sys.executable, "-m", "runners.cli", "study", str(path), "--results", str(results),
           "--address", two_nodes, "--device", "cpu"]  # fmt: skip
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr

    client = MlflowClient(f"sqlite:///{results / 'mlflow.db'}")
    exp = client.get_experiment_by_name("cluster")
    runs = client.search_runs([exp.experiment_id], "tags.kind = 'trial'")
    _, trials = load_spec(path)
    ran = sorted(r.data.tags["hybridscale.trial_id"] for r in runs)
    assert ran == sorted(t.trial_id for t in trials)  # one run a trial
    assert {r.info.status for r in runs} == {"FINISHED"}
    assert len({r.data.tags["hybridscale.node_id"] for r in runs}) == 2  # both nodes
