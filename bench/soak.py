"""Load and soak under faults: K trusted clients run N generations each against a server (or
a pool) while servers are killed and restarted and SIGSTOP/SIGCONTed on a schedule.

    python -m bench soak [--clients 4] [--generations 3] [--servers 1] [--kills 1] [--stops 1]
                         [--interval-s 2] [--tokens 24] [--timeout-ms 20000] [--model PATH] [--json]

Every generation must end with the tokens of an undisturbed run, inside its deadline, and
afterwards no file of ours may be left in /dev/shm and no server process behind.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import sys
import threading
import time

import psutil

from teegpu.config import GenerationConfig, ServerConfig
from teegpu.model.loading import load_weights
from teegpu.model.tokenizer import load_tokenizer
from teegpu.server_process import ServerProcess
from teegpu.tee.engine import Engine

PROMPTS = ["Once upon a time", "The river flows", "In the morning the market", "A letter to a friend",
           "The mountain stood", "Bees in spring", "The printing press", "A train at night"]


def free_tcp() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


class Servers:
    """The servers under test, each restartable on its own endpoint."""

    def __init__(self, model: str | None, count: int):
        self.model, self.endpoints = model, [free_tcp() for _ in range(count)]
        self.procs = [self._start(e) for e in self.endpoints]
        self.lock = threading.Lock()
        self.restarts: list[threading.Thread] = []
        self.dead: list[ServerProcess] = []  # killed ones, replaced

    def _start(self, endpoint: str) -> ServerProcess:
        proc = ServerProcess(ServerConfig(model=self.model, endpoint=endpoint))
        proc.wait_ready()
        return proc

    def kill_and_restart(self, i: int) -> bool:
        """SIGKILL server i and start a new one on its endpoint in the background (it takes
        seconds; the schedule goes on meanwhile). False if it was down already."""
        with self.lock:
            proc = self.procs[i].proc
            if proc.poll() is not None:
                return False
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        self.restarts.append(threading.Thread(target=self._restart, args=(i,)))
        self.restarts[-1].start()
        return True

    def _restart(self, i: int) -> None:
        fresh = self._start(self.endpoints[i])
        with self.lock:
            self.dead.append(self.procs[i])
            self.procs[i] = fresh

    def stall(self, i: int, seconds: float) -> bool:
        """SIGSTOP server i for `seconds`, then SIGCONT; False if it is down (being restarted)."""
        with self.lock:
            proc = self.procs[i].proc
            if proc.poll() is not None:
                return False
            os.kill(proc.pid, signal.SIGSTOP)
        time.sleep(seconds)
        os.kill(proc.pid, signal.SIGCONT)
        return True

    def stop(self) -> list[int]:
        """Stop every server (restarts finished first); the pids of all that ever ran."""
        for t in self.restarts:
            t.join()
        for p in self.procs:
            p.stop()
        return [p.proc.pid for p in self.procs + self.dead]


def leftovers(pids: list[int]) -> list[str]:
    """Files under /dev/shm named after us or a server, and server processes still alive."""
    names = [f"teegpu-{pid}-" for pid in [os.getpid(), *pids]]
    files = [f for f in os.listdir("/dev/shm") if any(f.startswith(n) for n in names)]
    alive = [f"process {p}" for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"]
    return files + alive


def run(model: str | None = None, clients: int = 4, generations: int = 3, servers: int = 1, kills: int = 1,
        stops: int = 1, interval_s: float = 2.0, tokens: int = 24, timeout_ms: int = 20_000,
        seed: int = 0, progress: bool = True) -> dict:
    weights, tok = load_weights(model), load_tokenizer(model)
    gen = GenerationConfig(max_new_tokens=tokens, stop_at_eos=False)
    pool = Servers(model, servers)
    with Engine.connect(weights, tok, pool.endpoints[0]) as engine:
        reference = {p: engine.generate(p, gen).token_ids for p in PROMPTS}
    results, faults, stop = [], [], threading.Event()

    def client(k: int) -> None:
        with Engine.connect(weights, tok, ",".join(pool.endpoints), timeout_ms=timeout_ms, data_plane="shm") as e:
            for g in range(generations):
                prompt = PROMPTS[(k + g) % len(PROMPTS)]
                start = time.monotonic()
                try:
                    ok = e.generate(prompt, gen).token_ids == reference[prompt]
                    error = None
                except Exception as err:  # recorded, and the run fails
                    ok, error = False, f"{type(err).__name__}: {err}"
                results.append({"client": k, "ok": ok, "s": time.monotonic() - start, "error": error})
                if progress:
                    print(f"\rgenerations {len(results)}/{clients * generations}, faults {len(faults)}   ",
                          end="", file=sys.stderr, flush=True)

    def injector() -> None:
        rng = random.Random(seed)  # which server each fault hits
        schedule = [f for pair in zip(["kill"] * kills, ["stop"] * stops) for f in pair]
        schedule += ["kill"] * (kills - len(schedule) // 2) + ["stop"] * (stops - len(schedule) // 2)
        for fault in schedule:
            if stop.wait(interval_s):
                return
            i = rng.randrange(servers)
            if pool.kill_and_restart(i) if fault == "kill" else pool.stall(i, 0.5):
                faults.append(fault)

    start = time.monotonic()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    chaos = threading.Thread(target=injector)
    for t in [*threads, chaos]:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    chaos.join()
    wall = time.monotonic() - start
    if progress:
        print(file=sys.stderr)
    left = leftovers(pool.stop())
    return {"clients": clients, "generations": len(results), "servers": servers, "faults": faults,
            "wall_s": round(wall, 2), "mismatches": [r for r in results if not r["ok"]],
            "slowest_s": round(max(r["s"] for r in results), 2), "deadline_s": timeout_ms / 1000,
            "leftovers": left}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench soak", description=__doc__.splitlines()[0])
    for name, default in (("clients", 4), ("generations", 3), ("servers", 1), ("kills", 1), ("stops", 1),
                          ("tokens", 24), ("timeout-ms", 20_000)):
        p.add_argument(f"--{name}", type=int, default=default)
    p.add_argument("--interval-s", type=float, default=2.0, help="time between faults")
    p.add_argument("--model", help="GGUF file or HF directory (default: SmolLM2-135M-Instruct)")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    res = run(a.model, a.clients, a.generations, a.servers, a.kills, a.stops, a.interval_s, a.tokens, a.timeout_ms)
    if a.json:
        print(json.dumps(res, indent=1))
    else:
        print(f"{res['generations']} generations by {res['clients']} clients on {res['servers']} server(s), "
              f"faults {res['faults']}, {res['wall_s']} s; mismatches {len(res['mismatches'])}, slowest "
              f"{res['slowest_s']} s (deadline {res['deadline_s']} s), left behind {res['leftovers'] or 'nothing'}")
    sys.exit(1 if res["mismatches"] or res["leftovers"] else 0)
