"""3x3 convolutions with fewer multiplications: Winograd's minimal filtering F(2x2, 3x3).

Lavin and Gray, "Fast Algorithms for Convolutional Neural Networks" (CVPR 2016).  Most of the
arithmetic of Mask R-CNN is 3x3 stride-1 convolutions: the ResNet's bottleneck and basic
blocks, FPN's output convs, the RPN head (Sec. 3, "Network Architecture") and the mask head's
four convs (Fig. 4).  im2col + GEMM (``conv.py``) spends 9 multiply-adds per output pixel, per
input and output channel.  Winograd's algorithm gets 2x2 outputs from a 4x4 input tile d with
16 products instead of 36, 4 per output pixel, 2.25 times fewer:

    y_tile = A^T [ (G g G^T) * (B^T d B) ] A          g the 3x3 filter, * elementwise

B^T (4x4), G (4x3) and A^T (2x4) are fixed small matrices (``kernels/winograd.py``); the
1-D case shows where they come from: two outputs of a 3-tap filter, y0 = d0 g0 + d1 g1 + d2 g2
and y1 = d1 g0 + d2 g1 + d3 g2, are m1 + m2 + m3 and m2 - m3 - m4 with

    m1 = (d0 - d2) g0                  m2 = (d1 + d2) (g0 + g1 + g2) / 2
    m4 = (d1 - d3) g2                  m3 = (d2 - d1) (g0 - g1 + g2) / 2

four products instead of six; F(2x2, 3x3) nests that in both directions.  Summed over input
channels, the 16 elementwise products of all tiles become 16 matrix products, one per tile
position k = (i, j), which BLAS runs near peak:

    U[k] = (G g G^T)[k]    (O, C)     the filters, transformed once per call
    V[k] = (B^T d B)[k]    (C, T)     T tiles of the input (a band of images at a time)
    M[k] = U[k] @ V[k]     (O, T)     the 16 GEMMs
    y    = A^T M A                     each tile's 2x2 outputs

Every step is linear, so the backward pass is the same steps transposed, in reverse order
(each transform's adjoint is in ``kernels/winograd.py``, tested as one):

    gM = A gy A^T                  the output transform's adjoint
    gU[k] = gM[k] @ V[k]^T  ->  gw = G^T gU G          (the weight gradient)
    gV[k] = U[k]^T @ gM[k]  ->  gx = B gV B^T, tiles added where they overlap

The same numbers as the direct convolution up to rounding: B and A hold only 0 and +-1, G
halves, so in float32 its error against the exact result is of im2col's order (a few 1e-7 of
the output's size for both; ``tests/test_winograd.py`` bounds it).

Bigger tiles save more: F(4x4, 3x3) gets 4x4 outputs from a 6x6 tile with 36 products, 2.25
per output pixel instead of 4 (4x fewer than im2col), and its transforms touch fewer numbers
per pixel; but its matrices hold fractions down to 1/24, and its float32 error is about ten
times F(2x2)'s.  ``winograd_forward(..., tile=4)`` computes it, for forward passes only (no
backward is written for it): ``conv2d``'s "auto" uses it for inference on large maps, where
it took 0.42 of im2col's time on r50_fpn's P2 against F(2x2)'s 0.64.

When it pays: the 16 GEMMs have inner dimension C, not 9C, and each reads and writes its own
(C, T) and (O, T) blocks, so the saving shows on wide convs (many channels) and disappears on
narrow ones, where the transforms' memory traffic is as large as the products.
``conv.WINOGRAD_AUTO`` says where ``Conv2dFn`` uses it on the CPU (measured against im2col at
the presets' sizes; ``minimask bench ops`` has a column for it); the GPU keeps im2col and
cuBLAS.
"""

import numpy as np

from ..kernels import winograd as tiles

# The V and M blocks of one chunk of tiles together take at most this many bytes (bands of
# tile rows of one image when an image needs more), so that the GEMMs read blocks still in
# cache; but a band has at least MIN_CHUNK_TILES tiles, the GEMMs' N.
CHUNK_BYTES = 2 * 2**20
MIN_CHUNK_TILES = 512


def applies(w_shape, stride, padding, dilation):
    """Whether Winograd's F(m x m, 3x3) computes this convolution: a 3x3 kernel, stride 1, no
    dilation, padding at most 2."""
    return tuple(w_shape[2:]) == (3, 3) and tuple(stride) == (1, 1) and tuple(dilation) == (1, 1) \
        and max(padding) <= 2


def _filter_matrix(dtype, g=tiles.G):
    """K (9, a^2), K[(i, j), (p, q)] = G[p, i] G[q, j]: vec(G g G^T) = vec(g) @ K, one GEMM for
    all O C filters instead of two tiny products each (a = 4 for F(2x2, 3x3), 6 for F(4x4))."""
    return np.kron(g, g).T.astype(dtype)


def transform_filters(w, g=tiles.G):
    """U (a^2, O, C) = G g G^T of every filter g of w (O, C, 3, 3); ``g``: G (default) or G4."""
    o, c = w.shape[:2]
    u = w.reshape(o * c, 9) @ _filter_matrix(w.dtype, g)  # (O C, a^2)
    return np.ascontiguousarray(u.T).reshape(-1, o, c)


