"""One convolution layer's three kernels, ours against PyTorch's (a measurement, not library code).

    python scripts/conv_kernels_vs_torch.py CI,CO,K,S,H,W [--seg] [--rounds=N] [--forms=auto,conv,taps]

Times, at batch 32 on this machine's cores, the forward pass (``conv_cpu._fwd``), the weight
gradient (``_wgrad``) and the input gradient (``_adj``) of a VALID ``K x K``, stride-``S``
convolution from ``CI`` to ``CO`` channels on ``H x W`` inputs, each compiled alone as the CNNs'
programs compile it (``conv_cpu.jit``: unpadded convolutions; YNNPACK dots and reductions, or
none with ``--seg``, as for the segmenters), under each formulation of ``--forms`` (values of
``conv_cpu.FORMULATION``; ``auto`` is the library's plan). Against them it times PyTorch's
``conv2d``, ``conv2d_weight`` and ``conv2d_input`` on the same data. All contenders run
alternately, ``--rounds`` rounds, with a short pause before each call (PyTorch's threads
spin after a call). Prints the median of each in ms. Needs ``pip install -e .[torch]``; run it
with nothing else on the machine. The per-kernel tables of ``results/cpu_cnn/README.md`` (fifth
session) come from this kind of timing.
"""
import os
import sys
import time

import jax
import numpy as np

from sphere_jax.models import conv_cpu as fc


def main(argv):
    import torch

    args = {a.split("=")[0]: (a.split("=", 1)[1] if "=" in a else True) for a in argv[1:] if a.startswith("--")}
    shape = [a for a in argv[1:] if not a.startswith("--")]
    if len(shape) != 1 or len(shape[0].split(",")) != 6:
        raise SystemExit(__doc__)
    ci, co, k, s, H, W = (int(v) for v in shape[0].split(","))
    rounds = int(args.get("--rounds", 7))
    forms = str(args.get("--forms", "auto")).split(",")
    ynn = fc.YNN_NONE if args.get("--seg") else fc.YNN_DOTS_AND_REDUCES
    torch.set_num_threads(os.cpu_count() or 1)  # one thread per core, as torch_twin
    B = 32
    Ho, Wo = (H - k) // s + 1, (W - k) // s + 1
    rng = np.random.default_rng(0)
    x = rng.standard_normal((B, H, W, ci), np.float32)
    w = (rng.standard_normal((k, k, ci, co)) / np.sqrt(k * k * ci)).astype(np.float32)
    g = rng.standard_normal((B, Ho, Wo, co), np.float32)
    xd, wd, gd = map(jax.device_put, (x, w, g))

    def made(fn, *a):
        f = fc.jit(fn, ynn)
        jax.block_until_ready(f(*a))
        return lambda: jax.block_until_ready(f(*a))

    run = {}
    for form in forms:
        run[f"fwd {form}"] = made(lambda x, w, form=form: fc._fwd(x, w, s, True, form), xd, wd)
        run[f"wgrad {form}"] = made(lambda x, g, form=form: fc._wgrad(x, g, k, s, True, form), xd, gd)
        run[f"adj {form}"] = made(lambda g, w, form=form: fc._adj(g, w, s, (H, W), form), gd, wd)
    xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
    wt = torch.from_numpy(w.transpose(3, 2, 0, 1).copy())
    gt = torch.from_numpy(g.transpose(0, 3, 1, 2).copy())
    run["fwd torch"] = lambda: torch.nn.functional.conv2d(xt, wt, stride=s)
    run["wgrad torch"] = lambda: torch.nn.grad.conv2d_weight(xt, wt.shape, gt, stride=s)
    run["adj torch"] = lambda: torch.nn.grad.conv2d_input(xt.shape, wt, gt, stride=s)
    for f in run.values():
        f(), f()
    names, times = list(run), {n: [] for n in run}
    for r in range(rounds):
        for n in names[r % len(names):] + names[:r % len(names)]:
            time.sleep(0.02)
            t = time.perf_counter()
            run[n]()
            times[n].append(time.perf_counter() - t)
    print(f"{ci} -> {co}, k={k}, s={s}, {H}x{W}, batch {B}, {rounds} rounds (ms):")
    for n in names:
        print(f"  {n:24s} {np.median(times[n]) * 1e3:8.1f}")


if __name__ == "__main__":
    main(sys.argv)
