"""Flower messages to and from a batched cohort: what each client starts from,
which messages the batched path can serve, and the replies a ClientApp would send.
"""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

from fedsim._cohort_shard import ShardResult
from fedsim.params import SERVER_STATE_KEY, record_to_state, state_to_record

__all__ = [
    "KNOWN_CONFIG",
    "incoming_states",
    "message_problem",
    "metrics_reply",
    "train_reply",
]

#: round-config keys the batched path reads (the same that train_client reads)
KNOWN_CONFIG = frozenset({"server-round", "lr", "proximal-mu"})


def message_problem(message: Message) -> str | None:
    """Why ``message`` needs the per-client path, or None when it can batch."""
    content = message.content
    if not isinstance(content.get("arrays"), ArrayRecord):
        return "a message carries no 'arrays' record"
    extra = sorted(
        k for k in content.array_records if k not in ("arrays", SERVER_STATE_KEY)
    )
    if extra:
        return f"messages carry tensor records {extra} besides the model"
    unknown = sorted(set(content.get("config", {})) - KNOWN_CONFIG)
    if unknown:
        return f"round configs carry keys {unknown} that only a ClientApp reads"
    return None


def incoming_states(
    messages: list[Message],
) -> tuple[list[dict[str, torch.Tensor]], list[int]]:
    """Distinct incoming states (server-owned + averaged tensors), who has which."""
    seen: dict[tuple[int, int], int] = {}
    states: list[dict[str, torch.Tensor]] = []
    index = []
    for message in messages:
        arrays = message.content["arrays"]
        server = message.content.get(SERVER_STATE_KEY)
        key = (id(arrays), id(server))
        if key not in seen:
            state = record_to_state(server) if isinstance(server, ArrayRecord) else {}
            state.update(record_to_state(arrays))  # type: ignore[arg-type]
            seen[key] = len(states)
            states.append(state)
        index.append(seen[key])
    return states, index


def train_reply(message: Message, result: ShardResult, row: int) -> Message:
    """The reply the ClientApp would send for this client's trained state."""
    trained = result.state(row)
    arrays = message.content["arrays"]
    server = message.content.get(SERVER_STATE_KEY)
    server_keys = set(server.keys()) if isinstance(server, ArrayRecord) else set()
    shared = [k for k in trained if k in arrays and k not in server_keys]
    metrics = {
        "num-examples": float(result.num_examples[row]),
        "train_loss": result.train_loss[row],
        "num-steps": float(result.num_steps[row]),
    }
    content = RecordDict(
        {
            "arrays": state_to_record(trained, shared),
            "metrics": MetricRecord(metrics),  # type: ignore[arg-type]
        }
    )
    return Message(content, reply_to=message)


def metrics_reply(message: Message, metrics: dict[str, float]) -> Message:
    """The evaluate reply a ClientApp would send with ``metrics``."""
    record = MetricRecord(metrics)  # type: ignore[arg-type]
    return Message(RecordDict({"metrics": record}), reply_to=message)
