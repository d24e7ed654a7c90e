"""Batched cohort training pieces: the batch plan, masked BatchNorm, the trainer
against per-client ``local_train``, the batching probe and chunk retries."""

from __future__ import annotations

import copy
import math
from typing import Any

import pytest
import torch
from torch import nn

from fedsim import models
from fedsim._batch_mask import MaskedBatchNorm, mask_batchnorm
from fedsim._cohort import CohortTrainer
from fedsim._cohort_plan import ClientStore, make_plan
from fedsim._cohort_probe import batching_problem
from fedsim.config import ClientConfig
from fedsim.node import proximal_penalty
from fedsim.tasks import build as build_task
from fedsim.train import local_train

TASK = build_task("classification")


def _clients(sizes: list[int], seed: int = 0) -> dict[int, tuple[torch.Tensor, ...]]:
    gen = torch.Generator().manual_seed(seed)
    return {
        10 + i: (
            torch.randn(n, 1, 8, 8, generator=gen),
            torch.randint(0, 10, (n,), generator=gen),
        )
        for i, n in enumerate(sizes)
    }


def _gens(ids: list[int]) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(1000 + c) for c in ids]


# -- the plan -----------------------------------------------------------------
def test_plan_reproduces_each_clients_own_batches() -> None:
    sizes, batch, epochs = [5, 11, 3], 4, 2
    data = _clients(sizes)
    store = ClientStore.stack(data)
    ids = list(data)
    plan = make_plan(store, ids, _gens(ids), epochs=epochs, batch_size=batch)
    assert plan.num_steps == epochs * math.ceil(11 / batch)  # longest client: 6
    assert plan.index.shape == (6, 3, 4)
    for col, (cid, n) in enumerate(zip(ids, sizes, strict=True)):
        start = store.spans[cid][0]
        gen = torch.Generator().manual_seed(1000 + cid)  # what local_train draws
        expected = []
        for _ in range(epochs):
            order = torch.randperm(n, generator=gen)
            expected += [order[s : s + batch] for s in range(0, n, batch)]
        steps = len(expected)
        assert int(plan.steps[col]) == steps
        assert plan.active[:, col].tolist() == [t < steps for t in range(6)]
        per_epoch = steps // epochs
        last = [steps - per_epoch <= t < steps for t in range(6)]
        assert plan.last_epoch[:, col].tolist() == last
        for t, rows in enumerate(expected):
            k = len(rows)
            assert torch.equal(plan.index[t, col, :k] - start, rows)
            assert plan.weight[t, col, :k].eq(1).all()
            assert plan.weight[t, col, k:].eq(0).all()
            # padding points at the client's own rows (finite inputs)
            assert plan.index[t, col, k:].ge(start).all()
    # steps where some client is done, or pads a short batch
    assert plan.all_active == tuple(t < 2 for t in range(6))
    assert plan.padded[0] and plan.padded[1]  # sizes 5 and 3 pad at once


def test_plan_rejects_empty_clients_and_mismatched_generators() -> None:
    store = ClientStore.stack(
        {0: (torch.zeros(0, 2), torch.zeros(0, dtype=torch.long))}
    )
    with pytest.raises(ValueError, match="at least one example"):
        make_plan(store, [0], _gens([0]), epochs=1, batch_size=2)
    with pytest.raises(ValueError, match="generators"):
        make_plan(store, [0], [], epochs=1, batch_size=2)


