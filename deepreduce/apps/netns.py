"""Emulate a cluster of N nodes on one Linux machine with network namespaces.

Each node is a network namespace with one interface (``eth0``, address ``10.200.0.<i+1>``),
plugged into a bridge that lives in a namespace of its own; nothing is routed to the
host or anywhere else. A node may run several processes (``procs_per_node``, one per
GPU on a real node): they reach each other at the node's own address, which the kernel
delivers over the namespace's loopback, so only traffic between nodes crosses the
shaped link (and its ``eth0`` counters). ``rate`` shapes every link with ``tc tbf`` at both ends, so a
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
    python -m deepreduce.apps.netns --nodes 2 --procs-per-node 2 --rate 100mbit -- --scheme hierarchical ...
    python -m deepreduce.apps.netns --nodes 3 --exec -- sh -c 'echo node $NODE_RANK at {addr}'

The first form runs ``torchrun ... -m deepreduce train ARGS`` on every node; ``--exec``
runs any command (once per node), with ``{node} {nodes} {addr} {master} {port} {ifname}``
replaced and ``NODE_RANK NNODES NPROC_PER_NODE MASTER_ADDR MASTER_PORT GLOO_SOCKET_IFNAME`` set.

Token-bucket burst: ``tbf`` lets ``burst`` bytes through at full speed after every idle
gap, which flatters payloads of about that size. The default is just above one timer
tick's worth of the rate (32 KiB at 100 Mbit/s, 256 KiB at 1 Gbit/s); smaller bursts
cap the link below its rate.

Faults, on a running cluster (each applies to one node's link, both directions):

    cluster.set_link(1, up=False)            # the node's interface goes down ...
    cluster.set_link(1, up=True)             # ... and up again (end="bridge": its switch port)
    cluster.set_rate(1, "20mbit")            # tc tbf replaced at both ends, traffic in flight
    cluster.set_loss(1, 0.02)                # 2 % of frames dropped each way (nftables)
    cluster.set_loss(1, 0)

This kernel has no ``netem``; loss uses nftables' ``numgen random`` in ``netdev``
ingress chains at both ends of the node's veth pair (the node's ``eth0`` and its bridge
port), so a dropped frame is lost on the wire: the sender is not told and TCP
retransmits, as over a lossy link. Needs ``nft`` (package ``nftables``);
:func:`loss_unavailable_reason` says whether it works here.
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


LOSS_TABLE = "deepreduce_loss"  # the nftables table that set_loss() owns in a namespace
LOSS_SCALE = 1 << 24  # numgen's range: loss probabilities resolve to 1 in 16.7 M
LINK_ENDS = ("node", "bridge", "both")


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


def loss_unavailable_reason() -> str | None:
    """Why :meth:`NetnsCluster.set_loss` cannot work here, or None if it can (makes a
    namespace with a veth pair and installs a loss rule on one end)."""
    reason = netns_unavailable_reason()
    if reason:
        return reason
    if shutil.which("nft") is None:
        return "'nft' is not installed (apt-get install nftables)"
    probe = f"drlossprobe{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode:
        return f"'ip netns add' failed: {made.stderr.strip()}"
    try:
        added = subprocess.run(["ip", "-n", probe, "link", "add", "eth0", "type", "veth", "peer", "name", "eth1"],
                               capture_output=True, text=True)
        if added.returncode:
            return f"cannot make a veth pair for the probe: {added.stderr.strip()}"
        ruleset = loss_ruleset([("eth0", "in")], 0.5)
        result = subprocess.run(["ip", "netns", "exec", probe, "nft", "-f", "-"], input=ruleset, capture_output=True,
                                text=True)
        if result.returncode:
            return f"nftables refused a netdev ingress numgen rule: {result.stderr.strip()}"
        return None
    finally:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True)


def loss_ruleset(devices: Sequence[tuple[str, str]], probability: float, table: str = LOSS_TABLE) -> str:
    """An ``nft -f`` script that (re)creates the netdev ``table`` dropping ``probability``
    of the frames arriving on each ``(device, chain name)``; with probability 0 it only
    removes the table. Ingress hooks, so the sender is not told of the drop."""
    if not 0.0 <= probability <= 1.0:
        raise ValueError(f"loss probability must be in [0, 1], got {probability!r}")
    # Declaring the table first makes the delete succeed whether or not it exists:
    # one atomic transaction replaces the previous rules.
    lines = [f"table netdev {table} {{}}", f"delete table netdev {table}"]
    if probability > 0:
        threshold = round(probability * LOSS_SCALE)
        lines.append(f"table netdev {table} {{")
        for device, chain in devices:
            lines += [f"  chain {chain} {{",
                      f'    type filter hook ingress device "{device}" priority 0; policy accept;',
                      f"    numgen random mod {LOSS_SCALE} < {threshold} counter drop",
                      "  }"]
        lines.append("}")
    return "\n".join(lines) + "\n"


class NetnsCluster:
    """N nodes (namespaces) on a private bridge, optionally rate-limited.

    Args:
        nodes: number of namespaces (>= 1).
        rate: link rate for tc tbf (``"100mbit"``, ``"1gbit"``); None: unshaped.
        burst: tbf burst in bytes (default :func:`default_burst`).
        latency: tbf queueing limit, as tc takes it.
        subnet: a /24 inside 10.0.0.0/8; node i gets host address i+1.
        name: prefix of the namespace names (default ``dr<pid>``), unique per cluster.
        procs_per_node: processes each node runs (torchrun's ``--nproc_per_node`` in
            :meth:`torchrun_argv`); they talk over the node's loopback.
    """

    def __init__(self, nodes: int, rate: str | None = None, burst: int | None = None, latency: str = "100ms",
                 subnet: str = "10.200.0.0/24", name: str | None = None, procs_per_node: int = 1) -> None:
        if not isinstance(nodes, int) or not 1 <= nodes <= 250:
            raise ValueError(f"nodes must be an int in [1, 250], got {nodes!r}")
        if isinstance(procs_per_node, bool) or not isinstance(procs_per_node, int) or procs_per_node < 1:
            raise ValueError(f"procs_per_node must be a positive int, got {procs_per_node!r}")
        network = ipaddress.ip_network(subnet)
        if network.prefixlen != 24 or not network.subnet_of(ipaddress.ip_network("10.0.0.0/8")):
            raise ValueError(f"subnet must be a /24 inside 10.0.0.0/8 (private, never routed), got {subnet}")
        if rate is not None:
            parse_rate(rate)
        if burst is not None and (isinstance(burst, bool) or not isinstance(burst, int) or burst < 1):
            raise ValueError(f"burst must be a positive int of bytes, got {burst!r}")
        self.nodes = nodes
        self.procs_per_node = procs_per_node
        self.rate = rate
        self.burst = burst if burst is not None else (default_burst(rate) if rate else None)
        self.latency = latency
        self.network = network
        self.name = name or f"dr{os.getpid()}"
        self.ifname = IFNAME
        self._procs: list[subprocess.Popen] = []
        self._created: list[str] = []
        self.rates: list[str | None] = [rate] * nodes  # each node's current link rate (set_rate changes it)

    # --- naming ------------------------------------------------------------------------

    def namespace(self, node: int) -> str:
        return f"{self.name}-n{node}"

    @property
    def bridge_namespace(self) -> str:
        return f"{self.name}-br"

    def port(self, node: int) -> str:
        """The name of ``node``'s port on the bridge (inside :attr:`bridge_namespace`)."""
        return f"p{node}"

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
        _check(cmd)

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
                ns, port = self.namespace(i), self.port(i)
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
        """Stop every process started through the cluster and any other left in its
        namespaces (one that left its process group), then delete the namespaces. Ctrl-C,
        SIGTERM and SIGHUP wait until this is done (in the main thread), so a second one
        cannot leave namespaces and processes behind."""
        # Signal handlers run in the main thread whichever thread the signal reaches, so
        # they are swapped for one that only notes the signal; it is raised again after.
        deferring = threading.current_thread() is threading.main_thread()
        noted: list[int] = []
        if deferring:
            previous = {sig: signal.signal(sig, lambda signum, frame: noted.append(signum)) for sig in _STOP_SIGNALS}
        try:
            self.terminate()
            for ns in reversed(self._created):
                _kill_inside(ns)
                subprocess.run(["ip", "netns", "del", ns], capture_output=True)
            self._created.clear()
        finally:
            if deferring:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)
                if noted:
                    signal.raise_signal(noted[0])

    # --- faults on a running cluster --------------------------------------------------------

    def _check_node(self, node: int) -> None:
        if not 0 <= node < self.nodes:
            raise ValueError(f"node {node} out of range [0, {self.nodes})")

    def link_argv(self, node: int, up: bool, end: str = "node") -> list[list[str]]:
        """Commands that take ``node``'s link down or up: ``end`` ``node`` is its own
        interface (its routes go with it), ``bridge`` its port on the bridge (the node's
        interface stays up without carrier, as when a switch port fails), ``both``."""
        self._check_node(node)
        if end not in LINK_ENDS:
            raise ValueError(f"end must be one of {LINK_ENDS}, got {end!r}")
        state = "up" if up else "down"
        argv = []
        if end in ("node", "both"):
            argv.append(["ip", "-n", self.namespace(node), "link", "set", IFNAME, state])
        if end in ("bridge", "both"):
            argv.append(["ip", "-n", self.bridge_namespace, "link", "set", self.port(node), state])
        return argv

    def rate_argv(self, node: int, rate: str | None, burst: int | None = None) -> list[list[str]]:
        """Commands that reshape ``node``'s link to ``rate`` at both ends (its upload on its
        interface, its download on its bridge port), replacing the qdisc in place; ``rate``
        None removes the shaping."""
        self._check_node(node)
        ends = [(self.namespace(node), IFNAME), (self.bridge_namespace, self.port(node))]
        if rate is None:
            return [["ip", "netns", "exec", ns, "tc", "qdisc", "del", "dev", dev, "root"] for ns, dev in ends]
        parse_rate(rate)
        burst = burst if burst is not None else default_burst(rate)
        return [["ip", "netns", "exec", ns, "tc", "qdisc", "replace", "dev", dev, "root", "tbf", "rate", rate,
                 "burst", str(burst), "latency", self.latency] for ns, dev in ends]

    def loss_argv(self, node: int, probability: float) -> list[tuple[list[str], str]]:
        """``(argv, stdin)`` pairs that make ``node``'s link drop ``probability`` of its
        frames in each direction (0: none): nftables ingress rules on the node's interface
        (its download) and on its bridge port (its upload)."""
        self._check_node(node)
        return [(["ip", "netns", "exec", ns, "nft", "-f", "-"], loss_ruleset([(dev, chain)], probability, table))
                for ns, dev, chain, table in self._loss_tables(node)]

    def _loss_tables(self, node: int) -> list[tuple[str, str, str, str]]:
        """(namespace, device, chain, table) of ``node``'s loss rules. The bridge namespace
        serves every node, so its tables are named by port."""
        return [(self.namespace(node), IFNAME, "download", LOSS_TABLE),
                (self.bridge_namespace, self.port(node), "upload", f"{LOSS_TABLE}_{self.port(node)}")]

    def _require_up(self) -> None:
        if not self._created:
            raise NetnsError("cluster is not up (use it as a context manager or call up())")

    def set_link(self, node: int, up: bool, end: str = "node") -> None:
        """Take ``node``'s link down or bring it up (see :meth:`link_argv` for ``end``).
        Connections survive a short outage: TCP retransmits once the link is back."""
        self._require_up()
        for cmd in self.link_argv(node, up, end):
            _check(cmd)

    def set_rate(self, node: int, rate: str | None, burst: int | None = None) -> None:
        """Change ``node``'s link rate while traffic flows (``tc qdisc replace``; None:
        unshaped). Packets queued in the old token bucket may be dropped, and are resent."""
        self._require_up()
        if rate is None:
            for cmd in self.rate_argv(node, None):
                # a link that was never shaped has no root qdisc to delete
                result = subprocess.run(cmd, capture_output=True, text=True)
                if result.returncode and "No such file" not in result.stderr and "Cannot delete" not in result.stderr:
                    raise NetnsError(f"'{' '.join(cmd)}' failed: {result.stderr.strip()}")
        else:
            for cmd in self.rate_argv(node, rate, burst):
                _check(cmd)
        self.rates[node] = rate

    def set_loss(self, node: int, probability: float) -> None:
        """Drop ``probability`` of ``node``'s frames in each direction (0: stop dropping)."""
        self._require_up()
        if shutil.which("nft") is None:
            raise NetnsError("packet loss needs 'nft' (apt-get install nftables)")
        for cmd, script in self.loss_argv(node, probability):
            _check(cmd, script)

    def lost_packets(self, node: int) -> int:
        """Frames that :meth:`set_loss` dropped on ``node``'s link since its rules were last
        installed (both directions; 0 when none are installed)."""
        self._require_up()
        self._check_node(node)
        total = 0
        for ns, _, _, table in self._loss_tables(node):
            listed = subprocess.run(["ip", "netns", "exec", ns, "nft", "list", "table", "netdev", table],
                                    capture_output=True, text=True)
            if listed.returncode == 0:  # no table: no rules installed, nothing dropped
                total += sum(int(n) for n in re.findall(r"counter packets (\d+)", listed.stdout))
        return total

    # --- running commands ------------------------------------------------------------------

    def env(self, node: int, port: int = 29500) -> dict[str, str]:
        """Variables a distributed job on ``node`` needs (added to os.environ)."""
        return {
            "NODE_RANK": str(node),
            "NNODES": str(self.nodes),
            "NPROC_PER_NODE": str(self.procs_per_node),
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

    def torchrun_argv(self, node: int, args: Sequence[str], nproc_per_node: int | None = None,
                      port: int = 29500) -> list[str]:
        """``torchrun`` (this interpreter's) for one node of a static N-node rendezvous,
        ``nproc_per_node`` processes (default :attr:`procs_per_node`) on the node."""
        nproc_per_node = self.procs_per_node if nproc_per_node is None else nproc_per_node
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


_STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}


