"""Drawings with matplotlib: detections (Fig. 2 and 5 of the paper), boxes, masks, keypoint
skeletons (Fig. 7), loss curves.

Every function draws on a matplotlib ``Axes`` you pass as ``ax``; without one it makes a new
figure with pyplot (handy in a notebook).  The commands pass their own ``Figure`` (no pyplot,
no GUI backend), so they run on a server with no display.

Arrays may be NumPy or CuPy (they are copied to the CPU to draw).  Images are drawn with
nearest-neighbour interpolation, so an enlarged image shows its pixels as they are (a 128 px
shapes image saved at 512 px is 4 x 4 blocks of one colour, not a blur), and box labels are
placed so that they do not cover each other (``label_positions``).

    ax = draw_detections(image, pred["boxes"], pred["labels"], pred["scores"], pred["masks"],
                         class_names=("circle", "triangle", "square"))
"""

import math

import numpy as np

from .backend import to_device


def _cpu(a):
    return None if a is None else np.asarray(to_device(a, "cpu"))


def _axes(ax, image=None):
    """``ax``, or a new pyplot figure's axes sized to the image."""
    if ax is not None:
        return ax
    import matplotlib.pyplot as plt

    h, w = (image.shape[:2] if image is not None else (480, 640))
    scale = 6.0 / max(h, w)
    _, ax = plt.subplots(figsize=(max(3.0, w * scale), max(3.0, h * scale)))
    return ax


def colors(n, seed=0):
    """``n`` distinct RGB colours in [0, 1] (tab20, then random ones), the same for a given seed."""
    import matplotlib

    tab20 = np.asarray(matplotlib.colormaps["tab20"].colors)
    base = np.concatenate([tab20[::2], tab20[1::2]])  # the 10 strong colours, then their light twins
    if n <= len(base):
        return base[:n]
    extra = np.random.default_rng(seed).uniform(0.2, 1.0, size=(n - len(base), 3))
    return np.concatenate([base, extra])


def display_scale(height, width, min_long_side=512):
    """The whole factor by which to enlarge an image so that its longer side is at least
    ``min_long_side`` pixels (1 for an image that is large enough).  A whole factor keeps every
    pixel the same size on screen."""
    return max(1, math.ceil(min_long_side / max(int(height), int(width), 1)))


def show_image(image, ax=None):
    """Show an (H, W, 3) uint8 RGB (or float) image without axes ticks, pixels as blocks.

    Pixel (i, j) covers [j, j+1] x [i, i+1] on the axes (``extent``), the coordinates boxes are
    in (a box around pixels 0..w-1 ends at x = w); imshow's default would centre it on (j, i) and
    put every box half a pixel off its object."""
    image = _cpu(image)
    ax = _axes(ax, image)
    h, w = image.shape[:2]
    ax.imshow(image, interpolation="nearest", extent=(0, w, h, 0))
    ax.set_axis_off()
    return ax


def show_masks(image, masks, ax=None, alpha=0.5, colours=None):
    """Overlay (N, H, W) masks on ``image`` (or on a black image if it is None), one
    translucent colour per mask.  Drawn as one RGBA layer, so 100 masks cost one ``imshow``."""
    masks = _cpu(masks).astype(bool)
    if masks.ndim != 3:
        raise ValueError(f"show_masks: expected (N, H, W) masks, got shape {masks.shape}")
    if image is None:
        image = np.zeros(masks.shape[1:] + (3,), np.uint8)
    image = _cpu(image)
    if masks.shape[1:] != image.shape[:2]:
        raise ValueError(f"show_masks: masks are {masks.shape[1:]} but the image is {image.shape[:2]}")
    ax = show_image(image, ax)
    colours = colors(len(masks)) if colours is None else np.asarray(colours, dtype=float)
    layer = np.zeros(image.shape[:2] + (4,))
    for m, c in zip(masks, colours):  # later masks on top, as they would be drawn
        layer[m, :3] = c[:3]
        layer[m, 3] = alpha
    ax.imshow(layer, interpolation="nearest", extent=(0, image.shape[1], image.shape[0], 0))
    return ax


def _overlap(a, b):
    """Area shared by two (x1, y1, x2, y2) rectangles."""
    return max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))


