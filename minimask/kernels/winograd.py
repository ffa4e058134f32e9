"""The tile transforms of Winograd's minimal filtering F(2x2, 3x3), as NumPy and as Numba loops.

``functional/winograd.py`` explains the algorithm (Lavin and Gray, 2016): a 3x3 stride-1
convolution computed on 4x4 input tiles d, two pixels apart, as

    y_tile (2x2) = A^T [ (G g G^T) * (B^T d B) ] A          (* elementwise, 16 products)

These are the linear maps around the 16 products, and their adjoints (what backward needs):

    input_tiles        V[k, c, t]  = (B^T d_t B)[k]      d_t: the 4x4 tile t of the padded image
    input_tiles_adjoint  gxpad     += B gV_t B^T          (tiles overlap by 2: their sums add)
    output_tiles       y_t         = A^T M_t A            (the 2x2 output tile t)
    output_tiles_adjoint gM_t      = A gy_t A^T

k = 4 i + j runs over the 16 tile positions, t over the tiles of a band of images, numbered
image by image, then row by row: t = (b (th) + ty) tw + tx.  The padded image xpad is the
input with ``padding`` zeros on top and left and enough on the bottom and right for whole
tiles (2 th + 2 rows, 2 tw + 2 columns).

Layers, each tested against the one before (``tests/test_winograd.py``): the transforms as
matrix products over every tile at once (``*_reference``, NumPy: they read like the formulas
and also run on CuPy), and the Numba loops, which write each product out as the few adds and
subtracts it is (B, A and their transposes hold only 0 and +-1).  One thread, as the im2col
loops and for the same reason (``kernels/im2col.py``).
"""

import numpy as np
from numba import njit, prange

from ..backend import get_array_module

# ---- the matrices (Lavin and Gray, Sec. 4.1) ------------------------------------------------
BT = np.array([[1, 0, -1, 0],
               [0, 1, 1, 0],
               [0, -1, 1, 0],
               [0, 1, 0, -1]], dtype=np.float64)
G = np.array([[1, 0, 0],
              [0.5, 0.5, 0.5],
              [0.5, -0.5, 0.5],
              [0, 0, 1]], dtype=np.float64)
AT = np.array([[1, 1, 1, 0],
               [0, 1, -1, -1]], dtype=np.float64)


def tile_counts(ho, wo):
    """(th, tw): 2x2 output tiles covering an ho x wo output (the last row / column of tiles
    hangs over by one where ho / wo is odd; those outputs are computed and dropped)."""
    return (ho + 1) // 2, (wo + 1) // 2


def padded_tiles(x, padding, th, tw):
    """x (m, C, H, W) zero-padded to (m, C, 2 th + 2, 2 tw + 2): ``padding`` zeros on top and
    left, the rest on the bottom and right (cut where x is larger than its tiles need)."""
    m, c, h, w = x.shape
    ph, pw = padding
    hp, wp = 2 * th + 2, 2 * tw + 2
    out = get_array_module(x).zeros((m, c, hp, wp), dtype=x.dtype)
    hh, ww = min(h, hp - ph), min(w, wp - pw)
    out[:, :, ph:ph + hh, pw:pw + ww] = x[:, :, :hh, :ww]
    return out


# ---- 1. the reference: every tile at once, as matrix products ------------------------------
def _tiles_view(xpad, th, tw):
    """(m, C, th, tw, 4, 4) view of the overlapping 4x4 tiles, two pixels apart."""
    m, c = xpad.shape[:2]
    s = xpad.strides
    return np.lib.stride_tricks.as_strided(
        xpad, (m, c, th, tw, 4, 4), (s[0], s[1], 2 * s[2], 2 * s[3], s[2], s[3]), writeable=False)


def input_tiles_reference(xpad, th, tw):
    """V (16, C, m th tw) = B^T d B for every 4x4 tile d of xpad (m, C, 2 th + 2, 2 tw + 2)."""
    m, c = xpad.shape[:2]
    bt = BT.astype(xpad.dtype)
    v = bt @ _tiles_view(xpad, th, tw) @ bt.T  # (m, C, th, tw, 4, 4)
    return np.ascontiguousarray(v.transpose(4, 5, 1, 0, 2, 3)).reshape(16, c, m * th * tw)


def input_tiles_adjoint_reference(gv, m, th, tw):
    """gxpad (m, C, 2 th + 2, 2 tw + 2): every tile's B gV B^T added onto the pixels it read."""
    c = gv.shape[1]
    bt = BT.astype(gv.dtype)
    gd = bt.T @ gv.reshape(4, 4, c, m, th, tw).transpose(3, 2, 4, 5, 0, 1) @ bt  # (m, C, th, tw, 4, 4)
    gxpad = np.zeros((m, c, 2 * th + 2, 2 * tw + 2), dtype=gv.dtype)
    for i in range(4):  # tiles overlap: add one tile position at a time (each a strided slice)
        for j in range(4):
            gxpad[:, :, i:i + 2 * th:2, j:j + 2 * tw:2] += gd[..., i, j]
    return gxpad


