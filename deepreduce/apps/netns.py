"""Emulate a cluster of N nodes on one Linux machine with network namespaces.

Each node is a network namespace with one interface (``eth0``, address ``10.200.0.<i+1>``),
plugged into a bridge that lives in a namespace of its own; nothing is routed to the
host or anywhere else. ``rate`` shapes every link with ``tc tbf`` at both ends, so a
node's upload and download are both limited. Needs root (or CAP_NET_ADMIN) and
``iproute2``.

    from deepreduce.apps.netns import NetnsCluster
    with NetnsCluster(nodes=2, rate="100mbit") as cluster:
        procs = [cluster.popen(i, cluster.torchrun_argv(i, ["-m", "deepreduce", "train"]))
                 for i in range(cluster.nodes)]
        codes = cluster.wait(procs, timeout=600)
    # namespaces, links and every process started through the cluster are gone here,
    # also after an exception or Ctrl-C

Command line (``launch/netns-cluster`` is a thin wrapper)::

    python -m deepreduce.apps.netns --nodes 2 --rate 100mbit -- --steps 200 --compression topk:0.01/eliasfano/fp16
    python -m deepreduce.apps.netns --nodes 3 --exec -- sh -c 'echo node $NODE_RANK at {addr}'

The first form runs ``torchrun ... -m deepreduce train ARGS`` on every node; ``--exec``
runs any command, with ``{node} {nodes} {addr} {master} {port} {ifname}`` replaced and
``NODE_RANK NNODES MASTER_ADDR MASTER_PORT GLOO_SOCKET_IFNAME`` set.

Token-bucket burst: ``tbf`` lets ``burst`` bytes through at full speed after every idle
gap, which flatters payloads of about that size. The default is just above one timer
tick's worth of the rate (32 KiB at 100 Mbit/s, 256 KiB at 1 Gbit/s); smaller bursts
cap the link below its rate.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from typing import IO, Iterable, Sequence

IFNAME = "eth0"  # every node's interface has this name inside its namespace

_RATE = re.compile(r"^(\d+(?:\.\d+)?)([kmg]?)(bit|bps)$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9}


class NetnsError(RuntimeError):
    """Network namespaces cannot be created or used here (the message says why)."""


def parse_rate(rate: str) -> float:
    """Bits per second of a tc rate such as ``100mbit``, ``1gbit`` or ``12.5mbps``."""
    match = _RATE.match(rate.strip())
    if not match:
        raise ValueError(f"rate {rate!r}: expected a number and a unit such as 100mbit, 1gbit, 500kbit, 12.5mbps")
    number, prefix, unit = match.groups()
    bits = float(number) * _UNITS[prefix.lower()] * (8 if unit.lower() == "bps" else 1)
    if bits <= 0:
        raise ValueError(f"rate {rate!r} must be positive")
    return bits


def default_burst(rate: str, hz: int = 1000) -> int:
    """Bytes: twice one timer tick of the rate, rounded up to a power of two, >= 32 KiB."""
    per_tick = 2 * parse_rate(rate) / 8 / hz
    burst = 32 * 1024
    while burst < per_tick:
        burst *= 2
    return burst


def netns_unavailable_reason() -> str | None:
    """Why namespaces cannot be used here, or None if they can (creates and deletes one)."""
    if sys.platform != "linux":
        return f"network namespaces need Linux, this is {sys.platform}"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"'{tool}' (iproute2) is not installed"
    probe = f"drprobe{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode:
        return f"'ip netns add' is not permitted: {made.stderr.strip() or made.returncode}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


class NetnsCluster:
    """N nodes (namespaces) on a private bridge, optionally rate-limited.

    Args:
        nodes: number of namespaces (>= 1).
        rate: link rate for tc tbf (``"100mbit"``, ``"1gbit"``); None: unshaped.
        burst: tbf burst in bytes (default :func:`default_burst`).
        latency: tbf queueing limit, as tc takes it.
        subnet: a /24 inside 10.0.0.0/8; node i gets host address i+1.
        name: prefix of the namespace names (default ``dr<pid>``), unique per cluster.
    """

    def __init__(self, nodes: int, rate: str | None = None, burst: int | None = None, latency: str = "100ms",
                 subnet: str = "10.200.0.0/24", name: str | None = None) -> None:
        if not isinstance(nodes, int) or not 1 <= nodes <= 250:
            raise ValueError(f"nodes must be an int in [1, 250], got {nodes!r}")
        network = ipaddress.ip_network(subnet)
        if network.prefixlen != 24 or not network.subnet_of(ipaddress.ip_network("10.0.0.0/8")):
            raise ValueError(f"subnet must be a /24 inside 10.0.0.0/8 (private, never routed), got {subnet}")
        if rate is not None:
            parse_rate(rate)
        self.nodes = nodes
        self.rate = rate
        self.burst = burst if burst is not None else (default_burst(rate) if rate else None)
        self.latency = latency
        self.network = network
        self.name = name or f"dr{os.getpid()}"
        self.ifname = IFNAME
        self._procs: list[subprocess.Popen] = []
        self._created: list[str] = []

    # --- naming ------------------------------------------------------------------------

    def namespace(self, node: int) -> str:
        return f"{self.name}-n{node}"

    @property
    def bridge_namespace(self) -> str:
        return f"{self.name}-br"

    def address(self, node: int) -> str:
        return str(self.network.network_address + node + 1)

    @property
    def master_addr(self) -> str:
        return self.address(0)

    # --- life cycle ----------------------------------------------------------------------

    def __enter__(self) -> "NetnsCluster":
        self.up()
        return self

    def __exit__(self, *exc: object) -> None:
        self.down()

    def _ip(self, *args: str) -> None:
        result = subprocess.run(["ip", *args], capture_output=True, text=True)
        if result.returncode:
            raise NetnsError(f"'ip {' '.join(args)}' failed: {result.stderr.strip()}")

    def _tc(self, namespace: str, device: str) -> None:
        cmd = ["ip", "netns", "exec", namespace, "tc", "qdisc", "add", "dev", device, "root", "tbf",
               "rate", self.rate, "burst", str(self.burst), "latency", self.latency]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode:
            raise NetnsError(f"'{' '.join(cmd)}' failed: {result.stderr.strip()}")

    def up(self) -> None:
        """Create the namespaces, links and shaping; on any failure undo what was made."""
        if self._created:
            raise NetnsError("cluster is already up")
        try:
            existing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
            wanted = [self.bridge_namespace] + [self.namespace(i) for i in range(self.nodes)]
            clash = [ns for ns in wanted if re.search(rf"^{re.escape(ns)}\b", existing, re.MULTILINE)]
            if clash:
                raise NetnsError(f"namespaces {clash} already exist (another cluster named {self.name!r}?)")
            for ns in wanted:
                self._ip("netns", "add", ns)
                self._created.append(ns)
                self._ip("-n", ns, "link", "set", "lo", "up")
            br = self.bridge_namespace
            self._ip("-n", br, "link", "add", "br0", "type", "bridge")
            self._ip("-n", br, "link", "set", "br0", "up")
            for i in range(self.nodes):
                ns, port = self.namespace(i), f"p{i}"
                # Both ends are created directly inside their namespaces: no names in the
                # host's namespace, so parallel clusters cannot collide.
                self._ip("link", "add", IFNAME, "netns", ns, "type", "veth", "peer", "name", port, "netns", br)
                self._ip("-n", br, "link", "set", port, "master", "br0")
                self._ip("-n", br, "link", "set", port, "up")
                self._ip("-n", ns, "addr", "add", f"{self.address(i)}/{self.network.prefixlen}", "dev", IFNAME)
                self._ip("-n", ns, "link", "set", IFNAME, "up")
                if self.rate:
                    self._tc(ns, IFNAME)  # the node's upload
                    self._tc(br, port)  # ... and its download
        except BaseException:
            self.down()
            raise

    def down(self) -> None:
        """Stop every process started through the cluster, then delete the namespaces."""
        self.terminate()
        for ns in reversed(self._created):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        self._created.clear()

    # --- running commands ------------------------------------------------------------------

    def env(self, node: int, port: int = 29500) -> dict[str, str]:
        """Variables a distributed job on ``node`` needs (added to os.environ)."""
        return {
            "NODE_RANK": str(node),
            "NNODES": str(self.nodes),
            "MASTER_ADDR": self.master_addr,
            "MASTER_PORT": str(port),
            "GLOO_SOCKET_IFNAME": IFNAME,
            "TP_SOCKET_IFNAME": IFNAME,
            "NCCL_SOCKET_IFNAME": IFNAME,
        }

    def argv(self, node: int, command: Sequence[str]) -> list[str]:
        """``command`` prefixed so that it runs inside ``node``'s namespace."""
        if not 0 <= node < self.nodes:
            raise ValueError(f"node {node} out of range [0, {self.nodes})")
        return ["ip", "netns", "exec", self.namespace(node), *command]

    def torchrun_argv(self, node: int, args: Sequence[str], nproc_per_node: int = 1, port: int = 29500) -> list[str]:
        """``torchrun`` (this interpreter's) for one node of a static N-node rendezvous."""
        return [
            sys.executable, "-m", "torch.distributed.run",
            f"--nnodes={self.nodes}", f"--node_rank={node}", f"--nproc_per_node={nproc_per_node}",
            f"--master_addr={self.master_addr}", f"--master_port={port}", *args,
        ]

    def popen(self, node: int, command: Sequence[str], env: dict[str, str] | None = None, port: int = 29500,
              **kwargs) -> subprocess.Popen:
        """Start ``command`` in ``node``'s namespace (own process group; stopped by
        :meth:`down`). ``env`` adds to os.environ and :meth:`env`."""
        if not self._created:
            raise NetnsError("cluster is not up (use it as a context manager or call up())")
        full_env = {**os.environ, **self.env(node, port), **(env or {})}
        proc = subprocess.Popen(self.argv(node, command), env=full_env, start_new_session=True, **kwargs)
        self._procs.append(proc)
        return proc

    def wait(self, procs: Sequence[subprocess.Popen], timeout: float | None = None) -> list[int]:
        """Wait for all; if one fails, stop the others (they would wait for it forever).
        Returns the exit codes (124 for those stopped at the timeout)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        codes: list[int | None] = [None] * len(procs)
        while any(code is None for code in codes):
            for i, proc in enumerate(procs):
                if codes[i] is None:
                    codes[i] = proc.poll()
            if any(code not in (None, 0) for code in codes):
                break
            if deadline is not None and time.monotonic() > deadline:
                for i, code in enumerate(codes):
                    if code is None:
                        codes[i] = 124
                break
            time.sleep(0.1)
        self.terminate(procs)
        return [proc.returncode if code is None else code for code, proc in zip(codes, procs)]

    def terminate(self, procs: Iterable[subprocess.Popen] | None = None, grace: float = 5.0) -> None:
        """SIGTERM the process groups of ``procs`` (default: all started here), then SIGKILL."""
        targets = [p for p in (self._procs if procs is None else procs) if p.poll() is None]
        for proc in targets:
            _signal_group(proc, signal.SIGTERM)
        end = time.monotonic() + grace
        for proc in targets:
            try:
                proc.wait(max(0.0, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(proc, signal.SIGKILL)
                proc.wait()


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)  # the process group popen() made for this command
    except ProcessLookupError:
        pass


def _pump(stream: IO[bytes], prefix: str, out: IO[str]) -> None:
    for line in iter(stream.readline, b""):
        out.write(f"{prefix}{line.decode(errors='replace')}")
        out.flush()


def _substitute(command: Sequence[str], cluster: NetnsCluster, node: int, port: int) -> list[str]:
    fields = {"node": node, "nodes": cluster.nodes, "addr": cluster.address(node), "master": cluster.master_addr,
              "port": port, "ifname": IFNAME}
    return [re.sub(r"\{(\w+)\}", lambda m: str(fields.get(m.group(1), m.group(0))), arg) for arg in command]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="netns-cluster",
        description="Run a job on N emulated nodes (network namespaces on a private, rate-limited bridge).",
        epilog="Arguments after -- go to `deepreduce train` (or, with --exec, form the command).",
    )
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--nproc-per-node", type=int, default=1)
    parser.add_argument("--rate", default=None, help="link rate, e.g. 100mbit or 1gbit (default: unshaped)")
    parser.add_argument("--burst", type=int, default=None, help="tbf burst in bytes (default: just above rate/HZ)")
    parser.add_argument("--subnet", default="10.200.0.0/24")
    parser.add_argument("--port", type=int, default=29500)
    parser.add_argument("--timeout", type=float, default=None, help="stop everything after this many seconds")
    parser.add_argument("--exec", dest="exec_", action="store_true", help="run the command after -- on every node as is")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if args.exec_ and not command:
        parser.error("--exec needs a command after --")
    reason = netns_unavailable_reason()
    if reason:
        print(f"netns-cluster: {reason}", file=sys.stderr)
        return 2

    def stop(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)  # unwinds through the context manager: teardown runs

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGHUP, stop)
    cluster = NetnsCluster(args.nodes, rate=args.rate, burst=args.burst, subnet=args.subnet)
    with cluster:
        shaped = f"{args.rate} (burst {cluster.burst} B)" if args.rate else "unshaped"
        print(f"netns-cluster: {args.nodes} nodes {cluster.address(0)}..{cluster.address(args.nodes - 1)}, links {shaped}",
              flush=True)
        procs, pumps = [], []
        for node in range(args.nodes):
            if args.exec_:
                node_cmd = _substitute(command, cluster, node, args.port)
            else:
                node_cmd = cluster.torchrun_argv(node, ["-m", "deepreduce", "train", *command],
                                                 nproc_per_node=args.nproc_per_node, port=args.port)
            proc = cluster.popen(node, node_cmd, port=args.port, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            procs.append(proc)
            pump = threading.Thread(target=_pump, args=(proc.stdout, f"[node {node}] ", sys.stdout), daemon=True)
            pump.start()
            pumps.append(pump)
        codes = cluster.wait(procs, timeout=args.timeout)
        for pump in pumps:
            pump.join(timeout=5)
    for node, code in enumerate(codes):
        print(f"netns-cluster: node {node} exited with {code}", file=sys.stderr if code else sys.stdout)
    # The node that failed on its own (a positive code) explains the run; the others
    # were stopped by a signal (negative codes) because of it.
    failed = next((code for code in codes if code > 0), None)
    if failed is not None:
        return failed
    return 128 - min(codes) if min(codes) < 0 else 0


if __name__ == "__main__":
    sys.exit(main())
