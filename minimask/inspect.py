"""Inside a trained model, stage by stage: ``minimask inspect`` (what matterport's ``inspect_model``
notebooks show, as a command).

A tool, not part of the engine: it opens the model up (its transform, backbone, RPN and heads),
where the engine only calls a model's public methods (docs/architecture.md).

For each image, the test-time path of the paper (Sec. 3.1, "Inference") is run with the model's
own parts, in the order ``MaskRCNN.predict`` runs them, and every stage is kept and drawn:

    model.transform          the resized, normalized, zero-padded input (drawn un-normalized)
    model.backbone           each FPN level P2..P6: the mean over channels of its activation
    model.rpn.head           an objectness logit per anchor: the top anchors by objectness; with
                             ground truth, each object's positive anchors (the RPN's own matcher:
                             IoU >= 0.7, or the object's best anchors, Faster R-CNN Sec. 3.1.2)
    rpn.filter_proposals     the proposals: per-level top-k, decoded, clipped, NMS per level
    poolers                  the FPN level each proposal (RoI) is pooled from (FPN Eq. 1,
                             ``assign_boxes_to_levels`` with the pooler's canonical size)
    roi_heads.detect_boxes   detections: class, score, class-specific box, per-class NMS
    roi_heads.detect_masks   their masks; then every class's 28x28 mask probabilities of the top
                             detections (the branch predicts one mask per class, Sec. 3)
    transform.postprocess    back to the image's pixels, masks pasted and binarized at 0.5

``inspect_image`` returns all of it as NumPy arrays with counts and timings; ``save_sheet``
draws one PNG sheet of it; ``summary_lines`` says it in a few lines of text; ``inspect_files``
does all three for image files, as the command does.  The detections are checked against
``model.predict`` on the same image, so the sheet shows what the model really does.
"""

import json
import math
import os
import time

import numpy as np

from .backend import get_array_module, to_device
from .models.mask_head import mask_probabilities
from .models.poolers import assign_boxes_to_levels
from .models.rpn import flatten_predictions
from .ops import box_iou
from .tensor import Tensor, no_grad


def _cpu(a):
    return None if a is None else np.asarray(to_device(a, "cpu"))


class _Clock:
    """Wall time per stage in ms; on the GPU each stage waits for its kernels before it is read."""

    def __init__(self):
        self.times = {}
        self.t = time.perf_counter()

    def lap(self, name, *arrays):
        for a in arrays:
            xp = get_array_module(a)
            if xp is not np:
                xp.cuda.Device().synchronize()
        now = time.perf_counter()
        self.times[name] = 1e3 * (now - self.t)
        self.t = now


