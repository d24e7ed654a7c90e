"""The ``inprocess`` engine: every ClientApp call runs in the server's process.

:class:`InProcessGrid` implements Flower's ``Grid`` by handing each message
straight to a ``ClientApp`` object, one client after another, with a
per-node ``Context`` (``partition-id``/``num-partitions`` node config and a
persistent ``state``) exactly as the simulation runtime gives them. There is no
Ray, no actor start-up and no serialisation, so it is the engine for debugging
(breakpoints work in client code), for tests and for tiny runs. Strategies and
the server loop see the same Grid interface as under Ray.
"""

from __future__ import annotations

import itertools
import time
import traceback
import uuid
from collections.abc import Iterable
from typing import Any

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

__all__ = ["InProcessGrid"]

CLIENT_EXCEPTION = 12  # Flower's error code for an exception in a ClientApp


class _Run:
    run_id = 0


class InProcessGrid(Grid):
    """A Grid whose nodes are ``num_nodes`` in-process ClientApp contexts.

    Parameters
    ----------
    client_app : ClientApp
        The app every node runs.
    num_nodes : int
        Number of nodes; node ``i`` has ``partition-id = i``.
    run_config : dict, optional
        The Flower run config every node sees.
    """

    #: clients run inside send_and_receive; FedsimGrid lets it apply timeouts
    synchronous = True
    #: node ``i`` gets id ``first_node_id + 7 * i`` (ids mean nothing in Flower)
    first_node_id = 1000

    def __init__(
        self,
        client_app: ClientApp,
        num_nodes: int,
        run_config: dict[str, Any] | None = None,
    ) -> None:
        self.client_app = client_app
        # node ids are arbitrary in Flower; keep them unrelated to partition ids
        self.node_ids = [self.first_node_id + 7 * i for i in range(num_nodes)]
        self.contexts = {
            node_id: Context(
                run_id=0,
                node_id=node_id,
                node_config={"partition-id": i, "num-partitions": num_nodes},
                state=RecordDict(),
                run_config=dict(run_config or {}),
            )
            for i, node_id in enumerate(self.node_ids)
        }
        self._replies: dict[str, Message] = {}
        self._counter = itertools.count()
        # Flower stamps every new Message with the identity of the running task
        TaskIdentity.task_id = 1
        TaskIdentity.run_id = 0
        TaskIdentity.node_id = SUPERLINK_NODE_ID

    def set_run(self, run: Any) -> None:
        """Nothing to do: there is one run."""

    @property
    def run(self) -> Any:
        return _Run()

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
        return list(self.node_ids)

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        """Run each message's ClientApp call now; replies wait to be pulled."""
        ids = []
        for message in messages:
            message_id = f"m{next(self._counter)}-{uuid.uuid4().hex[:8]}"
            message.metadata.__dict__["_message_id"] = message_id
            self._replies[message_id] = self._call(message)
            ids.append(message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        return [self._replies.pop(i) for i in list(message_ids) if i in self._replies]

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> list[Message]:
        """Run the clients one after another, each as if it had started with the
        round: with ``timeout``, a client whose own call takes longer is a
        timeout (its reply is dropped), as it would be among parallel clients."""
        replies = []
        for message in messages:
            started = time.monotonic()
            reply = self._call(message)
            if timeout is None or time.monotonic() - started <= timeout:
                replies.append(reply)
        return replies

    def _call(self, message: Message) -> Message:
        node_id = message.metadata.dst_node_id
        context = self.contexts[node_id]
        try:
            reply = self.client_app(message, context)
        except Exception as err:  # a failing client is a reply with an error
            reason = f"{type(err).__name__}: {err}\n{traceback.format_exc(limit=3)}"
            reply = Message(
                Error(code=CLIENT_EXCEPTION, reason=reason), reply_to=message
            )
        reply.metadata.__dict__["_src_node_id"] = node_id
        return reply
