"""Benchmarks: every figure is a ratio measured side by side in one run.

`python -m bench` runs the split's trusted side in its own process, configured as the
`teegpu` command configures it (idle OpenMP workers sleep: teegpu.options); the monolithic
baselines run in child processes with the environment the user started us with, as a user
would run transformers."""
import os

from teegpu.options import OPENMP_WAIT_POLICY

USER_WAIT_POLICY = os.environ.get(OPENMP_WAIT_POLICY)  # read before bench/__main__ sets ours


def monolithic_env() -> dict:
    """The environment for a monolithic baseline's process: ours, with the user's OpenMP policy."""
    env = dict(os.environ)
    env.pop(OPENMP_WAIT_POLICY, None)
    if USER_WAIT_POLICY is not None:
        env[OPENMP_WAIT_POLICY] = USER_WAIT_POLICY
    return env
