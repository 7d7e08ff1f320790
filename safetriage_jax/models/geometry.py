"""Coordinate grids, keypoint heatmaps and thin-plate-spline (TPS) transforms.

Coordinates are (x, y) in [-1, 1] with -1 and 1 at the corner pixels' centres (align_corners=True).
This module is the one place that builds TPS flows: from keypoints (the model's K transforms,
Eq. 2 of the TPSMM paper) and from random parameters (the equivariance loss).
"""

import jax
import jax.numpy as jnp

TPS_REGULARISER = 0.01  # added to the diagonal of the TPS system, as upstream does
LOG_EPS = 1e-9


def coordinate_grid(height, width, dtype=jnp.float32):
    """(H, W, 2) grid of (x, y) pixel centres spanning [-1, 1] on both axes."""
    x = 2 * (jnp.arange(width, dtype=dtype) / (width - 1)) - 1
    y = 2 * (jnp.arange(height, dtype=dtype) / (height - 1)) - 1
    xx, yy = jnp.meshgrid(x, y, indexing="xy")
    return jnp.stack([xx, yy], axis=-1)


def keypoint_heatmaps(kp_BN2, height, width, variance):
    """(B, H, W, N) Gaussians exp(-|p - kp|^2 / (2 variance)) centred on each keypoint."""
    grid_HW2 = coordinate_grid(height, width, kp_BN2.dtype)
    diff_BHWN2 = grid_HW2[None, :, :, None, :] - kp_BN2[:, None, None, :, :]
    return jnp.exp(-0.5 * jnp.sum(diff_BHWN2 ** 2, axis=-1) / variance)


def tps_radial(sq_dist):
    """TPS kernel U(r) = r^2 log r^2, written on r^2 so its gradient is finite at r = 0."""
    return sq_dist * jnp.log(sq_dist + LOG_EPS)


def _pairwise_sq_dist(a_MN2, b_MP2):
    """(..., N, P) squared distances between two point sets."""
    return jnp.sum((a_MN2[..., :, None, :] - b_MP2[..., None, :, :]) ** 2, axis=-1)


def fit_tps(control_BKN2, target_BKN2):
    """Solves for the TPS mapping each driving control point to its source point.

    Returns (affine_BK23, weights_BKN2): f(p) = A [p; 1] + sum_n w_n U(|p - c_n|^2).
    The solve runs in float32 even under bfloat16 training (it is tiny and ill-conditioned).
    """
    dtype = control_BKN2.dtype
    control_BKN2, target_BKN2 = control_BKN2.astype(jnp.float32), target_BKN2.astype(jnp.float32)
    num_points = control_BKN2.shape[-2]
    ones = jnp.ones(control_BKN2.shape[:-1] + (1,), control_BKN2.dtype)
    homog_BKN3 = jnp.concatenate([control_BKN2, ones], axis=-1)
    kernel_BKNN = tps_radial(_pairwise_sq_dist(control_BKN2, control_BKN2))
    zeros_BK33 = jnp.zeros(control_BKN2.shape[:-2] + (3, 3), control_BKN2.dtype)
    top = jnp.concatenate([kernel_BKNN, homog_BKN3], axis=-1)
    bottom = jnp.concatenate([jnp.swapaxes(homog_BKN3, -1, -2), zeros_BK33], axis=-1)
    system = jnp.concatenate([top, bottom], axis=-2)
    system = system + TPS_REGULARISER * jnp.eye(num_points + 3, dtype=system.dtype)
    rhs = jnp.concatenate(
        [target_BKN2, jnp.zeros(control_BKN2.shape[:-2] + (3, 2), control_BKN2.dtype)], axis=-2)
    params = jnp.linalg.solve(system, rhs)
    affine_BK23 = jnp.swapaxes(params[..., num_points:, :], -1, -2)
    return affine_BK23.astype(dtype), params[..., :num_points, :].astype(dtype)


