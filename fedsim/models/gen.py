"""Graph Element Networks (Alet et al., ICML 2019): a GNN on learnable node positions.

A GEN places ``grid x grid`` nodes in the unit square and solves a field
problem on them:

1. **Encode.** Every pixel of the (B, C, H, W) source field is an input point:
   its centre ``x_i`` in ``[0, 1]^2`` (column -> first coordinate, row -> second)
   and its C values ``u_i``. An MLP maps ``[x_i ; u_i]`` to a latent
   ``h_i`` of size ``latent``.
2. **Soft assignment.** Point ``x`` belongs to node ``v`` with weight
   ``r_v(x) = softmax_v(-e^s ||x - p_v||^2)`` (a soft nearest neighbour with a
   learnable sharpness ``s``); the weights of one point are >= 0 and sum to 1.
   Node states start as the weighted *sum* ``z_v = sum_i r_v(x_i) h_i``.
3. **Message passing.** ``steps`` rounds with shared weights on the graph that
   links every node to its ``neighbours`` nearest nodes (recomputed from the
   positions in each forward pass, without gradient): an edge MLP maps
   ``[z_u ; z_v ; p_u - p_v]`` to a message, messages are summed at the
   receiver ``v`` (``index_add``), and ``z_v <- LayerNorm(z_v + node([z_v ; m_v]))``.
   Positions still get gradients through ``r`` and ``p_u - p_v``.
4. **Decode.** At every pixel centre ``q`` (the query points), a decoder MLP
   reads the interpolated state and the point, ``[sum_v r_v(q) z_v ; q]``.
   ``head="field"``: it predicts the field value there; the output (B, H*W) is
   the row-major flattened field (a Poisson solution from
   :mod:`fedsim.data.poisson`). ``head="classes"``: it predicts class logits at
   every query point and their mean over the points is the output, so a GEN
   also classifies images. ``head="auto"`` (the default) picks "field" when
   ``num_classes == H * W``, else "classes".

Positions are kept in the unit square inside the forward pass: the effective
position is the raw parameter clamped to ``[0, 1]^2``, and the clamp passes a
gradient outside the square only when a descent step would move the raw value
back towards it, so the pure functional training step needs no post-step hook
and behaves like the reference's clamp after every optimiser step.
:meth:`GEN.node_positions` returns the effective positions.

Every part is equivariant to relabelling the nodes (the k-nearest graph is
computed from the positions; ties have probability zero after jitter), so the
nodes are a declared permutation group. Node positions are never averaged:
``positions="local"`` keeps each client's own (each client tunes its layout to
its data, as the reference tunes one layout per room); ``positions="server"``
makes every client use the server's positions, which clients' updates never
change, i.e. one fixed shared layout (the reference's fixed-grid baseline).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from fedsim.exceptions import ConfigError
from fedsim.matching.permspec import AxisRef, PermGroup, PermutationSpec
from fedsim.models import MODELS, Role

__all__ = ["GEN", "gen"]

HEADS = ("auto", "field", "classes")
POSITION_ROLES = ("local", "server")


class _ClampToUnit(torch.autograd.Function):
    """Clamp to [0, 1]; outside, pass only gradients whose descent step goes back in."""

    generate_vmap_rule = True

    @staticmethod
    def forward(raw: torch.Tensor) -> torch.Tensor:
        return raw.clamp(0.0, 1.0)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        (raw,) = ctx.saved_tensors
        inside = (raw >= 0) & (raw <= 1)
        inward = ((raw < 0) & (grad < 0)) | ((raw > 1) & (grad > 0))
        return torch.where(inside | inward, grad, torch.zeros_like(grad))


class _Perceptron(nn.Module):
    """Linear layers with ReLU between them (none after the last)."""

    def __init__(self, sizes: Sequence[int]) -> None:
        super().__init__()
        self.hidden = [int(s) for s in sizes[1:-1]]
        self.layers = nn.ModuleList(
            nn.Linear(a, b) for a, b in itertools.pairwise(sizes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers[:-1]:
            x = torch.relu(layer(x))
        return self.layers[-1](x)

    def hidden_groups(self, prefix: str, width_key: str) -> list[PermGroup]:
        """One group per hidden layer (keys under ``prefix``)."""
        return [
            PermGroup(
                name=f"{prefix}.{i}",
                size=width,
                axes=(
                    AxisRef(f"{prefix}.layers.{i}.weight", 0),
                    AxisRef(f"{prefix}.layers.{i}.bias", 0),
                    AxisRef(f"{prefix}.layers.{i + 1}.weight", 1),
                ),
                width_key=f"{width_key}.{i}",
            )
            for i, width in enumerate(self.hidden)
        ]

    def last(self) -> str:
        """State-dict prefix of the output layer."""
        return f"layers.{len(self.layers) - 1}"


def _pixel_centres(height: int, width: int) -> torch.Tensor:
    """(H*W, 2) centres in [0, 1]^2, row-major, as (column, row) coordinates."""
    rows = (torch.arange(height, dtype=torch.float32) + 0.5) / height
    cols = (torch.arange(width, dtype=torch.float32) + 0.5) / width
    r, c = torch.meshgrid(rows, cols, indexing="ij")
    return torch.stack([c.reshape(-1), r.reshape(-1)], dim=1)


def _jittered_grid(n: int, generator: torch.Generator) -> torch.Tensor:
    """(n*n, 2) cell centres of an n x n grid, jittered by N(0, (0.2/n)^2), clamped."""
    centres = _pixel_centres(n, n)
    jitter = torch.randn(centres.shape, generator=generator) * (0.2 / n)
    return (centres + jitter).clamp(0.0, 1.0)


class GEN(nn.Module):
    """Graph Element Network on learnable node positions (see the module docstring).

    Parameters
    ----------
    input_shape : sequence of int
        (C, H, W) of the source field.
    num_classes : int
        Output size: ``H * W`` for the field head, the class count otherwise.
    grid : int
        Nodes per side of the initial grid (>= 2); ``grid ** 2`` nodes.
    latent : int
        Size of the node states (the one latent space shared by every module).
    message : int
        Size of the messages.
    encoder_hidden, edge_hidden, node_hidden, decoder_hidden
        Hidden widths of the encoder, edge, node and decoder MLPs.
    steps : int
        Message-passing rounds (>= 0).
    neighbours : int
        Incoming edges per node (capped at ``grid ** 2 - 1``).
    head : {"auto", "field", "classes"}
        Output head.
    positions : {"local", "server"}
        Federated role of the node positions (never averaged).
    generator : torch.Generator
        Draws the jitter of the initial positions.
    """

    def __init__(
        self,
        *,
        input_shape: Sequence[int],
        num_classes: int,
        grid: int,
        latent: int,
        message: int,
        encoder_hidden: Sequence[int],
        edge_hidden: Sequence[int],
        node_hidden: Sequence[int],
        decoder_hidden: Sequence[int],
        steps: int,
        neighbours: int,
        head: str,
        positions: str,
        generator: torch.Generator,
    ) -> None:
        super().__init__()
        self.points: torch.Tensor
        channels, height, width = (int(v) for v in input_shape)
        self.head = _resolve_head(head, num_classes, height * width)
        _check_options(grid, steps, neighbours, positions)
        widths = {
            "latent": [latent],
            "message": [message],
            "encoder_hidden": list(encoder_hidden),
            "edge_hidden": list(edge_hidden),
            "node_hidden": list(node_hidden),
            "decoder_hidden": list(decoder_hidden),
        }
        for key, values in widths.items():
            if any(int(v) < 1 for v in values):
                raise ConfigError(f"gen {key} widths must be positive, got {values}")
        self.positions_role: Role = "local" if positions == "local" else "server"
        self.steps = steps
        self.neighbours = min(neighbours, grid * grid - 1)
        self.latent = latent
        self.message = message
        self.register_buffer("points", _pixel_centres(height, width), persistent=False)
        self.positions = nn.Parameter(_jittered_grid(grid, generator))
        # e^s = 2 grid^2: a node one grid spacing away gets e^-2 of a coincident
        # node's weight (s = 0, the reference's start, is nearly uniform here)
        self.log_sharpness = nn.Parameter(torch.tensor(math.log(2.0 * grid * grid)))
        self.encoder = _Perceptron([2 + channels, *encoder_hidden, latent])
        self.edge = _Perceptron([2 * latent + 2, *edge_hidden, message])
        self.node = _Perceptron([latent + message, *node_hidden, latent])
        self.norm = nn.LayerNorm(latent)
        outputs = 1 if self.head == "field" else num_classes
        self.decoder = _Perceptron([latent + 2, *decoder_hidden, outputs])

    def node_positions(self) -> torch.Tensor:
        """(nodes, 2) effective positions, clamped to the unit square."""
        clamp: torch.Tensor = _ClampToUnit.apply(self.positions)
        return clamp

    def assignment(self, points: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """(points, nodes) soft-nearest-neighbour weights; each row sums to 1."""
        sq = (points[:, None, :] - positions[None, :, :]).pow(2).sum(-1)
        return torch.softmax(-self.log_sharpness.exp() * sq, dim=1)

    def edges(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(sources, receivers): every node receives from its nearest neighbours."""
        with torch.no_grad():
            p = positions.detach()
            sq = (p[:, None, :] - p[None, :, :]).pow(2).sum(-1)
            self_loop = torch.eye(len(p), dtype=torch.bool, device=p.device)
            sq = torch.where(self_loop, torch.full_like(sq, math.inf), sq)
            nearest = sq.topk(self.neighbours, dim=1, largest=False).indices
        receivers = torch.arange(len(p), device=p.device).repeat_interleave(
            self.neighbours
        )
        return nearest.reshape(-1), receivers

    def encode(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """(B, nodes, latent) initial states: ``z_v = sum_i r_v(x_i) h_i``."""
        pts = self.points.to(x.dtype)
        inputs = torch.cat(
            [pts.expand(x.shape[0], -1, -1), x.flatten(2).transpose(1, 2)], dim=2
        )
        return torch.einsum(
            "pn,bpk->bnk", self.assignment(pts, positions), self.encoder(inputs)
        )

    def propagate(self, z: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """``steps`` rounds of message passing on the nearest-neighbour graph."""
        src, dst = self.edges(positions)
        offset = (positions[src] - positions[dst]).expand(z.shape[0], -1, -1)
        for _ in range(self.steps):
            msg = self.edge(torch.cat([z[:, src], z[:, dst], offset], dim=2))
            # out-of-place index_add, so that torch.func.vmap can batch it
            total = torch.zeros(
                *z.shape[:2], msg.shape[2], dtype=msg.dtype, device=msg.device
            ).index_add(1, dst, msg)
            z = self.norm(z + self.node(torch.cat([z, total], dim=2)))
        return z

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.node_positions()
        z = self.propagate(self.encode(x, p), p)
        queries = self.points.to(x.dtype)
        at_queries = torch.einsum("pn,bnk->bpk", self.assignment(queries, p), z)
        decoded = self.decoder(
            torch.cat([at_queries, queries.expand(x.shape[0], -1, -1)], dim=2)
        )
        if self.head == "classes":
            return decoded.mean(dim=1)
        return decoded.squeeze(2)

    def tensor_roles(self) -> dict[str, Role]:
        """Node positions are never averaged (``positions`` option); the rest is."""
        return {"positions": self.positions_role}

    def permutation_spec(self) -> PermutationSpec:
        """MLP hidden units, the tied latent and message spaces, and the nodes."""
        k = self.latent
        enc, edge, node = (
            f"encoder.{self.encoder.last()}",
            f"edge.{self.edge.last()}",
            f"node.{self.node.last()}",
        )
        latent = PermGroup(
            name="latent",
            size=k,
            axes=(
                AxisRef(f"{enc}.weight", 0),
                AxisRef(f"{enc}.bias", 0),
                AxisRef("edge.layers.0.weight", 1, repeat=2),  # [z_src ; z_dst ; dp]
                AxisRef("node.layers.0.weight", 1),  # [z ; messages]
                AxisRef(f"{node}.weight", 0),
                AxisRef(f"{node}.bias", 0),
                AxisRef("norm.weight", 0),
                AxisRef("norm.bias", 0),
                AxisRef("decoder.layers.0.weight", 1),  # [z(q) ; q]
            ),
            width_key="latent",
        )
        message = PermGroup(
            name="message",
            size=self.message,
            axes=(
                AxisRef(f"{edge}.weight", 0),
                AxisRef(f"{edge}.bias", 0),
                AxisRef("node.layers.0.weight", 1, offset=k),
            ),
            width_key="message",
        )
        nodes = PermGroup(
            name="nodes", size=len(self.positions), axes=(AxisRef("positions", 0),)
        )
        return PermutationSpec(
            (
                *self.encoder.hidden_groups("encoder", "encoder_hidden"),
                latent,
                *self.edge.hidden_groups("edge", "edge_hidden"),
                message,
                *self.node.hidden_groups("node", "node_hidden"),
                *self.decoder.hidden_groups("decoder", "decoder_hidden"),
                nodes,
            )
        )


def _resolve_head(head: str, num_classes: int, field_size: int) -> str:
    if head not in HEADS:
        raise ConfigError(f"gen head {head!r} is not one of {HEADS}")
    if head == "auto":
        return "field" if num_classes == field_size else "classes"
    if head == "field" and num_classes != field_size:
        raise ConfigError(
            f"gen head 'field' predicts H*W = {field_size} values, but num_classes "
            f"is {num_classes}; use head 'classes' or 'auto'"
        )
    return head


def _check_options(grid: int, steps: int, neighbours: int, positions: str) -> None:
    if grid < 2:
        raise ConfigError(f"gen grid must be >= 2 nodes per side, got {grid}")
    if steps < 0:
        raise ConfigError(f"gen steps must be >= 0, got {steps}")
    if neighbours < 1:
        raise ConfigError(f"gen neighbours must be >= 1, got {neighbours}")
    if positions not in POSITION_ROLES:
        raise ConfigError(f"gen positions {positions!r} is not one of {POSITION_ROLES}")


@MODELS.register("gen")
def gen(
    *,
    input_shape: Sequence[int],
    num_classes: int,
    grid: int = 4,
    latent: int = 32,
    message: int = 32,
    encoder_hidden: Sequence[int] = (32, 32),
    edge_hidden: Sequence[int] = (32,),
    node_hidden: Sequence[int] = (32,),
    decoder_hidden: Sequence[int] = (32, 32),
    steps: int = 3,
    neighbours: int = 4,
    head: str = "auto",
    positions: str = "local",
    seed: int = 0,
) -> GEN:
    """Registered ``gen``; ``seed`` draws the jitter of the initial node grid."""
    return GEN(
        input_shape=input_shape,
        num_classes=num_classes,
        grid=grid,
        latent=latent,
        message=message,
        encoder_hidden=list(encoder_hidden),
        edge_hidden=list(edge_hidden),
        node_hidden=list(node_hidden),
        decoder_hidden=list(decoder_hidden),
        steps=steps,
        neighbours=neighbours,
        head=head,
        positions=positions,
        generator=torch.Generator().manual_seed(seed),
    )
