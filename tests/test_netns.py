"""Emulated multi-node runs with network namespaces (launch/netns-cluster)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from deepreduce.apps.bench.soak import link_counters
from deepreduce.apps.netns import (NetnsCluster, NetnsError, default_burst, loss_unavailable_reason,
                                  netns_unavailable_reason, parse_rate)

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


def test_processes_per_node():
    cluster = NetnsCluster(2, name="drq", procs_per_node=3)
    argv = cluster.torchrun_argv(1, ["-m", "deepreduce", "train"], port=29511)
    assert "--nnodes=2" in argv and "--node_rank=1" in argv and "--nproc_per_node=3" in argv
    assert "--nproc_per_node=1" in cluster.torchrun_argv(0, ["x.py"], nproc_per_node=1)
    assert cluster.env(0)["NPROC_PER_NODE"] == "3"
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="procs_per_node"):
            NetnsCluster(2, procs_per_node=bad)


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


def _launch_sleepers(marker: Path, *options: str, node_script: str = "") -> subprocess.Popen:
    """netns-cluster on 2 nodes, each running ``node_script`` and then writing its address
    to ``marker`` and sleeping 120 s; returns once both have written (or after 30 s)."""
    cmd = [str(SCRIPT), "--nodes", "2", *options, "--exec", "--", "sh", "-c",
           f"{node_script}echo {{addr}} >> {marker}; sleep 120"]
    # Ctrl-C's default action, as at a terminal: a test run started in the background
    # (`cmd &`) inherits SIGINT ignored, and Python then installs no KeyboardInterrupt.
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHON": sys.executable},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 30
    while (not marker.exists() or len(marker.read_text().split()) < 2) and time.monotonic() < deadline:
        time.sleep(0.2)
    return proc


@needs_netns
def test_interrupt_tears_everything_down(tmp_path):
    marker = tmp_path / "started"
    proc = _launch_sleepers(marker, "--rate", "100mbit")
    prefix = f"dr{proc.pid}"
    assert sorted(marker.read_text().split()) == ["10.200.0.1", "10.200.0.2"]
    assert len(leftovers(prefix)) == 3  # two nodes and the bridge
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=30)
    assert not leftovers(prefix)
    sleepers = subprocess.run(["pgrep", "-f", f"{marker}; sleep 120"], capture_output=True, text=True).stdout
    assert not sleepers.strip()


@needs_netns
def test_a_second_signal_during_teardown_still_cleans_up(tmp_path):
    """Nodes that ignore SIGTERM hold the teardown for its grace period; a second Ctrl-C
    then must not cut it short, and a process that left its process group goes too."""
    marker = tmp_path / "started"
    proc = _launch_sleepers(marker, node_script="trap '' TERM INT; setsid sleep 121 & ")
    prefix = f"dr{proc.pid}"
    proc.send_signal(signal.SIGINT)
    time.sleep(1.5)  # inside the 5 s grace the nodes get before SIGKILL
    proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=30)
    assert proc.returncode == 130, output[-2000:]
    assert "every node stopped, namespaces removed" in output
    assert not leftovers(prefix)
    for sleeper in (f"{marker}; sleep 120", "sleep 121"):
        assert not subprocess.run(["pgrep", "-f", sleeper], capture_output=True, text=True).stdout.strip(), sleeper


@pytest.mark.parametrize("argv, message", [
    (["--nodes", "0"], r"nodes must be an int in \[1, 250\], got 0"),
    (["--rate", "fast"], "rate 'fast': expected a number and a unit"),
    (["--subnet", "192.168.5.0/24"], "subnet must be a /24 inside 10.0.0.0/8"),
    (["--burst", "-5"], "burst must be a positive int of bytes, got -5"),
])
def test_launcher_refuses_bad_options_as_usage_errors(argv, message, capsys):
    from deepreduce.apps import netns

    with pytest.raises(SystemExit) as stopped:
        netns.main([*argv, "--exec", "--", "true"])
    assert stopped.value.code == 2
    assert re.search(f"netns-cluster: error: {message}", capsys.readouterr().err)


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


# --- faults: link flaps, rate changes, packet loss --------------------------------------------------


def test_fault_commands():
    """The ip/tc/nft commands behind set_link, set_rate and set_loss (built without root)."""
    cluster = NetnsCluster(3, rate="100mbit", name="drf")
    assert cluster.link_argv(1, up=False) == [["ip", "-n", "drf-n1", "link", "set", "eth0", "down"]]
    assert cluster.link_argv(2, up=True, end="bridge") == [["ip", "-n", "drf-br", "link", "set", "p2", "up"]]
    assert cluster.link_argv(0, up=False, end="both") == [["ip", "-n", "drf-n0", "link", "set", "eth0", "down"],
                                                         ["ip", "-n", "drf-br", "link", "set", "p0", "down"]]
    # Both ends of the node's link, replaced in place, with the burst the new rate needs.
    assert cluster.rate_argv(1, "1gbit") == [
        ["ip", "netns", "exec", "drf-n1", "tc", "qdisc", "replace", "dev", "eth0", "root", "tbf", "rate", "1gbit",
         "burst", str(256 * 1024), "latency", "100ms"],
        ["ip", "netns", "exec", "drf-br", "tc", "qdisc", "replace", "dev", "p1", "root", "tbf", "rate", "1gbit",
         "burst", str(256 * 1024), "latency", "100ms"]]
    assert cluster.rate_argv(0, "20mbit", burst=4096)[0][-5:] == ["20mbit", "burst", "4096", "latency", "100ms"]
    assert cluster.rate_argv(2, None) == [["ip", "netns", "exec", "drf-n2", "tc", "qdisc", "del", "dev", "eth0", "root"],
                                          ["ip", "netns", "exec", "drf-br", "tc", "qdisc", "del", "dev", "p2", "root"]]
    # Loss: ingress drops at both ends (the node's download on eth0, its upload on its bridge port).
    (node_cmd, node_rules), (bridge_cmd, bridge_rules) = cluster.loss_argv(2, 0.25)
    assert node_cmd == ["ip", "netns", "exec", "drf-n2", "nft", "-f", "-"]
    assert bridge_cmd == ["ip", "netns", "exec", "drf-br", "nft", "-f", "-"]
    assert 'hook ingress device "eth0"' in node_rules and 'hook ingress device "p2"' in bridge_rules
    assert f"numgen random mod {1 << 24} < {1 << 22} counter drop" in node_rules
    assert "deepreduce_loss_p2" in bridge_rules  # one table per port in the shared bridge namespace
    # The old table goes in the same transaction; probability 0 only removes it.
    assert node_rules.splitlines()[:2] == ["table netdev deepreduce_loss {}", "delete table netdev deepreduce_loss"]
    assert [len(rules.splitlines()) for _, rules in cluster.loss_argv(2, 0)] == [2, 2]
    with pytest.raises(ValueError, match="probability"):
        cluster.loss_argv(0, 1.5)
    with pytest.raises(ValueError, match="out of range"):
        cluster.link_argv(3, up=True)
    with pytest.raises(ValueError, match="end"):
        cluster.link_argv(0, up=True, end="switch")
    with pytest.raises(ValueError, match="rate"):
        cluster.rate_argv(0, "fast")
    with pytest.raises(NetnsError, match="not up"):
        cluster.set_link(0, up=False)


LINE_SERVER = """
import socket, sys
s = socket.create_server(("10.200.0.1", 29598))
print("listening", flush=True)
c, _ = s.accept()
for line in c.makefile():
    print(line.strip(), flush=True)
