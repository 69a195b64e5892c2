"""SLURM scripts for a grid: python -m launch.slurm --grid=NAME --root=DIR [--multi_host --nodes=2] [--out=FILE].

* Array script (default): one array task per run, task ``i`` runs
  ``python -m launch.run_grid --grid=NAME --root=DIR --index=$SLURM_ARRAY_TASK_ID`` on one GPU.
  Finished runs are skipped and unfinished ones resume, so resubmitting the same script after a
  failure, a time limit or a preemption completes the sweep (``--requeue`` also works).
* Multi-host (``--multi_host``): each array task is one run spread over ``--nodes`` nodes, one
  process per node (``srun``), joined by ``jax.distributed`` through the flags
  ``--coordinator_address`` (first node of the allocation) / ``--num_processes`` / ``--process_id``.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys

from launch import grid as grid_lib


def array_script(grid: str, root: str, n_runs: int, *, python: str = "python", repo: str = grid_lib.REPO,
                 partition: str | None = None, time: str = "24:00:00", gpus: int = 1, cpus: int = 8,
                 mem: str = "64G", max_parallel: int | None = None, account: str | None = None,
                 setup: str = "") -> str:
    """A ``sbatch`` script with one array task (one GPU) per run of the grid."""
    root = os.path.abspath(root)
    head = _header(grid, root, n_runs, partition, time, account, max_parallel)
    head += [f"#SBATCH --nodes=1", f"#SBATCH --ntasks=1", f"#SBATCH --gpus-per-task={gpus}",
             f"#SBATCH --cpus-per-task={cpus}", f"#SBATCH --mem={mem}", ""]
    cmd = (f"{python} -m launch.run_grid --grid={shlex.quote(grid)} --root={shlex.quote(root)} "
           f"--index=$SLURM_ARRAY_TASK_ID")
    return "\n".join(head + _body(repo, setup) + [cmd, ""])


def multi_host_script(grid: str, root: str, n_runs: int, *, nodes: int = 2, gpus_per_node: int = 8,
                      python: str = "python", repo: str = grid_lib.REPO, partition: str | None = None,
                      time: str = "24:00:00", cpus: int = 32, mem: str = "0", port: int = 12355,
                      max_parallel: int | None = None, account: str | None = None, setup: str = "") -> str:
    """A ``sbatch`` script whose array tasks each train one run on ``nodes`` nodes with jax.distributed."""
    root = os.path.abspath(root)
    head = _header(grid, root, n_runs, partition, time, account, max_parallel)
    head += [f"#SBATCH --nodes={nodes}", "#SBATCH --ntasks-per-node=1", f"#SBATCH --gpus-per-node={gpus_per_node}",
             f"#SBATCH --cpus-per-task={cpus}", f"#SBATCH --mem={mem}", ""]
    body = _body(repo, setup) + [
        'COORD="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"',
        f"PORT=$(( {port} + SLURM_ARRAY_TASK_ID % 1000 ))",
        "export COORD PORT",
        "# one process per node; each sees its node's GPUs; SLURM_PROCID numbers them",
        f"srun --ntasks={nodes} --ntasks-per-node=1 bash -c '"
        f"exec {python} -m launch.run_grid --grid={shlex.quote(grid)} --root={shlex.quote(root)} "
        f"--index=$SLURM_ARRAY_TASK_ID --coordinator_address=$COORD:$PORT --num_processes=$SLURM_NTASKS "
        f"--process_id=$SLURM_PROCID'",
        "",
    ]
    return "\n".join(head + body)


def _header(grid, root, n_runs, partition, time, account, max_parallel):
    if n_runs < 1:
        raise ValueError(f"grid {grid!r} has no runs")
    array = f"0-{n_runs - 1}" + (f"%{max_parallel}" if max_parallel else "")
    lines = ["#!/bin/bash", f"#SBATCH --job-name=sphere_jax_{grid}", f"#SBATCH --array={array}",
             f"#SBATCH --time={time}", f"#SBATCH --output={root}/slurm/%A_%a.out", "#SBATCH --requeue"]
    if partition:
        lines.append(f"#SBATCH --partition={partition}")
    if account:
        lines.append(f"#SBATCH --account={account}")
    return lines


def _body(repo, setup):
    lines = ["set -euo pipefail", f"cd {shlex.quote(repo)}", "export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false"]
    if setup:
        lines.append(setup)
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m launch.slurm", description=__doc__.splitlines()[0])
    p.add_argument("--grid", required=True, choices=grid_lib.grid_names())
    p.add_argument("--root", required=True)
    p.add_argument("--out", default=None, help="write the script here (default: stdout)")
    p.add_argument("--multi_host", action="store_true", help="one run over --nodes nodes with jax.distributed")
    p.add_argument("--nodes", type=int, default=2)
    p.add_argument("--gpus_per_node", type=int, default=8)
    p.add_argument("--gpus", type=int, default=1, help="GPUs per array task (single-host script)")
    p.add_argument("--partition", default=None)
    p.add_argument("--account", default=None)
    p.add_argument("--time", default="24:00:00")
    p.add_argument("--max_parallel", type=int, default=None, help="at most this many array tasks at once")
    p.add_argument("--python", default="python")
    p.add_argument("--setup", default="", help="a shell line run before the job (e.g. 'source .venv/bin/activate')")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    runs = grid_lib.get_grid(args.grid)
    common = dict(python=args.python, partition=args.partition, time=args.time, max_parallel=args.max_parallel,
                  account=args.account, setup=args.setup)
    if args.multi_host:
        text = multi_host_script(args.grid, args.root, len(runs), nodes=args.nodes, gpus_per_node=args.gpus_per_node, **common)
    else:
        text = array_script(args.grid, args.root, len(runs), gpus=args.gpus, **common)
    os.makedirs(os.path.join(os.path.abspath(args.root), "slurm"), exist_ok=True)  # sbatch --output needs it
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
        print(f"{args.out}: {len(runs)} array tasks (0-{len(runs) - 1}); submit with: sbatch {args.out}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