def apply_tps(points_BP2, affine_BK23, control_BKN2, weights_BKN2):
    """(B, K, P, 2) images of the points under each of the K TPS transforms."""
    linear_BKP2 = jnp.einsum("bkij,bpj->bkpi", affine_BK23[..., :2], points_BP2,
                             precision=jax.lax.Precision.HIGHEST)
    linear_BKP2 = linear_BKP2 + affine_BK23[:, :, None, :, 2]
    sq_dist_BKPN = jnp.sum(
        (points_BP2[:, None, :, None, :] - control_BKN2[:, :, None, :, :]) ** 2, axis=-1)
    radial_BKP2 = jnp.einsum("bkpn,bkni->bkpi", tps_radial(sq_dist_BKPN), weights_BKN2,
                             precision=jax.lax.Precision.HIGHEST)
    return linear_BKP2 + radial_BKP2


def keypoint_tps_grids(kp_driving_BKN2, kp_source_BKN2, height, width):
    """(B, K, H, W, 2) sampling grids: where each driving pixel comes from in the source."""
    batch, num_tps = kp_driving_BKN2.shape[:2]
    affine, weights = fit_tps(kp_driving_BKN2, kp_source_BKN2)
    grid_P2 = coordinate_grid(height, width, kp_driving_BKN2.dtype).reshape(-1, 2)
    points_BP2 = jnp.broadcast_to(grid_P2, (batch,) + grid_P2.shape)
    warped_BKP2 = apply_tps(points_BP2, affine, kp_driving_BKN2, weights)
    return warped_BKP2.reshape(batch, num_tps, height, width, 2)


def affine_grid(matrix_B33, height, width):
    """(B, H, W, 2) grid moved by a projective 3x3 matrix (upstream's background motion)."""
    grid_HW2 = coordinate_grid(height, width, matrix_B33.dtype)
    homog_HW3 = jnp.concatenate([grid_HW2, jnp.ones((height, width, 1), grid_HW2.dtype)], -1)
    moved_BHW3 = jnp.einsum("bij,hwj->bhwi", matrix_B33, homog_HW3,
                            precision=jax.lax.Precision.HIGHEST)
    return moved_BHW3[..., :2] / moved_BHW3[..., 2:3]


def random_tps(rng, batch, sigma_affine, sigma_tps, points_tps, dtype=jnp.float32):
    """Random TPS warps for the equivariance loss: identity affine plus N(0, sigma_affine) noise
    and a ``points_tps`` x ``points_tps`` control grid with N(0, sigma_tps) scalar weights."""
    affine_key, weight_key = jax.random.split(rng)
    affine_B23 = jnp.eye(2, 3, dtype=dtype) + sigma_affine * jax.random.normal(
        affine_key, (batch, 2, 3), dtype)
    control_N2 = coordinate_grid(points_tps, points_tps, dtype).reshape(-1, 2)
    weights_BN = sigma_tps * jax.random.normal(weight_key, (batch, points_tps ** 2), dtype)
    return {"affine": affine_B23, "control": control_N2, "weights": weights_BN}


def warp_random_tps(tps, points_BP2):
    """Applies :func:`random_tps` warps to (B, P, 2) points. As upstream, each control point's
    scalar weight moves x and y by the same amount."""
    affine_B23 = tps["affine"]
    linear_BP2 = jnp.einsum("bij,bpj->bpi", affine_B23[..., :2], points_BP2,
                            precision=jax.lax.Precision.HIGHEST) + affine_B23[:, None, :, 2]
    sq_dist_BPN = jnp.sum((points_BP2[:, :, None, :] - tps["control"][None, None]) ** 2, -1)
    radial_BP = jnp.einsum("bpn,bn->bp", tps_radial(sq_dist_BPN), tps["weights"],
                           precision=jax.lax.Precision.HIGHEST)
    return linear_BP2 + radial_BP[..., None]


def random_tps_grid(tps, height, width):
    """(B, H, W, 2) sampling grid of a :func:`random_tps` warp."""
    batch = tps["affine"].shape[0]
    grid_P2 = coordinate_grid(height, width, tps["affine"].dtype).reshape(-1, 2)
    warped_BP2 = warp_random_tps(tps, jnp.broadcast_to(grid_P2, (batch,) + grid_P2.shape))
    return warped_BP2.reshape(batch, height, width, 2)