"""
LINE_CLIENT = """
import socket, sys, time
for _ in range(100):
    try:
        s = socket.create_connection(("10.200.0.1", 29598), timeout=5)
        break
    except OSError:
        time.sleep(0.1)
s.settimeout(None)
for line in sys.stdin:
    s.sendall(line.encode())
"""
BULK_SERVER = """
import socket
s = socket.create_server(("10.200.0.1", 29597))
print("listening", flush=True)
while True:
    c, _ = s.accept()
    f = c.makefile("rb")
    n = int(f.readline())
    assert len(f.read(n)) == n
    c.sendall(b"done")
    c.close()
"""
BULK_CLIENT = """
import socket, sys, time
n = int(sys.argv[1])
s = socket.create_connection(("10.200.0.1", 29597), timeout=30)
began = time.perf_counter()
s.sendall(f"{n}\\n".encode() + bytes(n))
assert s.recv(4) == b"done"
print(time.perf_counter() - began)
"""
UDP_SINK = """
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("10.200.0.1", 29596))
print("listening", flush=True)
s.settimeout(3)
n = 0
try:
    while True:
        s.recv(64)
        n += 1
except socket.timeout:
    print(n, flush=True)
"""
UDP_SOURCE = """
import socket, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for i in range(1000):
    s.sendto(b"x", ("10.200.0.1", 29596))
    if i % 50 == 0:
        time.sleep(0.005)  # below the socket buffers: only the loss rule drops
