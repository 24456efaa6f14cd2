"""gather_pages copies exactly the chosen pages, whether they come in runs or scattered."""

from __future__ import annotations

import numpy as np
import pytest

from snapvisor.image.gather import gather_pages


@pytest.mark.parametrize(
    "pages",
    [
        [],
        [5],
        list(range(10, 40)) + list(range(100, 164)) + [250],  # runs: copied run by run
        [1, 3, 7, 9, 11, 200, 255],  # scattered: gathered
    ],
)
def test_gather_copies_the_listed_pages(pages: list[int]) -> None:
    rng = np.random.default_rng(3)
    live = rng.integers(0, 256, (256, 4096), dtype=np.uint8)
    chosen = np.array(pages, dtype=np.int64)
    out = np.zeros((len(chosen) + 2, 4096), dtype=np.uint8)
    gather_pages(live, chosen, out)
    assert np.array_equal(out[: len(chosen)], live[chosen])
    assert not out[len(chosen) :].any()
