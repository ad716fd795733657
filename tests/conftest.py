"""Shared test set-up: deterministic, single-threaded, offline, loopback only."""

from __future__ import annotations

import os

# Set before torch/ray are imported anywhere in the test session: 2-core CI machines
# oversubscribe badly with one intra-op thread pool per process.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import torch  # noqa: E402

torch.set_num_threads(1)