"""


def _lines(proc: subprocess.Popen):
    """A queue that receives the process's stdout lines as they come."""
    import queue
    import threading

    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line.strip()) for line in proc.stdout], daemon=True).start()
    return lines


@needs_netns
@pytest.mark.parametrize("end", ["node", "bridge"])
def test_link_flap_holds_a_connection_and_delivers_after_it(end):
    """A node's link down (its interface, or its bridge port): what its TCP connection sends
    does not arrive; once the link is up again it does, on the same connection."""
    import queue

    with NetnsCluster(2, rate="100mbit", name=f"drl{os.getpid()}") as cluster:
        server = cluster.popen(0, [sys.executable, "-c", LINE_SERVER], stdout=subprocess.PIPE, text=True)
        received = _lines(server)
        assert received.get(timeout=30) == "listening"
        client = cluster.popen(1, [sys.executable, "-c", LINE_CLIENT], stdin=subprocess.PIPE, text=True)
        client.stdin.write("before\n")
        client.stdin.flush()
        assert received.get(timeout=30) == "before"
        cluster.set_link(1, up=False, end=end)
        state = subprocess.run(["ip", "-n", cluster.namespace(1), "link", "show", "eth0"], capture_output=True, text=True)
        assert ("state DOWN" in state.stdout) and (("NO-CARRIER" in state.stdout) == (end == "bridge"))
        client.stdin.write("during\n")
        client.stdin.flush()
        with pytest.raises(queue.Empty):
            received.get(timeout=1.5)  # the link is down: nothing gets through
        cluster.set_link(1, up=True, end=end)
        # TCP retransmits with backed-off timers: the line arrives within a few seconds.
        assert received.get(timeout=20) == "during"
        client.stdin.close()
        client.wait(timeout=10)
        assert client.returncode == 0


def _bulk_seconds(cluster: NetnsCluster, nbytes: int) -> float:
    client = cluster.popen(1, [sys.executable, "-c", BULK_CLIENT, str(nbytes)], stdout=subprocess.PIPE, text=True)
    out, _ = client.communicate(timeout=60)
    assert client.returncode == 0
    return float(out)


@needs_netns
def test_rate_change_on_the_fly():
    """tc tbf replaced at both ends of a live link: the new rate bounds transfers both ways."""
    with NetnsCluster(2, rate="1gbit", name=f"drr{os.getpid()}") as cluster:
        server = cluster.popen(0, [sys.executable, "-c", BULK_SERVER], stdout=subprocess.PIPE, text=True)
        assert server.stdout.readline().strip() == "listening"
        _bulk_seconds(cluster, 100_000)  # connection set-up, imports: warm
        cluster.set_rate(1, "8mbit")
        assert cluster.rates == ["1gbit", "8mbit"]
        for ns, dev in ((cluster.namespace(1), "eth0"), (cluster.bridge_namespace, "p1")):
            shown = subprocess.run(["ip", "netns", "exec", ns, "tc", "qdisc", "show", "dev", dev], capture_output=True,
                                   text=True).stdout
            assert "tbf" in shown and "rate 8Mbit" in shown
        # 1 MB at 8 Mbit/s takes 1 s; the token bucket allows no less than ~0.95 s, however
        # fast the machine is (a lower bound, so a loaded machine cannot make this flaky).
        assert _bulk_seconds(cluster, 1_000_000) > 0.9
        cluster.set_rate(1, None)  # unshaped
        assert "tbf" not in subprocess.run(["ip", "netns", "exec", cluster.namespace(1), "tc", "qdisc", "show", "dev",
                                            "eth0"], capture_output=True, text=True).stdout
        cluster.set_rate(1, None)  # twice: nothing to remove is fine


