"""PyTorch twins of the planar CNNs, a benchmark peer (optional: ``pip install -e .[torch]``).

    python -m experiments.torch_twin MODEL [--L=50] [--batch=32] [--repeats=3] [--check]
    python -m experiments.torch_twin MODEL --paired [--repeats=7] [--variants=conv,one_device] [--cpu_devices=N]

prints one JSON line: the twin's median training step (forward, cross-entropy, backward, Adam)
and inference time on this CPU, with as many torch threads as JAX uses cores. ``--check``
first loads the JAX model's initial parameters into the twin and compares the logits.
``--paired`` times ours and the twin alternately in one process and reports the median of the
per-round ratios (:func:`paired`). Ours runs as a training run would: data-parallel over the
CPU devices that ``registry.cpu_devices`` gives the model (``--cpu_devices=N`` to choose N);
``--variants=one_device`` adds ours on one device.
``python -m experiments.benchmark --torch`` runs this next to each CNN and prints the ratios.

The segmenter is the reference's ``ConvNet_sem_seg`` (JanEGerken/sem_seg_s2cnn): VALID
``Conv2d`` encoder, ``MaxPool2d`` + 1x1 ``Conv2d`` shortcuts, ``ConvTranspose2d`` decoder with
per-axis ``output_padding`` (our grids are 2L x (2L-1)), nearest ``Upsample`` + 1x1 shortcuts.
The classifier is :class:`sphere_jax.models.cnn.CNNClassifier`. Layer sizes come from
:mod:`sphere_jax.models.cnn`, and the parameter counts are asserted equal. Not part of the
library or the test suite.
"""
from __future__ import annotations

import json
import os
import sys
import time

import numpy as np

try:
    import torch
    import torch.nn as tnn
    import torch.nn.functional as F
except ImportError:  # pragma: no cover - the optional peer
    sys.exit("experiments.torch_twin needs PyTorch: pip install -e .[torch]")

from sphere_jax.models import cnn


def _output_padding(din, dout, k, s):
    return tuple(dout[a] - k - (din[a] - 1) * s for a in (0, 1))


class Segmenter(tnn.Module):
    def __init__(self, hw, cfg: cnn.CNNSegmenterConfig, c_in: int = 1):
        super().__init__()
        fs, ks, ss = tuple(cfg.channels), tuple(cfg.kernels), tuple(cfg.strides)
        n = len(fs)
        self.use_skips = cfg.use_skips
        dims = cnn.conv_sizes(hw, ks, ss)
        self.input_layer = tnn.Conv2d(c_in, fs[0], ks[0], ss[0])
        self.down = tnn.ModuleList([tnn.Conv2d(fs[i], fs[i + 1], ks[i + 1], ss[i + 1]) for i in range(n - 1)])
        self.pool = tnn.ModuleList([tnn.MaxPool2d(ks[i + 1], ss[i + 1]) for i in range(n - 1)])
        self.down_skip = tnn.ModuleList([tnn.Conv2d(fs[i], fs[i + 1], 1) for i in range(n - 1)])
        self.up = tnn.ModuleList([
            tnn.ConvTranspose2d(fs[i], fs[i - 1], ks[i], ss[i], output_padding=_output_padding(dims[i + 1], dims[i], ks[i], ss[i]))
            for i in range(n - 1, 0, -1)])
        self.up_skip = tnn.ModuleList([tnn.Conv2d(fs[i], fs[i - 1], 1) for i in range(n - 1, 0, -1)])
        self.upsample = tnn.ModuleList([tnn.Upsample(size=tuple(dims[i]), mode="nearest") for i in range(n - 1, 0, -1)])
        self.out_layer = tnn.ConvTranspose2d(fs[0], cfg.num_classes, ks[0], ss[0],
                                             output_padding=_output_padding(dims[1], dims[0], ks[0], ss[0]))

    def forward(self, x):
        x = F.relu(self.input_layer(x))
        for i, layer in enumerate(self.down):
            x = F.relu(layer(x) + self.down_skip[i](self.pool[i](x))) if self.use_skips else F.relu(layer(x))
        for i, layer in enumerate(self.up):
            x = F.relu(layer(x) + self.upsample[i](self.up_skip[i](x))) if self.use_skips else F.relu(layer(x))
        return self.out_layer(x)


