"""AOFP: Approximated Oracle Filter Pruning during training.

Ding et al., "Approximated Oracle Filter Pruning for Destructive CNN Width
Optimization", ICML 2019, arXiv:1905.04748.

Oracle pruning removes the units whose ablation damages the network least,
trying every subset; AOFP approximates it by a binary search run during
training. For each target group (a conv's output channels, or a hidden layer's
units) it keeps a search set ``S`` of candidates. On every training step it
masks a random half ``A`` of ``S`` in a second path and measures the damage
``t = ||Z - Z~||^2 / ||Z||^2`` on the *follower*'s output (the next layer reading
the units), accumulating ``t`` on the units of ``A``; training itself uses the
unablated path. Every ``k`` steps each unit's mean damage ``t-bar`` decides:

* the ``g = floor(|S| / 2)`` units of lowest ``t-bar`` are pruned (masked) when
  the largest of them is below ``theta``, and ``S`` restarts from the kept units;
* otherwise ``S`` halves to those ``g`` units (when ``g > 1``), or restarts.

Groups start searching at staggered steps (``warmup + index * (k // groups)``).
The search stops once the masked model's FLOPs fall to ``target_flops`` times
the reference; :meth:`AOFP.export` then removes the masked units physically
(:func:`~fedsim.pruning.groups.remove_units`), and further training of the
narrower model is the fine-tuning. Masks live only in :class:`UnitMasks`
hooks, never in a state dict.

Damage is measured at the follower layer's own output (before any
normalisation or activation that follows it), restricted to the follower's
kept units; ``theta`` is relative to that point.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from fedsim import models
from fedsim.config import ClientConfig
from fedsim.exceptions import ConfigError
from fedsim.pruning.flops import count_flops
from fedsim.pruning.groups import UnitMasks, prunable_groups
from fedsim.pruning.removal import remove_units
from fedsim.tasks import Task
from fedsim.train import Penalty, TrainResult, local_train

__all__ = [
    "AOFP",
    "AOFP_RECORD",
    "NEVER_SAMPLED",
    "Decision",
    "GroupSearch",
    "aofp_train",
    "decide",
    "mean_damage",
]

#: t-bar of a unit no ablation has touched in a cycle (as in the reference code)
NEVER_SAMPLED = 999.0

#: tensor record with AOFP search sets (server to client) or the damage
#: statistics ``<group>.t`` / ``<group>.n`` (client to server)
AOFP_RECORD = "fedsim.aofp"


def mean_damage(total: np.ndarray, count: np.ndarray) -> np.ndarray:
    """``total / count`` per unit, :data:`NEVER_SAMPLED` where ``count`` is zero."""
    total = np.asarray(total, dtype=np.float64)
    count = np.asarray(count, dtype=np.float64)
    out = np.full(total.shape, NEVER_SAMPLED)
    np.divide(total, count, out=out, where=count > 0)
    return out


@dataclass(frozen=True)
class Decision:
    """Outcome of one AOFP decision for one group.

    Attributes
    ----------
    pruned : numpy.ndarray
        Units pruned now (empty when none).
    search : numpy.ndarray
        The next search set.
    """

    pruned: np.ndarray
    search: np.ndarray


def decide(
    search: np.ndarray, tbar: np.ndarray, theta: float, kept: np.ndarray
) -> Decision:
    """AOFP's end-of-cycle rule for one group.

    Parameters
    ----------
    search : numpy.ndarray
        The search set ``S`` (unit indices).
    tbar : numpy.ndarray
        Mean damage of every unit of the group (indexed by unit).
    theta : float
        Pruning threshold.
    kept : numpy.ndarray
        Units not pruned so far (``S`` restarts from these).
    """
    search = np.asarray(search, dtype=np.int64)
    kept = np.asarray(kept, dtype=np.int64)
    g = len(search) // 2
    order = search[np.argsort(tbar[search], kind="stable")]
    empty = np.zeros(0, dtype=np.int64)
    if g >= 1 and tbar[order[g - 1]] < theta:
        pruned = np.sort(order[:g])
        return Decision(pruned, np.setdiff1d(kept, pruned))
    if g > 1:
        return Decision(empty, np.sort(order[:g]))
    return Decision(empty, kept)


@dataclass
class GroupSearch:
    """The search state of one group: kept units, ``S`` and the accumulators."""

    size: int
    start: int = 0
    keep: np.ndarray = field(init=False)
    search: np.ndarray = field(init=False)
    total: np.ndarray = field(init=False)
    count: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.keep = np.ones(self.size, dtype=bool)
        self.search = np.arange(self.size)
        self.reset_statistics()

    def reset_statistics(self) -> None:
        """Zero the damage totals and counts."""
        self.total = np.zeros(self.size)
        self.count = np.zeros(self.size, dtype=np.int64)

    @property
    def searchable(self) -> bool:
        """Whether two or more units remain (one unit is never pruned)."""
        return int(self.keep.sum()) >= 2

    def sample(self, generator: torch.Generator) -> np.ndarray:
        """A random half ``A`` of ``S`` (``floor(|S| / 2)`` units)."""
        g = len(self.search) // 2
        pick = torch.randperm(len(self.search), generator=generator)[:g].numpy()
        return np.sort(self.search[pick])

    def record(self, units: np.ndarray, damage: float) -> None:
        """Add one measured damage to the units that were ablated together."""
        self.total[units] += damage
        self.count[units] += 1

    def end_cycle(self, theta: float, tbar: np.ndarray | None = None) -> np.ndarray:
        """Apply :func:`decide`, reset the statistics; returns the pruned units.

        ``tbar`` (mean damage per unit) defaults to this search's own
        accumulators; the server passes the clients' pooled estimate.
        """
        kept = np.flatnonzero(self.keep)
        if tbar is None:
            tbar = mean_damage(self.total, self.count)
        result = decide(self.search, tbar, theta, kept)
        self.keep[result.pruned] = False
        self.search = result.search
        self.reset_statistics()
        return result.pruned


class AOFP:
    """AOFP's search over the prunable groups of one model.

    Drive it around training steps: :meth:`before_step` picks the ablations,
    the step runs with :attr:`masks` attached, :meth:`after_step` accumulates
    the damages and takes the decisions (:func:`aofp_train` does all this).

    Parameters
    ----------
    model : torch.nn.Module
        A model built by :func:`fedsim.models.build`.
    generator : torch.Generator
        Draws the ablated halves.
    layers : sequence of str
        Group names to prune; empty means every prunable group.
    k : int
        Steps per decision cycle.
    theta : float
        Pruning threshold on the mean damage.
    warmup : int
        Steps before the first group starts searching.
    target_flops : float
        Stop once FLOPs <= ``target_flops * reference_flops``.
    reference_flops : int, optional
        The FLOPs the target is relative to; defaults to the model's own.
    search_sets : mapping of str to array, optional
        Measure only: search these sets from the first step and never decide
        (a client probing for the server's decision); ``layers`` is ignored.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        generator: torch.Generator,
        layers: Sequence[str] = (),
        k: int = 50,
        theta: float = 0.05,
        warmup: int = 20,
        target_flops: float = 0.5,
        reference_flops: int | None = None,
        search_sets: Mapping[str, np.ndarray] | None = None,
    ) -> None:
        if k < 1:
            raise ConfigError(f"client.pruning.k={k} is not allowed; it must be >= 1")
        self.model = model
        self.generator = generator
        self.k, self.theta, self.target_flops = k, theta, target_flops
        names = list(search_sets) if search_sets is not None else list(layers)
        groups = prunable_groups(model, names)
        if not groups:
            raise ConfigError(
                f"model {getattr(model, 'fedsim_name', type(model).__name__)!r} has "
                "no group AOFP can prune"
            )
        self.masks = UnitMasks(model, groups)
        self.measure_only = search_sets is not None
        stagger = 0 if self.measure_only else k // len(groups)
        start = 0 if self.measure_only else warmup
        self.searches = {
            name: GroupSearch(g.size, start + i * stagger)
            for i, (name, g) in enumerate(groups.items())
        }
        if search_sets is not None:
            for name, units in search_sets.items():
                self.searches[name].search = np.sort(np.asarray(units, dtype=np.int64))
        self.iteration = 0
        self.initial_flops = count_flops(model)
        self.reference_flops = reference_flops or self.initial_flops
        self.flops = self.initial_flops
        self._flops_cache: dict[tuple[int, ...], int] = {}
        self.pruned_at: list[tuple[int, str, np.ndarray]] = []
        self.stopped = not self.measure_only and self._reached_target()

    def _reached_target(self) -> bool:
        return self.flops <= self.target_flops * self.reference_flops

    def widths(self) -> dict[str, int]:
        """Kept units per searched group."""
        return {n: int(s.keep.sum()) for n, s in self.searches.items()}

    def flops_at(self, widths: Mapping[str, int]) -> int:
        """FLOPs of the model rebuilt with some groups at ``widths``."""
        key = tuple(widths[n] for n in self.searches)
        if key not in self._flops_cache:
            spec = models.permutation_spec(self.model)
            kwargs = models.rebuild_kwargs(
                self.model.fedsim_kwargs,  # type: ignore[arg-type]
                spec,
                dict(widths),
            )
            with torch.random.fork_rng(devices=[]):
                narrow = models.build(self.model.fedsim_name, **kwargs)  # type: ignore[arg-type]
            self._flops_cache[key] = count_flops(narrow)
        return self._flops_cache[key]

    def before_step(self) -> None:
        """Choose this step's ablated half of ``S`` for every active group."""
        self.masks.ablate = {}
        self.masks.damage = {}
        if self.stopped:
            return
        for name, s in self.searches.items():
            if self.iteration >= s.start and s.searchable and len(s.search) >= 2:
                self.masks.ablate[name] = s.sample(self.generator)

    def after_step(self) -> None:
        """Accumulate the measured damages; decide at the end of each cycle."""
        for name, units in self.masks.ablate.items():
            if name in self.masks.damage:
                self.searches[name].record(units, self.masks.damage[name])
        self.masks.ablate = {}
        self.masks.damage = {}
        self.iteration += 1
        if self.stopped or self.measure_only:
            return
        changed = False
        for name, s in self.searches.items():
            since = self.iteration - s.start
            if since <= 0 or since % self.k or not s.searchable:
                continue
            pruned = s.end_cycle(self.theta)
            if len(pruned):
                self.masks.set_keep(name, s.keep)
                self.pruned_at.append((self.iteration, name, pruned))
                changed = True
        if changed:
            self.flops = self.flops_at(self.widths())
            self.stopped = self._reached_target()

    def statistics(self) -> dict[str, torch.Tensor]:
        """Per group, the mean damage (``<group>.t``, 0 where unsampled) and the
        number of measurements per unit (``<group>.n``)."""
        out: dict[str, torch.Tensor] = {}
        for name, s in self.searches.items():
            tbar = np.where(s.count > 0, mean_damage(s.total, s.count), 0.0)
            out[f"{name}.t"] = torch.as_tensor(tbar, dtype=torch.float64)
            out[f"{name}.n"] = torch.as_tensor(s.count, dtype=torch.float64)
        return out

    def export(
        self, state: Mapping[str, torch.Tensor]
    ) -> tuple[nn.Module, dict[str, torch.Tensor]]:
        """The model with the masked units removed physically, and its state."""
        keep = {n: np.flatnonzero(s.keep) for n, s in self.searches.items()}
        return remove_units(self.model, state, keep)


def aofp_train(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    cfg: ClientConfig,
    task: Task,
    *,
    search: AOFP,
    generator: torch.Generator,
    lr: float | None = None,
    penalty: Penalty | None = None,
) -> TrainResult:
    """:func:`fedsim.train.local_train` with AOFP's search on every step.

    The same pure step and batching as ``local_train`` (one ``randperm`` per
    epoch from ``generator``), with ``search``'s masks and probes attached. The
    returned state has the full widths; :meth:`AOFP.export` removes the masked
    units.
    """
    with search.masks.attached():
        return local_train(
            model,
            x,
            y,
            cfg,
            task,
            generator=generator,
            lr=lr,
            penalty=penalty,
            before_step=search.before_step,
            after_step=search.after_step,
        )
