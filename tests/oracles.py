"""Brute-force references for the layer tests: band-limited signals evaluated anywhere."""
import numpy as np
import s2fft
from scipy.special import sph_harm_y
from scipy.spatial.transform import Rotation

from sphere_jax import grids


def random_flm(L, seed):
    rng = np.random.default_rng(seed)
    return s2fft.utils.signal_generator.generate_flm(rng, L, reality=True)


def eval_s2(flm, L, points):
    """f(x) = sum flm Y_lm(x) at unit vectors points [..., 3] (real part)."""
    pts = np.asarray(points, float)
    th = np.arccos(np.clip(pts[..., 2], -1, 1))
    ph = np.arctan2(pts[..., 1], pts[..., 0])
    out = np.zeros(pts.shape[:-1], complex)
    for l in range(L):
        for m in range(-l, l + 1):
            c = flm[l, L - 1 + m]
            if c != 0:
                out += c * sph_harm_y(l, m, th, ph)
    return out.real


def grid_rotations(L):
    """Rotation matrices of the dh SO(3) grid, [2L-1, 2L, 2L-1, 3, 3] ([gamma, beta, alpha])."""
    g, b, a = np.meshgrid(grids.gammas(L), grids.thetas(L), grids.phis(L), indexing="ij")
    R = Rotation.from_euler("ZYZ", np.stack([a.ravel(), b.ravel(), g.ravel()], -1)).as_matrix()
    return R.reshape(g.shape + (3, 3))


def s2_filter_points(betas, alphas):
    """[n_beta, n_alpha, 3] unit vectors of the S2 near-identity grid."""
    B, A = np.meshgrid(betas, alphas, indexing="ij")
    return np.stack([np.sin(B) * np.cos(A), np.sin(B) * np.sin(A), np.cos(B)], -1)


def so3_filter_rotations(betas, alphas, pre_gammas):
    """[n_beta, n_alpha, n_gamma, 3, 3] rotations Q = R(alpha, beta, pre_gamma - alpha)."""
    B, A, G = np.meshgrid(betas, alphas, pre_gammas, indexing="ij")
    R = Rotation.from_euler("ZYZ", np.stack([A.ravel(), B.ravel(), (G - A).ravel()], -1)).as_matrix()
    return R.reshape(B.shape + (3, 3))
