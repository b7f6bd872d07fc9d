"""The Gramine manifest renders the way gramine-manifest renders it (Jinja2, then TOML), with
exactly the Makefile's -D flags, and says what an SGX deployment of the trusted side needs.

Gramine itself is not installed here: its own paths (libos, runtime) are stand-ins and the
only files not checked for existence; everything else the manifest trusts must exist."""
import os
import shutil
import subprocess
import tomllib
from pathlib import Path
from types import SimpleNamespace

import jinja2
import pytest

ROOT = Path(__file__).parents[1]
GRAMINE_PREFIX = "/usr/lib/x86_64-linux-gnu/gramine"  # where a Gramine package puts its files
GRAMINE = SimpleNamespace(libos=f"{GRAMINE_PREFIX}/libsysdb.so", runtimedir=lambda: f"{GRAMINE_PREFIX}/runtime/glibc")


def makefile_defines(**overrides) -> dict:
    args = ["make", "-s", "-C", str(ROOT / "gramine"), "print-defines", f"VENV={ROOT / '.venv'}"]
    args += [f"{k}={v}" for k, v in overrides.items()]
    out = subprocess.run(args, capture_output=True, text=True, check=True).stdout.split()
    return dict(token.removeprefix("-D").split("=", 1) for token in out)


def render(**overrides) -> dict:
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    template = env.from_string((ROOT / "gramine" / "teegpu.manifest.template").read_text())
    text = template.render(gramine=GRAMINE, env=os.environ, **makefile_defines(**overrides))
    return tomllib.loads(text)


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_manifest_has_what_the_trusted_side_needs():
    m = render()
    defines = makefile_defines()
    assert m["libos"]["entrypoint"] == os.path.realpath(ROOT / ".venv" / "bin" / "python")
    mounts = {mount["path"]: mount for mount in m["fs"]["mounts"]}
    assert mounts["/tmp"]["type"] == "tmpfs"
    assert mounts["/dev/shm"] == {"type": "untrusted_shm", "path": "/dev/shm", "uri": "dev:/dev/shm"}
    assert mounts["/teegpu-cache"]["type"] == "encrypted" and mounts["/teegpu-cache"]["key_name"] == "_sgx_mrenclave"
    for needed in (defines["venv"], defines["model"], f"{defines['repo']}/teegpu", "/lib"):
        assert needed in mounts, needed
    env = m["loader"]["env"]
    assert env["TEEGPU_GRAMINE"] == "1" and env["OMP_NUM_THREADS"] == "1" and env["TEEGPU_CACHE_DIR"] == "/teegpu-cache"
    assert env["OMP_WAIT_POLICY"] == "PASSIVE"  # idle OpenMP workers sleep: the two sides take turns
    sgx = m["sgx"]
    assert sgx["enclave_size"] == "8G" and sgx["max_threads"] == 32
    assert sgx["edmm_enable"] is False and sgx["remote_attestation"] == "none" and sgx["debug"] is False
    assert m["sys"]["enable_extra_runtime_domain_names_conf"] is True
    trusted = [t.removeprefix("file:") for t in sgx["trusted_files"]]
    assert defines["model"] in trusted  # the model is hash-checked
    assert f"{defines['repo']}/teegpu/" in trusted and f"{defines['site_packages']}/" in trusted
    for path in trusted:
        if not path.startswith(GRAMINE_PREFIX):
            assert os.path.exists(path), f"trusted file {path} does not exist"
    assert Path(defines["model"]).name.endswith(".gguf")


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_switches_for_sgx2_and_dcap():
    m = render(EDMM=1, RA_TYPE="dcap", THREADS=4, ENCLAVE_SIZE="16G", MAX_THREADS=64)
    assert m["sgx"]["edmm_enable"] is True and m["sgx"]["remote_attestation"] == "dcap"
    assert m["loader"]["env"]["OMP_NUM_THREADS"] == "4" and m["sgx"]["enclave_size"] == "16G"
    assert m["sgx"]["max_threads"] == 64


def test_ipc_is_refused_under_gramine(tmp_path):
    """Inside Gramine, unix sockets stay in the enclave: teegpu says so instead of hanging."""
    import sys

    env = {**os.environ, "TEEGPU_GRAMINE": "1"}
    cli = [sys.executable, "-m", "teegpu.cli", "generate", "hi", "--max-new-tokens", "1"]
    out = subprocess.run(cli + ["--server", f"ipc://{tmp_path}/s.sock"], capture_output=True, text=True, env=env,
                         timeout=300)
    assert out.returncode == 2 and "ipc://" in out.stderr and "tcp://" in out.stderr
    assert "Traceback" not in out.stderr
    out = subprocess.run(cli, capture_output=True, text=True, env=env, timeout=300)  # no --server
    assert out.returncode == 2 and "--server tcp://" in out.stderr
