"""The one tile planner: regular tiles along an axis, the last one shifted inward to stay full size.

Used by build_lmdb.py (tiles stored in a database), the reader and the tiled predictor (inference
and the test pass), each of which derives what it needs (owned or kept ranges) from these starts.
"""


def tile_starts(length, tile, overlap=0):
    """Start offsets of tiles of size ``tile`` covering [0, length), neighbours sharing ``overlap``.

    Tiles advance by ``tile - overlap``; the last tile is shifted inward so it ends at ``length``
    (it may then share more than ``overlap`` with its neighbour). An axis no longer than one tile
    gives the single start 0.
    """
    if tile < 1 or not 0 <= overlap < tile:
        raise ValueError(f"tile {tile} with overlap {overlap}: need tile >= 1 and 0 <= overlap < tile")
    if length <= tile:
        return [0]
    return list(range(0, length - tile, tile - overlap)) + [length - tile]