def output_tiles_reference(mt, m, th, tw, ho, wo):
    """y (m, O, ho, wo) from the products M (16, O, m th tw): A^T M_t A per tile, cut to ho x wo."""
    o = mt.shape[1]
    at = AT.astype(mt.dtype)
    y = at @ mt.reshape(4, 4, o, m, th, tw).transpose(3, 2, 4, 5, 0, 1) @ at.T  # (m, O, th, tw, 2, 2)
    y = y.transpose(0, 1, 2, 4, 3, 5).reshape(m, o, 2 * th, 2 * tw)
    return np.ascontiguousarray(y[:, :, :ho, :wo])


def output_tiles_adjoint_reference(gy, th, tw):
    """gM (16, O, m th tw) = A gy_t A^T for every 2x2 tile of gy (m, O, ho, wo), zero past its edge."""
    m, o, ho, wo = gy.shape
    g = np.zeros((m, o, 2 * th, 2 * tw), dtype=gy.dtype)
    g[:, :, :ho, :wo] = gy
    g = g.reshape(m, o, th, 2, tw, 2).transpose(0, 1, 2, 4, 3, 5)  # (m, O, th, tw, 2, 2)
    at = AT.astype(gy.dtype)
    gm = at.T @ g @ at  # (m, O, th, tw, 4, 4)
    return np.ascontiguousarray(gm.transpose(4, 5, 1, 0, 2, 3)).reshape(16, o, m * th * tw)


# ---- 2. the Numba loops: one tile at a time, the products written out as adds --------------
# B^T, B, A^T and A hold only 0 and +-1, so each product with a 4-vector is a few adds:
#     B^T (d0, d1, d2, d3) = (d0 - d2, d1 + d2, d2 - d1, d1 - d3)
#     B   (v0, v1, v2, v3) = (v0, v1 - v2 + v3, v1 + v2 - v0, -v3)
#     A^T (m0, m1, m2, m3) = (m0 + m1 + m2, m1 - m2 - m3)
#     A   (g0, g1)         = (g0, g0 + g1, g0 - g1, -g1)
# and a 4x4 transform X^T d X is that map on each column of d, then on each row of the result.
@njit(cache=True, parallel=True)
def _input_tiles_numba(xpad, th, tw, out):
    # Row-wise: first B^T down the columns, for a whole row of tiles at once (four row
    # combinations), then B^T along each of those rows, tile by tile; the inner loops run over
    # pixels and tiles, consecutive in memory (SIMD-friendly).
    m, c, wp = xpad.shape[0], xpad.shape[1], xpad.shape[3]
    for bc in prange(m * c):  # one image channel per task: no two write one pixel
        b, ch = bc // c, bc % c
        p = np.empty((4, wp), dtype=xpad.dtype)
        for ty in range(th):
            r = 2 * ty
            for q in range(wp):  # P = B^T d for every tile of the row
                d1, d2 = xpad[b, ch, r + 1, q], xpad[b, ch, r + 2, q]
                p[0, q] = xpad[b, ch, r, q] - d2
                p[1, q] = d1 + d2
                p[2, q] = d2 - d1
                p[3, q] = d1 - xpad[b, ch, r + 3, q]
            t0 = (b * th + ty) * tw
            for i in range(4):  # V = P B, row i of each tile's P
                for tx in range(tw):
                    q = 2 * tx
                    p1, p2 = p[i, q + 1], p[i, q + 2]
                    out[4 * i, ch, t0 + tx] = p[i, q] - p2
                    out[4 * i + 1, ch, t0 + tx] = p1 + p2
                    out[4 * i + 2, ch, t0 + tx] = p2 - p1
                    out[4 * i + 3, ch, t0 + tx] = p1 - p[i, q + 3]