def label_positions(boxes, sizes, bounds=None):
    """Where to put each box's label so that labels do not cover each other: (N, 4) rectangles
    ``x1, y1, x2, y2`` in the boxes' coordinates (y growing downwards, as in an image).

    boxes: (N, 4) xyxy; sizes: (N, 2) width and height of each label; bounds: optional
    ``x1, y1, x2, y2`` the labels must stay in.  Labels are placed in order (pass the most
    important first, e.g. by score), each at the first spot that overlaps no label placed before
    it: above the box, inside its top, below it, inside its bottom, then one and two label
    heights further out (or in), each at the box's left and then its right edge; if every spot
    overlaps, the one that overlaps least.
    """
    boxes = np.asarray(boxes, dtype=float).reshape(-1, 4)
    sizes = np.asarray(sizes, dtype=float).reshape(-1, 2)
    placed = []
    for (x1, y1, x2, y2), (w, h) in zip(boxes, sizes):
        spots = []
        rows = [y for k in range(3) for y in (y1 - (k + 1) * h, y1 + k * h, y2 + k * h, y2 - (k + 1) * h)]
        for y in rows:
            for x in (x1, x2 - w):
                if bounds is not None:  # slide the label back inside, keeping the box's side
                    x, y = min(max(x, bounds[0]), bounds[2] - w), min(max(y, bounds[1]), bounds[3] - h)
                spots.append((x, y, x + w, y + h))
        costs = [sum(_overlap(s, p) for p in placed) for s in spots]
        placed.append(spots[int(np.argmin(costs))])  # argmin: the first spot of least overlap
    return np.array(placed, dtype=float).reshape(-1, 4)


def _place_texts(ax, boxes, texts, fontsize, pad):
    """Label rectangles in data coordinates for ``texts`` on ``boxes``, worked out on the screen
    (display pixels) so that they hold for any axes orientation and zoom."""
    fig = ax.figure
    to_screen = ax.transData
    corners = to_screen.transform(boxes.reshape(-1, 2)).reshape(-1, 4)
    # On the screen y grows upwards: flip it so that "above the box" means smaller y as in an image.
    top = fig.bbox.height
    xs, ys = corners[:, 0::2], top - corners[:, 1::2]
    screen = np.stack([xs.min(1), ys.min(1), xs.max(1), ys.max(1)], axis=1)
    px = fig.dpi / 72.0  # pixels per point
    # DejaVu Sans, matplotlib's default font: about 0.6 em per character, 1.2 em per line.
    sizes = np.array([[(0.6 * fontsize * len(t) + 2 * pad) * px, (1.2 * fontsize + 2 * pad) * px]
                      for t in texts]).reshape(-1, 2)
    a = ax.bbox
    rects = label_positions(screen, sizes, bounds=(a.x0, top - a.y1, a.x1, top - a.y0))
    back = to_screen.inverted()
    # The label's top-left corner on the screen, back in data coordinates.
    return back.transform(np.stack([rects[:, 0] + pad * px, top - rects[:, 1] - pad * px], axis=1))


def draw_boxes(image, boxes, labels=None, ax=None, colours=None, linewidth=1.5, texts=None):
    """Draw xyxy ``boxes`` (anchors, proposals, ground truth) on ``image`` (None: use ``ax`` as is).

    labels: optional class per box, giving each class its own colour;
    texts:  optional string per box, written by its box where it covers no earlier text
            (``label_positions``: give the boxes in order of importance, e.g. by score).
    """
    from matplotlib.patches import Rectangle

    boxes = _cpu(boxes).reshape(-1, 4)
    if image is not None:
        ax = show_image(image, ax)
    ax = _axes(ax)
    if colours is None:
        if labels is not None:
            labels = _cpu(labels).reshape(-1).astype(int)
            palette = colors(int(labels.max(initial=0)) + 1)
            colours = palette[labels]
        else:
            colours = colors(len(boxes))
    colours = np.atleast_2d(np.asarray(colours, dtype=float))[:, :3]
    for i, (x1, y1, x2, y2) in enumerate(boxes):
        c = colours[i % len(colours)]
        ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=c, linewidth=linewidth))
    if texts is not None and len(boxes):
        fontsize, pad = 8, 1.0
        anchors = _place_texts(ax, boxes, [str(t) for t in texts], fontsize, pad)
        for i, (x, y) in enumerate(anchors):
            ax.text(x, y, texts[i], fontsize=fontsize, color="white", ha="left", va="top", clip_on=True,
                    bbox=dict(facecolor=colours[i % len(colours)], alpha=0.8, pad=pad, edgecolor="none"))
    return ax


