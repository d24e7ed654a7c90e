"""LegoNet CNN (Yang et al., ICML 2019): a standard conv stem, then Lego convolutions.

Paper: "LegoNet: Efficient Convolutional Neural Networks with Lego Filters",
https://proceedings.mlr.press/v97/yang19c.html. Every conv after the stem is a
:class:`~fedsim.models._lego.LegoConv2d` followed by BatchNorm and ReLU; ``"M"``
in ``widths`` is a 2x2 max-pool; global average pooling feeds a Linear head.

Training the masks
    The selections are learned by a straight-through estimator while the masks
    are open and then frozen: call :meth:`LegoCNN.freeze_masks` after a warm-up
    (LegoNet warms up for 10 of 400 epochs), after which the logits get no
    gradient.

Federated settlement of the masks
    A selection is discrete, so it is never averaged. The frozen selections
    (``layers.<l>.frozen_index``) and their flags (``layers.<l>.frozen``) have the
    ``"server"`` role: the server owns them and ignores the clients' copies.
    During the first ``mask_rounds`` rounds the clients learn their masks
    locally, and the selection logits, being real-valued parameters, are
    averaged like every other weight; the argmax of the averaged logits is a
    vote of the clients weighted by their confidence. Right after aggregating
    round ``mask_rounds``, :meth:`LegoCNN.server_update` freezes every layer at
    that argmax and broadcasts it; from then on every client trains the same
    one-hot masks and the logits receive no gradient, so only the Lego filters,
    the coefficients, BatchNorm and the head still change. ``mask_rounds=0``
    freezes the shared initial masks before the first round.

Permutation symmetries
    Per Lego layer: its output filters (the coefficients' and logits' middle
    axis, the frozen selection, BatchNorm, and the next layer's inputs) and its
    Lego index (the Lego filters' first axis, the last axis of the logits and
    coefficients, and the values of the frozen selection). The inputs of a Lego
    layer are constrained: every fragment shares the Lego filters, so the
    producing layer's channels (the stem's included) move only in bundles of one
    channel per fragment, ``{r, r + c/o, ..., r + (o-1) c/o}``, with one
    within-fragment permutation shared by all fragments (the Lego filters'
    input axis). The reordering of whole fragments is a symmetry too, but it
    moves the same channel axis as the bundles, so it is not declared.

Widths and rebuilding
    The Lego counts are ``int(ratio * width)`` unless ``legos`` lists them. A
    model rebuilt at new widths must keep its Lego counts, so the Lego layers'
    groups carry a ``width_key`` only when ``legos`` is given explicitly; with
    ratio-derived counts their widths are fixed (the stem's stays resizable).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from fedsim.exceptions import ConfigError
from fedsim.matching.permspec import AxisRef, PermGroup, PermutationSpec
from fedsim.models import MODELS, Role
from fedsim.models._lego import LegoConv2d

__all__ = ["LegoCNN", "lego_cnn"]

POOL = "M"


class LegoCNN(nn.Module):
    """Conv stem, then Lego conv blocks and max-pools as listed in ``widths``.

    Parameters
    ----------
    input_shape : sequence of int
        (C, H, W).
    num_classes : int
        Output size.
    widths : sequence of int or "M"
        Lego conv widths in order, ``"M"`` for a 2x2 max-pool.
    stem : int
        Width of the standard conv stem.
    fragments : int
        ``o``: input fragments of every Lego conv; divides every width that
        feeds a Lego conv.
    ratio : float
        Lego filters per output filter, ``m / n``, when ``legos`` is not given.
    legos : sequence of int, optional
        Explicit Lego counts ``m``, one per Lego conv.
    kernel : int
        Odd kernel size of the stem and the Lego convs.
    balance : float
        ``lambda`` of the balance rule while masks are learned.
    mask_rounds : int
        Federated rounds of mask learning before the server freezes the masks.
    """

    def __init__(
        self,
        *,
        input_shape: Sequence[int],
        num_classes: int,
        widths: Sequence[int | str],
        stem: int,
        fragments: int,
        ratio: float,
        legos: Sequence[int] | None,
        kernel: int,
        balance: float,
        mask_rounds: int,
    ) -> None:
        super().__init__()
        plan = [_parse_width(w) for w in widths]
        if all(width is None for width in plan):
            raise ConfigError(f"lego_cnn needs at least one Lego width, got {widths}")
        counts = _lego_counts([w for w in plan if w is not None], ratio, legos)
        for label, value in (("stem", stem), ("fragments", fragments)):
            if value < 1:
                raise ConfigError(f"lego_cnn {label} must be positive, got {value}")
        if kernel < 1 or kernel % 2 == 0:
            raise ConfigError(f"lego_cnn kernel must be odd and positive, got {kernel}")
        if mask_rounds < 0:
            raise ConfigError(f"lego_cnn mask_rounds must be >= 0, got {mask_rounds}")
        c, h, w = (int(v) for v in input_shape)
        self.stem = nn.Conv2d(c, stem, kernel, padding=kernel // 2, bias=False)
        self.stem_bn = nn.BatchNorm2d(stem)
        self.layers = nn.ModuleList()
        self.bns = nn.ModuleList()
        self.plan = plan
        self.positions = [p for p, width in enumerate(plan) if width is not None]
        self.legos_given = legos is not None
        self.mask_rounds = mask_rounds
        self.fragments = fragments
        channels = stem
        for position, width in enumerate(plan):
            if width is not None and channels % fragments:
                source = "stem" if not self.layers else "a Lego width"
                raise ConfigError(
                    f"lego_cnn {source} of {channels} feeding widths[{position}] "
                    f"must be divisible by fragments={fragments}"
                )
            if width is None:
                if min(h, w) < 2:
                    raise ConfigError(
                        f"lego_cnn cannot pool a {h}x{w} map at widths[{position}]; "
                        f"remove a {POOL!r} from {list(widths)}"
                    )
                h, w = h // 2, w // 2
                continue
            self.layers.append(
                LegoConv2d(
                    in_channels=channels,
                    out_channels=width,
                    legos=counts[len(self.layers)],
                    fragments=fragments,
                    kernel=kernel,
                    balance=balance,
                )
            )
            self.bns.append(nn.BatchNorm2d(width))
            channels = width
        self.head = nn.Linear(channels, num_classes)
        if mask_rounds == 0:
            self.freeze_masks()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem_bn(self.stem(x)))
        blocks = iter(zip(self.layers, self.bns, strict=True))
        for width in self.plan:
            if width is None:
                x = nn.functional.max_pool2d(x, 2)
            else:
                lego, bn = next(blocks)
                x = torch.relu(bn(lego(x)))
        return self.head(x.mean((2, 3)))

    def freeze_masks(self) -> None:
        """Freeze every Lego layer's selection at its current argmax."""
        for layer in self._lego_layers():
            layer.freeze_masks()

    def tensor_roles(self) -> dict[str, Role]:
        """The frozen selections and their flags are owned by the server."""
        roles: dict[str, Role] = {}
        for i in range(len(self.layers)):
            roles[f"layers.{i}.frozen_index"] = "server"
            roles[f"layers.{i}.frozen"] = "server"
        return roles

    def server_update(self, server_round: int, num_rounds: int) -> None:
        """Freeze the masks at the averaged logits' argmax after ``mask_rounds``.

        Parameters
        ----------
        server_round : int
            The round just aggregated (1-based).
        num_rounds : int
            Rounds in the run (the schedule does not depend on it).
        """
        if server_round < self.mask_rounds:
            return
        for layer in self._lego_layers():
            if not layer.is_frozen:
                layer.freeze_masks()

    def permutation_spec(self) -> PermutationSpec:
        """Bundled inputs, Lego index and output filters of every Lego layer."""
        o = self.fragments
        last = len(self.layers) - 1
        groups = []
        for i, layer in enumerate(self._lego_layers()):
            in_width = layer.lego.shape[1]
            groups.append(
                PermGroup(
                    name="stem" if i == 0 else f"lego.{i - 1}.filters",
                    size=in_width,
                    axes=(
                        *self._producer_axes(i, repeat=o),
                        AxisRef(f"layers.{i}.lego", 1),
                    ),
                    width_key="stem" if i == 0 else self._width_key(i - 1),
                    width_scale=o,
                )
            )
            groups.append(
                PermGroup(
                    name=f"lego.{i}.legos",
                    size=layer.legos,
                    axes=(
                        AxisRef(f"layers.{i}.lego", 0),
                        AxisRef(f"layers.{i}.logits", 2),
                        AxisRef(f"layers.{i}.coef", 2),
                        AxisRef(f"layers.{i}.frozen_index", values=True),
                    ),
                    width_key=f"legos.{i}" if self.legos_given else None,
                )
            )
        groups.append(
            PermGroup(
                name=f"lego.{last}.filters",
                size=self.head.in_features,
                axes=(
                    *self._producer_axes(last + 1, repeat=1),
                    AxisRef("head.weight", 1),
                ),
                width_key=self._width_key(last),
            )
        )
        return PermutationSpec(tuple(groups))

    def _lego_layers(self) -> list[LegoConv2d]:
        return [layer for layer in self.layers if isinstance(layer, LegoConv2d)]

    def _width_key(self, index: int) -> str | None:
        """Where Lego layer ``index``'s width lives, if it may be rebuilt."""
        return f"widths.{self.positions[index]}" if self.legos_given else None

    def _producer_axes(self, consumer: int, *, repeat: int) -> tuple[AxisRef, ...]:
        """Output axes of the layer feeding Lego layer ``consumer`` (or the head)."""
        if consumer == 0:
            conv, bn = "stem", "stem_bn"
            own: tuple[AxisRef, ...] = (AxisRef(f"{conv}.weight", 0, repeat=repeat),)
        else:
            conv, bn = f"layers.{consumer - 1}", f"bns.{consumer - 1}"
            own = tuple(
                AxisRef(f"{conv}.{key}", 1, repeat=repeat)
                for key in ("coef", "logits", "frozen_index")
            )
        stats = ("weight", "bias", "running_mean", "running_var")
        return own + tuple(AxisRef(f"{bn}.{key}", 0, repeat=repeat) for key in stats)


