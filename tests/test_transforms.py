"""Transforms: the data's flips (flip twice is the identity) and the model's input transform
(resize sizes and box scaling, bilinear/nearest as PyTorch's interpolate, normalize, padding to
a multiple of 32, targets checked and typed once)."""

import dataclasses

import numpy as np
import pytest

from minimask.data.transforms import RandomHorizontalFlip, hflip
from minimask.functional.resize import resize_image, resize_masks
from minimask.models import preset
from minimask.models.transform import RCNNTransform, batch_images, normalize, resize, resized_size


def make_sample(rng, h=37, w=53, n=3):
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    masks = np.zeros((n, h, w), np.uint8)
    boxes = []
    for k in range(n):
        y0, x0 = rng.integers(0, h // 2), rng.integers(0, w // 2)
        y1, x1 = y0 + rng.integers(3, h // 2), x0 + rng.integers(3, w // 2)
        masks[k, y0:y1, x0:x1] = 1
        boxes.append([x0, y0, x1, y1])
    target = {"boxes": np.array(boxes, np.float32), "labels": np.arange(1, n + 1),
              "masks": masks, "crowd_boxes": np.array([[1.5, 2, 9, 7]], np.float32), "image_id": 7}
    return image, target


def test_hflip_moves_pixels_boxes_and_masks_together(rng):
    image, target = make_sample(rng)
    w = image.shape[1]
    fimage, ft = hflip(image, target)
    np.testing.assert_array_equal(fimage[:, w - 1 - 5], image[:, 5])
    for box, m in zip(ft["boxes"], ft["masks"]):  # the flipped box still encloses the flipped mask
        ys, xs = np.nonzero(m)
        np.testing.assert_array_equal(box, [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
    np.testing.assert_allclose(ft["crowd_boxes"], [[w - 9, 2, w - 1.5, 7]])
    assert ft["image_id"] == 7 and ft["labels"] is target["labels"]


def test_hflip_twice_is_identity(rng):
    image, target = make_sample(rng)
    image2, t2 = hflip(*hflip(image, target))
    np.testing.assert_array_equal(image2, image)
    for key in ("boxes", "masks", "crowd_boxes"):
        np.testing.assert_array_equal(t2[key], target[key])
    assert hflip(image, None)[1] is None


def test_hflip_keypoints_swap_twins():
    image = np.zeros((10, 20, 3), np.uint8)
    kp = np.array([[[3.0, 4, 2], [15, 4, 2], [9, 8, 1]]])  # left, right, middle
    _, t = hflip(image, {"keypoints": kp}, keypoint_flip_map=[1, 0, 2])
    np.testing.assert_array_equal(t["keypoints"], [[[5, 4, 2], [17, 4, 2], [11, 8, 1]]])
    with pytest.raises(ValueError, match="keypoint_flip_map"):
        hflip(image, {"keypoints": kp})


def test_random_flip_follows_the_generator(rng):
    image, target = make_sample(rng)
    flip = RandomHorizontalFlip(0.5)
    flips = []
    for s in range(20):
        out, _ = flip(image, target, np.random.default_rng(s))
        flips.append(not np.array_equal(out, image))
        expected = np.random.default_rng(s).random() < 0.5
        assert flips[-1] == expected
    assert 0 < sum(flips) < 20
    with pytest.raises(ValueError, match="p must be"):
        RandomHorizontalFlip(1.5)


@pytest.mark.parametrize("h, w, min_size, max_size, expected", [
    (480, 640, 800, 1333, (800, 1067)),    # short side to 800
    (100, 1000, 800, 1333, (133, 1333)),   # long side capped
    (128, 128, 128, 128, (128, 128)),      # unchanged
    (300, 200, 100, 1000, (150, 100)),     # downscale, portrait
])
def test_resized_size(h, w, min_size, max_size, expected):
    assert resized_size(h, w, min_size, max_size) == expected


def test_resize_scales_boxes_and_masks(rng):
    image, target = make_sample(rng, h=40, w=60)
    out, t = resize(image, target, (80, 120))
    assert out.shape == (80, 120, 3) and out.dtype == np.uint8
    assert t["masks"].shape == (3, 80, 120)
    np.testing.assert_allclose(t["boxes"], target["boxes"] * 2)
    # an exact 2x upscale by nearest neighbour repeats every mask pixel twice each way
    np.testing.assert_array_equal(t["masks"], target["masks"].repeat(2, 1).repeat(2, 2))
    # boxes with integer corners still enclose their masks exactly
    for box, m in zip(t["boxes"], t["masks"]):
        ys, xs = np.nonzero(m)
        np.testing.assert_array_equal(box, [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
    out, t = resize(image, target, (20, 30))
    assert out.shape == (20, 30, 3)
    np.testing.assert_allclose(t["boxes"], target["boxes"] / 2)
    np.testing.assert_allclose(t["crowd_boxes"], target["crowd_boxes"] / 2)
    assert resize(image, None, (20, 30))[1] is None


def test_resize_image_constant_stays_constant():
    image = np.full((13, 17, 3), 77, np.uint8)
    np.testing.assert_array_equal(resize_image(image, (29, 8)), 77)


@pytest.mark.parametrize("size", [(23, 41), (7, 9), (16, 20)])
def test_resize_matches_torch_interpolate(rng, size):
    torch = pytest.importorskip("torch", reason="torch is the independent oracle for interpolate")
    image = rng.random((16, 20, 3)).astype(np.float32)
    ours = resize_image(image, size)
    t = torch.from_numpy(image).permute(2, 0, 1)[None]
    ref = torch.nn.functional.interpolate(t, size=size, mode="bilinear", align_corners=False)
    np.testing.assert_allclose(ours, ref[0].permute(1, 2, 0).numpy(), atol=1e-5)
    masks = (rng.random((2, 16, 20)) < 0.5).astype(np.uint8)
    ref = torch.nn.functional.interpolate(torch.from_numpy(masks)[None].float(), size=size, mode="nearest")
    np.testing.assert_array_equal(resize_masks(masks, size), ref[0].numpy().astype(np.uint8))


def test_normalize(rng):
    image = rng.integers(0, 256, (5, 6, 3), dtype=np.uint8)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    out = normalize(image, mean, std)
    assert out.shape == (3, 5, 6) and out.dtype == np.float32
    for c in range(3):
        np.testing.assert_allclose(out[c], (image[..., c] / 255.0 - mean[c]) / std[c], rtol=1e-5)


def test_prepare_targets_checks_once_and_fixes_dtypes(rng):
    cfg = dataclasses.replace(preset("shapes"), num_classes=4)
    transform = RCNNTransform(cfg)
    image, target = make_sample(rng)
    target = dict(target, boxes=target["boxes"].astype(np.float64), labels=target["labels"].astype(np.int32))
    del target["crowd_boxes"]
    (t,) = transform.prepare_targets([target], [image.shape[:2]])
    assert t["boxes"].dtype == np.float32 and t["labels"].dtype == np.int64 and t["masks"].dtype == np.uint8
    assert t["crowd_boxes"].shape == (0, 4) and t["crowd_boxes"].dtype == np.float32
    assert "image_id" not in t  # only what the model reads
    with pytest.raises(ValueError, match="target 0 needs 'masks'"):
        transform.prepare_targets([{"boxes": t["boxes"], "labels": t["labels"]}], [image.shape[:2]])
    with pytest.raises(ValueError, match="labels must be in 1..3"):
        transform.prepare_targets([dict(target, labels=np.array([1, 2, 4]))], [image.shape[:2]])
    with pytest.raises(ValueError, match=r"masks should be \(G, 10, 10\)"):
        transform.prepare_targets([target], [(10, 10)])
    with pytest.raises(ValueError, match="3 boxes and 2 labels"):
        transform.prepare_targets([dict(target, labels=np.array([1, 2]))], [image.shape[:2]])
    with pytest.raises(ValueError, match=r"\(H, W, 3\) RGB"):
        transform([image[..., :2]])


def test_batch_images_pads_to_multiple_of_32(rng):
    images = [rng.random((3, 50, 70)).astype(np.float32), rng.random((3, 64, 33)).astype(np.float32)]
    batch, sizes = batch_images(images, size_divisible=32)
    assert batch.shape == (2, 3, 64, 96) and batch.dtype == np.float32
    assert sizes == [(50, 70), (64, 33)]
    np.testing.assert_array_equal(batch[0, :, :50, :70], images[0])
    np.testing.assert_array_equal(batch[1, :, :64, :33], images[1])
    assert not batch[0, :, 50:].any() and not batch[0, :, :, 70:].any() and not batch[1, :, :, 33:].any()
    batch, _ = batch_images([np.ones((3, 32, 64), np.float32)])
    assert batch.shape == (1, 3, 32, 64)  # already a multiple: no padding
    with pytest.raises(ValueError, match="no images"):
        batch_images([])
    with pytest.raises(ValueError, match="C=3"):
        batch_images([images[0], np.ones((1, 4, 4), np.float32)])


@pytest.mark.gpu
def test_transforms_on_cupy_match_numpy(rng):
    import cupy

    image, target = make_sample(rng)
    size = resized_size(*image.shape[:2], 60, 1000)
    out, _ = resize(image, None, size)
    out_gpu, _ = resize(cupy.asarray(image), None, size)
    np.testing.assert_array_equal(out_gpu.get(), out)
    norm = normalize(out, (0.5, 0.5, 0.5), (0.2, 0.2, 0.2))
    norm_gpu = normalize(out_gpu, (0.5, 0.5, 0.5), (0.2, 0.2, 0.2))
    np.testing.assert_allclose(norm_gpu.get(), norm, rtol=1e-6)
    batch, sizes = batch_images([norm_gpu])
    assert isinstance(batch, cupy.ndarray) and sizes == [norm.shape[1:]]
    np.testing.assert_array_equal(resize_masks(cupy.asarray(target["masks"]), (60, 80)).get(),
                                  resize_masks(target["masks"], (60, 80)))
