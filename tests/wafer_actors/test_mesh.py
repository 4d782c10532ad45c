import numpy as np
import pytest

from wafer_actors.mesh import NO_CORE, Core, Dir, Mesh, Tiling, parse_grid, split_tiles


def test_shift_gives_sources_and_destinations_with_open_edges():
    """Like MPI Cart_shift: partners along the axis, NO_CORE past an open edge."""
    m = Mesh(3, 5)
    src, dst = m.shift("x", 1)
    np.testing.assert_array_equal(src, [NO_CORE, 0, 1, 2, 3])
    np.testing.assert_array_equal(dst, [1, 2, 3, 4, NO_CORE])
    src, dst = m.shift("y", -1, wrap=True)
    np.testing.assert_array_equal(src, [1, 2, 0])
    np.testing.assert_array_equal(dst, [2, 0, 1])


def test_directions_follow_csl_convention():
    """y grows SOUTH and x grows EAST."""
    assert (Dir.SOUTH.dy, Dir.EAST.dx, Dir.NORTH.dy, Dir.WEST.dx) == (1, 1, -1, -1)
    assert repr(Core(y=3, x=5)) == "Core(y=3, x=5)"


@pytest.mark.parametrize("tiles", [(1, 1), (2, 2), (3, 3), (2, 3), (7, 5)])
def test_tiles_cover_the_mesh_once_with_near_equal_sides(tiles):
    """Every core belongs to exactly one tile, and uneven splits differ by one core at most."""
    m = Mesh(7, 5)
    t = Tiling(m, tiles)
    count = np.zeros(m.shape, int)
    for r in t.rects:
        count[r.y0 : r.y1, r.x0 : r.x1] += 1
        assert (t.owner[r.y0 : r.y1, r.x0 : r.x1] == r.index).all()
    assert (count == 1).all()
    heights = {r.shape[0] for r in t.rects}
    widths = {r.shape[1] for r in t.rects}
    assert max(heights) - min(heights) <= 1 and max(widths) - min(widths) <= 1


def test_more_tiles_than_cores_is_refused():
    """A tile must own at least one core along each axis."""
    with pytest.raises(ValueError, match=r"cannot split 5 cores along x into 6 tiles; use at most 5"):
        split_tiles(Mesh(7, 5), (1, 6))
    with pytest.raises(ValueError, match=r"positive integer, got 0"):
        split_tiles(Mesh(7, 5), (0, 1))


def test_grid_text_parses_and_rejects():
    """'4x8' means 4 rows by 8 columns; anything else is refused."""
    assert parse_grid("4x8") == (4, 8)
    with pytest.raises(ValueError, match=r"ROWSxCOLS"):
        parse_grid("4by8")