def draw_keypoints(keypoints, skeleton=(), ax=None, colours=None, image=None, markersize=3.0, linewidth=1.5):
    """Keypoints (N, J, 3) as x, y, v (COCO's triplets; v > 0 drawn) with their skeleton: the
    1-based pairs of keypoints joined by a limb (a category's ``skeleton``), as in Fig. 7 of the
    paper.  Each instance in its own colour; a limb is drawn when both its ends are labelled."""
    keypoints = _cpu(keypoints).reshape(-1, *(_cpu(keypoints).shape[-2:]))
    if image is not None:
        ax = show_image(image, ax)
    ax = _axes(ax)
    colours = colors(len(keypoints)) if colours is None else np.atleast_2d(np.asarray(colours, dtype=float))
    for n, kp in enumerate(keypoints):
        c = colours[n % len(colours)][:3]
        seen = kp[:, 2] > 0
        for a, b in skeleton:
            if seen[a - 1] and seen[b - 1]:
                ax.plot(kp[[a - 1, b - 1], 0], kp[[a - 1, b - 1], 1], color=c, linewidth=linewidth)
        ax.plot(kp[seen, 0], kp[seen, 1], "o", color=c, markersize=markersize, markeredgecolor="white",
                markeredgewidth=0.5)
    return ax


def draw_detections(image, boxes, labels, scores=None, masks=None, class_names=None, ax=None,
                    score_thresh=0.0, alpha=0.45, keypoints=None, skeleton=()):
    """Detections as in the paper's figures: each instance a colour, its mask translucent, its
    box outlined, and "name 0.93" above the box.  ``class_names[k - 1]`` names label ``k``
    (label 0 is background); without names the label number is written.  ``keypoints``
    (N, J, 3), if given, are drawn with ``skeleton`` (rows with every v = 0 draw nothing)."""
    boxes = _cpu(boxes).reshape(-1, 4)
    labels = _cpu(labels).reshape(-1).astype(int)
    scores = np.ones(len(boxes)) if scores is None else _cpu(scores).reshape(-1)
    keep = scores >= score_thresh
    boxes, labels, scores = boxes[keep], labels[keep], scores[keep]
    colours = colors(len(boxes))
    if masks is not None:
        ax = show_masks(image, _cpu(masks)[keep], ax=ax, alpha=alpha, colours=colours)
    else:
        ax = show_image(image, ax)

    def name(k):
        if class_names is not None and 1 <= k <= len(class_names):
            return class_names[k - 1]
        return str(k)

    texts = [f"{name(k)} {s:.2f}" for k, s in zip(labels, scores)]
    ax = draw_boxes(None, boxes, ax=ax, colours=colours, texts=texts)
    if keypoints is not None and keep.any():
        draw_keypoints(_cpu(keypoints)[keep], skeleton, ax=ax, colours=colours)
    return ax


def plot_losses(records, ax=None, smooth=20):
    """Loss curves from ``metrics.jsonl`` records (dicts with ``iter`` and ``loss_*``/``total``).

    Each term is drawn faintly as logged and boldly as a running mean over ``smooth``
    iterations (single iterations are noisy: each sees a different batch).  Log scale, since
    the losses fall by orders of magnitude."""
    ax = _axes(ax)
    if not records:
        ax.set_title("no iterations logged")
        return ax
    its = np.array([r["iter"] for r in records])
    keys = [k for k in records[0] if k.startswith("loss") or k == "total"]
    for k, c in zip(keys, colors(len(keys))):
        y = np.array([r.get(k, np.nan) for r in records], dtype=float)
        ax.plot(its, y, color=c, alpha=0.25, linewidth=0.8)
        w = max(1, min(smooth, len(y)))
        mean = np.convolve(y, np.ones(w) / w, mode="valid")
        ax.plot(its[w - 1:], mean, color=c, linewidth=2 if k == "total" else 1.2, label=k)
    ax.set_yscale("log")
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss")
    ax.legend(fontsize=8)
    ax.grid(True, alpha=0.3)
    return ax


def new_figure(width=6.0, height=6.0):
    """A matplotlib ``Figure`` not tied to pyplot (no display needed); ``fig.savefig(path)``."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height))


__all__ = ["draw_detections", "draw_keypoints", "draw_boxes", "show_masks", "show_image", "plot_losses",
           "colors", "new_figure", "display_scale", "label_positions"]
