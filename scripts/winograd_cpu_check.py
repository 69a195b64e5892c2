"""Winograd F(2x2, 3x3) against the CNNs' CPU convolutions, kernel by kernel (a measurement, not library code).

    python scripts/winograd_cpu_check.py [LAYER_PREFIX] [ROUNDS]

For the stride-1 3x3 layers of the classification CNNs (and two segmenter layers), times the
forward pass, the input gradient and the weight gradient of ``sphere_jax.models.conv_cpu``'s
plan against Winograd F(2x2, 3x3) (16 batched matmuls between 0/+-1 tile transforms),
alternating in one process, batch 32; asserts that both agree to 1e-5 first. Prints
``current/winograd (ratio)`` in ms per kernel. Result and reading (2026-11-27): not adopted,
``results/cpu_cnn/README.md``. Run it with nothing else on the machine.
"""
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from sphere_jax.models import conv_cpu as cc
HI = lax.Precision.HIGHEST
BT = np.array([[1,0,-1,0],[0,1,1,0],[0,-1,1,0],[0,1,0,-1]], np.float32)   # [xi, i]
G = np.array([[1,0,0],[.5,.5,.5],[.5,-.5,.5],[0,0,1]], np.float32)       # [xi, a]
AT = np.array([[1,1,1,0],[0,1,-1,-1]], np.float32)                        # [o, xi]


def _combine(pieces, M, i_first):
    """One 1-D transform of a dict of tiles: out[.., xi, ..] = sum_i M[xi, i] pieces[.., i, ..],
    over the first index of the keys (``i_first``) or the second; M's entries are 0, +-1 or 0.5."""
    out = {}
    keys_other = sorted({k[1] if i_first else k[0] for k in pieces})
    for xi in range(M.shape[0]):
        for o in keys_other:
            acc = None
            for i in range(M.shape[1]):
                c = M[xi, i]
                if c == 0:
                    continue
                t = pieces[(i, o) if i_first else (o, i)]
                t = t if c == 1 else (-t if c == -1 else c * t)
                acc = t if acc is None else acc + t
            out[(xi, o) if i_first else (o, xi)] = acc
    return out


def _lin(pieces, Mx, My):
    """pieces: {(i, j): tile} -> {(xi, nu): sum_ij Mx[xi, i] My[nu, j] pieces[i, j]}."""
    return _combine(_combine(pieces, Mx, True), My, False)


def _V(x):
    B, H, W, C = x.shape
    Th, Tw = (H - 2) // 2, (W - 2) // 2
    d = {(i, j): x[:, i:i + 2 * Th - 1:2, j:j + 2 * Tw - 1:2, :] for i in range(4) for j in range(4)}
    V = _lin(d, BT, BT)
    return jnp.stack([V[k] for k in sorted(V)]).reshape(16, B * Th * Tw, C)


def _U(w):
    return jnp.einsum("xa,yb,abio->xyio", G, G, w, precision=HI).reshape(16, w.shape[2], w.shape[3])