class Classifier(tnn.Module):
    def __init__(self, hw, cfg: cnn.CNNClassifierConfig, c_in: int = 1):
        super().__init__()
        if tuple(cfg.hidden):
            raise NotImplementedError("hidden dense layers are not twinned")
        self.convs = tnn.ModuleList()
        c = c_in
        for f, k, s in zip(cfg.channels, cfg.kernels, cfg.strides):
            self.convs.append(tnn.Conv2d(c, f, k, s))
            c = f
        self.global_pool = cfg.global_pool
        h, w = cnn.conv_sizes(hw, cfg.kernels, cfg.strides)[-1]
        self.out = tnn.Linear(c if cfg.global_pool else c * h * w, cfg.num_classes)

    def forward(self, x):
        for conv in self.convs:
            x = F.relu(conv(x))
        x = x.mean(dim=(2, 3)) if self.global_pool else x.permute(0, 2, 3, 1).reshape(x.shape[0], -1)  # (H, W, C) order
        return self.out(x)


def build(name: str, L: int):
    """``(torch module, (H, W), classes, is_segmenter)`` for a CNN of :mod:`sphere_jax.models.cnn`."""
    hw = (2 * L, 2 * L - 1)
    if name in cnn.SEGMENTERS:
        cfg = cnn.SEGMENTERS[name]
        return Segmenter(hw, cfg), hw, cfg.num_classes, True
    if name in cnn.CLASSIFIERS:
        cfg = cnn.CLASSIFIERS[name]
        return Classifier(hw, cfg), hw, cfg.num_classes, False
    raise SystemExit(f"no twin for {name!r}; choose one of {sorted(cnn.SEGMENTERS) + sorted(cnn.CLASSIFIERS)}")