@njit(cache=True, parallel=True)
def _input_tiles_adjoint_numba(gv, th, tw, gxpad):
    m, c = gxpad.shape[0], gxpad.shape[1]
    for bc in prange(m * c):  # one image channel per task: no two write one pixel
        b, ch = bc // c, bc % c
        q = np.empty((4, 4), dtype=gv.dtype)
        img = gxpad[b, ch]
        for ty in range(th):
            for tx in range(tw):
                t = (b * th + ty) * tw + tx
                for j in range(4):  # Q = B gV, a column at a time
                    v0 = gv[j, ch, t]
                    v1 = gv[4 + j, ch, t]
                    v2 = gv[8 + j, ch, t]
                    v3 = gv[12 + j, ch, t]
                    q[0, j], q[1, j], q[2, j], q[3, j] = v0, v1 - v2 + v3, v1 + v2 - v0, -v3
                for i in range(4):  # gd = Q B^T, a row at a time, added onto the tile
                    r = 2 * ty + i
                    img[r, 2 * tx] += q[i, 0]
                    img[r, 2 * tx + 1] += q[i, 1] - q[i, 2] + q[i, 3]
                    img[r, 2 * tx + 2] += q[i, 1] + q[i, 2] - q[i, 0]
                    img[r, 2 * tx + 3] -= q[i, 3]


@njit(cache=True, parallel=True)
def _output_tiles_numba(mt, th, tw, ho, wo, y):
    m, o = y.shape[0], y.shape[1]
    for bc in prange(m * o):  # one image channel per task: no two write one pixel
        b, oc = bc // o, bc % o
        s = np.empty((2, 4), dtype=mt.dtype)
        img = y[b, oc]
        for ty in range(th):
            for tx in range(tw):
                t = (b * th + ty) * tw + tx
                for j in range(4):  # S = A^T M, a column at a time
                    m0 = mt[j, oc, t]
                    m1 = mt[4 + j, oc, t]
                    m2 = mt[8 + j, oc, t]
                    m3 = mt[12 + j, oc, t]
                    s[0, j], s[1, j] = m0 + m1 + m2, m1 - m2 - m3
                for i in range(2):  # y_t = S A, a row at a time; the overhang is dropped
                    r = 2 * ty + i
                    if r < ho:
                        img[r, 2 * tx] = s[i, 0] + s[i, 1] + s[i, 2]
                        if 2 * tx + 1 < wo:
                            img[r, 2 * tx + 1] = s[i, 1] - s[i, 2] - s[i, 3]


@njit(cache=True, parallel=True)
def _output_tiles_adjoint_numba(gy, th, tw, out):
    m, o, ho, wo = gy.shape
    zero = np.zeros(1, dtype=gy.dtype)[0]
    for bc in prange(m * o):  # one image channel per task: no two write one pixel
        b, oc = bc // o, bc % o
        r2 = np.empty((4, 2), dtype=gy.dtype)
        img = gy[b, oc]
        for ty in range(th):
            for tx in range(tw):
                t = (b * th + ty) * tw + tx
                for j in range(2):  # R = A gy_t, a column at a time (zero past the edge)
                    col = 2 * tx + j
                    g0 = img[2 * ty, col] if col < wo else zero
                    g1 = img[2 * ty + 1, col] if (col < wo and 2 * ty + 1 < ho) else zero
                    r2[0, j], r2[1, j], r2[2, j], r2[3, j] = g0, g0 + g1, g0 - g1, -g1
                for i in range(4):  # gM_t = R A^T, a row at a time
                    out[4 * i, oc, t] = r2[i, 0]
                    out[4 * i + 1, oc, t] = r2[i, 0] + r2[i, 1]
                    out[4 * i + 2, oc, t] = r2[i, 0] - r2[i, 1]
                    out[4 * i + 3, oc, t] = -r2[i, 1]


def input_tiles(xpad, th, tw, out=None):
    """V (16, C, m th tw) of xpad (m, C, 2 th + 2, 2 tw + 2), a NumPy array or a view of one
    (``out``: filled instead of a new array)."""
    m, c = xpad.shape[:2]
    if out is None:
        out = np.empty((16, c, m * th * tw), dtype=xpad.dtype)
    _input_tiles_numba(xpad, th, tw, out)
    return out


def input_tiles_adjoint_add(gv, th, tw, gxpad):
    """gxpad (m, C, 2 th + 2, 2 tw + 2) += every tile's B gV_t B^T, in place (it may be a view)."""
    _input_tiles_adjoint_numba(np.ascontiguousarray(gv), th, tw, gxpad)
    return gxpad


def output_tiles(mt, th, tw, y):
    """Fill y (m, O, ho, wo) (it may be a view) with A^T M_t A of the products mt (16, O, m th tw)."""
    _output_tiles_numba(np.ascontiguousarray(mt), th, tw, y.shape[2], y.shape[3], y)
    return y


def output_tiles_adjoint(gy, th, tw, out=None):
    """gM (16, O, m th tw) = A gy_t A^T of gy (m, O, ho, wo), a NumPy array (``out``: filled)."""
    m, o = gy.shape[:2]
    if out is None:
        out = np.empty((16, o, m * th * tw), dtype=gy.dtype)
    _output_tiles_adjoint_numba(np.ascontiguousarray(gy), th, tw, out)
    return out
