"""Shared fixtures. Built-in datasets go to one per-session cache, so the build is tested too."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest


@pytest.fixture(scope="session", autouse=True)
def data_cache(tmp_path_factory) -> Path:
    cache = tmp_path_factory.mktemp("distres-cache")
    os.environ["DISTRES_CACHE"] = str(cache)
    return cache


@pytest.fixture(scope="session", autouse=True)
def no_wandb_unless_asked():
    # W&B's start-up costs seconds per run; the tests about W&B (test_tracking, test_slurm)
    # clear this for their own runs, the others train without it.
    os.environ["WANDB_MODE"] = "disabled"


@pytest.fixture(scope="session")
def digits_dirs(data_cache) -> tuple[Path, Path]:
    from distres.data.shards.digits import digits

    return digits()


@pytest.fixture
def test_rng(request) -> random.Random:
    """The random choices of a test (kill points, ...): seeded, the seed shown on failure.
    DISTRES_TEST_SEED=N replays a failed run's choices."""
    seed = int(os.environ.get("DISTRES_TEST_SEED") or random.SystemRandom().randrange(2**31))
    request.node.user_properties.append(("seed", seed))
    return random.Random(seed)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    seeds = [v for k, v in item.user_properties if k == "seed"]
    if report.failed and seeds:
        report.sections.append(
            (
                "test seed",
                f"replay with DISTRES_TEST_SEED={seeds[0]} python3 -m pytest {item.nodeid}",
            )
        )
    return report


def pytest_collection_modifyitems(config, items):
    """`gpu` tests need a CUDA device; elsewhere they are skipped, saying where they run."""
    import torch

    if torch.cuda.is_available() or os.environ.get("DISTRES_GPU_TESTS_ON") == "cpu":
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (bench/gpu_session.sh runs it)")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)