def inspect_image(model, image, target=None, top_anchors=50, top_masks=3):
    """Run ``model`` (a ``MaskRCNN``) on one (H, W, 3) uint8 ``image`` stage by stage.

    target: optional ground truth of the image (a data set's target: ``boxes``, ``labels``,
    ``masks``), for the positive anchors of each object.  Returns a dict of NumPy arrays (boxes
    in the resized image's pixels unless said otherwise), counts and ``times`` (ms per stage).
    """
    cfg = model.cfg
    heads = model.roi_heads
    was_training = model.training
    model.eval()
    try:
        with no_grad():
            clock = _Clock()
            batch, sizes, targets = model.transform([image], None if target is None else [target])
            clock.lap("transform", batch)
            features = model.backbone(Tensor(batch))
            clock.lap("backbone", features[-1].data)
            objectness, deltas = model.rpn.head(features)
            anchors = model.rpn.anchors(batch.shape[-2:], features)
            obj_flat, deltas_flat = flatten_predictions(objectness, deltas)
            clock.lap("rpn head", obj_flat.data)
            proposals, proposal_scores, proposal_levels = model.rpn.filter_proposals(
                obj_flat.data, deltas_flat.data, anchors, sizes)
            clock.lap("proposals", proposals[0])
            pyramid = list(features)[:len(heads.strides)]  # the heads read P2..P5
            results = heads.detect_boxes(pyramid, proposals, sizes)
            clock.lap("box head", results[0]["boxes"])
            top_logits = None
            if cfg.mask_on:
                heads.detect_masks(pyramid, results)
                clock.lap("mask head", results[0]["mask_probs"])
                top = results[0]["boxes"][:top_masks]
                if len(top):  # every class's logits of the top detections (detect keeps one class's)
                    pooled = heads.mask_roi_pool(pyramid, [top])
                    top_logits = heads.mask_predictor(heads.mask_head(pooled)).data
            if cfg.keypoint_on:
                heads.detect_keypoints(pyramid, results)
                clock.lap("keypoint head", results[0]["keypoints"])
            final = model.transform.postprocess(results, sizes, [tuple(image.shape[:2])])[0]
            clock.lap("postprocess", final["boxes"])
    finally:
        model.train(was_training)

    counts = [len(a) for a in anchors]
    all_anchors = np.concatenate([_cpu(a) for a in anchors])
    logits = _cpu(obj_flat.data)[0]
    order = np.argsort(-logits, kind="stable")[:top_anchors]
    anchor_level = np.repeat(np.arange(len(counts)), counts)
    out = {
        "image": np.asarray(image),
        "batch": _cpu(batch)[0],
        "resized_size": tuple(int(v) for v in sizes[0]),
        "features": [_cpu(f.data)[0].mean(axis=0) for f in features],
        "strides": [int(round(batch.shape[-1] / f.shape[-1])) for f in features],
        "fpn_names": [f"P{int(round(math.log2(batch.shape[-1] / f.shape[-1])))}" for f in features],
        "anchors_per_level": counts,
        "top_anchors": all_anchors[order],
        "top_anchor_scores": 1.0 / (1.0 + np.exp(-logits[order])),
        "top_anchor_levels": anchor_level[order],
        "proposals": _cpu(proposals[0]),
        "proposal_scores": _cpu(proposal_scores[0]),
        "proposal_levels": _cpu(proposal_levels[0]),
        "detections": {k: _cpu(v) for k, v in final.items()},
        "times": clock.times,
    }
    # The RoIs at test time are the proposals; the box pooler says which level reads each.
    pool = heads.box_roi_pool
    levels = [int(round(math.log2(s))) for s in heads.strides]
    out["roi_levels"] = _cpu(assign_boxes_to_levels(proposals[0], levels[0], levels[-1],  # 0: the first
                                                    pool.canonical_box_size, pool.canonical_level))
    out["roi_level_names"] = [f"P{k}" for k in range(levels[0], levels[-1] + 1)]
    if targets is not None:
        gt = targets[0]["boxes"]
        out["gt_boxes"] = _cpu(gt)
        out["gt_labels"] = _cpu(targets[0]["labels"])
        out["positive_anchors"] = []
        if len(gt):
            on_device = get_array_module(anchors[0]).concatenate(anchors, axis=0)
            matched = _cpu(model.rpn.matcher(box_iou(gt.astype(on_device.dtype), on_device)))
            out["positive_anchors"] = [all_anchors[matched == k] for k in range(len(gt))]
    if top_logits is not None:
        labels = results[0]["labels"][:top_masks]
        xp = get_array_module(labels)
        channels = [0] if cfg.class_agnostic_masks else list(range(1, cfg.num_classes))
        per_class = [_cpu(mask_probabilities(top_logits, xp.full(labels.shape, c, dtype=labels.dtype),
                                             cfg.mask_loss, cfg.class_agnostic_masks)) for c in channels]
        out["mask_probs_per_class"] = np.stack(per_class, axis=1) if per_class else None  # (D, C, m, m)
        out["mask_classes"] = channels
        out["top_boxes_resized"] = _cpu(results[0]["boxes"][:top_masks])
    return out


# ---------------------------------------------------------------- the text summary


def _per_level(levels, names):
    """Counts of ``levels`` (indices into ``names``) as "P2 12, P3 4, ..."."""
    counts = np.bincount(np.asarray(levels, dtype=np.int64), minlength=len(names))
    return ", ".join(f"{n} {c}" for n, c in zip(names, counts))


