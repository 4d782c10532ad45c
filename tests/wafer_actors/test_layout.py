import numpy as np
import pytest

from wafer_actors import Layout, LayoutError, Mesh, Spec, gather, scatter

MESH = Mesh(2, 3)


@pytest.mark.parametrize(
    "spec",
    [Spec("y", "x"), Spec("x", "y"), Spec(None, "x"), Spec("y", None), Spec(("y", "x"), None), Spec(("x", "y"), None), Spec(None, None)],
)
def test_scatter_and_gather_are_inverses(spec):
    """Loading a tensor and reading it back gives it unchanged, for every kind of spec."""
    a = np.arange(6 * 6 * 2, dtype=np.float32).reshape(6, 6, 2)
    layout = Layout(MESH, Spec(*spec, None))
    blocks = scatter(a, layout)
    assert blocks.shape == (2, 3) + layout.block_shape(a.shape)
    np.testing.assert_array_equal(gather(blocks, layout, a.shape), a)


def test_split_gives_each_core_its_block_and_replicates_the_rest():
    """Spec('y', None): core (y, x) holds row block y, the same on every x."""
    a = np.arange(6 * 4).reshape(6, 4)
    blocks = scatter(a, Layout(MESH, Spec("y", None)))
    for y in range(2):
        for x in range(3):
            np.testing.assert_array_equal(blocks[y, x], a[3 * y : 3 * y + 3])


def test_split_over_both_axes_is_major_to_minor():
    """Spec(('y', 'x')) numbers the blocks y-major: core (y, x) holds block y * width + x."""
    a = np.arange(12)
    blocks = scatter(a, Layout(MESH, Spec(("y", "x"))))
    for y in range(2):
        for x in range(3):
            np.testing.assert_array_equal(blocks[y, x], a[2 * (3 * y + x) : 2 * (3 * y + x) + 2])


def test_layout_errors_name_the_rule():
    """Unknown or repeated mesh axes, rank mismatches and uneven splits are refused clearly."""
    with pytest.raises(LayoutError, match=r"unknown mesh axis 'z'"):
        Layout(MESH, Spec("z", None))
    with pytest.raises(LayoutError, match=r"mesh axis 'y' is used twice"):
        Layout(MESH, Spec("y", "y"))
    with pytest.raises(LayoutError, match=r"shape \(4,\) has 1 axes but Spec\('y', None\) has 2"):
        Layout(MESH, Spec("y", None)).block_shape((4,))
    with pytest.raises(LayoutError, match=r"size 4 cannot be split over mesh axes \('x',\).*pad it to 6"):
        Layout(MESH, Spec(None, "x")).block_shape((2, 4))


def test_repr_reads_back_as_code():
    """A layout prints as the expression that builds it."""
    assert repr(Layout(MESH, Spec("y", None))) == "Layout(Mesh(height=2, width=3), Spec('y', None))"
