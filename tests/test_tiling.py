"""tiling.tile_starts: the one tile planner."""
import pytest

import tiling


@pytest.mark.parametrize("length,tile,overlap,expected", [
    (64, 64, 0, [0]), (40, 64, 0, [0]), (128, 64, 0, [0, 64]), (136, 64, 0, [0, 64, 72]),
    (100, 64, 16, [0, 36]), (200, 64, 16, [0, 48, 96, 136]),
])
def test_tile_starts(length, tile, overlap, expected):
    starts = tiling.tile_starts(length, tile, overlap)
    assert starts == expected
    covered = set()
    for s in starts:
        covered.update(range(s, min(s + tile, length)))
    assert covered == set(range(length))


def test_bad_overlap_is_refused():
    with pytest.raises(ValueError, match="overlap"):
        tiling.tile_starts(100, 64, 64)
