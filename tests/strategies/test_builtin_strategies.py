"""Each registered Flower strategy aggregates fabricated replies as its maths says.

No Ray: replies are hand-built Flower messages; expected values are computed
here from the formulas (weighted mean, median, trimmed mean, Krum, the FedOpt
family's moment updates, q-FedAvg's Lipschitz-scaled step).
"""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

import strategies  # noqa: F401
from fedsim.inprocess import InProcessGrid
from fedsim.strategy import STRATEGIES, StrategyContext

W0 = {"a": np.array([1.0, -2.0]), "b": np.array([0.5])}
CLIENTS = [
    ({"a": np.array([2.0, 0.0]), "b": np.array([1.0])}, 10, 0.5),
    ({"a": np.array([0.0, 1.0]), "b": np.array([-1.0])}, 30, 1.2),
    ({"a": np.array([4.0, -4.0]), "b": np.array([2.0])}, 20, 0.8),
]


def record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord(
        {k: Array(np.asarray(v, dtype=np.float64)) for k, v in arrays.items()}
    )


def replies(clients=CLIENTS) -> list[Message]:
    out = []
    for i, (arrays, n, loss) in enumerate(clients):
        content = RecordDict(
            {
                "arrays": record(arrays),
                "metrics": MetricRecord({"num-examples": n, "train_loss": loss}),
            }
        )
        out.append(Message(content, dst_node_id=1000 + i, message_type="train"))
    return out


def strategy(name: str, num_clients: int = 3, **options):
    return STRATEGIES.build(
        name, context=StrategyContext(num_clients=num_clients, client_lr=0.1), **options
    )


def run_round(strat, rnd: int, current: dict, clients=CLIENTS) -> dict[str, np.ndarray]:
    grid = InProcessGrid(ClientApp(), len(clients))
    messages = list(strat.configure_train(rnd, record(current), ConfigRecord(), grid))
    assert len(messages) == len(clients)
    arrays, _ = strat.aggregate_train(rnd, replies(clients))
    assert arrays is not None
    return {k: v.numpy() for k, v in arrays.items()}


def weighted_mean() -> dict[str, np.ndarray]:
    total = sum(n for _, n, _ in CLIENTS)
    return {k: sum(a[k] * n for a, n, _ in CLIENTS) / total for k in W0}


def test_fedavg_is_the_example_weighted_mean() -> None:
    out = run_round(strategy("fedavg"), 1, W0)
    expected = weighted_mean()
    # hand check of one entry: (2*10 + 0*30 + 4*20) / 60
    assert out["a"][0] == pytest.approx(100 / 60)
    for k in W0:
        np.testing.assert_allclose(out[k], expected[k])


def test_fedprox_sends_mu_and_averages() -> None:
    strat = strategy("fedprox", proximal_mu=0.3)
    grid = InProcessGrid(ClientApp(), 3)
    messages = list(strat.configure_train(1, record(W0), ConfigRecord(), grid))
    assert all(m.content["config"]["proximal-mu"] == 0.3 for m in messages)
    arrays, _ = strat.aggregate_train(1, replies())
    np.testing.assert_allclose(arrays["a"].numpy(), weighted_mean()["a"])


def test_fedavgm_applies_server_momentum_over_two_rounds() -> None:
    strat = strategy("fedavgm", server_learning_rate=0.5, server_momentum=0.9)
    avg = weighted_mean()
    w1 = run_round(strat, 1, W0)
    pg1 = {k: W0[k] - avg[k] for k in W0}
    expected1 = {k: W0[k] - 0.5 * pg1[k] for k in W0}
    for k in W0:
        np.testing.assert_allclose(w1[k], expected1[k])
    w2 = run_round(strat, 2, w1)
    momentum = {k: 0.9 * pg1[k] + (w1[k] - avg[k]) for k in W0}
    for k in W0:
        np.testing.assert_allclose(w2[k], w1[k] - 0.5 * momentum[k])


