"""fedsim's Flower ClientApp: the same code in simulation and on real devices.

Under ``fedsim run`` the experiment arrives by closure (:func:`build_client_app`);
under ``flwr run`` and in deployment the module-level :data:`app` composes it
from the Flower run config, exactly as the ServerApp does. Handlers:

``query.hello``
    Who am I: partition id, example count, label histogram (before round 1).
``train``
    Load the global model (plus server-owned tensors and this client's own
    local tensors), train locally, reply with the averaged tensors and metrics.
``evaluate``
    Evaluate the global model on this client's held-out split.

A node's data comes from its node config: ``partition-id``/``num-partitions``
(simulation, and deployment demos) selects one partition of the experiment's
dataset; ``data-path`` (a device's own files, see :mod:`fedsim.device_data`)
makes the device train on its whole local copy, identified by ``partition-id``
if given, else by a number derived from the data.
"""

from __future__ import annotations

from typing import Any

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from clients.fedma import register_fedma
from fedsim.config import ExperimentConfig, experiment_from_run_config
from fedsim.device_data import device_node_data
from fedsim.faults import apply_fault, corrupt
from fedsim.node import NodeData, evaluate_client, node_data, train_client
from fedsim.params import SERVER_STATE_KEY, record_to_state, state_to_record

__all__ = ["app", "build_client_app"]

LOCAL_STATE_KEY = "fedsim.local"
DATA_PATH = "data-path"  # node config: the device's own data (fedsim.device_data)
PARTITION_ID = "partition-id"  # node config: partition / identity of the node


def _partition_id(context: Context) -> int:
    try:
        return int(context.node_config[PARTITION_ID])
    except KeyError:
        raise ValueError(
            "this SuperNode has neither partition-id nor data-path; start it with "
            "--node-config 'partition-id=<i> num-partitions=<n>' or "
            "--node-config 'data-path=\"/path/to/data\"'"
        ) from None


def build_client_app(exp: ExperimentConfig | None = None) -> ClientApp:
    """A ClientApp for ``exp``, or one that reads the experiment from the run config."""
    app = ClientApp()

    def experiment(context: Context) -> ExperimentConfig:
        return (
            exp if exp is not None else experiment_from_run_config(context.run_config)
        )

    def data(context: Context) -> tuple[ExperimentConfig, NodeData]:
        """This node's experiment and data (a device's own files with data-path)."""
        e = experiment(context)
        path = context.node_config.get(DATA_PATH)
        if path is not None:
            pid = context.node_config.get(PARTITION_ID)
            return device_node_data(
                e, str(path), partition_id=None if pid is None else int(pid)
            )
        return e, node_data(e, _partition_id(context))

    @app.query("hello")
    def hello(msg: Message, context: Context) -> Message:
        e, node = data(context)
        metrics = MetricRecord(
            {
                "partition-id": node.partition_id,
                "num-partitions": int(
                    context.node_config.get("num-partitions", e.num_clients)
                ),
                "num-examples": int(node.x_train.shape[0]),
                "label-counts": node.label_counts(),
            }
        )
        return Message(RecordDict({"metrics": metrics}), reply_to=msg)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        e, node = data(context)
        arrays: ArrayRecord = msg.content["arrays"]  # type: ignore[assignment]
        state = _incoming_state(msg, context)
        config: dict[str, Any] = dict(msg.content.get("config", {}))
        fault = apply_fault(config)  # simulation.faults: crash or straggle here
        update = train_client(
            e,
            node,
            state,
            server_round=int(config.get("server-round", 1)),
            config=config,
            extras=_extras(msg),
        )
        trained = update.state if fault != "corrupt" else corrupt(update.state)
        server_keys = _server_keys(msg)
        local_keys = [k for k in trained if k not in arrays and k not in server_keys]
        if local_keys:
            context.state[LOCAL_STATE_KEY] = state_to_record(trained, local_keys)
        # every tensor the server shares, at the client's own widths (a client
        # that pruned its model comes back narrower)
        shared = [k for k in trained if k not in server_keys and k not in local_keys]
        reply = RecordDict(
            {
                "arrays": state_to_record(trained, shared),
                # label counts let matching strategies (PFNM) weigh output units
                "metrics": MetricRecord(
                    {**update.metrics, "label-counts": node.label_counts()}
                ),
            }
        )
        for name, tensors in update.extras.items():
            reply[name] = state_to_record(tensors)
        return Message(reply, reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        e, node = data(context)
        metrics = evaluate_client(e, node, _incoming_state(msg, context))
        return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)  # type: ignore[arg-type]

    register_fedma(app, data)  # train.fedma_local and train.fedma_layer
    return app


def _server_keys(msg: Message) -> set[str]:
    record = msg.content.get(SERVER_STATE_KEY)
    return set(record.keys()) if isinstance(record, ArrayRecord) else set()


def _extras(msg: Message) -> dict[str, dict[str, Any]]:
    """The message's tensor records other than the model and server state."""
    return {
        name: record_to_state(record)
        for name, record in msg.content.array_records.items()
        if name not in ("arrays", SERVER_STATE_KEY)
    }


def _incoming_state(msg: Message, context: Context) -> dict[str, Any]:
    """Global averaged tensors + server-owned tensors + this client's local tensors."""
    state: dict[str, Any] = {}
    local = context.state.get(LOCAL_STATE_KEY)
    if isinstance(local, ArrayRecord):
        state.update(record_to_state(local))
    server = msg.content.get(SERVER_STATE_KEY)
    if isinstance(server, ArrayRecord):
        state.update(record_to_state(server))
    state.update(record_to_state(msg.content["arrays"]))  # type: ignore[arg-type]
    return state


#: The ClientApp that ``flwr run`` and SuperNodes load (``pyproject.toml``).
app = build_client_app()
