"""A Grid wrapper that gives every strategy fedsim's guarantees, unchanged.

:class:`FedsimGrid` wraps the runtime's ``flwr.serverapp.Grid`` (in-memory in
simulation, gRPC in deployment) and is what strategies see:

* **known nodes, stable order** - before round 1 it asks every node who it is
  (a ``query.hello`` message: partition id, example counts, label histogram)
  and from then on lists node ids in partition order, so Flower's
  ``random.sample`` over them picks the same clients for the same seed in every
  run and for every strategy (the server loop seeds ``random`` per round);
* **byte accounting** - array payload bytes of every message sent and received;
* **server-owned state** - tensors the strategy must not average ride along in
  every outgoing message under :data:`fedsim.params.SERVER_STATE_KEY`;
* **round accounting** - how many replies arrived, failed or timed out;
* **no slow polling** - replies are polled with a short, growing interval.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from fedsim.exceptions import ConfigError
from fedsim.params import SERVER_STATE_KEY, payload_bytes

__all__ = ["FedsimGrid", "NodeInfo", "PhaseStats", "partition_id"]

HELLO = "query.hello"


def partition_id(grid: Grid, node_id: int) -> int:
    """The partition id of ``node_id`` on ``grid``: what a strategy should key
    per-client state by, since node ids change from run to run (a resumed run
    too) under Flower's runtimes. On a grid that is not a :class:`FedsimGrid`
    it is the node's position among the grid's nodes."""
    partition_of = getattr(grid, "partition_of", None)
    if partition_of is not None:
        return int(partition_of(node_id))
    return list(grid.get_node_ids()).index(node_id)


def _in_sending_order(replies: list[Message], messages: list[Message]) -> list[Message]:
    """``replies`` in the order of the messages they answer (by node).

    Replies arrive in whatever order clients finish, and strategies sum their
    updates in the order given: floating-point sums in arrival order made runs
    of the same seed differ in the last digits, and drift apart over rounds.
    """
    position: dict[int, int] = {}
    for i, message in enumerate(messages):
        position.setdefault(message.metadata.dst_node_id, i)
    return sorted(
        replies, key=lambda r: position.get(r.metadata.src_node_id, len(messages))
    )


@dataclass(frozen=True)
class NodeInfo:
    """What a node said about itself in reply to ``query.hello``."""

    node_id: int
    partition_id: int
    num_partitions: int
    num_examples: int
    label_counts: tuple[int, ...]


@dataclass
class PhaseStats:
    """Counters of one send-and-receive phase (or a sum of them)."""

    sent: int = 0
    replies: int = 0
    failures: int = 0
    timeouts: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    failed_nodes: list[int] = field(default_factory=list)

    def add(self, other: PhaseStats) -> None:
        self.sent += other.sent
        self.replies += other.replies
        self.failures += other.failures
        self.timeouts += other.timeouts
        self.bytes_sent += other.bytes_sent
        self.bytes_received += other.bytes_received
        self.failed_nodes += other.failed_nodes


class FedsimGrid(Grid):
    """Wraps a runtime Grid; see the module docstring.

    Parameters
    ----------
    inner : Grid
        The runtime's grid.
    expected_nodes : int
        Nodes to wait for before the first round (``num_clients``).
    wait_seconds : float
        How long to wait for them (deployment: devices connect over time).
    decorate : callable, optional
        ``decorate(message) -> None`` called on every outgoing message before it
        is pushed (fault injection, extra records).
    """

    def __init__(
        self,
        inner: Grid,
        *,
        expected_nodes: int,
        wait_seconds: float = 120.0,
        decorate: Callable[[Message], None] | None = None,
    ) -> None:
        self.inner = inner
        self.expected_nodes = expected_nodes
        self.wait_seconds = wait_seconds
        self.decorate = decorate
        self.nodes: dict[int, NodeInfo] = {}
        self._order: list[int] = []
        self.server_state: ArrayRecord | None = None
        self.stats = PhaseStats()

    # -- Grid interface ---------------------------------------------------
    def set_run(self, run: Any) -> None:
        self.inner.set_run(run)

    @property
    def run(self) -> Any:
        return self.inner.run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> list[int]:
        """Node ids in partition order (all expected nodes once discovered)."""
        return list(self._order) if self._order else sorted(self.inner.get_node_ids())

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.inner.push_messages(self._sending(messages))

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._received(self.inner.pull_messages(message_ids))

    def _sending(self, messages: Iterable[Message]) -> list[Message]:
        prepared = [self._prepare(m) for m in messages]
        self.stats.sent += len(prepared)
        self.stats.bytes_sent += sum(payload_bytes(m.content) for m in prepared)
        return prepared

    def _received(self, replies: Iterable[Message]) -> list[Message]:
        replies = list(replies)
        for reply in replies:
            if reply.has_error():
                self.stats.failures += 1
                self.stats.failed_nodes.append(reply.metadata.src_node_id)
            else:
                self.stats.replies += 1
                self.stats.bytes_received += payload_bytes(reply.content)
        return replies

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Push, then poll for replies until all arrived or ``timeout`` passed.

        Engines that run clients synchronously (``inner.synchronous``) apply the
        timeout themselves: a reply finished after the deadline is dropped.
        """
        messages = list(messages)
        if getattr(self.inner, "synchronous", False):
            prepared = self._sending(messages)
            done = self._received(
                self.inner.send_and_receive(prepared, timeout=timeout)
            )
            self.stats.timeouts += len(prepared) - len(done)
            return _in_sending_order(done, messages)
        pending = set(self.push_messages(messages))
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        interval = 0.002
        while pending:
            got = list(self.pull_messages(pending))
            replies += got
            pending -= {m.metadata.reply_to_message_id for m in got}
            if not pending or (deadline is not None and time.monotonic() >= deadline):
                break
            if not got:
                time.sleep(interval)
                interval = min(interval * 1.5, 0.05)
            else:
                interval = 0.002
        self.stats.timeouts += len(pending)
        return _in_sending_order(replies, messages)

    # -- fedsim additions ---------------------------------------------------
    def take_stats(self) -> PhaseStats:
        """The counters since the last call, then reset them."""
        stats, self.stats = self.stats, PhaseStats()
        return stats

    def _prepare(self, message: Message) -> Message:
        if self.server_state is not None and SERVER_STATE_KEY not in message.content:
            message.content[SERVER_STATE_KEY] = self.server_state
        if self.decorate is not None:
            self.decorate(message)
        return message

    def discover(self, config: ConfigRecord | None = None) -> dict[int, NodeInfo]:
        """Wait for ``expected_nodes`` nodes, ask each who it is, fix their order.

        Raises
        ------
        ConfigError
            If fewer nodes connect within ``wait_seconds``, or two nodes claim
            the same partition.
        """
        start = time.monotonic()
        while True:
            node_ids = sorted(self.inner.get_node_ids())
            if len(node_ids) >= self.expected_nodes:
                break
            if time.monotonic() - start > self.wait_seconds:
                raise ConfigError(
                    f"the experiment needs num_clients={self.expected_nodes} nodes but "
                    f"only {len(node_ids)} connected within {self.wait_seconds:.0f} s; "
                    "start more SuperNodes (flwr run: --federation-config "
                    f"'num-supernodes={self.expected_nodes}') or lower num_clients"
                )
            time.sleep(0.2)
        content = RecordDict(
            {"config": config if config is not None else ConfigRecord()}
        )
        hello = [Message(content, node_id, HELLO) for node_id in node_ids]
        replies = list(self.inner.send_and_receive(hello, timeout=self.wait_seconds))
        infos: dict[int, NodeInfo] = {}
        for reply in replies:
            if reply.has_error():
                reason = (reply.error.reason or "unknown error").strip()
                raise ConfigError(
                    f"node {reply.metadata.src_node_id} failed to start: "
                    f"{reason.splitlines()[-1]}"
                )
            meta: dict[str, Any] = dict(reply.content["metrics"])
            info = NodeInfo(
                node_id=reply.metadata.src_node_id,
                partition_id=int(meta["partition-id"]),
                num_partitions=int(meta["num-partitions"]),
                num_examples=int(meta["num-examples"]),
                label_counts=tuple(int(v) for v in meta.get("label-counts", [])),
            )
            infos[info.node_id] = info
        if len(infos) < self.expected_nodes:
            raise ConfigError(
                f"only {len(infos)} of {self.expected_nodes} nodes answered the hello"
            )
        by_partition: dict[int, int] = {}
        for info in infos.values():
            if info.partition_id in by_partition:
                raise ConfigError(
                    f"two nodes claim partition-id={info.partition_id}; give every "
                    "SuperNode its own partition-id in --node-config"
                )
            by_partition[info.partition_id] = info.node_id
        self.nodes = infos
        self._order = [by_partition[p] for p in sorted(by_partition)][
            : self.expected_nodes
        ]
        return infos

    def partition_of(self, node_id: int) -> int:
        """The partition id a node reported."""
        return self.nodes[node_id].partition_id