@pytest.mark.parametrize("name", ["fedadam", "fedyogi", "fedadagrad"])
def test_fedopt_family_first_step(name: str) -> None:
    eta, b1, b2, tau = 0.1, 0.9, 0.99, 0.001
    opts = {"eta": eta, "tau": tau}
    if name != "fedadagrad":
        opts.update(beta_1=b1, beta_2=b2)
    out = run_round(strategy(name, **opts), 1, W0)
    avg = weighted_mean()
    for k in W0:
        delta = avg[k] - W0[k]
        # FedAdagrad has no first moment (Flower passes beta_1 = 0)
        m = delta if name == "fedadagrad" else (1 - b1) * delta
        if name == "fedadam":
            v = (1 - b2) * delta**2
            step = eta * np.sqrt(1 - b2**2) / (1 - b1**2)  # Flower's bias correction
        elif name == "fedyogi":
            v = -(1 - b2) * delta**2 * np.sign(-(delta**2))
            step = eta
        else:
            v = delta**2
            step = eta
        np.testing.assert_allclose(out[k], W0[k] + step * m / (np.sqrt(v) + tau))


def test_fedmedian_is_coordinatewise() -> None:
    out = run_round(strategy("fedmedian"), 1, W0)
    np.testing.assert_allclose(out["a"], [2.0, 0.0])
    np.testing.assert_allclose(out["b"], [1.0])


def test_fedtrimmedavg_drops_the_extremes() -> None:
    five = [
        ({"a": np.array([v, -v]), "b": np.array([v])}, 10, 1.0)
        for v in (0.0, 1.0, 2.0, 3.0, 100.0)
    ]
    out = run_round(strategy("fedtrimmedavg", num_clients=5, beta=0.2), 1, W0, five)
    # beta=0.2 of 5 clients trims one from each end: mean of 1, 2, 3
    np.testing.assert_allclose(out["a"], [2.0, -2.0])
    np.testing.assert_allclose(out["b"], [2.0])


def test_krum_and_multikrum_skip_the_outlier() -> None:
    clients = [
        ({"a": np.array([1.0, 1.0]), "b": np.array([0.0])}, 10, 1.0),
        ({"a": np.array([1.1, 1.0]), "b": np.array([0.0])}, 10, 1.0),
        ({"a": np.array([1.0, 1.3]), "b": np.array([0.0])}, 10, 1.0),
        ({"a": np.array([50.0, -50.0]), "b": np.array([9.0])}, 10, 1.0),
    ]
    # Krum with f=0 scores each update by its squared distance to its n-f-2 = 2
    # nearest others; client 0's neighbours are closest (0.01 + 0.09).
    out = run_round(strategy("krum", num_clients=4), 1, W0, clients)
    np.testing.assert_allclose(out["a"], [1.0, 1.0])
    multi = strategy("multikrum", num_clients=4, num_nodes_to_select=2)
    out = run_round(multi, 1, W0, clients)
    # the two best scores are clients 0 (0.10) and 1 (0.01 + 0.10 = 0.11)
    np.testing.assert_allclose(out["a"], [1.05, 1.0])


def test_bulyan_without_byzantine_clients_is_the_plain_mean() -> None:
    out = run_round(strategy("bulyan"), 1, W0)
    for k in W0:
        np.testing.assert_allclose(
            out[k], np.mean([a[k] for a, _, _ in CLIENTS], axis=0)
        )


def test_qfedavg_step() -> None:
    q, lr = 0.5, 0.1
    out = run_round(strategy("qfedavg", q=q), 1, W0)
    lipschitz = 1.0 / lr
    deltas, hs = [], []
    for arrays, _, loss in CLIENTS:
        grad = {k: lipschitz * (W0[k] - arrays[k]) for k in W0}
        sq = sum(float((g**2).sum()) for g in grad.values())
        fq = (loss + 1e-10) ** q
        deltas.append({k: fq * g for k, g in grad.items()})
        hs.append(q * (loss + 1e-10) ** (q - 1) * sq + lipschitz * fq)
    for k in W0:
        np.testing.assert_allclose(out[k], W0[k] - sum(d[k] for d in deltas) / sum(hs))


def test_every_registered_strategy_has_a_test_or_is_listed() -> None:
    covered = {
        "fedavg",
        "fedprox",
        "fedavgm",
        "fedadam",
        "fedyogi",
        "fedadagrad",
        "fedmedian",
        "fedtrimmedavg",
        "krum",
        "multikrum",
        "bulyan",
        "qfedavg",
    }
    builtin = {n for n in STRATEGIES.names() if n in covered}
    assert builtin == covered


def test_exact_participation_from_round_one() -> None:
    ctx = StrategyContext(num_clients=10, fraction_train=0.3)
    strat = STRATEGIES.build("fedavg", context=ctx)
    grid = InProcessGrid(ClientApp(), 10)
    messages = list(strat.configure_train(1, record(W0), ConfigRecord(), grid))
    assert len(messages) == 3
