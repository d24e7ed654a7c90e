"""fedsim's server loop: drives any Flower strategy round by round.

Flower's ``Strategy.start()`` runs train, federated evaluation and central
evaluation per round. fedsim runs the same sequence through the strategy's own
``configure_*`` / ``aggregate_*`` methods, so every Flower strategy works
unchanged, and adds what a simulation framework needs around it: exact,
seeded cohorts; server-side evaluation with any task's metrics; rejection of
invalid updates before they reach the strategy; server-owned model state and
the model's ``server_update`` hook; per-round records written atomically
(``results.json``); and progress on the console.

A strategy with a multi-phase round (FedMA) may define ``run_round(server_round,
arrays, config, grid) -> (arrays | None, metrics | None)``; the loop then calls it
instead of ``configure_train`` / ``aggregate_train``.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid

from fedsim import models, tasks
from fedsim.checkpoint import Checkpoint, capture_rng, restore_rng, save_checkpoint
from fedsim.class_accuracy import class_accuracy
from fedsim.config import ExperimentConfig
from fedsim.data import DataSplits
from fedsim.faults import FAULT_KEY, STRAGGLE_KEY, plan_faults
from fedsim.grid import FedsimGrid
from fedsim.params import record_to_state, split_roles, state_to_record
from fedsim.pruning.flops import count_flops
from fedsim.results import Results, write_label_histogram
from fedsim.train import derive_seed, evaluate
from fedsim.validation import check_reply

__all__ = ["ServerLoop"]

log = logging.getLogger("fedsim")


@dataclass
class ServerLoop:
    """Runs one experiment's rounds on a Grid.

    Parameters
    ----------
    exp : ExperimentConfig
        The experiment.
    strategy : flwr.serverapp.strategy.Strategy
        The aggregation strategy (built by the composition root).
    splits : DataSplits
        The dataset (the server evaluates on ``splits.test``).
    model : torch.nn.Module
        The initial global model.
    results : Results
        Where per-round records go.
    progress : callable, optional
        ``progress(record)`` after every round (the CLI prints a line).
    resume_from : Checkpoint, optional
        Continue from this checkpoint's round instead of starting afresh.
    """

    exp: ExperimentConfig
    strategy: Any
    splits: DataSplits
    model: torch.nn.Module
    results: Results
    progress: Callable[[dict[str, Any]], None] | None = None
    resume_from: Checkpoint | None = None

    def __post_init__(self) -> None:
        self.task = tasks.build(self.exp.task.name, **self.exp.task.options)
        # a task may need the model (classification's certify_eps: its Lipschitz
        # constant); it reads what it needs once, here
        bind = getattr(self.task, "bind_model", None)
        if bind is not None:
            self.task = bind(self.model)
        self.roles = models.tensor_roles(self.model)

    # -- state helpers ------------------------------------------------------
    def _split(self, state: dict[str, torch.Tensor]) -> tuple[ArrayRecord, ArrayRecord]:
        parts = split_roles(state, self.roles)
        return state_to_record(parts["average"]), state_to_record(parts["server"])

    def _install(self, arrays: ArrayRecord, server_state: ArrayRecord) -> None:
        """Make the global model hold ``arrays`` plus the server-owned tensors."""
        state = {**record_to_state(server_state), **record_to_state(arrays)}
        current = self.model.state_dict()
        full = {k: state.get(k, current[k]) for k in current}
        full.update({k: v for k, v in state.items() if k not in full})
        model = models.fit_to_state(self.model, full)
        if model is not self.model:
            # the aggregate changed widths: server-owned tensors that no longer
            # fit (their old widths) restart from the rebuilt model's values
            template = model.state_dict()
            full = {
                k: full[k]
                if k in full and full[k].shape == template[k].shape
                else template[k]
                for k in template
            }
            self.model = model
            self.roles = models.tensor_roles(model)
        self.model.load_state_dict(full, strict=True)

    def _evaluate(self) -> dict[str, Any]:
        test = self.splits.test
        metrics = evaluate(
            self.model,
            test.x,
            test.y,
            self.task,
            batch_size=self.exp.evaluation.batch_size,
        )
        out: dict[str, Any] = {f"test_{k}": v for k, v in metrics.items()}
        if self.exp.evaluation.per_class:
            per_class = class_accuracy(
                self.model,
                test.x,
                test.y,
                num_classes=self.splits.num_classes,
                batch_size=self.exp.evaluation.batch_size,
            )
            out.update({f"test_{k}": v for k, v in per_class.items()})
        return out

    def _num_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    # -- the loop -----------------------------------------------------------
    def run(self, runtime_grid: Grid) -> Results:
        """Discover the nodes, then run every round; returns the filled Results."""
        exp = self.exp
        grid = FedsimGrid(runtime_grid, expected_nodes=exp.num_clients)
        infos = grid.discover()
        counts = np.array(
            [list(infos[n].label_counts) for n in grid.get_node_ids()], dtype=np.int64
        )
        if counts.ndim == 2 and counts.shape[1] > 0:
            write_label_histogram(self.results.output_dir, counts)
        self.results.extra["clients"] = [
            {
                "partition_id": infos[n].partition_id,
                "num_examples": infos[n].num_examples,
            }
            for n in grid.get_node_ids()
        ]
        first = 1
        if self.resume_from is not None:
            first = self._restore(self.resume_from)
        else:
            record0: dict[str, Any] = {
                "round": 0,
                **self._evaluate(),
                "num_params": self._num_params(),
                "flops": count_flops(self.model),
            }
            self._commit(0, record0)
        arrays, server_state = self._split(self.model.state_dict())
        grid.server_state = server_state
        for rnd in range(first, exp.num_rounds + 1):
            started = time.perf_counter()
            arrays, record = self._round(rnd, arrays, grid)
            _, server_state = self._split(self.model.state_dict())
            grid.server_state = server_state
            if rnd % exp.evaluation.every == 0 or rnd == exp.num_rounds:
                record.update(self._evaluate())
            record["num_params"] = self._num_params()
            record["flops"] = count_flops(self.model)
            record["round_seconds"] = time.perf_counter() - started
            self._commit(rnd, record)
        self.results.finish("completed")
        return self.results

    def _commit(self, rnd: int, record: dict[str, Any]) -> None:
        """Checkpoint, then record the round (so the checkpoint is never behind)."""
        rounds = [r for r in self.results.rounds if int(r["round"]) != rnd]
        save_checkpoint(
            self.results.output_dir,
            Checkpoint(
                server_round=rnd,
                global_state=self.model.state_dict(),
                model_name=str(self.model.fedsim_name),
                model_kwargs=dict(self.model.fedsim_kwargs),  # type: ignore[arg-type]
                strategy=self.strategy,
                rounds=[*rounds, record],
                rng=capture_rng(),
            ),
        )
        self.results.add_round(record)
        if self.progress:
            self.progress(record)

    def _restore(self, ckpt: Checkpoint) -> int:
        """Load a checkpoint's model, strategy, RNG and records; the next round."""
        self.model = models.build(ckpt.model_name, **ckpt.model_kwargs)
        self.model.load_state_dict(ckpt.global_state, strict=True)
        self.roles = models.tensor_roles(self.model)
        if ckpt.strategy is not None:
            self.strategy = ckpt.strategy
        self.results.rounds = list(ckpt.rounds)
        self.results.status = "running"
        self.results.save()
        restore_rng(ckpt.rng)
        log.info(
            "resuming %s after round %d", self.results.output_dir, ckpt.server_round
        )
        return ckpt.server_round + 1

    def _round(
        self, rnd: int, arrays: ArrayRecord, grid: FedsimGrid
    ) -> tuple[ArrayRecord, dict[str, Any]]:
        exp = self.exp
        record: dict[str, Any] = {"round": rnd}
        train_started = time.perf_counter()
        random.seed(derive_seed(exp.seed, rnd, 1))
        timeout = exp.simulation.round_timeout
        if hasattr(self.strategy, "run_round"):
            new_arrays, metrics = self.strategy.run_round(
                rnd, arrays, ConfigRecord(), grid
            )
            rejected = 0
        else:
            messages = list(
                self.strategy.configure_train(rnd, arrays, ConfigRecord(), grid)
            )
            messages = self._inject_faults(rnd, messages, grid, record)
            record["clients"] = sorted(
                grid.partition_of(m.metadata.dst_node_id) for m in messages
            )
            clients_started = time.perf_counter()
            replies = list(grid.send_and_receive(messages, timeout=timeout))
            record["client_seconds"] = time.perf_counter() - clients_started
            accepted, rejected = self._screen(replies, arrays, grid)
            new_arrays, metrics = self.strategy.aggregate_train(rnd, accepted)
        stats = grid.take_stats()
        record["train_seconds"] = time.perf_counter() - train_started
        if new_arrays is None:
            log.warning(
                "round %d: no valid update arrived; keeping the previous global model",
                rnd,
            )
            record["kept_previous_model"] = True
        else:
            self._install(new_arrays, grid.server_state or ArrayRecord())
            hook = getattr(self.model, "server_update", None)
            if hook is not None:
                hook(rnd, exp.num_rounds)
            # the model's own tensors, in its dtypes: Flower's FedOpt family
            # returns float64 arrays, which clients would send back as float32
            arrays, _ = self._split(self.model.state_dict())
        if metrics is not None and "train_loss" in metrics:
            record["train_loss"] = float(metrics["train_loss"])
        if exp.evaluation.federated:
            record.update(self._federated_evaluation(rnd, arrays, grid))
        widths = models.permutation_spec(self.model).widths()
        record.update(
            num_replies=stats.replies - rejected,
            num_failures=stats.failures,
            num_timeouts=stats.timeouts,
            num_rejected=rejected,
            bytes_sent=stats.bytes_sent,
            bytes_received=stats.bytes_received,
            widths=widths,
        )
        return arrays, record

    def _inject_faults(
        self,
        rnd: int,
        messages: list[Message],
        grid: FedsimGrid,
        record: dict[str, Any],
    ) -> list[Message]:
        """Mark the clients that crash, straggle or corrupt this round."""
        faults = self.exp.simulation.faults
        if not (faults.crash or faults.straggle or faults.corrupt):
            return messages
        cohort = [grid.partition_of(m.metadata.dst_node_id) for m in messages]
        plan = plan_faults(faults, self.exp.seed, rnd, cohort)
        timeout = self.exp.simulation.round_timeout
        seconds = faults.straggle_seconds
        if timeout is not None:  # no need to sleep much past the deadline
            seconds = min(seconds, timeout + 1.0)
        for message, pid in zip(messages, cohort, strict=True):
            kind = plan.get(pid)
            if kind is None:
                continue
            old = message.content.config_records.get("config", ConfigRecord())
            config = ConfigRecord(dict(old))
            config[FAULT_KEY] = kind
            config[STRAGGLE_KEY] = float(seconds)
            content = RecordDict(dict(message.content))  # messages share content
            content["config"] = config
            message.content = content
        record["injected_faults"] = {
            kind: sorted(p for p, k in plan.items() if k == kind)
            for kind in ("crash", "straggle", "corrupt")
        }
        return messages

    def _screen(
        self, replies: Iterable[Message], arrays: ArrayRecord, grid: FedsimGrid
    ) -> tuple[list[Message], int]:
        """Drop replies with invalid updates (logged); error replies pass through.

        A client may not claim more examples than it reported at discovery.
        """
        allow_widths = bool(getattr(self.strategy, "accepts_different_widths", False))
        accepted: list[Message] = []
        rejected = 0
        for reply in replies:
            if reply.has_error():
                accepted.append(reply)
                continue
            node = grid.nodes.get(reply.metadata.src_node_id)
            reason = check_reply(
                reply.content,
                arrays,
                allow_other_widths=allow_widths,
                max_examples=float(
                    node.num_examples if node else len(self.splits.train)
                ),
            )
            if reason is None:
                accepted.append(reply)
            else:
                rejected += 1
                log.warning(
                    "rejected the update of node %d: %s",
                    reply.metadata.src_node_id,
                    reason,
                )
        return accepted, rejected

    def _federated_evaluation(
        self, rnd: int, arrays: ArrayRecord, grid: FedsimGrid
    ) -> dict[str, Any]:
        random.seed(derive_seed(self.exp.seed, rnd, 2))
        messages = list(
            self.strategy.configure_evaluate(rnd, arrays, ConfigRecord(), grid)
        )
        replies = list(
            grid.send_and_receive(messages, timeout=self.exp.simulation.round_timeout)
        )
        metrics: MetricRecord | None = self.strategy.aggregate_evaluate(rnd, replies)
        stats = grid.take_stats()
        out: dict[str, Any] = {
            "eval_bytes_sent": stats.bytes_sent,
            "eval_bytes_received": stats.bytes_received,
        }
        if metrics is not None:
            for key, value in metrics.items():
                if key != "num-examples" and isinstance(value, int | float):
                    out[f"fed_{key}"] = float(value)
        return out
