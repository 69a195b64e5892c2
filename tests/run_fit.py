"""Subprocess driver for runner tests: python tests/run_fit.py WORKDIR CONFIG_JSON [KILL_AT_STEP [TERM_AT_STEP]]
(a negative step: none)."""
import json
import sys

from absl import logging

from sphere_jax import runner

logging.set_verbosity(logging.WARNING)
workdir, cfg = sys.argv[1], json.loads(sys.argv[2])
kill = int(sys.argv[3]) if len(sys.argv) > 3 and int(sys.argv[3]) >= 0 else None
term = int(sys.argv[4]) if len(sys.argv) > 4 and int(sys.argv[4]) >= 0 else None
try:
    res = runner.fit(runner.RunConfig(**cfg), workdir, progress=False, _kill_at_step=kill, _term_at_step=term)
except runner.RunError as e:
    print(f"RunError: {e}")
    sys.exit(3)
except runner.Preempted as e:
    print(f"Preempted: {e}")
    sys.exit(143)
print("RESULT " + json.dumps(res))