def _kill_inside(namespace: str) -> None:
    """SIGKILL every process still running in ``namespace``."""
    listed = subprocess.run(["ip", "netns", "pids", namespace], capture_output=True, text=True).stdout
    for pid in listed.split():
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass


def _check(cmd: Sequence[str], stdin: str | None = None) -> None:
    result = subprocess.run(list(cmd), input=stdin, capture_output=True, text=True)
    if result.returncode:
        raise NetnsError(f"'{' '.join(cmd)}' failed: {result.stderr.strip()}")


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


def _run(cluster: NetnsCluster, args: argparse.Namespace, command: list[str]) -> list[int]:
    """Start the command on every node of ``cluster`` and wait: the nodes' exit codes."""
    with cluster:
        shaped = f"{args.rate} (burst {cluster.burst} B)" if args.rate else "unshaped"
        print(f"netns-cluster: {args.nodes} nodes x {args.procs_per_node} processes, "
              f"{cluster.address(0)}..{cluster.address(args.nodes - 1)}, links {shaped}", flush=True)
        procs, pumps = [], []
        for node in range(args.nodes):
            if args.exec_:
                node_cmd = _substitute(command, cluster, node, args.port)
            else:
                node_cmd = cluster.torchrun_argv(node, ["-m", "deepreduce", "train", *command], port=args.port)
            proc = cluster.popen(node, node_cmd, port=args.port, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            procs.append(proc)
            pump = threading.Thread(target=_pump, args=(proc.stdout, f"[node {node}] ", sys.stdout), daemon=True)
            pump.start()
            pumps.append(pump)
        codes = cluster.wait(procs, timeout=args.timeout)
        for pump in pumps:
            pump.join(timeout=5)
    return codes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="netns-cluster",
        description="Run a job on N emulated nodes (network namespaces on a private, rate-limited bridge).",
        epilog="Arguments after -- go to `deepreduce train` (or, with --exec, form the command).",
    )
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--procs-per-node", "--nproc-per-node", dest="procs_per_node", type=int, default=1,
                        help="processes per node (torchrun --nproc_per_node); they share the node's loopback")
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
    if args.procs_per_node < 1:
        parser.error(f"--procs-per-node must be >= 1, got {args.procs_per_node}")
    try:
        cluster = NetnsCluster(args.nodes, rate=args.rate, burst=args.burst, subnet=args.subnet,
                               procs_per_node=args.procs_per_node)
    except ValueError as error:
        parser.error(str(error))
    reason = netns_unavailable_reason()
    if reason:
        print(f"netns-cluster: {reason}", file=sys.stderr)
        return 2

    def stop(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)  # unwinds through the context manager: teardown runs

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGHUP, stop)
    try:
        codes = _run(cluster, args, command)
    except KeyboardInterrupt:  # the cluster is down by now
        print("netns-cluster: interrupted; every node stopped, namespaces removed", file=sys.stderr)
        return 130
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