def summary_lines(stages, class_names=(), score_thresh=0.5, name="image"):
    """A few lines of text: the count at every stage, and the time each took."""
    def cls(k):
        return class_names[k - 1] if 1 <= k <= len(class_names) else str(int(k))

    fpn, rois = stages["fpn_names"], stages["roi_level_names"]
    counts = stages["anchors_per_level"]
    h, w = stages["image"].shape[:2]
    (rh, rw), (bh, bw) = stages["resized_size"], stages["batch"].shape[1:]
    det = stages["detections"]
    kept = det["scores"] >= score_thresh
    found = ", ".join(f"{cls(k)} {s:.2f}" for k, s in zip(det["labels"][kept][:8], det["scores"][kept][:8]))
    found += ", ..." if kept.sum() > 8 else ""
    top = stages["top_anchor_scores"]
    lines = [f"{name}: {h}x{w} pixels, resized to {rh}x{rw}, batch {bh}x{bw}",
             f"anchors: {sum(counts)} ({', '.join(f'{n} {c}' for n, c in zip(fpn, counts))})",
             f"top {len(top)} anchors by objectness: {_per_level(stages['top_anchor_levels'], fpn)}; "
             f"objectness {top.max(initial=0.0):.3f} down to {top.min(initial=1.0):.3f}"]
    if "positive_anchors" in stages:
        positives = [len(p) for p in stages["positive_anchors"]]
        lines.append(f"ground truth: {len(positives)} objects; positive anchors per object: {positives}")
    times, proposals = stages["times"], stages["proposals"]
    lines += [f"proposals after NMS: {len(proposals)} ({_per_level(stages['proposal_levels'], fpn)})",
              f"RoIs pooled from: {_per_level(stages['roi_levels'], rois)}",
              f"detections: {int(kept.sum())} of {len(kept)} score >= {score_thresh:g}: {found or 'none'}",
              "times (ms): " + ", ".join(f"{k} {v:.1f}" for k, v in times.items())
              + f"; total {sum(times.values()):.1f}"]
    if "same_as_predict" in stages:
        lines.append("detections equal model.predict's: " + ("yes" if stages["same_as_predict"] else "NO"))
    return lines


# ---------------------------------------------------------------- the sheet


def _input_image(stages, cfg, padded=False):
    """The model's input batch turned back into an RGB image in [0, 1] (un-normalized)."""
    x = stages["batch"].transpose(1, 2, 0) * np.asarray(cfg.image_std) + np.asarray(cfg.image_mean)
    if not padded:
        h, w = stages["resized_size"]
        x = x[:h, :w]
    return np.clip(x, 0.0, 1.0)


def _blank(ax, text):
    ax.set_axis_off()
    ax.text(0.5, 0.5, text, ha="center", va="center", fontsize=10, transform=ax.transAxes, wrap=True)


