"""python -m launch: the named grids and the commands that run, submit and aggregate them."""
import sys

from launch import grid


def doc(fn) -> str:
    return " ".join(fn.__doc__.split("\n\n")[0].split())


def main() -> int:
    print("grids:")
    for name in grid.grid_names():
        runs = grid.get_grid(name)
        tasks = sorted({r.task for r in runs})
        print(f"  {name:22s} {len(runs):3d} runs ({', '.join(tasks)})  {doc(grid.GRIDS[name])}")
    print("\ncommands:\n"
          "  python -m launch.run_grid --grid=NAME --root=DIR [--jobs=N] [--list] [--dry_run] [--index=I]\n"
          "  python -m launch.slurm --grid=NAME --root=DIR [--multi_host --nodes=N] [--out=job.sh]\n"
          "  python -m launch.aggregate --root=DIR [--benchmark=benchmark.json] [--out=DIR]\n"
          "  python -m launch.collect --sweep=DIR --into=results/TASK/runs [--replace] [--dry_run]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
