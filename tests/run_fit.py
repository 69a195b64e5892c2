"""Subprocess driver for runner tests: python tests/run_fit.py WORKDIR CONFIG_JSON [KILL_AT_STEP]."""
import json
import sys

from absl import logging

from sphere_jax import runner

logging.set_verbosity(logging.WARNING)
workdir, cfg = sys.argv[1], json.loads(sys.argv[2])
kill = int(sys.argv[3]) if len(sys.argv) > 3 else None
try:
    res = runner.fit(runner.RunConfig(**cfg), workdir, progress=False, _kill_at_step=kill)
except runner.RunError as e:
    print(f"RunError: {e}")
    sys.exit(3)
print("RESULT " + json.dumps(res))