LOSS_REASON = loss_unavailable_reason() if REASON is None else REASON


@needs_netns
@pytest.mark.skipif(LOSS_REASON is not None, reason=f"packet loss unavailable: {LOSS_REASON}")
def test_packet_loss_drops_about_the_share_asked_and_stops():
    with NetnsCluster(2, name=f"drp{os.getpid()}") as cluster:
        def delivered() -> int:
            sink = cluster.popen(0, [sys.executable, "-c", UDP_SINK], stdout=subprocess.PIPE, text=True)
            assert sink.stdout.readline().strip() == "listening"
            source = cluster.popen(1, [sys.executable, "-c", UDP_SOURCE])
            assert source.wait(timeout=60) == 0
            return int(sink.stdout.readline())

        assert delivered() == 1000
        cluster.set_loss(1, 0.3)  # node 1's upload: dropped at its bridge port
        got = delivered()
        assert 550 < got < 850  # binomial(1000, 0.7): 700 +- 15; wide bounds
        assert cluster.lost_packets(1) >= 1000 - got
        assert cluster.lost_packets(0) == 0  # no rules there
        cluster.set_loss(1, 0.3)  # replacing the rules resets their counters
        assert cluster.lost_packets(1) == 0
        cluster.set_loss(1, 0)
        assert delivered() == 1000 and cluster.lost_packets(1) == 0


def _train_job(cluster: NetnsCluster, args: list[str], steps: int, out: Path, port: int) -> tuple[int, int]:
    """One `deepreduce train` job on the cluster: (bytes node 0 put on its link, bytes its
    rank counted as handed to collectives)."""
    metrics = out / f"metrics-{steps}.jsonl"
    before = link_counters(cluster, 0)["tx_bytes"]
    procs = [cluster.popen(node, cluster.torchrun_argv(node, ["-m", "deepreduce", "train", *args, "--steps", str(steps),
                                                              "--metrics", str(metrics)], port=port),
                           env={"OMP_NUM_THREADS": "1"}, port=port, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
             for node in range(cluster.nodes)]
    assert cluster.wait(procs, timeout=240) == [0, 0]
    summary = json.loads(metrics.read_text().splitlines()[-1])["summary"]
    return link_counters(cluster, 0)["tx_bytes"] - before, summary["hook"]["sent_bytes"]


@needs_netns
@pytest.mark.parametrize("mode", ["update", "gradient"])
def test_each_step_sends_what_its_stats_count(tmp_path, mode):
    """What a `deepreduce train` step adds on the link is the bytes its stats count, plus
    TCP/IP and gloo framing: no collective outside the exchange (DDP's broadcast of the
    LM's constant mask before every forward added 4 kB a step here). Two jobs of
    different lengths share their set-up and end, so the difference is per-step traffic."""
    args = ["--d-model", "32", "--layers", "1", "--heads", "2", "--seq-len", "32", "--batch", "4", "--start-iter", "2",
            "--corpus-mb", "1", "--threads", "1", "--eval-every", "0", "--log-every", "0", "--quiet",
            "--compression", "topk:0.05/eliasfano/fp16", "--min-numel", "256", "--mode", mode]
    if mode == "update":
        args += ["--keep-unsent"]
    short, long = 10, 40
    with NetnsCluster(2, rate="1gbit", name=f"drw{os.getpid() % 1000}") as cluster:
        wire_short, counted_short = _train_job(cluster, args, short, tmp_path, 29531)
        wire_long, counted_long = _train_job(cluster, args, long, tmp_path, 29532)
    wire, counted = (wire_long - wire_short) / (long - short), (counted_long - counted_short) / (long - short)
    assert counted > 1000, counted
    assert counted <= wire <= 1.2 * counted + 400, (wire, counted)
