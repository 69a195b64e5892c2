"""Do several training processes on one accelerator add throughput? Measure it.

    python -m launch.share_check --model=s2cnn_cls --L=30 --procs=1,4 --members=4 --seconds=5 [--label=mps]

For each K of ``--procs``, K processes each compile one model's training step (batch
``--batch``, random data) and warm up; then all start at once (a file barrier) and train back
to back for ``--seconds``, as a run does (asynchronous dispatch, no wait per step). Prints one
JSON line per K:

``{"model", "L", "batch", "procs", "label", "device", "steps_per_s"`` (all processes together),
``"per_proc_steps_per_s"`` (list), ``"vs_one"`` (``steps_per_s`` over the K=1 row's, when
``--procs`` has 1)``}``, or ``"error"`` with the failing worker's last output. Then, for each
K of ``--members``, one process training K copies of the model in one program (``jax.vmap``,
``sphere_jax.benchmark.TrainLoop(members=K)``): a row with ``"members": K`` whose
``steps_per_s`` counts member-steps (K per step), comparable with the K-process row.

Without MPS, processes on one GPU take turns (time slices): more of them add throughput only
where one leaves the GPU idle between its kernels. ``launch/gpu_window_seg.sh`` (``STAGES``
with ``share``) runs this with and without the MPS daemon (``MPS=1``).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

WAIT_READY_S = 900.0
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def worker(args) -> int:
    import jax

    from sphere_jax import benchmark

    loop = benchmark.TrainLoop(args.model, args.L, args.batch, members=args.members)
    chunk = max(1, min(200, int(0.2 / max(loop.run(1), 1e-6))))  # about 0.2 s per chunk alone
    open(os.path.join(args.dir, f"ready_{args.index}"), "w").close()
    go = os.path.join(args.dir, "go")
    t_wait = time.time()
    while not os.path.exists(go):
        if time.time() - t_wait > WAIT_READY_S:
            print("no go signal", file=sys.stderr)
            return 1
        time.sleep(0.005)
    steps, seconds = 0, 0.0
    while seconds < args.seconds:
        seconds += loop.run(chunk)
        steps += chunk
    with open(os.path.join(args.dir, f"result_{args.index}.json"), "w") as f:
        json.dump({"steps": steps * max(args.members, 1), "seconds": seconds, "device": jax.devices()[0].device_kind}, f)
    return 0


def measure(model: str, L: int, batch: int, procs: int, seconds: float, members: int = 0,
            python: str = sys.executable) -> dict:
    """Start ``procs`` workers (each training ``members`` vmapped copies, 0: the plain step),
    release them together, return their rates in (member-)steps per second (see the module doc)."""
    row = {"model": model, "L": L, "batch": batch, "procs": procs, "members": members}
    with tempfile.TemporaryDirectory(prefix="share_check_") as d:
        cmd = [python, "-m", "launch.share_check", "--worker", f"--dir={d}", f"--model={model}", f"--L={L}",
               f"--batch={batch}", f"--seconds={seconds}", f"--members={members}"]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
        ps = [subprocess.Popen(cmd + [f"--index={i}"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               cwd=ROOT, env=env) for i in range(procs)]
        t0 = time.time()
        while not all(os.path.exists(os.path.join(d, f"ready_{i}")) for i in range(procs)):
            failed = [p for p in ps if p.poll() not in (None, 0)]
            if failed or time.time() - t0 > WAIT_READY_S:
                for p in ps:
                    p.kill()
                out = failed[0].communicate()[0] if failed else "timed out waiting for the workers"
                return dict(row, error=out[-1500:])
            time.sleep(0.05)
        open(os.path.join(d, "go"), "w").close()
        outs = [p.communicate()[0] for p in ps]
        bad = [o for p, o in zip(ps, outs) if p.returncode != 0]
        if bad:
            return dict(row, error=bad[0][-1500:])
        res = [json.load(open(os.path.join(d, f"result_{i}.json"))) for i in range(procs)]
    rates = [r["steps"] / r["seconds"] for r in res]
    return dict(row, device=res[0]["device"], steps_per_s=round(sum(rates), 2),
                per_proc_steps_per_s=[round(r, 2) for r in rates])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="s2cnn_cls")
    ap.add_argument("--L", type=int, default=30)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--procs", default="1,4", help="comma-separated numbers of concurrent processes")
    ap.add_argument("--members", default="", help="comma-separated K: one process training K vmapped copies")
    ap.add_argument("--seconds", type=float, default=5.0, help="timed training per process")
    ap.add_argument("--label", default="", help="recorded in each row (e.g. mps)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--dir", help=argparse.SUPPRESS)
    ap.add_argument("--index", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        args.members = int(args.members or 0)
        return worker(args)
    try:
        procs = [int(k) for k in args.procs.split(",") if k]
        members = [int(k) for k in args.members.split(",") if k]
    except ValueError:
        ap.error(f"--procs and --members must be comma-separated integers, got {args.procs!r}, {args.members!r}")
    if any(k < 1 for k in procs + members) or args.seconds <= 0:
        ap.error("--procs and --members must be >= 1 and --seconds > 0")
    one = None
    for k, m in [(k, 0) for k in procs] + [(1, m) for m in members]:
        row = measure(args.model, args.L, args.batch, k, args.seconds, members=m)
        row["label"] = args.label
        if "steps_per_s" in row:
            if k == 1 and not m:
                one = row["steps_per_s"]
            if one:
                row["vs_one"] = round(row["steps_per_s"] / one, 3)
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
