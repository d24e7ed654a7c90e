"""FedsimGrid hands strategies the replies in the order of their messages."""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedsim.grid import FedsimGrid
from fedsim.inprocess import InProcessGrid


def _echo_app() -> ClientApp:
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: object) -> Message:
        metrics = MetricRecord({"num-examples": 1})
        return Message(RecordDict({"metrics": metrics}), reply_to=msg)

    return app


class _Backwards(InProcessGrid):
    """An engine whose replies come back last message first."""

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> list[Message]:
        return super().send_and_receive(messages, timeout=timeout)[::-1]

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        return super().pull_messages(message_ids)[::-1]


def _messages(grid: FedsimGrid, order: list[int]) -> list[Message]:
    nodes = grid.get_node_ids()
    content = RecordDict({"config": ConfigRecord({"server-round": 1})})
    return [Message(content, nodes[i], "train") for i in order]


def test_replies_follow_the_messages_whatever_order_they_arrive_in() -> None:
    order = [3, 0, 4, 1]
    for synchronous in (True, False):
        inner = _Backwards(_echo_app(), 5)
        inner.synchronous = synchronous  # False: FedsimGrid pushes and polls
        grid = FedsimGrid(inner, expected_nodes=5)
        messages = _messages(grid, order)
        replies = list(grid.send_and_receive(messages))
        assert [r.metadata.src_node_id for r in replies] == [
            m.metadata.dst_node_id for m in messages
        ]
