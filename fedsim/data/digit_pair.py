"""Two digit classes as two distributions (task ``wasserstein``).

P is scikit-learn's 8x8 images of digit ``classes[0]`` and Q those of digit
``classes[1]`` (about 180 of each; :mod:`fedsim.data.digits`), labelled 0 and
1. Inputs are the pixels divided by 16, in [0, 1], without standardisation, so
a W1 estimate is in pixel units (the l_2 norm of the 64 pixel differences);
``num_classes`` is 1, the potential's output size. The true W1 is unknown: a
1-Lipschitz potential's ``test_w1`` is a lower bound. A seeded split holds out
the same number of images of each digit, ``round(test_fraction * min(n_P,
n_Q))``, for the server; both splits interleave the digits ``P, Q, P, Q,
...`` (the train split's surplus of one digit comes last).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from fedsim.data import DATASETS, ArrayDataset, DataSplits
from fedsim.data._prepare import check_test_fraction
from fedsim.data.digits import source_arrays
from fedsim.exceptions import ConfigError, DataError

__all__ = ["digit_pair"]


def _mix(p: np.ndarray, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``p0, q0, p1, q1, ...`` then the longer one's surplus, with labels 0/1."""
    common = min(len(p), len(q))
    x = np.empty((len(p) + len(q), *p.shape[1:]), dtype=p.dtype)
    y = np.empty(len(p) + len(q), dtype=np.int64)
    x[0 : 2 * common : 2], x[1 : 2 * common : 2] = p[:common], q[:common]
    y[0 : 2 * common : 2], y[1 : 2 * common : 2] = 0, 1
    rest, label = (p[common:], 0) if len(p) > common else (q[common:], 1)
    x[2 * common :], y[2 * common :] = rest, label
    return x, y


@DATASETS.register("digit_pair")
def digit_pair(
    *,
    data_dir: str = "data",
    download: bool = False,
    seed: int = 0,
    classes: Sequence[int] = (3, 8),
    test_fraction: float = 0.2,
) -> DataSplits:
    """Digits ``classes[0]`` (label 0) and ``classes[1]`` (label 1) as (1, 8, 8) images.

    Parameters
    ----------
    data_dir : str
        Unused: the data ships with scikit-learn.
    download : bool
        Unused, for the same reason.
    seed : int
        Seed of the split.
    classes : pair of int
        The two digits (0..9, different): P first, then Q.
    test_fraction : float
        Share of the rarer digit's images held out for the server, in (0, 1);
        as many of the other digit's are held out.
    """
    fraction = check_test_fraction(test_fraction)
    pair = [int(c) for c in classes]
    if len(pair) != 2 or pair[0] == pair[1] or not all(0 <= c <= 9 for c in pair):
        raise ConfigError(
            f"digit_pair classes must be two different digits 0..9, got {list(classes)}"
        )
    images, labels = source_arrays()
    rng = np.random.default_rng(int(seed))
    members = [rng.permutation(np.flatnonzero(labels == c)) for c in pair]
    n_test = int(np.floor(min(len(m) for m in members) * fraction + 0.5))
    if n_test == 0 or n_test == min(len(m) for m in members):
        raise DataError(
            f"test_fraction={fraction} leaves an empty "
            f"{'test' if n_test == 0 else 'train'} set for digits {pair}; choose a "
            "value nearer 0.5"
        )
    pixels = np.asarray(images, dtype=np.float32) / np.float32(16.0)

    def split(p_idx: np.ndarray, q_idx: np.ndarray) -> ArrayDataset:
        x, y = _mix(pixels[np.sort(p_idx)], pixels[np.sort(q_idx)])
        return ArrayDataset(x=torch.from_numpy(x), y=torch.from_numpy(y))

    p, q = members
    return DataSplits(
        name="digit_pair",
        train=split(p[n_test:], q[n_test:]),
        test=split(p[:n_test], q[:n_test]),
        input_shape=(1, 8, 8),
        num_classes=1,
    )
