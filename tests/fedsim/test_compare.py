"""``fedsim compare`` end to end on the in-process engine (digits, tiny MLP).

One comparison (3 strategies x 2 seeds, with references) is run once per module;
the tests read its folder, and the resume tests work on copies of it.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import fedsim
import fedsim.compare_plan as compare_plan
import fedsim.compare_runner as compare_module
import fedsim.runner as run_module
from fedsim import models
from fedsim.cli import main as cli_main
from fedsim.comparison import (
    CENTRAL,
    ENSEMBLE,
    LOCAL_BEST,
    LOCAL_MEAN,
    ComparisonTable,
    ReferenceRecord,
    reference_rows,
)
from fedsim.exceptions import ConfigError
from fedsim.node import build_global_model, load_dataset

STRATEGIES = ["fedavg", "fedadam"]
SEEDS = [0, 1]
ROUNDS = 3
CLIENTS = 4
COHORT = 2  # fraction_train=0.5 of 4 clients
TARGET = 0.5
BASE = [
    f"strategies=[{','.join(STRATEGIES)}]",
    f"seeds=[{','.join(map(str, SEEDS))}]",
    f"target_accuracy={TARGET}",
    "dataset=digits",
    "model.hidden=[16]",
    f"num_clients={CLIENTS}",
    f"num_rounds={ROUNDS}",
    "fraction_train=0.5",
    "simulation.engine=inprocess",
    "client.lr=0.1",
    "compare.reference_epochs=2",
]
FIGURES = ("accuracy_vs_round.png", "accuracy_vs_bytes.png")


def args_for(folder: Path, *extra: str) -> list[str]:
    return [*BASE, f"compare_dir={folder}", *extra]


@pytest.fixture(scope="module")
def compared(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, ComparisonTable]:
    folder = tmp_path_factory.mktemp("cmp") / "c"
    table = compare_module.compare(args_for(folder))
    return folder, table


def run_folder(root: Path, strategy: str, seed: int) -> Path:
    return root / "runs" / strategy / f"seed_{seed}"


def results_json(root: Path, strategy: str, seed: int) -> dict[str, Any]:
    return json.loads((run_folder(root, strategy, seed) / "results.json").read_text())


def csv_rows(root: Path) -> dict[str, dict[str, str]]:
    with (root / "comparison.csv").open(newline="") as fh:
        return {r["name"]: r for r in csv.DictReader(fh)}


def snapshot(root: Path) -> dict[str, tuple[int, str]]:
    """mtime and text of every record file of a comparison folder."""
    files = list(root.glob("runs/*/seed_*/results.json"))
    files += list(root.glob("references/*.json"))
    return {
        str(p.relative_to(root)): (p.stat().st_mtime_ns, p.read_text()) for p in files
    }


def test_folder_layout_and_hydra_multirun(
    compared: tuple[Path, ComparisonTable],
) -> None:
    root, table = compared
    assert not table.failed
    for name in ("comparison.csv", "comparison.md", *FIGURES, "multirun.yaml"):
        assert (root / name).is_file(), name
    for strategy in STRATEGIES:
        for seed in SEEDS:
            folder = run_folder(root, strategy, seed)
            assert results_json(root, strategy, seed)["status"] == "completed"
            # the run was a Hydra multirun job with these sweep values
            overrides = (folder / ".hydra" / "overrides.yaml").read_text()
            assert f"strategy={strategy}" in overrides and f"seed={seed}" in overrides
    assert sorted(p.name for p in (root / "references").iterdir()) == [
        "seed_0.json",
        "seed_1.json",
    ]
    assert [r.name for r in table.rows] == [
        *STRATEGIES,
        LOCAL_MEAN,
        LOCAL_BEST,
        ENSEMBLE,
        CENTRAL,
    ]


def test_identical_partitions_cohorts_and_initial_weights(
    compared: tuple[Path, ComparisonTable],
) -> None:
    root, _ = compared
    cohorts_by_seed = {}
    for seed in SEEDS:
        first = results_json(root, STRATEGIES[0], seed)
        cohorts = [r["clients"] for r in first["rounds"][1:]]
        assert all(len(c) == COHORT for c in cohorts)
        histogram = (
            run_folder(root, STRATEGIES[0], seed) / "partition.csv"
        ).read_text()
        for strategy in STRATEGIES[1:]:
            other = results_json(root, strategy, seed)
            assert [r["clients"] for r in other["rounds"][1:]] == cohorts
            assert (
                run_folder(root, strategy, seed) / "partition.csv"
            ).read_text() == histogram
            assert other["clients"] == first["clients"]  # examples per client
            # same initial model: identical round-0 evaluation
            assert other["rounds"][0]["test_loss"] == first["rounds"][0]["test_loss"]
        cohorts_by_seed[seed] = cohorts
    # the seed does change the data and cohorts (so the checks above can fail)
    assert cohorts_by_seed[0] != cohorts_by_seed[1]
    assert (run_folder(root, "fedavg", 0) / "partition.csv").read_text() != (
        run_folder(root, "fedavg", 1) / "partition.csv"
    ).read_text()


def test_initial_weights_are_the_same_for_every_strategy() -> None:
    plan = compare_module.plan(args_for(Path("unused")))
    for seed in SEEDS:
        exps = [r.exp for r in plan.runs if r.seed == seed]
        assert [e.strategy.name for e in exps] == STRATEGIES
        states = [build_global_model(e, load_dataset(e)).state_dict() for e in exps]
        for state in states[1:]:
            assert state.keys() == states[0].keys()
            for key in state:
                assert torch.equal(state[key], states[0][key])


def test_table_means_and_stds_match_the_run_records(
    compared: tuple[Path, ComparisonTable],
) -> None:
    root, _ = compared
    rows = csv_rows(root)
    for strategy in STRATEGIES:
        finals, bests, hits, seconds, sent, received = [], [], [], [], [], []
        for seed in SEEDS:
            data = results_json(root, strategy, seed)
            accs = [r["test_accuracy"] for r in data["rounds"]]
            finals.append(accs[-1])
            bests.append(max(accs))
            hit = [r["round"] for r in data["rounds"] if r["test_accuracy"] >= TARGET]
            if hit:
                hits.append(hit[0])
            seconds.append(sum(r.get("round_seconds", 0.0) for r in data["rounds"]))
            sent.append(sum(r.get("bytes_sent", 0) for r in data["rounds"]))
            received.append(sum(r.get("bytes_received", 0) for r in data["rounds"]))
        row = rows[strategy]
        assert float(row["final_mean"]) == pytest.approx(np.mean(finals), abs=1e-12)
        assert float(row["final_std"]) == pytest.approx(
            np.std(finals, ddof=1), abs=1e-12
        )
        assert float(row["best_mean"]) == pytest.approx(np.mean(bests), abs=1e-12)
        assert float(row["best_std"]) == pytest.approx(np.std(bests, ddof=1), abs=1e-12)
        assert int(row["reached_target"]) == len(hits)
        if hits:
            assert float(row["rounds_to_target"]) == pytest.approx(np.mean(hits))
        assert float(row["wall_seconds"]) == pytest.approx(np.mean(seconds))
        assert float(row["bytes_sent"]) == np.mean(sent)
        assert float(row["bytes_received"]) == np.mean(received)
        assert row["seeds"] == "0 1" and row["missing_seeds"] == ""
        # the markdown shows the same numbers, rounded
        md = (root / "comparison.md").read_text()
        line = next(ln for ln in md.splitlines() if ln.startswith(f"| {strategy} |"))
        expected = f"{np.mean(finals):.3f} ± {np.std(finals, ddof=1):.3f}"
        assert expected in line


def test_reference_rows_match_the_reference_records(
    compared: tuple[Path, ComparisonTable],
) -> None:
    root, _ = compared
    rows = csv_rows(root)
    records = [
        json.loads((root / "references" / f"seed_{s}.json").read_text()) for s in SEEDS
    ]
    for rec in records:
        assert rec["epochs"] == 2 and len(rec["local_accuracy"]) == CLIENTS
    expect = {
        LOCAL_MEAN: [np.mean(r["local_accuracy"]) for r in records],
        LOCAL_BEST: [max(r["local_accuracy"]) for r in records],
        ENSEMBLE: [r["ensemble_accuracy"] for r in records],
        CENTRAL: [r["central_accuracy"] for r in records],
    }
    for name, values in expect.items():
        assert float(rows[name]["final_mean"]) == pytest.approx(np.mean(values))
        assert float(rows[name]["final_std"]) == pytest.approx(np.std(values, ddof=1))
        assert rows[name]["kind"] == "reference" and rows[name]["bytes_sent"] == ""
    params = records[0]["num_params"]
    assert params == 64 * 16 + 16 + 16 * 10 + 10
    assert int(rows[ENSEMBLE]["num_params"]) == CLIENTS * params
    assert int(rows[CENTRAL]["num_params"]) == params


def test_reference_rows_by_hand() -> None:
    def record(
        seed: int, local: list[float], ens: float, cen: float
    ) -> ReferenceRecord:
        return ReferenceRecord(
            seed=seed,
            epochs=1,
            config={},
            local_accuracy=local,
            ensemble_accuracy=ens,
            central_accuracy=cen,
            local_seconds=2.0 + seed,
            central_seconds=1.0,
            num_params=7,
        )

    rows = {
        r.name: r
        for r in reference_rows(
            [record(0, [0.2, 0.6, 0.4], 0.7, 0.9), record(1, [0.3, 0.5, 0.1], 0.8, 0.8)]
        )
    }
    # per-seed means 0.4 and 0.3; bests 0.6 and 0.5
    assert rows[LOCAL_MEAN].final_mean == pytest.approx(0.35)
    assert rows[LOCAL_MEAN].final_std == pytest.approx(0.05 * np.sqrt(2))
    assert rows[LOCAL_BEST].final_mean == pytest.approx(0.55)
    assert rows[ENSEMBLE].final_mean == pytest.approx(0.75)
    assert rows[CENTRAL].final_std == pytest.approx(0.1 / np.sqrt(2))
    assert rows[ENSEMBLE].num_params == 21 and rows[CENTRAL].num_params == 7
    assert rows[LOCAL_MEAN].wall_seconds == pytest.approx(2.5)
    single = reference_rows([record(3, [0.5], 0.5, 0.5)])
    assert single[0].final_std is None  # no std from one seed


def npy_size(tensor: torch.Tensor) -> int:
    buf = io.BytesIO()
    np.save(buf, tensor.detach().numpy(), allow_pickle=False)
    return len(buf.getvalue())


def test_bytes_are_the_npy_sizes_of_the_arrays_times_messages(
    compared: tuple[Path, ComparisonTable],
) -> None:
    root, table = compared
    model = models.build("mlp", input_shape=(1, 8, 8), num_classes=10, hidden=[16])
    per_message = sum(npy_size(t) for t in model.state_dict().values())
    for strategy in STRATEGIES:
        for seed in SEEDS:
            for rec in results_json(root, strategy, seed)["rounds"][1:]:
                messages = len(rec["clients"])
                assert rec["bytes_sent"] == per_message * messages
                assert rec["bytes_received"] == per_message * messages
        row = table.row(strategy)
        assert row.bytes_sent == per_message * COHORT * ROUNDS
        assert row.bytes_received == per_message * COHORT * ROUNDS
        assert row.num_params == sum(p.numel() for p in model.parameters())


def test_second_invocation_runs_nothing_new(
    compared: tuple[Path, ComparisonTable], monkeypatch: pytest.MonkeyPatch
) -> None:
    root, _ = compared
    before = snapshot(root)
    csv_before = (root / "comparison.csv").read_text()

    def no_launch(plan: Any) -> None:
        raise AssertionError("a completed comparison launched runs")

    monkeypatch.setattr(compare_module, "_launch", no_launch)
    table = compare_module.compare(args_for(root))
    assert snapshot(root) == before
    assert (root / "comparison.csv").read_text() == csv_before
    assert not table.failed


def test_killed_and_failed_runs_are_run_again(
    compared: tuple[Path, ComparisonTable],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    original, _ = compared
    root = tmp_path / "copy"
    shutil.copytree(original, root)
    # fedadam seed 1 was killed after round 1; fedavg seed 0 never finished
    killed = run_folder(root, "fedadam", 1) / "results.json"
    data = json.loads(killed.read_text())
    data["status"], data["rounds"] = "running", data["rounds"][:2]
    killed.write_text(json.dumps(data))
    (run_folder(root, "fedavg", 0) / "results.json").unlink()
    before = snapshot(root)

    real_run = run_module.run
    calls: list[tuple[str, int]] = []

    def flaky(exp: Any, **kw: Any) -> Any:
        calls.append((exp.strategy.name, exp.seed))
        if (exp.strategy.name, exp.seed) == ("fedavg", 0):
            raise RuntimeError("simulated crash")
        return real_run(exp, **kw)

    monkeypatch.setattr(run_module, "run", flaky)
    plan = compare_module.plan(args_for(root))
    actions = {(r.strategy, r.seed): r.action for r in plan.runs}
    assert actions.pop(("fedadam", 1)) == "rerun"
    assert actions.pop(("fedavg", 0)) == "run"
    assert set(actions.values()) == {"skip"}

    table = compare_module.compare(args_for(root))
    assert sorted(calls) == [("fedadam", 1), ("fedavg", 0)]
    assert list(table.failed) == ["runs/fedavg/seed_0"]
    assert "simulated crash" in table.failed["runs/fedavg/seed_0"]
    assert (run_folder(root, "fedavg", 0) / "failure.txt").is_file()
    assert table.row("fedavg").missing_seeds == (0,)
    assert table.row("fedavg").seeds == (1,)
    assert table.row("fedavg").final_std is None
    redone = results_json(root, "fedadam", 1)
    assert redone["status"] == "completed"
    assert redone["final"]["test_accuracy"] == data["final"]["test_accuracy"]
    after = snapshot(root)
    untouched = [k for k in before if "fedadam/seed_1" not in k]
    assert all(after[k] == before[k] for k in untouched)

    # the failed run is retried next time, and only it
    calls.clear()
    monkeypatch.setattr(run_module, "run", counting(real_run, calls))
    table = compare_module.compare(args_for(root))
    assert calls == [("fedavg", 0)]
    assert not table.failed
    assert not (run_folder(root, "fedavg", 0) / "failure.txt").exists()
    again = results_json(root, "fedavg", 0)["final"]
    first = results_json(original, "fedavg", 0)["final"]
    assert again["test_accuracy"] == first["test_accuracy"]
    assert again["bytes_sent"] == first["bytes_sent"]


def counting(real: Any, log: list[tuple[str, int]]) -> Any:
    def wrapped(exp: Any, **kw: Any) -> Any:
        log.append((exp.strategy.name, exp.seed))
        return real(exp, **kw)

    return wrapped


def test_dry_run_lists_runs_and_writes_nothing(
    compared: tuple[Path, ComparisonTable],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    fresh = tmp_path / "fresh"
    assert cli_main(["compare", *args_for(fresh), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert not fresh.exists()
    for strategy in STRATEGIES:
        for seed in SEEDS:
            assert f"run    runs/{strategy}/seed_{seed} " in out
    assert "compute references/seed_0.json" in out
    assert (
        f"{len(STRATEGIES) * len(SEEDS)} of {len(STRATEGIES) * len(SEEDS)} runs" in out
    )

    root, _ = compared
    before = snapshot(root)
    assert cli_main(["compare", *args_for(root), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.count("skip   runs/") == len(STRATEGIES) * len(SEEDS)
    assert "skip   references/seed_1.json" in out
    assert f"0 of {len(STRATEGIES) * len(SEEDS)} runs to do" in out
    assert snapshot(root) == before


def test_a_changed_experiment_is_refused_in_the_same_folder(
    compared: tuple[Path, ComparisonTable],
) -> None:
    root, _ = compared
    before = snapshot(root)
    with pytest.raises(ConfigError, match=r"num_rounds=3 there, 2 now"):
        compare_module.plan(args_for(root, "num_rounds=2"))
    assert snapshot(root) == before


def test_plot_redraws_the_comparison_figures(
    compared: tuple[Path, ComparisonTable], tmp_path: Path
) -> None:
    root = tmp_path / "copy"
    shutil.copytree(compared[0], root)
    for name in FIGURES:
        (root / name).unlink()
    assert cli_main(["plot", str(root)]) == 0
    for name in FIGURES:
        assert (root / name).stat().st_size > 10_000
    table = ComparisonTable.read_csv(root / "comparison.csv")
    assert table.rows == compared[1].rows and table.target == TARGET


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["strategy=fedavg"], "strategy= is set by fedsim compare itself"),
        (["hydra.sweep.dir=x"], "hydra.sweep.dir= is set by fedsim compare"),
        (["strategies=[fedavg,fedmagic]"], "unknown strategy 'fedmagic'"),
        (["seeds=[0,0]"], "compare.seeds=[0, 0] is not allowed"),
        (["strategies=[]"], "compare.strategies=[] is not allowed"),
        (["compare.colour=red"], "unknown compare setting 'colour'"),
    ],
)
def test_bad_input_is_one_sentence_exit_2(
    extra: list[str],
    message: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    code = cli_main(["compare", *args_for(tmp_path / "x"), *extra, "--dry-run"])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


def test_fedsim_compare_is_callable(compared: tuple[Path, ComparisonTable]) -> None:
    root, table = compared
    again = fedsim.compare(args_for(root))  # nothing left to run
    assert isinstance(again, ComparisonTable) and again.rows == table.rows


def test_no_reference_rows_where_they_do_not_apply(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(compare_plan, "references_apply", lambda exp: False)
    plan = compare_module.plan(args_for(tmp_path / "r"))
    assert set(plan.references.values()) == {"n/a"}
    assert "references/" not in plan.describe()


def test_changed_reference_epochs_recompute_only_the_references(
    compared: tuple[Path, ComparisonTable],
) -> None:
    root, _ = compared
    plan = compare_module.plan(args_for(root, "compare.reference_epochs=1"))
    assert {r.action for r in plan.runs} == {"skip"}
    assert set(plan.references.values()) == {"compute"}
