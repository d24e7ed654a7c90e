"""Test-suite settings: one torch thread per test process.

The suite runs on 2-core CI machines; with torch's default thread count,
training tests oversubscribe the cores and run many times slower.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch

torch.set_num_threads(1)