def save_sheet(stages, path, cfg, class_names=(), score_thresh=0.5, panel_px=512, summary=None):
    """Draw ``stages`` (``inspect_image``'s dict) as one PNG sheet at ``path``.

    Six panels a row, each ``panel_px`` pixels wide, images drawn with nearest-neighbour pixels:
    the input and P2..P6; the top anchors, each object's positive anchors, the proposals, the
    RoIs by pooling level, the detections and the summary text; then one row per top detection:
    its crop of the input and its mask probabilities for each class (the predicted one first).
    """
    import textwrap

    import matplotlib

    from .viz import colors, draw_boxes, draw_detections, new_figure, show_image

    cols, dpi = 6, 100
    per_class = stages.get("mask_probs_per_class")
    mask_rows = 0 if per_class is None else len(per_class)
    side = panel_px / dpi
    fig = new_figure(cols * side, (2 + 0.75 * mask_rows) * side)
    grid = fig.add_gridspec(2 + mask_rows, cols, height_ratios=[1, 1] + [0.75] * mask_rows,
                            left=0.01, right=0.99, top=0.97, bottom=0.01, wspace=0.06, hspace=0.22)
    h, w = stages["resized_size"]
    inp = _input_image(stages, cfg)
    title = dict(fontsize=11)

    # Row 1: what the backbone sees, and what each pyramid level makes of it.
    ax = fig.add_subplot(grid[0, 0])
    show_image(_input_image(stages, cfg, padded=True), ax)
    bh, bw = stages["batch"].shape[1:]
    ax.set_title(f"input: resized {h}x{w}, padded {bh}x{bw}", **title)
    levels = zip(stages["features"][:cols - 1], stages["strides"], stages["fpn_names"])
    for k, (fmap, stride, name) in enumerate(levels):
        ax = fig.add_subplot(grid[0, k + 1])
        ax.imshow(fmap, cmap="viridis", interpolation="nearest")
        ax.set_axis_off()
        ax.set_title(f"{name} mean activation ({fmap.shape[0]}x{fmap.shape[1]}, stride {stride})", **title)

    # Row 2: the RPN, the proposals, the pooling levels, the detections.
    ax = fig.add_subplot(grid[1, 0])
    scores = stages["top_anchor_scores"]
    spread = max(float(np.ptp(scores)) if len(scores) else 0.0, 1e-6)
    ramp = matplotlib.colormaps["plasma"]((scores - scores.min(initial=1.0)) / spread)
    draw_boxes(inp, stages["top_anchors"][::-1], ax=ax, colours=ramp[::-1], linewidth=1.0)  # best on top
    ax.set_xlim(-0.5, w - 0.5), ax.set_ylim(h - 0.5, -0.5)
    ax.set_title(f"top {len(scores)} anchors by objectness (bright: higher)", **title)

    ax = fig.add_subplot(grid[1, 1])
    if "positive_anchors" in stages:
        palette = colors(max(len(stages["positive_anchors"]), 1))
        show_image(inp, ax)
        draw_boxes(None, stages["gt_boxes"], ax=ax, colours=[(1.0, 1.0, 1.0)], linewidth=2.5)
        for k, boxes in enumerate(stages["positive_anchors"]):
            draw_boxes(None, boxes, ax=ax, colours=[palette[k]], linewidth=1.2)
        ax.set_xlim(-0.5, w - 0.5), ax.set_ylim(h - 0.5, -0.5)
        counts = [len(b) for b in stages["positive_anchors"]]
        ax.set_title(f"positive anchors per object (white: ground truth): {counts}", **title)
    else:
        _blank(ax, "positive anchors: give the ground truth (--ann)")

    ax = fig.add_subplot(grid[1, 2])
    shown = stages["proposals"][:50]
    draw_boxes(inp, shown[::-1], ax=ax, colours=[(1.0, 0.85, 0.1)], linewidth=0.8)
    ax.set_xlim(-0.5, w - 0.5), ax.set_ylim(h - 0.5, -0.5)
    ax.set_title(f"{len(stages['proposals'])} proposals after NMS (best {len(shown)} drawn)", **title)

    ax = fig.add_subplot(grid[1, 3])
    names = stages["roi_level_names"]
    palette = colors(len(names))
    levels = stages["roi_levels"]
    show_image(inp, ax)
    for k in range(len(names))[::-1]:
        draw_boxes(None, stages["proposals"][levels == k], ax=ax, colours=[palette[k]], linewidth=0.8)
    ax.set_xlim(-0.5, w - 0.5), ax.set_ylim(h - 0.5, -0.5)
    counts = np.bincount(levels, minlength=len(names))
    for k, name in enumerate(names):
        ax.plot([], [], color=palette[k], label=f"{name}: {counts[k]}")
    ax.legend(loc="lower right", fontsize=9, framealpha=0.8)
    ax.set_title("RoIs by the level they are pooled from", **title)

    ax = fig.add_subplot(grid[1, 4])
    det = stages["detections"]
    draw_detections(stages["image"], det["boxes"], det["labels"], det["scores"], det.get("masks"),
                    class_names=class_names, ax=ax, score_thresh=score_thresh,
                    keypoints=det.get("keypoints"), skeleton=getattr(cfg, "keypoint_skeleton", ()))
    ax.set_title(f"{int((det['scores'] >= score_thresh).sum())} detections scoring >= {score_thresh:g}",
                 **title)

    ax = fig.add_subplot(grid[1, 5])
    ax.set_axis_off()
    text = "\n".join(textwrap.fill(line, 52, subsequent_indent="  ") for line in (summary or []))
    ax.text(0.0, 1.0, text, va="top", ha="left", family="monospace", fontsize=9.5, transform=ax.transAxes)

    # Rows 3+: every class's mask probabilities of the top detections (Sec. 3: K masks per RoI).
    for row in range(mask_rows):
        probs = per_class[row]
        label = int(det["labels"][row]) if row < len(det["labels"]) else 0
        classes = stages["mask_classes"]
        order = sorted(range(len(classes)), key=lambda c: (classes[c] != label, -probs[c].mean()))
        ax = fig.add_subplot(grid[2 + row, 0])
        x1, y1, x2, y2 = stages["top_boxes_resized"][row]
        show_image(inp, ax)
        draw_boxes(None, stages["top_boxes_resized"][row:row + 1], ax=ax, colours=[(1.0, 1.0, 0.0)],
                   linewidth=1.5)
        pad = 0.15 * max(x2 - x1, y2 - y1) + 2
        ax.set_xlim(x1 - pad, x2 + pad), ax.set_ylim(y2 + pad, y1 - pad)
        name = class_names[label - 1] if 1 <= label <= len(class_names) else str(label)
        ax.set_title(f"detection {row + 1}: {name} {det['scores'][row]:.2f}", **title)
        for col, c in enumerate(order[:cols - 1], start=1):
            ax = fig.add_subplot(grid[2 + row, col])
            ax.imshow(probs[c], cmap="magma", vmin=0.0, vmax=1.0, interpolation="nearest")
            ax.set_axis_off()
            k = classes[c]
            what = "one mask for all classes" if cfg.class_agnostic_masks else (
                class_names[k - 1] if 1 <= k <= len(class_names) else f"class {k}")
            mark = " (its class)" if k == label and not cfg.class_agnostic_masks else ""
            ax.set_title(f"{what}{mark}: mean p {probs[c].mean():.2f}", **title)
    fig.savefig(path, dpi=dpi)
    return path


