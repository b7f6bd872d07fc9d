"""The short soak (the long one is `python -m bench soak`, figures in BENCHMARKS.md): clients
keep generating while servers are killed, restarted and stalled; every generation ends with
the undisturbed tokens inside its deadline, and nothing is left behind."""
import pytest

from bench import soak


@pytest.mark.parametrize("servers", [1, 2])
def test_clients_lose_nothing_while_servers_die(tiny_model_dir, servers):
    res = soak.run(str(tiny_model_dir), clients=4, generations=3, servers=servers, kills=1, stops=1,
                   interval_s=0.3, tokens=48, timeout_ms=15_000, progress=False)
    assert res["generations"] == 12 and res["faults"][:1] == ["kill"]  # the stall may come after the clients
    assert res["mismatches"] == []
    assert res["slowest_s"] < res["deadline_s"]
    assert res["leftovers"] == []
