import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import LocalCluster  # noqa: E402


@pytest.fixture
def cluster(tmp_path):
    """A fresh, empty cluster namespace; start workers with cluster.bootstrap()."""
    c = LocalCluster(tmp_path)
    yield c
    c.close()


@pytest.fixture
def make_cluster(tmp_path):
    """Factory for clusters with settings overrides: make_cluster(scale_window=5)."""
    made = []

    def make(**overrides):
        c = LocalCluster(tmp_path / f"c{len(made)}", **overrides)
        made.append(c)
        return c
    yield make
    for c in made:
        c.close()