# ---------------------------------------------------------------- image files


def _targets_for(paths, ann, images=None):
    """The ground truth of each image file from the COCO file ``ann``, found by file name."""
    from .data import CocoDataset

    datasets, out = {}, []
    for path in paths:
        folder = images or os.path.dirname(os.path.abspath(path))
        if folder not in datasets:
            data = CocoDataset(ann, folder, train=False)
            by_name = {os.path.basename(data.images[i]["file_name"]): k for k, i in enumerate(data.image_ids)}
            datasets[folder] = (data, by_name)
        data, by_name = datasets[folder]
        k = by_name.get(os.path.basename(path))
        if k is None:
            raise ValueError(f"{ann}: no image named {os.path.basename(path)!r} (the ground truth is found "
                             f"by file name)")
        out.append(data[k][1])
    return out


def _same_detections(a, b):
    """Whether two detection dicts (NumPy) hold the same boxes, scores and labels."""
    keys = ("boxes", "scores", "labels")
    return all(a[k].shape == b[k].shape and np.allclose(a[k], b[k], rtol=1e-5, atol=1e-4) for k in keys)


def inspect_files(predictor, paths, out_dir, ann=None, images=None, top_anchors=50, top_masks=3,
                  log=print):
    """``minimask inspect``: for each image file, ``out_dir/<name>.png`` (the sheet) and
    ``out_dir/<name>.txt`` (the summary), and ``out_dir/inspect.json`` with every image's
    counts; returns that list.  ``ann`` (a COCO file holding the images, by file name) adds the
    positive anchors of each object."""
    from .engine.predictor import load_image, output_name

    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"image file not found: {', '.join(missing)}")
    targets = _targets_for(paths, ann, images) if ann else [None] * len(paths)
    os.makedirs(out_dir, exist_ok=True)
    model, cfg = predictor.model, predictor.model.cfg
    used, report = set(), []
    for path, target in zip(paths, targets):
        image = load_image(path)
        # model.predict first: the reference the stages must reproduce, and a warm-up (the
        # first call compiles the Numba kernels, which would distort the stages' times).
        reference = {k: _cpu(v) for k, v in model.predict([image])[0].items()}
        stages = inspect_image(model, image, target, top_anchors=top_anchors, top_masks=top_masks)
        stages["same_as_predict"] = _same_detections(stages["detections"], reference)
        name = output_name(path, used)
        lines = summary_lines(stages, predictor.class_names, predictor.score_thresh, name=os.fspath(path))
        sheet = save_sheet(stages, os.path.join(out_dir, name + ".png"), cfg, predictor.class_names,
                           predictor.score_thresh, summary=lines)
        with open(os.path.join(out_dir, name + ".txt"), "w") as f:
            f.write("\n".join(lines) + "\n")
        det = stages["detections"]
        report.append({
            "file": os.fspath(path), "sheet": sheet, "summary": os.path.join(out_dir, name + ".txt"),
            "anchors_per_level": [int(c) for c in stages["anchors_per_level"]],
            "top_anchors": int(len(stages["top_anchors"])),
            "positive_anchors": ([int(len(p)) for p in stages["positive_anchors"]]
                                 if "positive_anchors" in stages else None),
            "proposals": int(len(stages["proposals"])),
            "proposals_per_level": np.bincount(stages["proposal_levels"].astype(np.int64),
                                               minlength=len(stages["strides"])).tolist(),
            "rois_per_level": dict(zip(stages["roi_level_names"], np.bincount(
                stages["roi_levels"], minlength=len(stages["roi_level_names"])).tolist())),
            "detections": int(len(det["scores"])),
            "detections_kept": int((det["scores"] >= predictor.score_thresh).sum()),
            "same_as_predict": bool(stages["same_as_predict"]),
            "times_ms": {k: round(v, 2) for k, v in stages["times"].items()},
        })
        log("\n".join(lines) + f"\n-> {sheet}")
    with open(os.path.join(out_dir, "inspect.json"), "w") as f:
        json.dump(report, f, indent=1)
    return report


__all__ = ["inspect_image", "summary_lines", "save_sheet", "inspect_files"]