def _out_from_M(M, B, Th, Tw):
    Co = M.shape[-1]
    Md = {(k // 4, k % 4): M[k] for k in range(16)}
    Y = _lin(Md, AT, AT)    # (a,b) -> [N, Co]
    y = jnp.stack([jnp.stack([Y[a, b] for b in range(2)], 0) for a in range(2)], 0)  # [2,2,N,Co]
    y = y.reshape(2, 2, B, Th, Tw, Co).transpose(2, 3, 0, 4, 1, 5)
    return y.reshape(B, 2 * Th, 2 * Tw, Co)


def wfwd(x, w):
    B, H, W, C = x.shape
    Th, Tw = (H - 2) // 2, (W - 2) // 2
    M = lax.dot_general(_V(x), _U(w), (((2,), (1,)), ((0,), (0,))), precision=HI)
    return _out_from_M(M, B, Th, Tw)


def w_adj(g, w, hw):
    """dx of the VALID 3x3 conv: g [B,Ho,Wo,Co] (Ho, Wo even), w [3,3,Ci,Co] -> [B,H,W,Ci]."""
    B, Ho, Wo, Co = g.shape
    C = w.shape[2]
    Th, Tw = Ho // 2, Wo // 2
    dy = {(a, b): g[:, a::2, b::2, :] for a in range(2) for b in range(2)}
    dM = _lin(dy, AT.T, AT.T)
    dM = jnp.stack([dM[k] for k in sorted(dM)]).reshape(16, -1, Co)
    dV = lax.dot_general(dM, _U(w), (((2,), (2,)), ((0,), (0,))), precision=HI)
    dVd = {(k // 4, k % 4): dV[k].reshape(B, Th, Tw, C) for k in range(16)}
    dd = _lin(dVd, BT.T, BT.T)
    par = {}
    for p in range(2):
        for r in range(2):
            acc = None
            for q in range(2):
                for s in range(2):
                    t = jnp.pad(dd[2 * q + p, 2 * s + r], ((0, 0), (q, 1 - q), (s, 1 - s), (0, 0)))
                    acc = t if acc is None else acc + t
            par[p, r] = acc
    dx = jnp.stack([jnp.stack([par[p, r] for r in range(2)], 0) for p in range(2)], 0)
    return dx.transpose(2, 3, 0, 4, 1, 5).reshape(B, 2 * Th + 2, 2 * Tw + 2, C)


def w_wgrad(x, g):
    B, Ho, Wo, Co = g.shape
    C = x.shape[-1]
    dy = {(a, b): g[:, a::2, b::2, :] for a in range(2) for b in range(2)}
    dM = _lin(dy, AT.T, AT.T)
    dM = jnp.stack([dM[k] for k in sorted(dM)]).reshape(16, -1, Co)
    dU = lax.dot_general(_V(x), dM, (((1,), (1,)), ((0,), (0,))), precision=HI)
    return jnp.einsum("xa,yb,xyio->abio", G, G, dU.reshape(4, 4, C, Co), precision=HI)


if __name__ == "__main__":
    shapes = [("250k L2",32,28,28,30,60),("250k L4",32,12,12,60,120),("250k L5",32,10,10,120,120),
              ("1M L2",32,28,28,61,122),("1M L4",32,12,12,122,244),("1M L5",32,10,10,244,244),
              ("4M L2",32,28,28,122,244),("4M L4",32,12,12,244,488),("4M L5",32,10,10,488,488),
              ("seg1m L2",32,98,96,12,13),("seg5m L3",32,96,96,15,16)]
    if len(sys.argv)>1: shapes=[s for s in shapes if s[0].startswith(sys.argv[1])]
    rounds=int(sys.argv[2]) if len(sys.argv)>2 else 9
    for name,B,H,W,ci,co in shapes:
        k=jax.random.split(jax.random.key(0),3)
        x=jax.random.normal(k[0],(B,H,W,ci)); w=jax.random.normal(k[1],(3,3,ci,co))*0.1
        g=jax.random.normal(k[2],(B,H-2,W-2,co))
        fns={"fwd":(jax.jit(lambda x,w,g: cc._fwd(x,w,1)), jax.jit(lambda x,w,g: wfwd(x,w))),
             "adj":(jax.jit(lambda x,w,g: cc._adj(g,w,1,(H,W))), jax.jit(lambda x,w,g: w_adj(g,w,(H,W)))),
             "wgrad":(jax.jit(lambda x,w,g: cc._wgrad(x,g,3,1)), jax.jit(lambda x,w,g: w_wgrad(x,g)))}
        for a,b in fns.values():
            ra, rb = a(x,w,g), b(x,w,g)
            err=float(jnp.abs(ra-rb).max()/jnp.abs(ra).max()); assert err<1e-5, err
            jax.block_until_ready(a(x,w,g)); jax.block_until_ready(b(x,w,g))
        out=[]
        for kn,(a,b) in fns.items():
            ta,tb=[],[]
            for r in range(rounds):
                for f,lst in ([(a,ta),(b,tb)] if r%2==0 else [(b,tb),(a,ta)]):
                    time.sleep(0.02); t0=time.perf_counter(); jax.block_until_ready(f(x,w,g)); lst.append(time.perf_counter()-t0)
            out.append(f"{kn} {np.median(ta)*1e3:.2f}/{np.median(tb)*1e3:.2f} ({np.median(tb)/np.median(ta):.2f})")
        print(name, " | ".join(out), flush=True)
