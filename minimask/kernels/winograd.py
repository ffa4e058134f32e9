"""The tile transforms of Winograd's minimal filtering, F(2x2, 3x3) (section 2, with their
adjoints) and F(4x4, 3x3) (section 3, forward only), as NumPy and as Numba loops.

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
from numba import njit

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


def tile_counts(ho, wo, m=2):
    """(th, tw): m x m output tiles covering an ho x wo output (the last row / column of tiles
    hangs over where m does not divide ho / wo; those outputs are computed and dropped)."""
    return -(-ho // m), -(-wo // m)


def padded_tiles(x, padding, th, tw):
    """x (m, C, H, W) zero-padded to (m, C, 2 th + 2, 2 tw + 2): ``padding`` zeros on top and
    left, the rest on the bottom and right (what the references read; the loops pad as they go)."""
    m, c, h, w = x.shape
    ph, pw = padding
    out = get_array_module(x).zeros((m, c, 2 * th + 2, 2 * tw + 2), dtype=x.dtype)
    out[:, :, ph:ph + h, pw:pw + w] = x
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


# ---- 2. the Numba loops: a row of tiles at a time, the products written out as adds --------
# B^T, B, A^T and A hold only 0 and +-1, so each product with a 4-vector is a few adds:
#     B^T (d0, d1, d2, d3) = (d0 - d2, d1 + d2, d2 - d1, d1 - d3)
#     B   (v0, v1, v2, v3) = (v0, v1 - v2 + v3, v1 + v2 - v0, -v3)
#     A^T (m0, m1, m2, m3) = (m0 + m1 + m2, m1 - m2 - m3)
#     A   (g0, g1)         = (g0, g0 + g1, g0 - g1, -g1)
# and a 4x4 transform X^T d X is that map down each column of d, then along each row of the
# result.  Each loop works on one row of tiles of one channel in two passes over scratch rows,
# so that every inner loop runs over consecutive tiles (consecutive in V and M) or pixels: SIMD
# code, about as fast as copying the arrays.  (One tile at a time, with the 16 values in a 4x4
# scratch, was 2-5 times slower.)  One thread, as the im2col loops: a parallel loop was slower
# here even on two idle cores.
@njit(cache=True, inline="always")
def _padded_rows(x, b, ch, r0, pw, cols, d):
    """d[i] = padded row r0 + i of image b, channel ch (zero outside x; d's columns outside
    pw .. pw + cols are zero already and stay so)."""
    h = x.shape[2]
    for i in range(d.shape[0]):
        r = r0 + i
        if 0 <= r < h:
            for j in range(cols):
                d[i, pw + j] = x[b, ch, r, j]
        else:
            for j in range(cols):
                d[i, pw + j] = 0


@njit(cache=True)
def _input_tiles_numba(x, ph, pw, ty0, nt, tw, out):
    # Reads the unpadded input: each tile row's four padded rows are copied into a scratch
    # (zeros where they hang over the border), so no padded copy of the whole input is made.
    m, c, w = x.shape[0], x.shape[1], x.shape[3]
    wp = 2 * tw + 2
    cols = min(w, wp - pw)  # the columns of x that tiles read
    d = np.zeros((4, wp), dtype=x.dtype)
    p = np.empty((4, wp), dtype=x.dtype)
    for b in range(m):
        for ch in range(c):
            for ty in range(nt):
                _padded_rows(x, b, ch, 2 * (ty0 + ty) - ph, pw, cols, d)  # rows r0 .. r0 + 3
                for q in range(wp):  # pass 1: P = B^T d down the columns, the whole row at once
                    p[0, q] = d[0, q] - d[2, q]
                    p[1, q] = d[1, q] + d[2, q]
                    p[2, q] = d[2, q] - d[1, q]
                    p[3, q] = d[1, q] - d[3, q]
                t0 = (b * nt + ty) * tw
                for i in range(4):  # pass 2: V = P B along the rows, tile by tile
                    for tx in range(tw):
                        q = 2 * tx
                        p1, p2 = p[i, q + 1], p[i, q + 2]
                        out[4 * i, ch, t0 + tx] = p[i, q] - p2
                        out[4 * i + 1, ch, t0 + tx] = p1 + p2
                        out[4 * i + 2, ch, t0 + tx] = p2 - p1
                        out[4 * i + 3, ch, t0 + tx] = p1 - p[i, q + 3]


@njit(cache=True)
def _input_tiles_adjoint_numba(gv, th, tw, gxpad):
    m, c = gxpad.shape[0], gxpad.shape[1]
    gd = np.empty((16, tw), dtype=gv.dtype)
    for b in range(m):
        for ch in range(c):
            for ty in range(th):
                t0 = (b * th + ty) * tw
                for j in range(4):  # pass 1: Q = B gV down the columns, then gd = Q B^T
                    for tx in range(tw):
                        v0, v1 = gv[j, ch, t0 + tx], gv[4 + j, ch, t0 + tx]
                        v2, v3 = gv[8 + j, ch, t0 + tx], gv[12 + j, ch, t0 + tx]
                        gd[j, tx] = v0  # column j of Q, kept in gd's rows until the next pass
                        gd[4 + j, tx] = v1 - v2 + v3
                        gd[8 + j, tx] = v1 + v2 - v0
                        gd[12 + j, tx] = -v3
                for i in range(4):
                    for tx in range(tw):  # row i of Q -> row i of gd = B applied along it
                        q0, q1 = gd[4 * i, tx], gd[4 * i + 1, tx]
                        q2, q3 = gd[4 * i + 2, tx], gd[4 * i + 3, tx]
                        gd[4 * i, tx] = q0
                        gd[4 * i + 1, tx] = q1 - q2 + q3
                        gd[4 * i + 2, tx] = q1 + q2 - q0
                        gd[4 * i + 3, tx] = -q3
                    # pass 2: add row i of every tile onto padded row 2 ty + i.  Tiles overlap by
                    # two columns: column 2 t gets column 0 of tile t and column 2 of tile t - 1.
                    r = 2 * ty + i
                    gxpad[b, ch, r, 0] += gd[4 * i, 0]
                    gxpad[b, ch, r, 1] += gd[4 * i + 1, 0]
                    for tx in range(1, tw):
                        gxpad[b, ch, r, 2 * tx] += gd[4 * i, tx] + gd[4 * i + 2, tx - 1]
                        gxpad[b, ch, r, 2 * tx + 1] += gd[4 * i + 1, tx] + gd[4 * i + 3, tx - 1]
                    gxpad[b, ch, r, 2 * tw] += gd[4 * i + 2, tw - 1]
                    gxpad[b, ch, r, 2 * tw + 1] += gd[4 * i + 3, tw - 1]


@njit(cache=True)
def _output_tiles_numba(mt, th, tw, ho, wo, y):
    m, o = y.shape[0], y.shape[1]
    s = np.empty((8, tw), dtype=mt.dtype)
    row = np.empty(2 * tw, dtype=mt.dtype)
    for b in range(m):
        for oc in range(o):
            for ty in range(th):
                t0 = (b * th + ty) * tw
                for j in range(4):  # pass 1: S = A^T M down the columns, tile by tile
                    for tx in range(tw):
                        m1, m2 = mt[4 + j, oc, t0 + tx], mt[8 + j, oc, t0 + tx]
                        s[j, tx] = mt[j, oc, t0 + tx] + m1 + m2
                        s[4 + j, tx] = m1 - m2 - mt[12 + j, oc, t0 + tx]
                for i in range(2):  # pass 2: y_t = S A along the rows; the overhang is dropped
                    r = 2 * ty + i
                    if r >= ho:
                        break
                    for tx in range(tw):
                        s1, s2 = s[4 * i + 1, tx], s[4 * i + 2, tx]
                        row[2 * tx] = s[4 * i, tx] + s1 + s2
                        row[2 * tx + 1] = s1 - s2 - s[4 * i + 3, tx]
                    for q in range(wo):
                        y[b, oc, r, q] = row[q]


@njit(cache=True)
def _output_tiles_adjoint_numba(gy, th, tw, out):
    m, o, ho, wo = gy.shape
    e = np.zeros((2, 2 * tw), dtype=gy.dtype)  # two rows of gy, zero past its right edge
    rr = np.empty((8, tw), dtype=gy.dtype)
    for b in range(m):
        for oc in range(o):
            for ty in range(th):
                for i in range(2):  # the tile row's two rows of gy (zero past the bottom)
                    r = 2 * ty + i
                    for q in range(wo):
                        e[i, q] = gy[b, oc, r, q] if r < ho else 0
                for tx in range(tw):  # pass 1: R = A g_t down the two columns of each tile
                    a0, a1, b0, b1 = e[0, 2 * tx], e[0, 2 * tx + 1], e[1, 2 * tx], e[1, 2 * tx + 1]
                    rr[0, tx], rr[1, tx] = a0, a1
                    rr[2, tx], rr[3, tx] = a0 + b0, a1 + b1
                    rr[4, tx], rr[5, tx] = a0 - b0, a1 - b1
                    rr[6, tx], rr[7, tx] = -b0, -b1
                t0 = (b * th + ty) * tw
                for i in range(4):  # pass 2: gM_t = R A^T along each row: (r0, r0 + r1, r0 - r1, -r1)
                    for tx in range(tw):
                        r0, r1 = rr[2 * i, tx], rr[2 * i + 1, tx]
                        out[4 * i, oc, t0 + tx] = r0
                        out[4 * i + 1, oc, t0 + tx] = r0 + r1
                        out[4 * i + 2, oc, t0 + tx] = r0 - r1
                        out[4 * i + 3, oc, t0 + tx] = -r1


def input_tiles(x, padding, ty0, nt, tw, out=None):
    """V (16, C, m nt tw) of tile rows ty0 .. ty0 + nt - 1 of x (m, C, H, W), a NumPy array or
    a view of one, zero-padded by ``padding`` on top and left (and as needed bottom and right):
    the same as ``input_tiles_reference`` of those rows of ``padded_tiles(x, ...)``.
    ``out``: filled instead of a new array."""
    m, c = x.shape[:2]
    if out is None:
        out = np.empty((16, c, m * nt * tw), dtype=x.dtype)
    _input_tiles_numba(x, padding[0], padding[1], ty0, nt, tw, out)
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


# ---- 3. F(4x4, 3x3): bigger tiles, for forward passes only ---------------------------------
# 6x6 input tiles four pixels apart give 4x4 outputs from 36 products: 2.25 per output pixel
# instead of F(2x2, 3x3)'s 4 (and im2col's 9).  The matrices (Lavin and Gray, Sec. 4.2) hold
# 4, 5, 8 and fractions down to 1/24, so float32 rounding grows: about ten times F(2x2)'s error
# (``tests/test_winograd.py`` bounds it), harmless for inference and not used for training.
BT4 = np.array([[4, 0, -5, 0, 1, 0],
                [0, -4, -4, 1, 1, 0],
                [0, 4, -4, -1, 1, 0],
                [0, -2, -1, 2, 1, 0],
                [0, 2, -1, -2, 1, 0],
                [0, 4, 0, -5, 0, 1]], dtype=np.float64)
G4 = np.array([[1 / 4, 0, 0],
               [-1 / 6, -1 / 6, -1 / 6],
               [-1 / 6, 1 / 6, -1 / 6],
               [1 / 24, 1 / 12, 1 / 6],
               [1 / 24, -1 / 12, 1 / 6],
               [0, 0, 1]], dtype=np.float64)
AT4 = np.array([[1, 1, 1, 1, 1, 0],
                [0, 1, -1, 2, -2, 0],
                [0, 1, 1, 4, 4, 0],
                [0, 1, -1, 8, -8, 1]], dtype=np.float64)


def input_tiles4_reference(xpad, th, tw):
    """V (36, C, m th tw) = B^T d B for every 6x6 tile d of xpad (m, C, 4 th + 2, 4 tw + 2)."""
    m, c = xpad.shape[:2]
    s = xpad.strides
    d = np.lib.stride_tricks.as_strided(
        xpad, (m, c, th, tw, 6, 6), (s[0], s[1], 4 * s[2], 4 * s[3], s[2], s[3]), writeable=False)
    bt = BT4.astype(xpad.dtype)
    v = bt @ d @ bt.T
    return np.ascontiguousarray(v.transpose(4, 5, 1, 0, 2, 3)).reshape(36, c, m * th * tw)


def output_tiles4_reference(mt, m, th, tw, ho, wo):
    """y (m, O, ho, wo) from the products M (36, O, m th tw): A^T M_t A per tile, cut to ho x wo."""
    o = mt.shape[1]
    at = AT4.astype(mt.dtype)
    y = at @ mt.reshape(6, 6, o, m, th, tw).transpose(3, 2, 4, 5, 0, 1) @ at.T  # (m, O, th, tw, 4, 4)
    y = y.transpose(0, 1, 2, 4, 3, 5).reshape(m, o, 4 * th, 4 * tw)
    return np.ascontiguousarray(y[:, :, :ho, :wo])


# The loops have the two-pass shape of section 2, with B^T and A^T written out:
#     B^T (d0..d5) = (4 d0 - 5 d2 + d4,  -4 d1 - 4 d2 + d3 + d4,  4 d1 - 4 d2 - d3 + d4,
#                     -2 d1 - d2 + 2 d3 + d4,  2 d1 - d2 - 2 d3 + d4,  4 d1 - 5 d3 + d5)
#     A^T (m0..m5) = (m0 + m1 + m2 + m3 + m4,  m1 - m2 + 2 m3 - 2 m4,
#                     m1 + m2 + 4 m3 + 4 m4,  m1 - m2 + 8 m3 - 8 m4 + m5)
# with the sums the rows share computed once (rows 1 and 2 of B^T are t0 + t1 and t0 - t1 for
# t0 = d4 - 4 d2, t1 = d3 - 4 d1; rows 3 and 4 likewise).  The constants are float32: in
# Numba an integer literal times a float32 is a float64, and with plain 4, 5, 2, 8 every
# F(4x4) transform of float32 arrays ran in double precision, with a conversion at each end
# (float64 arrays stay float64 either way).
@njit(cache=True, inline="always")
def _bt4(d0, d1, d2, d3, d4, d5):
    two, four, five = np.float32(2), np.float32(4), np.float32(5)
    t0, t1 = d4 - four * d2, d3 - four * d1
    t2, t3 = d4 - d2, two * (d3 - d1)
    return (four * d0 - five * d2 + d4, t0 + t1, t0 - t1, t2 + t3, t2 - t3, four * d1 - five * d3 + d5)


@njit(cache=True, inline="always")
def _at4(m0, m1, m2, m3, m4, m5):
    two, four, eight = np.float32(2), np.float32(4), np.float32(8)
    a, b, c, e = m1 + m2, m1 - m2, m3 + m4, m3 - m4
    return m0 + a + c, b + two * e, a + four * c, b + eight * e + m5


@njit(cache=True)
def _input_tiles4_numba(x, ph, pw, ty0, nt, tw, out):
    m, c, w = x.shape[0], x.shape[1], x.shape[3]
    wp = 4 * tw + 2
    cols = min(w, wp - pw)
    d = np.zeros((6, wp), dtype=x.dtype)
    p = np.empty((6, wp), dtype=x.dtype)
    for b in range(m):
        for ch in range(c):
            for ty in range(nt):
                _padded_rows(x, b, ch, 4 * (ty0 + ty) - ph, pw, cols, d)  # rows r0 .. r0 + 5
                for q in range(wp):  # pass 1: P = B^T d down the columns, the whole row at once
                    p[0, q], p[1, q], p[2, q], p[3, q], p[4, q], p[5, q] = _bt4(
                        d[0, q], d[1, q], d[2, q], d[3, q], d[4, q], d[5, q])
                t0 = (b * nt + ty) * tw
                for i in range(6):  # pass 2: V = P B along the rows, tile by tile
                    for tx in range(tw):
                        q = 4 * tx
                        v0, v1, v2, v3, v4, v5 = _bt4(p[i, q], p[i, q + 1], p[i, q + 2],
                                                      p[i, q + 3], p[i, q + 4], p[i, q + 5])
                        out[6 * i, ch, t0 + tx] = v0
                        out[6 * i + 1, ch, t0 + tx] = v1
                        out[6 * i + 2, ch, t0 + tx] = v2
                        out[6 * i + 3, ch, t0 + tx] = v3
                        out[6 * i + 4, ch, t0 + tx] = v4
                        out[6 * i + 5, ch, t0 + tx] = v5


@njit(cache=True)
def _output_tiles4_numba(mt, th, tw, ho, wo, y):
    m, o = y.shape[0], y.shape[1]
    s = np.empty((24, tw), dtype=mt.dtype)
    row = np.empty(4 * tw, dtype=mt.dtype)
    for b in range(m):
        for oc in range(o):
            for ty in range(th):
                t0 = (b * th + ty) * tw
                for j in range(6):  # pass 1: S = A^T M down the columns, tile by tile
                    for tx in range(tw):
                        t = t0 + tx
                        s[j, tx], s[6 + j, tx], s[12 + j, tx], s[18 + j, tx] = _at4(
                            mt[j, oc, t], mt[6 + j, oc, t], mt[12 + j, oc, t],
                            mt[18 + j, oc, t], mt[24 + j, oc, t], mt[30 + j, oc, t])
                for i in range(4):  # pass 2: y_t = S A along the rows; the overhang is dropped
                    r = 4 * ty + i
                    if r >= ho:
                        break
                    for tx in range(tw):
                        row[4 * tx], row[4 * tx + 1], row[4 * tx + 2], row[4 * tx + 3] = _at4(
                            s[6 * i, tx], s[6 * i + 1, tx], s[6 * i + 2, tx],
                            s[6 * i + 3, tx], s[6 * i + 4, tx], s[6 * i + 5, tx])
                    for q in range(wo):
                        y[b, oc, r, q] = row[q]


def input_tiles4(x, padding, ty0, nt, tw, out=None):
    """F(4x4, 3x3)'s V (36, C, m nt tw), as ``input_tiles`` (tile rows four pixels apart)."""
    m, c = x.shape[:2]
    if out is None:
        out = np.empty((36, c, m * nt * tw), dtype=x.dtype)
    _input_tiles4_numba(x, padding[0], padding[1], ty0, nt, tw, out)
    return out


def output_tiles4(mt, th, tw, y):
    """Fill y (m, O, ho, wo) with F(4x4, 3x3)'s A^T M_t A of the products mt (36, O, m th tw)."""
    _output_tiles4_numba(np.ascontiguousarray(mt), th, tw, y.shape[2], y.shape[3], y)
    return y
