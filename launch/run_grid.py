"""Run a grid on one machine: python -m launch.run_grid --grid=NAME --root=DIR [--jobs=N] [--index=I].

Every run trains in its own subprocess (``python -m experiments.classify|segment`` with the
run's flags, see :meth:`launch.grid.Run.argv`), its output appended to ``WORKDIR/run.log``.

* Finished runs are skipped: a workdir whose ``config.json`` is the run's configuration and
  whose ``metrics.jsonl`` has a final ``"test"`` record.
* Stopping is safe: Ctrl-C / SIGTERM stops the children; started the same way again, the sweep
  skips what finished and every unfinished run resumes from its last checkpoint (the runner
  resumes; batches are a function of ``(seed, step)``).
* A failed run does not stop the sweep (``--stop_on_failure`` makes it); the exit status is 1
  when any run failed, and a restart retries only the runs that are not finished.
* Several GPUs: one run per device at a time (``CUDA_VISIBLE_DEVICES`` set per child);
  ``--jobs`` defaults to the number of visible GPUs (1 without GPUs), at most the number of
  runs left; with fewer runs than GPUs (``--index``, multi-host) a run gets a power-of-two
  group of GPUs and trains data-parallel (see :func:`device_slots`).
* ``--index=I`` runs only run I (SLURM arrays, see :mod:`launch.slurm`); the multi-host flags
  ``--coordinator_address / --num_processes / --process_id`` are passed on to the run.

Events go to ``ROOT/sweep.jsonl``; ``--list`` prints every run with its state.
"""
from __future__ import annotations

import dataclasses
import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Callable, Sequence

from launch import grid as grid_lib

DONE, NEW, PARTIAL, CONFLICT = "done", "new", "partial", "conflict"


# --------------------------------------------------------------------------- run state


def read_records(workdir: str) -> list[dict]:
    """The JSON records of ``WORKDIR/metrics.jsonl``; a line cut short by a kill is ignored."""
    path = os.path.join(workdir, "metrics.jsonl")
    out = []
    if not os.path.exists(path):
        return out
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


def final_test(records: Sequence[dict], test_rotate: bool | None = None) -> dict | None:
    """The last record with a ``"test"`` entry written at the end of training (``final_step`` in
    it; an interim ``experiments.evaluate`` of a cut run does not count), of the run's own test
    rotation when the record says."""
    for rec in reversed(records):
        if ("test" in rec and "final_step" in rec
                and (test_rotate is None or rec.get("test_rotate", test_rotate) == test_rotate)):
            return rec
    return None


def run_state(run: grid_lib.Run, root: str) -> str:
    """``done`` (final test record), ``partial`` (started), ``new``, or ``conflict`` (the workdir
    holds another configuration)."""
    wd = run.workdir(root)
    cfg_path = os.path.join(wd, "config.json")
    if not os.path.exists(cfg_path):
        return NEW
    try:
        with open(cfg_path) as f:
            theirs = json.load(f)
    except (OSError, json.JSONDecodeError):
        return CONFLICT
    if theirs != dataclasses.asdict(run.config):
        return CONFLICT
    return DONE if final_test(read_records(wd), run.config.test_rotate) else PARTIAL


# --------------------------------------------------------------------------- devices