def _lego_counts(
    widths: list[int], ratio: float, legos: Sequence[int] | None
) -> list[int]:
    """The Lego count ``m`` of every Lego conv of widths ``widths``."""
    if legos is None:
        if ratio <= 0:
            raise ConfigError(f"lego_cnn ratio must be positive, got {ratio}")
        return [max(1, int(ratio * n)) for n in widths]
    if len(legos) != len(widths) or min(legos) < 1:
        raise ConfigError(
            f"lego_cnn legos must list one positive count per Lego width "
            f"({len(widths)}), got {list(legos)}"
        )
    return [int(m) for m in legos]


def _parse_width(width: int | str) -> int | None:
    """A Lego width as an int, or ``None`` for a pool."""
    if width == POOL:
        return None
    if isinstance(width, int) and not isinstance(width, bool) and width >= 1:
        return width
    raise ConfigError(
        f"lego_cnn widths hold positive ints or {POOL!r} (a max-pool), got {width!r}"
    )


@MODELS.register("lego_cnn")
def lego_cnn(
    *,
    input_shape: Sequence[int],
    num_classes: int,
    widths: Sequence[int | str] = (32, POOL, 64, 64, POOL, 128),
    stem: int = 32,
    fragments: int = 2,
    ratio: float = 0.5,
    legos: Sequence[int] | None = None,
    kernel: int = 3,
    balance: float = 1e-4,
    mask_rounds: int = 1,
) -> LegoCNN:
    """Registered ``lego_cnn``; the defaults are LegoNet's minimal 28x28 grey model."""
    return LegoCNN(
        input_shape=input_shape,
        num_classes=num_classes,
        widths=list(widths),
        stem=stem,
        fragments=fragments,
        ratio=ratio,
        legos=None if legos is None else list(legos),
        kernel=kernel,
        balance=balance,
        mask_rounds=mask_rounds,
    )
