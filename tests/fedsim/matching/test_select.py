"""The pure parts of PFNM's hyperparameter selection."""

from __future__ import annotations

import pytest

from fedsim.exceptions import ConfigError
from fedsim.matching.select import (
    Candidate,
    Hyper,
    best_candidate,
    candidates,
    width_ratio,
)


def test_candidates_start_with_the_base_and_cover_the_grid_once() -> None:
    base = Hyper(1.0, 1.0, 1.0)
    grid = {"sigma2": [1.0, 0.5], "gamma": [1.0, 1e-3, 50.0]}
    got = candidates(base, grid)
    assert got[0] == base
    assert len(got) == 2 * 3  # base is one of the combinations
    assert len(set(got)) == len(got)
    assert {(h.sigma2, h.gamma) for h in got} == {
        (s, g) for s in (1.0, 0.5) for g in (1.0, 1e-3, 50.0)
    }
    assert all(h.sigma0_2 == 1.0 for h in got)  # absent key keeps the base value
    assert candidates(Hyper(2.0, 3.0, 4.0), {}) == [Hyper(2.0, 3.0, 4.0)]


@pytest.mark.parametrize(
    ("grid", "match"),
    [
        ({"lr": [0.1]}, "select_grid has key 'lr'"),
        ({"gamma": []}, "select_grid.gamma is empty"),
        ({"sigma2": [-1.0]}, "sigma2=-1.0 must be a finite number > 0"),
    ],
)
def test_bad_grids_are_refused(grid, match) -> None:
    with pytest.raises(ConfigError, match=match):
        candidates(Hyper(), grid)


def test_hyper_rejects_non_positive_values_and_labels_itself() -> None:
    with pytest.raises(ConfigError, match="gamma=0"):
        Hyper(gamma=0)
    with pytest.raises(ConfigError, match="sigma0_2=inf"):
        Hyper(sigma0_2=float("inf"))
    assert Hyper(0.15, 0.3, 1e-7).label() == "sigma2=0.15 sigma0_2=0.3 gamma=1e-07"


def test_width_ratio_is_the_largest_growth_over_the_groups() -> None:
    assert width_ratio({"a": 250, "b": 120}, {"a": 100, "b": 100}) == 2.5
    assert width_ratio({"a": 90}, {"a": 30}) == 3.0
    assert width_ratio({}, {}) == 1.0


def cand(score: float | None, ratio: float = 1.0, gamma: float = 1.0) -> Candidate:
    return Candidate(Hyper(gamma=gamma), {"h": 1}, ratio, score)


def test_best_candidate_takes_the_best_score_and_the_earliest_tie() -> None:
    tried = [cand(0.7, gamma=1), cand(0.9, gamma=2), cand(None, 9.0, 3),
             cand(0.9, gamma=4)]  # fmt: skip
    assert best_candidate(tried).hyper.gamma == 2
    assert best_candidate(tried, higher_is_better=False).hyper.gamma == 1


def test_without_scores_the_narrowest_candidate_wins() -> None:
    tried = [cand(None, 5.0, 1), cand(None, 3.5, 2), cand(None, 4.0, 3)]
    assert best_candidate(tried).hyper.gamma == 2
    with pytest.raises(ValueError, match="at least one candidate"):
        best_candidate([])