# -- masked BatchNorm ------------------------------------------------------------
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("dims", [1, 2])
def test_masked_batchnorm_equals_batchnorm_on_the_real_rows(
    momentum: float | None, dims: int
) -> None:
    torch.manual_seed(0)
    layer = (nn.BatchNorm1d if dims == 1 else nn.BatchNorm2d)(3, momentum=momentum)
    layer = layer.double()
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.uniform_(-0.5, 0.5)
    shape = (6, 3) if dims == 1 else (6, 3, 4, 5)
    real = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    junk = 100 * torch.randn(3, *shape[1:], dtype=torch.float64)
    rows = torch.tensor([1, 1, 1, 1, 1, 1, 0, 0, 0], dtype=torch.float64)
    plain = copy.deepcopy(layer)
    # the control: PyTorch's BatchNorm over the padded batch is not the same
    polluted = copy.deepcopy(layer)(torch.cat([real, junk]))[:6]
    assert (polluted - copy.deepcopy(layer)(real)).abs().max() > 0.1
    clone, mask = mask_batchnorm(nn.Sequential(layer))
    masked = clone[0]
    assert isinstance(masked, MaskedBatchNorm)
    assert masked.state_dict().keys() == plain.state_dict().keys()
    for _ in range(2):  # the second step exercises the running averages
        expected = plain(real)
        with mask.use(rows):
            got = masked(torch.cat([real, junk]))[:6]
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
        g1 = torch.autograd.grad(expected.pow(2).sum(), [real, plain.weight])
        g2 = torch.autograd.grad(got.pow(2).sum(), [real, masked.weight])
        for a, b in zip(g1, g2, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
    for key, value in plain.state_dict().items():
        torch.testing.assert_close(masked.state_dict()[key], value, rtol=1e-10, atol=0)
    # with no mask set (every row real) it is PyTorch's own BatchNorm
    x = torch.randn(*shape, dtype=torch.float64)
    torch.testing.assert_close(masked(x), plain(x), rtol=0, atol=0)


# -- the trainer against per-client training --------------------------------------
CONFIGS = {
    "sgd": ClientConfig(
        lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3, epochs=2, batch_size=8
    ),
    "adam": ClientConfig(
        optimizer="adam",
        lr=0.01,
        amsgrad=True,
        weight_decay=1e-4,
        epochs=2,
        batch_size=8,
    ),
}
ARCHS = {"mlp": {"hidden": [16]}, "cnn": {"channels": [4, 6], "hidden": [12]}}


@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize("recipe", sorted(CONFIGS))
def test_cohort_equals_local_train_for_every_client(arch: str, recipe: str) -> None:
    cfg = CONFIGS[recipe]
    torch.manual_seed(3)
    model = models.build(arch, input_shape=(1, 8, 8), num_classes=10, **ARCHS[arch])
    sizes = [3, 8, 13, 21, 30]  # padded last batches and clients that finish early
    data = _clients(sizes, seed=1)
    ids = list(data)
    lrs = [cfg.lr * f for f in (1.0, 0.5, 1.0, 2.0, 1.0)]
    mus = [0.0, 0.1, 0.0, 0.3, 0.0]
    # clients start from different states (personalised messages)
    starts = []
    for i in range(len(ids)):
        state = {k: v.clone() for k, v in model.state_dict().items()}
        if i % 2:
            for v in state.values():
                if v.is_floating_point():
                    v.add_(0.01 * i)
        starts.append(state)
    expected = []
    for cid, start, lr, mu in zip(ids, starts, lrs, mus, strict=True):
        alone = copy.deepcopy(model)
        alone.load_state_dict(start)
        anchor = {k: v.detach().clone() for k, v in alone.named_parameters()}
        penalty = proximal_penalty(anchor, mu) if mu > 0 else None
        gen = torch.Generator().manual_seed(1000 + cid)
        x, y = data[cid]
        expected.append(
            local_train(alone, x, y, cfg, TASK, generator=gen, lr=lr, penalty=penalty)
        )
    trainer = CohortTrainer(model=model, task=TASK, cfg=cfg, proximal=proximal_penalty)
    states = {k: torch.stack([s[k] for s in starts]) for k in trainer.keys}
    store = ClientStore.stack(data)
    for chunk in (None, 2):
        got = trainer.train(
            states, store, ids, _gens(ids), lr=lrs, mu=mus, max_chunk=chunk
        )
        for i, ref in enumerate(expected):
            assert int(got.num_steps[i]) == ref.num_steps
            assert float(got.train_loss[i]) == pytest.approx(ref.train_loss, rel=1e-5)
            for key in trainer.keys:
                torch.testing.assert_close(
                    got.state[key][i], ref.state_dict[key], rtol=1e-5, atol=1e-6
                )


def test_out_of_memory_halves_the_chunk_and_keeps_the_result(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cfg = CONFIGS["sgd"]
    torch.manual_seed(0)
    model = models.build("mlp", input_shape=(1, 8, 8), num_classes=10, hidden=[8])
    data = _clients([5, 9, 12, 7, 16])
    ids = list(data)
    trainer = CohortTrainer(model=model, task=TASK, cfg=cfg)
    state = model.state_dict()
    states = {k: torch.stack([state[k]] * len(ids)) for k in trainer.keys}
    store = ClientStore.stack(data)
    whole = trainer.train(states, store, ids, _gens(ids), lr=cfg.lr)
    real = CohortTrainer._train_chunk
    sizes: list[int] = []

    def small_memory(
        self: CohortTrainer, states: Any, store: Any, clients: list[int], *rest: Any
    ) -> Any:
        sizes.append(len(clients))
        if len(clients) > 2:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(self, states, store, clients, *rest)

    monkeypatch.setattr(CohortTrainer, "_train_chunk", small_memory)
    halved = trainer.train(states, store, ids, _gens(ids), lr=cfg.lr)
    assert sizes[:3] == [5, 2, 2]  # 5 failed, then chunks of 2 (the same draws)
    for key in trainer.keys:
        torch.testing.assert_close(halved.state[key], whole.state[key])

    def broken(self: CohortTrainer, *args: Any) -> Any:
        raise RuntimeError("shape mismatch")

    monkeypatch.setattr(CohortTrainer, "_train_chunk", broken)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        trainer.train(states, store, ids, _gens(ids), lr=cfg.lr)


# -- the probe --------------------------------------------------------------------
class _Counting(nn.Module):
    """Keeps a Python counter of forward calls (state a batch cannot keep)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 10)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.fc(x.flatten(1))


class _Centred(nn.Module):
    """Subtracts the batch mean: mixes the examples of a batch."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x.flatten(1))
        return h - h.mean(dim=0, keepdim=True)


class _Dropping(nn.Module):
    """Random dropout: per-client randomness vmap will not invent."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 10)
        self.drop = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(x.flatten(1)))


@pytest.mark.parametrize(
    ("module", "says"),
    [
        (_Counting, "Python-side state"),
        (_Centred, "mixes the examples"),
        (_Dropping, "vmap cannot train it"),
    ],
)
def test_probe_names_what_cannot_be_batched(module: type, says: str) -> None:
    torch.manual_seed(0)
    x, y = _clients([20])[10]
    problem = batching_problem(module(), TASK, CONFIGS["sgd"], x, y)
    assert problem is not None and says in problem


class _ShareWeightedLoss:
    """Cross-entropy times the batch's share of class 0: mixes a batch's examples."""

    primary = "loss"
    higher_is_better = False

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        share = (target == 0).to(output.dtype).mean()
        return share * nn.functional.cross_entropy(output, target, reduction="none")

    def metrics(
        self, output: torch.Tensor, target: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        return {"loss": self.loss(output, target)}


def test_probe_rejects_a_task_that_mixes_the_batch() -> None:
    torch.manual_seed(0)
    model = models.build("mlp", input_shape=(1, 8, 8), num_classes=10, hidden=[8])
    x = torch.randn(16, 1, 8, 8)
    y = torch.tensor([0, 1, 2, 3, 0, 0, 0, 0] * 2)  # class-0 share 1/4 vs 5/8
    problem = batching_problem(model, _ShareWeightedLoss(), CONFIGS["sgd"], x, y)
    assert problem is not None and "per-example loss changes" in problem
    assert batching_problem(model, TASK, CONFIGS["sgd"], x, y) is None


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_probe_accepts_mlp_and_cnn(arch: str) -> None:
    torch.manual_seed(0)
    model = models.build(arch, input_shape=(1, 8, 8), num_classes=10, **ARCHS[arch])
    x, y = _clients([20])[10]
    assert batching_problem(model, TASK, CONFIGS["adam"], x, y) is None