def visible_gpus() -> list[str]:
    """GPU ids for ``CUDA_VISIBLE_DEVICES`` (without importing jax, which would claim them)."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [d for d in env.split(",") if d.strip() and d.strip() != "-1"]
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout
        except (OSError, subprocess.SubprocessError):
            return []
        return [str(i) for i, line in enumerate(l for l in out.splitlines() if l.startswith("GPU "))]
    return []


def device_slots(devices: Sequence[str], jobs: int) -> list[str]:
    """``CUDA_VISIBLE_DEVICES`` of each of ``jobs`` workers: disjoint groups of a power-of-two
    number of GPUs (so that power-of-two batch sizes split evenly) when there are at least as
    many GPUs as jobs, else GPUs shared round-robin."""
    if not devices:
        return [""] * jobs
    if jobs > len(devices):
        return [devices[i % len(devices)] for i in range(jobs)]
    g = 1
    while 2 * g <= len(devices) // jobs:
        g *= 2
    return [",".join(devices[i * g:(i + 1) * g]) for i in range(jobs)]


# --------------------------------------------------------------------------- executors

Executor = Callable[[grid_lib.Run, str, dict], int]
"""``executor(run, root, env) -> exit status``; ``env`` holds extra environment variables (device)."""


class SubprocessExecutor:
    """Runs ``run.argv(root)`` in a child process, output appended to ``WORKDIR/run.log``."""

    def __init__(self, python: str | None = None, extra_flags: Sequence[str] = ()):
        self.python = python or sys.executable
        self.extra_flags = list(extra_flags)
        self._children: set[subprocess.Popen] = set()
        self._lock = threading.Lock()

    def __call__(self, run: grid_lib.Run, root: str, env: dict) -> int:
        wd = run.workdir(root)
        os.makedirs(wd, exist_ok=True)
        for member in getattr(run, "runs", ())[1:]:  # a group logs to its first run's run.log
            os.makedirs(member.workdir(root), exist_ok=True)
            with open(os.path.join(member.workdir(root), "run.log"), "a") as log:
                log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} trained together with run {run.index}: "
                          f"see {os.path.join(wd, 'run.log')}\n")
        full_env = dict(os.environ)
        full_env.update(env)
        full_env["PYTHONPATH"] = os.pathsep.join([grid_lib.REPO] + [p for p in [full_env.get("PYTHONPATH")] if p])
        argv = run.argv(root, self.python, self.extra_flags)
        with open(os.path.join(wd, "run.log"), "a") as log:
            log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {socket.gethostname()} "
                      f"{' '.join(f'{k}={v}' for k, v in env.items())} {' '.join(argv)}\n")
            log.flush()
            proc = subprocess.Popen(argv, cwd=grid_lib.REPO, env=full_env, stdout=log, stderr=subprocess.STDOUT)
            with self._lock:
                self._children.add(proc)
            try:
                return proc.wait()
            except BaseException:  # interrupted while waiting: take the child down with us
                _terminate([proc])
                raise
            finally:
                with self._lock:
                    self._children.discard(proc)

    def stop(self):
        """Terminate running children (then kill those that linger)."""
        with self._lock:
            children = list(self._children)
        _terminate(children)


def _terminate(procs):
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


# --------------------------------------------------------------------------- the sweep


@dataclasses.dataclass
class SweepResult:
    done: list[int] = dataclasses.field(default_factory=list)  # ran to the end now
    skipped: list[int] = dataclasses.field(default_factory=list)  # finished before
    failed: list[int] = dataclasses.field(default_factory=list)  # non-zero exit or no test record
    conflicts: list[int] = dataclasses.field(default_factory=list)  # workdir of another configuration
    interrupted: bool = False

    @property
    def ok(self) -> bool:
        return not (self.failed or self.conflicts or self.interrupted)


def _event(root: str, **rec):
    rec = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "host": socket.gethostname(), "pid": os.getpid(), **rec}
    with open(os.path.join(root, "sweep.jsonl"), "a") as f:
        f.write(json.dumps(rec) + "\n")


# Measured on 2 CPU cores (results/classification/README.md, "Cost of the grid"): one program of
# several runs (jax.vmap) trains fewer run-steps per second than the runs one process each.
CPU_TOGETHER_NOTE = ("no GPU is visible, and on CPU cores runs trained together are slower than one process per run "
                     "(68k CNN: 2 runs in one program 0.83x one run's steps/s, two processes of 6 runs each 0.4x "
                     "two processes of one run); leave out --together there")


def execute(runs: Sequence[grid_lib.Run], root: str, executor: Executor | None = None, jobs: int | None = None,
            devices: Sequence[str] | None = None, stop_on_failure: bool = False,
            log: Callable[[str], None] = print, together: int | None = None) -> SweepResult:
    """Train every unfinished run of ``runs`` under ``root``.

    Args:
      executor: how a run is trained (default :class:`SubprocessExecutor`).
      jobs: concurrent runs (default: number of ``devices``, at most the runs left, at least 1).
      devices: GPU ids, split among the workers by :func:`device_slots` (default
        :func:`visible_gpus`; ``[]`` for none: no ``CUDA_VISIBLE_DEVICES`` is set).
      stop_on_failure: stop dispatching after the first failed run.
      together: not ``None``: unfinished runs that differ only in their seed and augmentation
        level train together, at most ``together`` per process (0: no limit;
        :class:`launch.grid.RunGroup`, :func:`launch.grid.group_runs`; on a GPU, several runs of a
        small model cost little more than one). Each run of a group is still done, failed or
        resumed on its own.

    A ``KeyboardInterrupt`` (Ctrl-C, or SIGTERM via :func:`main`) stops the children and
    returns with ``interrupted=True``; unfinished runs resume when the sweep is started again.
    """
    os.makedirs(root, exist_ok=True)
    executor = executor or SubprocessExecutor()
    devices = visible_gpus() if devices is None else list(devices)
    res = SweepResult()
    todo: "queue.Queue[grid_lib.Run | grid_lib.RunGroup]" = queue.Queue()
    left = []
    for run in runs:
        state = run_state(run, root)
        if state == DONE:
            res.skipped.append(run.index)
        elif state == CONFLICT:
            res.conflicts.append(run.index)
            log(f"[{run.index}] {run.name}: CONFLICT, its workdir holds another configuration; move it away")
        else:
            left.append(run)
    units = left if together is None else grid_lib.group_runs(left, together)
    for unit in units:
        todo.put(unit)
    jobs = jobs or max(1, min(len(devices), todo.qsize()))
    if together is None or not devices:
        slots = device_slots(devices, jobs)
    else:  # runs trained together use one device: a worker gets one GPU, never a data-parallel set
        slots = [devices[i % len(devices)] for i in range(jobs)]
    grouped = "" if together is None else f" in {todo.qsize()} processes"
    log(f"{len(runs)} runs: {len(res.skipped)} finished before, {len(left)} to run{grouped}, "
        f"{len(res.conflicts)} conflicts; {jobs} at a time" + (f" on GPUs {slots}" if devices else ""))
    if together is not None and not devices and any(isinstance(u, grid_lib.RunGroup) for u in units):
        log(f"note: {CPU_TOGETHER_NOTE}")
    stop = threading.Event()
    lock = threading.Lock()

    def worker(slot: int):
        env = {"CUDA_VISIBLE_DEVICES": slots[slot]} if devices else {}
        while not stop.is_set():
            try:
                run = todo.get_nowait()
            except queue.Empty:
                return
            t0 = time.time()
            state = ",".join(run_state(r, root) for r in getattr(run, "runs", (run,)))  # a group: each of its runs
            log(f"[{run.index}] {run.name}: {state}, starting" + (f" on GPU {env['CUDA_VISIBLE_DEVICES']}" if env else ""))
            _event(root, event="start", index=run.index, name=run.name, **env)
            try:
                rc = executor(run, root, env)
            except BaseException as e:  # an executor that raises counts as a failure; interrupts stop the sweep
                if isinstance(e, (KeyboardInterrupt, SystemExit)):
                    stop.set()
                    with lock:
                        res.interrupted = True
                    _event(root, event="interrupted", index=run.index, name=run.name)
                    return
                rc = f"{type(e).__name__}: {e}"
            if stop.is_set():  # stopped while it ran: it did not finish on its own
                with lock:
                    res.interrupted = True
                _event(root, event="interrupted", index=run.index, name=run.name)
                return
            secs = round(time.time() - t0, 1)
            for member in getattr(run, "runs", (run,)):  # a group: each of its runs
                finished = run_state(member, root) == DONE
                ok = rc == 0 and finished
                with lock:
                    (res.done if ok else res.failed).append(member.index)
                _event(root, event="end", index=member.index, name=member.name, rc=rc, finished=finished, seconds=secs)
                if ok:
                    log(f"[{member.index}] {member.name}: done in {secs} s")
                else:
                    why = f"exit status {rc}" if rc != 0 else "no final test record"
                    log(f"[{member.index}] {member.name}: FAILED ({why}), see {os.path.join(run.workdir(root), 'run.log')}")
                    if stop_on_failure:
                        stop.set()

    if jobs == 1:
        try:
            worker(0)
        except KeyboardInterrupt:
            res.interrupted = True
    else:
        threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(jobs)]
        for t in threads:
            t.start()
        try:
            while any(t.is_alive() for t in threads):
                for t in threads:
                    t.join(timeout=0.5)
        except KeyboardInterrupt:
            stop.set()
            res.interrupted = True
            if hasattr(executor, "stop"):
                executor.stop()
            for t in threads:
                t.join(timeout=60)
    if res.interrupted and hasattr(executor, "stop"):
        executor.stop()
    res.done.sort()
    res.failed.sort()
    log(f"sweep: {len(res.done)} done now, {len(res.skipped)} skipped, {len(res.failed)} failed, "
        f"{len(res.conflicts)} conflicts" + (", INTERRUPTED (start it again to resume)" if res.interrupted else ""))
    return res


# --------------------------------------------------------------------------- command line


def _parse(argv):
    import argparse

    p = argparse.ArgumentParser(prog="python -m launch.run_grid", description=__doc__.splitlines()[0])
    p.add_argument("--grid", required=True, choices=grid_lib.grid_names())
    p.add_argument("--root", required=True, help="sweep root: one workdir per run below it")
    p.add_argument("--jobs", type=int, default=None, help="concurrent runs (default: visible GPUs, at least 1)")
    p.add_argument("--index", type=int, default=None, help="run only this run (0-based; SLURM_ARRAY_TASK_ID)")
    p.add_argument("--list", action="store_true", help="print every run with its state and exit")
    p.add_argument("--dry_run", action="store_true", help="print the commands of the unfinished runs and exit")
    p.add_argument("--stop_on_failure", action="store_true")
    p.add_argument("--together", type=int, nargs="?", const=0, default=None, metavar="N",
                   help="train unfinished runs that differ only in their seed and augmentation level together, one "
                        "process per group of at most N runs (none given: no limit; --seeds / --augmentations: one "
                        "program, one device); each run keeps its own workdir. For GPUs: on CPU cores it is slower than one "
                        "process per run")
    p.add_argument("--python", default=sys.executable, help="interpreter for the runs")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a RunConfig field of every run, e.g. --set source=npz --set digits_npz=/data/mnist.npz "
                        "(repeatable; give the same overrides again to resume)")
    p.add_argument("--only", default=None, help="comma-separated run indices to run, in that order (default: all)")
    p.add_argument("--coordinator_address", default=None, help="multi-host: passed on to the run")
    p.add_argument("--num_processes", type=int, default=None, help="multi-host: passed on to the run")
    p.add_argument("--process_id", type=int, default=None, help="multi-host: passed on to the run")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = _parse(sys.argv[1:] if argv is None else argv)
    try:
        runs = grid_lib.with_overrides(grid_lib.get_grid(args.grid), grid_lib.parse_overrides(args.set))
    except grid_lib.GridError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    root = os.path.abspath(args.root)
    os.makedirs(root, exist_ok=True)
    grid_lib.write_manifest(runs, root, args.grid)
    grid_runs = runs
    if args.index is not None:
        if not 0 <= args.index < len(runs):
            print(f"error: --index={args.index} is outside the grid's runs 0..{len(runs) - 1}", file=sys.stderr)
            return 2
        runs = [runs[args.index]]
    if args.only:
        try:
            keep = [int(i) for i in args.only.split(",") if i.strip()]
        except ValueError:
            print(f"error: --only takes comma-separated run indices, got {args.only!r}", file=sys.stderr)
            return 2
        if not keep:
            print(f"error: --only names no run, got {args.only!r}", file=sys.stderr)
            return 2
        by_index = {r.index: r for r in runs}
        unknown = sorted({i for i in keep if i not in by_index})
        if unknown:
            where = (f"the run --index={args.index} selects" if args.index is not None
                     else f"the grid {args.grid!r} (0..{len(grid_runs) - 1})")
            print(f"error: --only names runs that are not in {where}: {unknown}", file=sys.stderr)
            return 2
        # in the order given (a window's priorities), each run once
        runs = [by_index[i] for i in dict.fromkeys(keep)]
    if args.list:
        for r in runs:
            print(f"{r.index:4d}  {run_state(r, root):8s}  {r.name}")
        return 0
    if args.dry_run:
        left = [r for r in runs if run_state(r, root) not in (DONE, CONFLICT)]
        for unit in left if args.together is None else grid_lib.group_runs(left, args.together):
            print(" ".join(unit.argv(root, args.python)))
        return 0
    extra = []
    if args.coordinator_address:
        extra = [f"--coordinator_address={args.coordinator_address}", f"--num_processes={args.num_processes}",
                 f"--process_id={args.process_id}"]
    executor = SubprocessExecutor(args.python, extra)

    stopping = []

    def on_term(signum, frame):
        if stopping:  # already shutting down (the children may signal the group again): finish that
            return
        stopping.append(signum)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_term)  # SIGTERM (SLURM preemption, kill) stops the children too
    try:
        res = execute(runs, root, executor, jobs=args.jobs, stop_on_failure=args.stop_on_failure,
                      together=args.together)
    finally:
        signal.signal(signal.SIGTERM, previous)
    if res.interrupted:
        return 130
    return 0 if res.ok else 1


if __name__ == "__main__":
    sys.exit(main())
