"""kernels/im2col.py: the Numba column loops against the plain reference and the slice copies."""

import numpy as np
import pytest

from minimask.functional.conv import ConvGeometry, col2im, im2col
from minimask.kernels.im2col import col2im_reference, col2im_rows_add, im2col_reference, im2col_rows

# x shape, kernel, stride, padding, dilation
CASES = [
    ((2, 3, 5, 6), (3, 3), (1, 1), (1, 1), (1, 1)),
    ((2, 3, 7, 7), (3, 3), (2, 2), (1, 1), (1, 1)),     # stride 2 on odd sizes
    ((1, 2, 9, 8), (3, 3), (1, 1), (2, 2), (2, 2)),     # dilation 2
    ((2, 3, 6, 7), (2, 3), (2, 1), (1, 0), (1, 1)),     # non-square everything
    ((2, 2, 4, 4), (5, 5), (1, 1), (2, 2), (1, 1)),     # kernel larger than the image
    ((1, 2, 11, 10), (7, 7), (2, 2), (3, 3), (1, 1)),   # the ResNet stem's 7x7/2
    ((2, 2, 3, 3), (3, 3), (3, 3), (4, 4), (1, 1)),     # whole output rows and columns in the padding
    ((1, 2, 6, 5), (2, 2), (2, 2), (0, 0), (1, 1)),     # the mask head's deconv geometry
    ((2, 3, 4, 14), (3, 3), (1, 1), (1, 1), (1, 1)),    # "same" convs (the one-copy path) ...
    ((1, 2, 3, 3), (3, 3), (1, 1), (4, 4), (4, 4)),     # ... whose dilated taps miss the image
    ((1, 2, 5, 4), (5, 3), (1, 1), (1, 1), (1, 1)),     # ... "same" in width only
]


@pytest.mark.parametrize("xs, kernel, stride, padding, dilation", CASES)
def test_reference_matches_slices(rng, xs, kernel, stride, padding, dilation):
    """The entry-by-entry reference agrees with conv.py's slice copies (both ways)."""
    x = rng.standard_normal(xs)
    cols = im2col_reference(x, kernel, stride, padding, dilation)
    np.testing.assert_array_equal(cols, im2col(x, kernel, stride, padding, dilation))
    c = rng.standard_normal(cols.shape)
    np.testing.assert_allclose(col2im_reference(c, xs, kernel, stride, padding, dilation),
                               col2im(c, xs, kernel, stride, padding, dilation), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("xs, kernel, stride, padding, dilation", CASES)
def test_numba_matches_reference(rng, dtype, xs, kernel, stride, padding, dilation):
    """Whole images and bands of output rows; col2im adds in the slice version's order (same bits)."""
    x = rng.standard_normal(xs).astype(dtype)
    g = ConvGeometry(xs[2:], kernel, stride, padding, dilation)
    ref = im2col_reference(x, kernel, stride, padding, dilation)
    c = rng.standard_normal(ref.shape).astype(dtype)
    expected = col2im(c, xs, kernel, stride, padding, dilation)  # slices: the bits to match
    by_row = ref.reshape(xs[0], -1, g.ho, g.wo)
    for band in (g.ho, 1, 2):
        gx = np.zeros(xs, dtype)
        for u0 in range(0, g.ho, band):
            u1 = min(g.ho, u0 + band)
            part = im2col_rows(x, kernel, stride, padding, dilation, u0, u1, g.wo)
            assert part.dtype == dtype
            np.testing.assert_array_equal(part, by_row[:, :, u0:u1].reshape(part.shape))
            c_band = np.ascontiguousarray(c.reshape(xs[0], -1, g.ho, g.wo)[:, :, u0:u1]).reshape(part.shape)
            col2im_rows_add(gx, c_band, kernel, stride, padding, dilation, u0, u1, g.wo)
        if band == g.ho:
            np.testing.assert_array_equal(gx, expected)
        np.testing.assert_allclose(gx, col2im_reference(c, xs, kernel, stride, padding, dilation),
                                   rtol=1e-5 if dtype == np.float32 else 1e-12, atol=1e-5)


def test_numba_adds_onto_what_is_there(rng):
    """col2im_rows_add accumulates into gx (conv's bands rely on it) and fills ``out`` if given."""
    xs, args = (2, 3, 6, 6), ((3, 3), (1, 1), (1, 1), (1, 1))
    g = ConvGeometry(xs[2:], *args)
    x = rng.standard_normal(xs)
    out = np.full((2, 27, g.ho * g.wo), np.nan)
    assert im2col_rows(x, *args, 0, g.ho, g.wo, out=out) is out
    np.testing.assert_array_equal(out, im2col_reference(x, *args))
    start = rng.standard_normal(xs)
    gx = start.copy()
    col2im_rows_add(gx, out, *args, 0, g.ho, g.wo)
    np.testing.assert_allclose(gx, start + col2im_reference(out, xs, *args), rtol=1e-12)


def test_numba_reads_views(rng):
    """A non-contiguous input (a channel slice) gives the columns of its copy."""
    x = rng.standard_normal((2, 6, 5, 5))[:, ::2]
    args = ((3, 3), (1, 1), (1, 1), (1, 1))
    expected = im2col_reference(np.ascontiguousarray(x), *args)
    np.testing.assert_array_equal(im2col_rows(x, *args, 0, 5, 5), expected)
    with pytest.raises(ValueError, match="C-contiguous"):
        col2im_rows_add(np.zeros((2, 6, 5, 5))[:, ::2], np.zeros((2, 27, 25)), *args, 0, 5, 5)
