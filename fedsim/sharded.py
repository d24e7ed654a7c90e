"""The ``sharded`` engine: ClientApp calls grouped into one Ray call per worker.

Flower's simulation runtime (engine ``flower``) sends every client message to
a Ray actor on its own: a round trip that costs milliseconds even for a trivial
ClientApp, more than a small client's whole local training (see
``benchmarks/sim_overhead.py``). :class:`ShardedGrid` keeps Ray's parallelism
and resource accounting but pays that cost once per worker and round: node
``i`` always lives on worker ``i % K`` (so its ``context.state`` persists
there), a worker's messages of a round travel in one call (the global model
they share is serialised once), and inside the worker the ClientApp runs each
message exactly as the in-process engine does, so results equal the other
engines'.

``K`` is the number of clients that fit the Ray cluster at once
(``CPUs // simulation.client_resources.num_cpus``, and the GPUs'
``// num_gpus`` when clients use GPUs), as for Flower's actor pool.
"""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import Message
from flwr.clientapp import ClientApp

from fedsim.config import ExperimentConfig
from fedsim.inprocess import InProcessGrid

__all__ = ["ShardedGrid"]


class ShardedGrid(InProcessGrid):
    """A Grid whose nodes live on Ray workers, called once per worker and round.

    Parameters
    ----------
    client_app : ClientApp
        The app every node runs (sent to each worker once).
    exp : ExperimentConfig
        The experiment (Ray resources, client count).
    """

    def __init__(self, client_app: ClientApp, exp: ExperimentConfig) -> None:
        from fedsim.simulation import start_client_workers

        super().__init__(client_app, exp.num_clients)
        self._index = {node_id: i for i, node_id in enumerate(self.node_ids)}
        self.workers = start_client_workers(exp, client_app)

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        raise NotImplementedError("the sharded engine runs whole phases only")

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> list[Message]:
        """Send each worker its messages in one call; gather every reply.

        With ``timeout``, each client's own call is timed as in the in-process
        engine: a reply that took longer is dropped (a timeout).
        """
        groups: dict[int, list[Message]] = {}
        for message in messages:
            shard = self._index[message.metadata.dst_node_id] % self.workers.count
            groups.setdefault(shard, []).append(message)
        return self.workers.run(groups, timeout)

    def close(self) -> None:
        """Stop the workers (and Ray, if it was started for them)."""
        self.workers.close()
