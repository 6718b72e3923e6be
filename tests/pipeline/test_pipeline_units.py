"""Small pure functions of the pipeline and label writer."""

from __future__ import annotations

import numpy as np
import pytest

from cellseg1d.ngff.labels import label_colors
from cellseg1d.pipeline.runner import relabel_sequential


@pytest.mark.parametrize(
    ("labels", "offset", "expected", "n"),
    [
        ([[0, 1, 2], [3, 0, 2]], 4, [[0, 5, 6], [7, 0, 6]], 3),  # already sequential: shifted
        ([[0, 5, 5], [9, 0, 2]], 10, [[0, 12, 12], [13, 0, 11]], 3),  # gaps: compacted in order
        ([[0, 0], [0, 0]], 7, [[0, 0], [0, 0]], 0),
        ([[0, 2**31, 7]], 0, [[0, 2, 1]], 2),  # huge values take the sorting path
    ],
)
def test_relabel_sequential(labels, offset, expected, n) -> None:
    out, count = relabel_sequential(np.array(labels, dtype=np.int64), offset)
    assert out.dtype == np.uint32
    np.testing.assert_array_equal(out, expected)
    assert count == n


def test_label_colors_are_distinct_and_capped() -> None:
    colors = label_colors(50)
    assert [c["label-value"] for c in colors] == list(range(1, 51))
    assert len({tuple(c["rgba"]) for c in colors}) == 50
    assert len(label_colors(10**6)) == 10_000