def transform_filters_adjoint(gu):
    """gw (O, C, 3, 3) = G^T gU G: the adjoint of transform_filters."""
    _, o, c = gu.shape
    return (gu.reshape(16, o * c).T @ _filter_matrix(gu.dtype).T).reshape(o, c, 3, 3)


class _Tiling:
    """The tiles of a 3x3 stride-1 conv over x (N, C, H, W), and the chunks they are done in;
    ``m``: outputs per tile side, 2 for F(2x2, 3x3) or 4 for F(4x4, 3x3)."""

    def __init__(self, x_shape, o, padding, m=2):
        self.n, self.c, self.h, self.w = x_shape
        self.o, self.padding, self.m = o, tuple(padding), m
        self.ho = self.h + 2 * padding[0] - 2
        self.wo = self.w + 2 * padding[1] - 2
        if self.ho < 1 or self.wo < 1:
            raise ValueError(f"conv2d: input size {self.h}x{self.w} with padding {padding} is "
                             f"smaller than the 3x3 kernel: the output would be empty")
        self.th, self.tw = tiles.tile_counts(self.ho, self.wo, m)

    def chunks(self, itemsize):
        """(n0, n1, ty0, ty1): images n0:n1, tile rows ty0:ty1, V and M within the budget but
        at least MIN_CHUNK_TILES tiles (several images, or a band of one image's rows)."""
        per_tile = (self.m + 2) ** 2 * (self.c + self.o) * itemsize
        per_chunk = max(MIN_CHUNK_TILES, CHUNK_BYTES // per_tile)
        if self.th * self.tw <= per_chunk:  # whole images, as many as make up the tiles
            step = max(1, per_chunk // (self.th * self.tw))
            for n0 in range(0, self.n, step):
                yield n0, min(self.n, n0 + step), 0, self.th
            return
        rows = -(-per_chunk // self.tw)
        for b in range(self.n):
            for ty0 in range(0, self.th, rows):
                yield b, b + 1, ty0, min(self.th, ty0 + rows)

    def band(self, xpad, n0, n1, ty0, ty1):
        """The padded rows that tile rows ty0:ty1 of images n0:n1 read (a view)."""
        return xpad[n0:n1, :, self.m * ty0:self.m * ty1 + 2]

    def out_rows(self, ty0, ty1):
        return slice(self.m * ty0, min(self.ho, self.m * ty1))


def winograd_forward(x, w, padding, tile=2):
    """y = conv2d(x, w) for a 3x3 stride-1 conv, by F(2x2, 3x3) (``tile=2``) or F(4x4, 3x3)
    (``tile=4``, forward only: no backward is written for it): M = U @ V, y = A^T M A."""
    if tile not in (2, 4):
        raise ValueError(f"winograd_forward: tile must be 2 or 4, got {tile!r}")
    t = _Tiling(x.shape, w.shape[0], padding, tile)
    u = transform_filters(w, tiles.G if tile == 2 else tiles.G4)
    inputs, outputs = ((tiles.input_tiles, tiles.output_tiles) if tile == 2 else
                       (tiles.input_tiles4, tiles.output_tiles4))
    y = np.empty((t.n, t.o, t.ho, t.wo), dtype=x.dtype)
    for n0, n1, ty0, ty1 in t.chunks(x.itemsize):
        v = inputs(x[n0:n1], padding, ty0, ty1 - ty0, t.tw)
        outputs(np.matmul(u, v), ty1 - ty0, t.tw, y[n0:n1, :, t.out_rows(ty0, ty1)])
    return y


def winograd_backward(x, w, gy, padding, need_x=True, need_w=True):
    """(gx, gw) of y = conv2d(x, w): the forward's steps transposed (see the module docstring)."""
    t = _Tiling(x.shape, w.shape[0], padding)
    ut = np.ascontiguousarray(transform_filters(w).transpose(0, 2, 1)) if need_x else None
    gu = np.zeros((16, t.o, t.c), dtype=x.dtype) if need_w else None
    gxpad = np.zeros((t.n, t.c, 2 * t.th + 2, 2 * t.tw + 2), dtype=x.dtype) if need_x else None
    for n0, n1, ty0, ty1 in t.chunks(x.itemsize):
        nt = ty1 - ty0
        gm = tiles.output_tiles_adjoint(gy[n0:n1, :, t.out_rows(ty0, ty1)], nt, t.tw)
        if need_w:
            v = tiles.input_tiles(x[n0:n1], padding, ty0, nt, t.tw)
            gu += np.matmul(gm, v.transpose(0, 2, 1))
        if need_x:
            tiles.input_tiles_adjoint_add(np.matmul(ut, gm), nt, t.tw, t.band(gxpad, n0, n1, ty0, ty1))
    gx = gw = None
    if need_x:
        ph, pw = t.padding
        gx = np.ascontiguousarray(gxpad[:, :, ph:ph + t.h, pw:pw + t.w])
    if need_w:
        gw = transform_filters_adjoint(gu)
    return gx, gw


__all__ = ["applies", "winograd_forward", "winograd_backward", "transform_filters",
           "transform_filters_adjoint"]
