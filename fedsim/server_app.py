"""fedsim's Flower ServerApp (composition root: it imports ``strategies``).

``fedsim run`` builds it with the experiment by closure; ``flwr run .`` loads the
module-level :data:`app`, which composes the experiment from the Flower run
config (``[tool.flwr.app.config]`` plus ``--run-config``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

import strategies  # noqa: F401  (registers every strategy)
from fedsim import node, tasks
from fedsim.config import ExperimentConfig, experiment_from_run_config
from fedsim.exceptions import FedsimError
from fedsim.pruning.federated import federated_pruning
from fedsim.results import Results
from fedsim.server import ServerLoop
from fedsim.strategy import STRATEGIES, StrategyContext

__all__ = ["Prepared", "app", "build_server_app", "build_strategy", "prepare"]

log = logging.getLogger("fedsim")


def build_strategy(exp: ExperimentConfig, model: Any, num_classes: int) -> Any:
    """The experiment's strategy, built from the registry."""
    context = StrategyContext(
        num_clients=exp.num_clients,
        fraction_train=exp.fraction_train,
        fraction_evaluate=exp.fraction_evaluate,
        federated_evaluation=exp.evaluation.federated,
        seed=exp.seed,
        num_rounds=exp.num_rounds,
        model_name=exp.model.name,
        model_kwargs=dict(model.fedsim_kwargs),
        num_classes=num_classes,
        task=exp.task.name,
        client_lr=exp.client.lr,
    )
    strategy = STRATEGIES.build(
        exp.strategy.name, context=context, **exp.strategy.options
    )
    # server-side AOFP wraps the strategy; client-side AOFP needs one that
    # merges different widths (refused here, before any output is written)
    return federated_pruning(exp, strategy, model)


class Prepared:
    """Everything the server needs, built and validated before any file is written."""

    def __init__(self, exp: ExperimentConfig) -> None:
        self.exp = exp
        self.splits = node.load_dataset(exp)
        node.partition_indices(exp)  # validates the partition (raises ConfigError)
        self.model = node.build_global_model(exp, self.splits)
        task = tasks.build(exp.task.name, **exp.task.options)
        bind = getattr(task, "bind_model", None)
        if bind is not None:  # e.g. certify_eps needs a Lipschitz-bounded model
            bind(self.model)
        self.strategy = build_strategy(exp, self.model, self.splits.num_classes)


def prepare(exp: ExperimentConfig) -> Prepared:
    """Load data, check the partition, build model and strategy (may raise)."""
    return Prepared(exp)


def build_server_app(
    exp: ExperimentConfig | None = None,
    *,
    prepared: Prepared | None = None,
    results: Results | None = None,
    progress: Callable[[dict[str, Any]], None] | None = None,
    resume_from: Any = None,
) -> ServerApp:
    """A ServerApp running ``exp`` (or the run config's experiment)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        from fedsim.runner import open_results, print_progress
        from fedsim.simulation import quiet

        e = exp if exp is not None else experiment_from_run_config(context.run_config)
        quiet(e.simulation.ray_log_level)
        try:
            ready = prepared or prepare(e)
            sink = results or open_results(e, ready.splits)
            loop = ServerLoop(
                e,
                ready.strategy,
                ready.splits,
                ready.model,
                sink,
                progress=progress or print_progress(e),
                resume_from=resume_from,
            )
            loop.run(grid)
        except FedsimError as err:
            log.error("%s", err)
            raise

    return app


#: The ServerApp that ``flwr run .`` loads (``pyproject.toml``).
app = build_server_app()