def check(name: str, L: int) -> float:
    """Load the JAX model's initial parameters into the twin; max relative logit difference."""
    import jax
    import jax.numpy as jnp
    from flax.traverse_util import flatten_dict

    model, hw, _, seg = build(name, L)
    jm = cnn.make_cnn(name)
    x = np.random.default_rng(0).normal(size=(2, *hw, 1)).astype(np.float32)
    variables = jm.init(jax.random.key(1), jnp.asarray(x))
    P = {k: np.asarray(v) for k, v in flatten_dict(variables["params"], sep="/").items()}

    def conv(m, pre):  # HWIO -> OIHW
        m.weight.data = torch.from_numpy(P[pre + "/kernel"].transpose(3, 2, 0, 1).copy())
        m.bias.data = torch.from_numpy(P[pre + "/bias"].copy())

    def conv_t(m, pre):  # Flax ConvTranspose (k, k, I, O), y[i s + j] += x[i] w[k-1-j] -> torch (I, O, k, k)
        m.weight.data = torch.from_numpy(P[pre + "/kernel"][::-1, ::-1].transpose(2, 3, 0, 1).copy())
        m.bias.data = torch.from_numpy(P[pre + "/bias"].copy())

    if seg:
        n = len(cnn.SEGMENTERS[name].channels)
        conv(model.input_layer, "enc_conv_0")
        for i in range(1, n):
            conv(model.down[i - 1], f"enc_conv_{i}")
            conv(model.down_skip[i - 1], f"enc_skip_{i}")
        for j, i in enumerate(range(n - 1, 0, -1)):
            conv_t(model.up[j], f"dec_conv_{i}")
            conv(model.up_skip[j], f"dec_skip_{i}")
        conv_t(model.out_layer, "out_conv")
    else:
        for i, c in enumerate(model.convs):
            conv(c, f"conv_{i}")
        model.out.weight.data = torch.from_numpy(P["out/kernel"].T.copy())
        model.out.bias.data = torch.from_numpy(P["out/bias"].copy())
    yj = np.asarray(jm.apply(variables, jnp.asarray(x)))
    with torch.no_grad():
        yt = model(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
    if seg:
        yt = yt.transpose(0, 2, 3, 1)
    return float(np.max(np.abs(yt - yj)) / np.max(np.abs(yj)))


def _twin_step(name: str, L: int, batch: int):
    """The twin's ``(train, infer, x, y, n_params, is_segmenter)`` on one random batch (seed 0):
    ``train()`` is one Adam step on cross-entropy, ``infer()`` one forward without gradients;
    ``x`` is ``[B, 1, H, W]``, ``y`` the labels (``[B]`` or ``[B, H, W]``)."""
    torch.manual_seed(0)
    model, hw, ncls, seg = build(name, L)
    x = torch.randn(batch, 1, *hw)
    y = torch.randint(0, ncls, (batch, *hw) if seg else (batch,))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def train():
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        return loss.item()

    def infer():
        with torch.no_grad():
            return model(x).sum().item()

    return train, infer, x, y, sum(p.numel() for p in model.parameters()), seg


def timing(name: str, L: int, batch: int = 32, repeats: int = 3) -> dict:
    """Median training step and inference of the twin at batch ``batch`` (after 2 warm-ups)."""
    train, infer, _, _, params, _ = _twin_step(name, L, batch)
    for f in (train, infer):
        f(), f()
    ts = {"train": [], "infer": []}
    for _ in range(repeats):
        for k, f in (("train", train), ("infer", infer)):
            t = time.perf_counter()
            f()
            ts[k].append(time.perf_counter() - t)
    return {"model": name, "L": L, "batch": batch, "params": int(params), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "torch_train_step_s": float(np.median(ts["train"])),
            "torch_infer_s": float(np.median(ts["infer"]))}


def paired(name: str, L: int, batch: int = 32, rounds: int = 7, variants: str = "") -> dict:
    """Ours and the twin in one process, timed alternately, so that the machine's drift (this VM's
    speed wanders by 10-40 % over minutes) hits both alike.

    Each round times one training step and one inference of every contender, in an order that
    rotates from round to round. Returns per-contender medians (``{who}_train_step_s``,
    ``{who}_infer_s``) and, per JAX contender, the median over rounds of its time divided by
    PyTorch's in the same round (``{who}_train_vs_torch``, ``{who}_infer_vs_torch``).

    ``variants``: comma-separated extra JAX contenders: values of
    :data:`sphere_jax.models.conv_cpu.FORMULATION` (e.g. ``"conv"``: every layer as before the
    per-shape plan), ``"one_device"`` (the library's formulation on one device, all cores used
    within each operation), or ``"with_ynn"`` (the programs compiled by plain ``jax.jit``, with
    XLA's default YNNPACK fusions and padded convolutions, as before
    :func:`sphere_jax.train.jit_for`). Ours is always ``"jax"`` (the library default, over every
    CPU device of the process). Adds ``devices``: that count.

    Until 2026-11-28 (late) a ``FORMULATION`` variant timed the default formulation: the first
    call below, on the numpy state, traced the step under the variant, but the next call, on the
    device arrays that the first returned, traced it again after the global had been set back.
    (CNN-218k, L=50: default then ``no_fft`` 1.94 and 1.95 s; ``no_fft`` then default 2.47 and
    2.48 s.) Programs made by :func:`sphere_jax.models.conv_cpu.jit` now keep the formulation of
    the moment they are made (``tests/test_cnn_cpu.py::test_a_program_keeps_the_formulation_it_was_made_under``).
    ``with_ynn`` was not affected: its choice is made with the program (``train.jit_for``).
    """
    import jax
    import optax

    from sphere_jax import train
    from sphere_jax.models import conv_cpu

    t_train, t_infer, xt, yt, _, seg = _twin_step(name, L, batch)
    task = "segment" if seg else "classify"
    contenders = {"torch": (t_train, t_infer)}
    xj = np.asarray(xt.numpy().transpose(0, 2, 3, 1))
    yj = np.asarray(yt.numpy())
    for who, how in [("jax", conv_cpu.FORMULATION)] + [(f"jax_{v}", v) for v in variants.split(",") if v]:
        # ours as a run trains: data-parallel over this process's CPU devices (main() splits the
        # cores as the entry points do, registry.cpu_devices); "one_device": the same on one device
        mesh = train.make_mesh(jax.devices()[:1] if how == "one_device" else jax.devices())
        with_ynn = how == "with_ynn"
        how = conv_cpu.FORMULATION if how in ("one_device", "with_ynn") else how
        old, conv_cpu.FORMULATION = conv_cpu.FORMULATION, how  # kept by the programs made now (conv_cpu.jit)
        old_choice = cnn.cpu_ynn_fusions
        if with_ynn:  # read when the programs are made (train.jit_for)
            cnn.cpu_ynn_fusions = lambda model: None
        jm = cnn.make_cnn(name)
        params = jm.init(jax.random.key(0), xj[:1])["params"]
        state = train.TrainState.create(jax.tree.map(np.array, params), optax.adam(1e-3))  # own buffers: donated
        if mesh.devices.size > 1:  # as runner.fit trains on a split CPU
            step, holder = train.make_split_train_step(jm, task, mesh), {"s": jax.device_put(state, jax.devices()[0])}
        else:
            step, holder = train.make_train_step(jm, task), {"s": state}
        predict = train.make_predict(jm)
        xm, ym = train.shard_batch(mesh, (xj, yj))
        # inference on the initial parameters, placed once as an evaluation places them
        infer_params = train.replicate(mesh, jax.tree.map(np.array, params))

        def j_train(step=step, holder=holder, xm=xm, ym=ym):
            holder["s"], loss = step(holder["s"], None, xm, ym)
            jax.block_until_ready(loss)

        def j_infer(predict=predict, infer_params=infer_params, xm=xm):
            jax.block_until_ready(predict(infer_params, None, xm))

        try:
            j_train(), j_infer()  # compile now, under this formulation
        finally:
            conv_cpu.FORMULATION = old
            cnn.cpu_ynn_fusions = old_choice
        contenders[who] = (j_train, j_infer)
    for train_fn, infer_fn in contenders.values():  # warm-up
        train_fn(), infer_fn(), train_fn(), infer_fn()
    names = list(contenders)
    times = {w: {"train": [], "infer": []} for w in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for kind, idx in (("train", 0), ("infer", 1)):
            for w in order:
                # a pause first: torch's OpenMP threads keep spinning for a while after each call
                # and slowed the next JAX call of a 2 ms model by 70 % (measured); 1 ms of sleep
                # removed most of that
                time.sleep(0.05)
                t = time.perf_counter()
                contenders[w][idx]()
                times[w][kind].append(time.perf_counter() - t)
    out = {"model": name, "L": L, "batch": batch, "rounds": rounds, "torch": torch.__version__,
           "threads": torch.get_num_threads(), "devices": len(jax.devices())}
    for w in names:
        for kind, key in (("train", "train_step_s"), ("infer", "infer_s")):
            out[f"{w}_{key}"] = float(np.median(times[w][kind]))
            if w != "torch":
                ratios = np.asarray(times[w][kind]) / np.asarray(times["torch"][kind])
                out[f"{w}_{kind}_vs_torch"] = round(float(np.median(ratios)), 3)
    return out


def main(argv):
    args = {a.split("=")[0]: (a.split("=", 1)[1] if "=" in a else True) for a in argv[1:] if a.startswith("--")}
    names = [a for a in argv[1:] if not a.startswith("--")]
    if len(names) != 1:
        raise SystemExit(__doc__)
    torch.set_num_threads(int(args.get("--threads", os.cpu_count() or 1)))
    if args.get("--paired"):  # before anything uses a device: the CPU split as a run of this model gets it
        from sphere_jax import train
        from sphere_jax.models import registry

        train.split_cpu(int(args.get("--cpu_devices", registry.cpu_devices(names[0], int(args.get("--batch", 32))))))
    L = int(args.get("--L", 50 if names[0] in cnn.SEGMENTERS else 30))
    out = {}
    if args.get("--paired"):
        print(json.dumps(paired(names[0], L, int(args.get("--batch", 32)), int(args.get("--repeats", 7)),
                                str(args.get("--variants", "")))))
        return
    if args.get("--check"):
        out["check_rel_err"] = check(names[0], L)
        if out["check_rel_err"] > 1e-4:
            raise SystemExit(f"twin of {names[0]} disagrees with the JAX model: {out['check_rel_err']:.2e}")
    out.update(timing(names[0], L, int(args.get("--batch", 32)), int(args.get("--repeats", 3))))
    ref = cnn.count_params(cnn.make_cnn(names[0]).init(
        __import__("jax").random.key(0), np.zeros((1, 2 * L, 2 * L - 1, 1), np.float32))["params"])
    if out["params"] != ref:
        raise SystemExit(f"twin of {names[0]} has {out['params']} parameters, the JAX model {ref}")
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv)
