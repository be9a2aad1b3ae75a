"""Emulated multi-node runs with network namespaces (launch/netns-cluster)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from deepreduce.apps.netns import NetnsCluster, NetnsError, default_burst, netns_unavailable_reason, parse_rate

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "launch" / "netns-cluster"


def test_rates_and_bursts():
    assert parse_rate("100mbit") == 100e6 and parse_rate("1gbit") == 1e9 and parse_rate("12.5mbps") == 100e6
    assert default_burst("100mbit") == 32 * 1024 and default_burst("1gbit") == 256 * 1024
    with pytest.raises(ValueError, match="rate"):
        parse_rate("fast")


def test_cluster_refuses_public_addresses():
    with pytest.raises(ValueError, match="10.0.0.0/8"):
        NetnsCluster(2, subnet="192.0.2.0/24")
    with pytest.raises(ValueError, match="/24"):
        NetnsCluster(2, subnet="10.1.0.0/16")
    with pytest.raises(ValueError, match="nodes"):
        NetnsCluster(0)
    cluster = NetnsCluster(3, subnet="10.9.8.0/24", name="drx")
    assert [cluster.address(i) for i in range(3)] == ["10.9.8.1", "10.9.8.2", "10.9.8.3"]
    assert cluster.argv(1, ["true"]) == ["ip", "netns", "exec", "drx-n1", "true"]
    with pytest.raises(NetnsError, match="not up"):
        cluster.popen(0, ["true"])


REASON = netns_unavailable_reason()
_skip_without_netns = pytest.mark.skipif(REASON is not None, reason=f"network namespaces unavailable: {REASON}")


def needs_netns(test):
    """Namespaces, links and processes: a slow test, skipped where namespaces cannot be made."""
    return pytest.mark.slow(_skip_without_netns(test))


def namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def leftovers(prefix: str) -> set[str]:
    return {ns for ns in namespaces() if ns.startswith(prefix + "-")}


@needs_netns
def test_two_node_training_job(tmp_path):
    """Two namespaces at 1 Gbit/s, one torchrun each, one `deepreduce train` job."""
    metrics = tmp_path / "metrics.jsonl"
    cmd = [str(SCRIPT), "--nodes", "2", "--rate", "1gbit", "--timeout", "240", "--",
           "--d-model", "32", "--layers", "1", "--heads", "2", "--seq-len", "32", "--batch", "4", "--steps", "6",
           "--start-iter", "2", "--corpus-mb", "1", "--threads", "1", "--eval-every", "6", "--eval-batches", "2",
           "--compression", "topk:0.05/eliasfano/fp16", "--min-numel", "256", "--metrics", str(metrics)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"})
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output[-4000:]
    assert "node 0 exited with 0" in output and "node 1 exited with 0" in output
    summary = json.loads(metrics.read_text().splitlines()[-1])["summary"]
    assert summary["world_size"] == 2 and summary["steps"] == 6
    assert summary["hook"]["compressed_buckets"] > 0
    assert not leftovers(f"dr{proc.pid}")


@needs_netns
def test_failing_node_stops_the_others_and_cleans_up():
    started = time.monotonic()
    cmd = [str(SCRIPT), "--nodes", "2", "--exec", "--", "sh", "-c", "if [ {node} = 1 ]; then exit 3; fi; sleep 60"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHON": sys.executable})
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert time.monotonic() - started < 30
    assert "node 1 exited with 3" in proc.stderr


@needs_netns
def test_interrupt_tears_everything_down(tmp_path):
    marker = tmp_path / "started"
    cmd = [str(SCRIPT), "--nodes", "2", "--rate", "100mbit", "--exec", "--",
           "sh", "-c", f"echo {{addr}} >> {marker}; sleep 120"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHON": sys.executable})
    prefix = f"dr{proc.pid}"
    deadline = time.monotonic() + 30
    while (not marker.exists() or len(marker.read_text().split()) < 2) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert sorted(marker.read_text().split()) == ["10.200.0.1", "10.200.0.2"]
    assert len(leftovers(prefix)) == 3  # two nodes and the bridge
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=30)
    assert not leftovers(prefix)
    sleepers = subprocess.run(["pgrep", "-f", f"{marker}; sleep 120"], capture_output=True, text=True).stdout
    assert not sleepers.strip()


CLIENT = """
import socket, time
for _ in range(100):
    try:
        s = socket.create_connection(("10.200.0.1", 29599), timeout=5)
        break
    except OSError:
        time.sleep(0.1)
print(s.recv(2).decode())
"""


@needs_netns
def test_cluster_context_manager_links_nodes_and_cleans_up_after_errors():
    cluster = NetnsCluster(2, rate="100mbit", name=f"drt{os.getpid()}")
    with pytest.raises(RuntimeError, match="boom"):
        with cluster:
            assert len(leftovers(cluster.name)) == 3
            server = cluster.popen(0, [sys.executable, "-c",
                                       "import socket; s = socket.create_server(('10.200.0.1', 29599)); "
                                       "c, _ = s.accept(); c.sendall(b'ok')"])
            client = cluster.popen(1, [sys.executable, "-c", CLIENT], stdout=subprocess.PIPE, text=True)
            assert cluster.wait([server, client], timeout=30) == [0, 0]
            assert client.stdout.read().strip() == "ok"
            sleeper = cluster.popen(1, ["sleep", "60"])
            raise RuntimeError("boom")
    assert not leftovers(cluster.name)
    assert sleeper.poll() is not None  # stopped by the teardown
