"""Two processes starting at once on a model nobody has cached (a client and its private
server) dequantise it once: one builds under a file lock, the other waits and reuses it."""
import os
import subprocess
import sys

LOAD = "from teegpu.model.loading import load_weights; print(load_weights(None).fingerprint)"


def test_concurrent_first_loads_build_the_cache_once(tmp_path):
    env = {**os.environ, "TEEGPU_CACHE_DIR": str(tmp_path)}
    procs = [subprocess.Popen([sys.executable, "-c", LOAD], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err for _, err in outs]
    fingerprints = {out.strip() for out, _ in outs}
    assert len(fingerprints) == 1  # both got the same weights
    stderr = "".join(err for _, err in outs)
    assert stderr.count("dequantising GGUF") == 1, stderr
    assert stderr.count("waiting for another process") == 1, stderr
