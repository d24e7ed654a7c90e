"""NAS-Bench-101 cells: the published hash, pruning, channel split, the network.

Published check values (google-research repositories):
- the Inception-like cell's hash 28cfc787...: unified_functional_hashing,
  ``unified_functional_hashing/nasbench/python/evaluator_test.py``, where it is
  the ``graph_hash`` of the README's Inception matrix and ops;
- the isomorphic relabelling of that cell and its 2,694,282 trainable
  parameters: nasbench, ``NASBench.ipynb``, output of the "Basic usage" cell;
- the tricky non-isomorphic pairs: nasbench, ``nasbench/tests/graph_util_test.py``
  (``test_hash_module``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence

import numpy as np
import pytest
import torch

from fedsim import models
from fedsim.matching.permspec import (
    AxisRef,
    PermGroup,
    PermutationSpec,
    permute_state_dict,
    select_units,
)
from fedsim.models.nasbench import (
    AVAILABLE_OPS,
    INCEPTION_MATRIX,
    INCEPTION_OPS,
    ModelSpec,
    graph_hash,
    sample_specs,
    spec_hash,
    vertex_channels,
)
from tests.fedsim.models._helpers import adam_steps, digit_images
from tests.support import max_output_change, perturb_state

INCEPTION_HASH = "28cfc7874f6d200472e1a9dcd8650aa0"
C3, C1, MP = AVAILABLE_OPS
# the same cell as the dataset stores it (vertices renumbered)
DATASET_MATRIX = [
    [0, 1, 1, 1, 1, 0, 0],
    [0, 0, 0, 0, 0, 0, 1],
    [0, 0, 0, 0, 0, 0, 1],
    [0, 0, 0, 0, 0, 0, 1],
    [0, 0, 0, 0, 0, 1, 0],
    [0, 0, 0, 0, 0, 0, 1],
    [0, 0, 0, 0, 0, 0, 0],
]
DATASET_OPS = ["input", C3, C1, MP, C3, C3, "output"]
CHAIN5 = [[1 if j == i + 1 else 0 for j in range(5)] for i in range(5)]
SKIP4 = [[0, 1, 0, 1], [0, 0, 1, 0], [0, 0, 0, 1], [0, 0, 0, 0]]
FAN7 = [
    [0, 1, 1, 1, 1, 0, 0],
    [0, 0, 1, 0, 0, 0, 0],
    [0, 0, 0, 0, 0, 0, 1],
    [0, 0, 0, 0, 0, 1, 0],
    [0, 0, 0, 0, 0, 1, 0],
    [0, 0, 0, 0, 0, 0, 1],
    [0, 0, 0, 0, 0, 0, 0],
]
REGULAR_A = [
    [0, 1, 0, 0, 0, 0, 0, 0],
    [0, 0, 1, 1, 0, 0, 1, 0],
    [0, 0, 0, 0, 1, 1, 0, 0],
    [0, 0, 0, 0, 1, 1, 0, 0],
    [0, 0, 0, 0, 0, 0, 1, 0],
    [0, 0, 0, 0, 0, 0, 1, 0],
    [0, 0, 0, 0, 0, 0, 0, 1],
    [0, 0, 0, 0, 0, 0, 0, 0],
]
REGULAR_B = [
    [0, 1, 0, 0, 0, 0, 0, 0],
    [0, 0, 1, 1, 0, 1, 0, 0],
    [0, 0, 0, 0, 1, 0, 1, 0],
    [0, 0, 0, 0, 1, 1, 0, 0],
    [0, 0, 0, 0, 0, 0, 1, 0],
    [0, 0, 0, 0, 0, 0, 1, 0],
    [0, 0, 0, 0, 0, 0, 0, 1],
    [0, 0, 0, 0, 0, 0, 0, 0],
]
# (matrix, labels, matrix, labels) pairs the published tests call non-isomorphic
TRICKY_PAIRS = [
    (REGULAR_A, [-1, 1, 1, 1, 1, 1, 1, -2], REGULAR_B, [-1, 1, 1, 1, 1, 1, 1, -2]),
    (CHAIN5, [-1, 1, 0, 0, -2], CHAIN5, [-1, 0, 0, 1, -2]),  # needs the self hash
    (SKIP4, [-1, 1, 0, -2], SKIP4, [-1, 0, 1, -2]),  # needs directed edges
    (FAN7, [-1, 1, 0, 0, 0, 0, -2], FAN7, [-1, 0, 0, 0, 1, 0, -2]),  # in-edges too
]


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny convs run far faster on one thread when the machine is oversubscribed."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def ops_of(labels: Sequence[int]) -> list[str]:
    """Hash labels back to op names (-1 input, -2 output)."""
    ends = {-1: "input", -2: "output"}
    return [ends[v] if v < 0 else AVAILABLE_OPS[v] for v in labels]


def relabel(
    spec: ModelSpec, rng: np.random.Generator
) -> tuple[list[list[int]], list[str]]:
    """A random topological renumbering of the interior vertices (still valid)."""
    n = spec.num_vertices
    placed = [0]
    while len(placed) < n - 1:
        ready = [
            v
            for v in range(1, n - 1)
            if v not in placed
            and all(u in placed for u in range(v) if spec.matrix[u][v])
        ]
        placed.append(ready[int(rng.integers(len(ready)))])
    placed.append(n - 1)
    new = {old: i for i, old in enumerate(placed)}
    matrix = [[0] * n for _ in range(n)]
    for i in range(n):
        for j in range(n):
            if spec.matrix[i][j]:
                matrix[new[i]][new[j]] = 1
    return matrix, [spec.ops[old] for old in placed]


def _unit_refs(prefix: str) -> list[AxisRef]:
    """Output-channel axes of the conv-BN-ReLU block at ``prefix``."""
    keys = ("conv.weight", "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var")
    return [AxisRef(f"{prefix}.{key}", 0) for key in keys]


def _change(
    model: torch.nn.Module,
    spec: PermutationSpec,
    perms: dict[str, np.ndarray],
    x: torch.Tensor,
) -> float:
    """Largest output change (eval mode, float64) after permuting with ``perms``."""
    model.eval()
    x = x.double()
    with torch.no_grad():
        before = model(x)
        state = model.state_dict()
        model.load_state_dict(permute_state_dict(state, spec, perms))
        after = model(x)
        model.load_state_dict(state)
    return float((after - before).abs().max())


# --- the graph hash ---------------------------------------------------------


def test_inception_cell_hashes_to_its_published_value() -> None:
    assert spec_hash(INCEPTION_MATRIX, INCEPTION_OPS) == INCEPTION_HASH
    # the isomorphic numbering the dataset itself returns for this cell
    assert spec_hash(DATASET_MATRIX, DATASET_OPS) == INCEPTION_HASH


def test_numpy_integers_hash_like_python_ints() -> None:
    matrix = np.asarray(INCEPTION_MATRIX, dtype=np.int64)
    labels = np.asarray(ModelSpec(INCEPTION_MATRIX, INCEPTION_OPS).labels())
    assert graph_hash(matrix, labels) == INCEPTION_HASH
    assert spec_hash(matrix, INCEPTION_OPS) == INCEPTION_HASH


def test_isomorphic_relabellings_hash_alike() -> None:
    rng = np.random.default_rng(3)
    specs = [ModelSpec(INCEPTION_MATRIX, INCEPTION_OPS), *sample_specs(6, seed=11)]
    for spec in specs:
        reference = spec.hash()
        for _ in range(4):
            # topological renumbering: a valid cell with the same hash
            matrix, ops = relabel(spec, rng)
            assert spec_hash(matrix, ops) == reference
            # any vertex permutation at all keeps the plain graph hash
            perm = rng.permutation(spec.num_vertices)
            permuted = np.asarray(spec.matrix)[np.ix_(perm, perm)]
            labels = [spec.labels()[p] for p in perm]
            assert graph_hash(permuted, labels) == reference


def test_published_isomorphic_cases_hash_alike() -> None:
    diamond = [[0, 1, 1, 0], [0, 0, 0, 1], [0, 0, 0, 1], [0, 0, 0, 0]]
    assert graph_hash(diamond, [-1, 1, 2, -2]) == graph_hash(diamond, [-1, 2, 1, -2])
    m1 = [[0, 1, 1, 0, 0], [0, 0, 0, 0, 1], [0, 0, 0, 1, 0], [0, 0, 0, 0, 1], [0] * 5]
    m2 = [[0, 1, 0, 1, 0], [0, 0, 1, 0, 0], [0, 0, 0, 0, 1], [0, 0, 0, 0, 1], [0] * 5]
    m3 = [[0, 1, 1, 0, 0], [0, 0, 0, 1, 0], [0, 0, 0, 0, 1], [0, 0, 0, 0, 1], [0] * 5]
    h1 = graph_hash(m1, [-1, 1, 2, 3, -2])
    assert h1 == graph_hash(m2, [-1, 2, 3, 1, -2]) == graph_hash(m3, [-1, 2, 1, 3, -2])
    assert graph_hash(m1, [-1, 2, 3, 1, -2]) != h1
    assert graph_hash(m1, [-1, 2, 1, 3, -2]) != h1


@pytest.mark.parametrize("pair", range(len(TRICKY_PAIRS)))
def test_published_tricky_pairs_hash_apart(pair: int) -> None:
    m1, l1, m2, l2 = TRICKY_PAIRS[pair]
    assert graph_hash(m1, l1) != graph_hash(m2, l2)
    if len(l1) <= 7:  # a valid cell: the spec-level hash tells them apart too
        assert spec_hash(m1, ops_of(l1)) != spec_hash(m2, ops_of(l2))


# --- pruning and validity ---------------------------------------------------


def test_a_dangling_vertex_is_pruned() -> None:
    matrix = [row[:] for row in map(list, INCEPTION_MATRIX)]
    matrix[2][6] = 0  # vertex 2 (the 3x3 conv) now reaches nothing
    spec = ModelSpec(matrix, INCEPTION_OPS)
    assert spec.num_vertices == 6
    assert spec.matrix == (
        (0, 1, 1, 0, 1, 0),
        (0, 0, 0, 0, 0, 1),
        (0, 0, 0, 1, 0, 0),
        (0, 0, 0, 0, 0, 1),
        (0, 0, 0, 0, 0, 1),
        (0, 0, 0, 0, 0, 0),
    )
    assert spec.ops == ("input", C1, C3, C3, MP, "output")
    # pruning is idempotent and equal pruned cells compare equal
    assert ModelSpec(spec.matrix, spec.ops) == spec


def test_a_vertex_unreachable_from_the_input_is_pruned() -> None:
    matrix = [[0, 1, 0, 0], [0, 0, 0, 1], [0, 0, 0, 1], [0, 0, 0, 0]]
    spec = ModelSpec(matrix, ["input", C3, "no-such-op", "output"])
    assert spec.matrix == ((0, 1, 0), (0, 0, 1), (0, 0, 0))
    assert spec.ops == ("input", C3, "output")


def test_an_input_disconnected_cell_is_refused() -> None:
    matrix = [[0, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 1], [0, 0, 0, 0]]
    with pytest.raises(ValueError, match="no path"):
        ModelSpec(matrix, ["input", C3, C3, "output"])


def _chain(n: int) -> list[list[int]]:
    return [[1 if j == i + 1 else 0 for j in range(n)] for i in range(n)]


def _dense(n: int) -> list[list[int]]:
    return [[1 if j > i else 0 for j in range(n)] for i in range(n)]


@pytest.mark.parametrize(
    ("matrix", "ops", "message"),
    [
        ([[0, 1], [1, 0]], ["input", "output"], "upper triangular"),
        ([[0, 2], [0, 0]], ["input", "output"], "0 and 1"),
        ([[0, 1, 0], [0, 0]], ["input", C3, "output"], "square"),
        (_chain(3), ["input", "output"], "needs 3 ops"),
        (_chain(8), ["input", *[C3] * 6, "output"], "at most 7 vertices"),
        (_dense(6), ["input", *[C3] * 4, "output"], "at most 9 edges"),
        (_chain(3), [C3, C3, "output"], "first op"),
        (_chain(3), ["input", "conv5x5", "output"], "unknown cell op"),
    ],
)
def test_invalid_cells_are_refused(
    matrix: list[list[int]], ops: list[str], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        ModelSpec(matrix, ops)


# --- channels ---------------------------------------------------------------


def test_inception_vertex_channels() -> None:
    assert vertex_channels(128, 128, INCEPTION_MATRIX) == [128, 32, 32, 32, 32, 32, 128]
    # 13 = 4 * 3 + 1: the first feeding vertex takes the extra channel, and the
    # first 3x3 (feeding only the second) takes its successor's width
    assert vertex_channels(7, 13, INCEPTION_MATRIX) == [7, 4, 3, 3, 3, 3, 13]
    model = models.build(
        "nasbench",
        input_shape=(3, 8, 8),
        num_classes=10,
        stem_channels=128,
        channels=128,
    )
    assert model.cells[0].vertex_widths == [128, 32, 32, 32, 32, 32, 128]


@pytest.mark.parametrize("out_channels", [5, 13, 128])
def test_channels_never_grow_along_edges_and_fill_the_output(out_channels: int) -> None:
    for spec in sample_specs(40, seed=5):
        m, n = spec.matrix, spec.num_vertices
        width = vertex_channels(17, out_channels, m)
        feeders = [v for v in range(1, n - 1) if m[v][n - 1]]
        assert sum(width[v] for v in feeders) == (out_channels if feeders else 0)
        for v in range(1, n - 1):
            for w in range(v + 1, n - 1):
                if m[v][w]:
                    assert 0 <= width[v] - width[w] <= 1


def test_too_few_channels_for_the_fan_in_are_refused() -> None:
    with pytest.raises(ValueError, match="at least 4 channels"):
        vertex_channels(3, 3, INCEPTION_MATRIX)


# --- sampling ---------------------------------------------------------------


def test_sample_specs_is_valid_unique_and_deterministic() -> None:
    specs = sample_specs(60, seed=1)
    assert len(specs) == 60
    assert len({s.hash() for s in specs}) == 60
    assert all(ModelSpec(s.matrix, s.ops) == s for s in specs)
    assert specs == sample_specs(60, seed=1)
    assert specs != sample_specs(60, seed=2)
    assert sample_specs(0, seed=1) == []
    with pytest.raises(ValueError, match="n >= 0"):
        sample_specs(-1, seed=1)


# --- the network ------------------------------------------------------------


def test_full_cifar10_model_has_the_published_parameter_count() -> None:
    model = models.build(
        "nasbench",
        input_shape=(3, 32, 32),
        num_classes=10,
        stem_channels=128,
        channels=128,
        num_stacks=3,
        cells_per_stack=3,
    )
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == 2_694_282


def test_batchnorm_uses_the_benchmark_decay() -> None:
    model = models.build("nasbench", input_shape=(1, 8, 8), num_classes=10)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and all(m.momentum == 0.003 and m.eps == 1e-5 for m in norms)


def test_cell_truncates_sums_concatenates_and_adds_the_input_projection() -> None:
    # input -> v1 (3x3) -> v2 (maxpool) -> output, input -> v2, v1 -> output,
    # input -> output; at 5 channels v1 has 3 and v2 has 2 (v1 is truncated)
    matrix = [[0, 1, 1, 1], [0, 0, 1, 1], [0, 0, 0, 1], [0, 0, 0, 0]]
    torch.manual_seed(0)
    model = models.build(
        "nasbench",
        input_shape=(2, 6, 6),
        num_classes=3,
        matrix=matrix,
        ops=["input", C3, MP, "output"],
        channels=5,
        num_stacks=1,
    )
    model.eval()
    cell = model.cells[0]
    x = torch.randn(4, 16, 6, 6)
    a1 = cell.ops["1"](cell.proj["1"](x))
    a2 = torch.nn.functional.max_pool2d(
        a1[:, :2] + cell.proj["2"](x), 3, stride=1, padding=1
    )
    expected = torch.cat([a1, a2], dim=1) + cell.proj["3"](x)
    torch.testing.assert_close(cell(x), expected)


INVARIANCE_CELLS = [
    ([[0, 1], [0, 0]], ["input", "output"]),  # output is the projection alone
    (
        [[0, 1, 1, 1], [0, 0, 1, 1], [0, 0, 0, 1], [0, 0, 0, 0]],
        ["input", C3, MP, "output"],
    ),
]


def test_permutation_spec_is_an_invariance_on_many_cells() -> None:
    cells = [*INVARIANCE_CELLS, *((s.matrix, s.ops) for s in sample_specs(12, seed=4))]
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    for matrix, ops in cells:
        torch.manual_seed(0)
        model = models.build(
            "nasbench",
            input_shape=(1, 8, 8),
            num_classes=10,
            matrix=matrix,
            ops=ops,
            stem_channels=6,
            channels=13,
            num_stacks=2,
            cells_per_stack=2,
        ).double()
        perturb_state(model)
        spec = models.permutation_spec(model)
        assert len(spec) > 0
        for seed in range(2):
            assert max_output_change(model, spec, x.double(), seed) < 1e-9
        # every group matters: without its first axis (the layer's own output
        # channels), a cyclic shift of its units changes the outputs
        for group in spec:
            assert group.axes[0].tensor.endswith("conv.weight")
            broken = dataclasses.replace(group, axes=group.axes[1:])
            shift = {group.name: np.roll(np.arange(group.size), 1)}
            assert _change(model, PermutationSpec((broken,)), shift, x) > 1e-4


def test_a_truncated_channel_stays_pinned() -> None:
    # v1 (3 channels) feeds v2 (2 channels): v2 reads v1's first two channels
    matrix = [[0, 1, 1, 0], [0, 0, 1, 1], [0, 0, 0, 1], [0, 0, 0, 0]]
    torch.manual_seed(0)
    model = models.build(
        "nasbench",
        input_shape=(1, 8, 8),
        num_classes=4,
        matrix=matrix,
        ops=["input", C3, C3, "output"],
        channels=5,
        num_stacks=1,
    ).double()
    perturb_state(model)
    declared = models.permutation_spec(model).group("cells.0.v1")
    assert declared.size == 2 and model.cells[0].vertex_widths[1] == 3
    # v1's three channels everywhere they appear whole, and v2's input sum
    v1 = PermGroup("v1", 3, (*_unit_refs("cells.0.ops.1"), AxisRef("fc.weight", 1)))
    s2 = PermGroup(
        "s2",
        2,
        (*_unit_refs("cells.0.proj.2"), AxisRef("cells.0.ops.2.conv.weight", 1)),
    )
    both = PermutationSpec((v1, s2))
    x = torch.randn(3, 1, 8, 8, dtype=torch.float64)

    def change(p1: list[int], p2: list[int]) -> float:
        perms = {"v1": np.array(p1), "s2": np.array(p2)}
        return _change(model, both, perms, x)

    assert change([1, 0, 2], [1, 0]) < 1e-9  # the last channel kept in place
    for moved in ([2, 1, 0], [0, 2, 1]):  # the last channel moved: nothing repairs it
        assert min(change(moved, [0, 1]), change(moved, [1, 0])) > 1e-4


def test_the_stem_width_can_be_rebuilt() -> None:
    model = models.build("nasbench", input_shape=(1, 8, 8), num_classes=10)
    spec = models.permutation_spec(model)
    stem = spec.group("stem")
    assert stem.width_key == "stem_channels"
    assert all(g.width_key is None for g in spec if g.name != "stem")
    kwargs = models.rebuild_kwargs(model.fedsim_kwargs, spec, {"stem": 9})
    narrow = models.build("nasbench", **kwargs)
    state = select_units(model.state_dict(), spec, "stem", np.arange(9))
    narrow.load_state_dict(state)  # every shape fits the narrower stem
    assert narrow.cells[0].vertex_widths == [9, *model.cells[0].vertex_widths[1:]]
    assert narrow.cells[1].vertex_widths == model.cells[1].vertex_widths


def test_torch_func_gradients_equal_autograd() -> None:
    torch.manual_seed(0)
    model = models.build("nasbench", input_shape=(1, 8, 8), num_classes=10)
    x = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    y = torch.arange(8)
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.clone() for k, v in model.named_buffers()}

    def loss(p: dict[str, torch.Tensor]) -> torch.Tensor:
        # BatchNorm updates its buffers in place: hand it fresh copies
        fresh = {k: v.clone() for k, v in buffers.items()}
        out = torch.func.functional_call(model, (p, fresh), (x,))
        return torch.nn.functional.cross_entropy(out, y)

    grads = torch.func.grad(loss)(params)
    torch.nn.functional.cross_entropy(model(x), y).backward()
    for key, p in model.named_parameters():
        torch.testing.assert_close(grads[key], p.grad)


def test_training_on_digits_lowers_the_loss() -> None:
    x, y = digit_images()
    x = x / 16.0
    torch.manual_seed(0)
    model = models.build("nasbench", input_shape=(1, 8, 8), num_classes=10)
    gen = torch.Generator().manual_seed(0)

    def full_batch() -> tuple[float, float]:
        # batch statistics: 150 steps of decay 0.997 leave the running ones stale
        with torch.no_grad():
            logits = model(x)
        loss = torch.nn.functional.cross_entropy(logits, y).item()
        return loss, (logits.argmax(1) == y).float().mean().item()

    before, _ = full_batch()
    adam_steps(model, x, y, steps=150, batch=32, lr=3e-3, generator=gen)
    after, accuracy = full_batch()
    assert after < 0.25 * before
    assert accuracy > 0.9
