"""On a host whose CPUs are SMT siblings (two hardware threads of one core), a client polling for its
reply takes execution units from the server's products on the sibling. The host measures that
once (products.poll_slowdown); a client then sleeps on its reply word's futex wherever polling
would cost the products more than a wake-up, and its answers stay the same."""
import os

import psutil
import pytest
import torch

from teegpu.model import products
from teegpu.protocol import Op
from teegpu.transport import RpcClient, rpc_client
from teegpu.transport.rpc_client import FUTEX_WAKE_NS, MAX_SPIN_NS, MIN_SPIN_NS

HIDDEN = 64


def fake_topology(root, siblings: dict[int, str]) -> str:
    """A sysfs cpu directory whose CPU i lists `siblings[i]` as its thread_siblings_list."""
    for cpu, listed in siblings.items():
        folder = root / f"cpu{cpu}" / "topology"
        folder.mkdir(parents=True)
        (folder / "thread_siblings_list").write_text(listed + "\n")
    return str(root)


def test_siblings_come_from_the_topology_of_our_own_cpus(tmp_path):
    root = fake_topology(tmp_path, {0: "0,2", 1: "1,3", 2: "0,2", 3: "1,3"})  # 2 cores, 2 threads each
    assert products.smt_siblings(root, {0, 1, 2, 3}) == [(0, 2), (1, 3)]
    assert products.smt_siblings(root, {0, 1}) == []  # pinned to one thread of each core: no siblings
    assert products.smt_siblings(root, {1, 2, 3}) == [(1, 3)]
    assert products.smt_siblings(str(tmp_path / "absent"), {0, 1}) == []  # unreadable: none
    assert products.smt_siblings(fake_topology(tmp_path / "b", {0: "0-1", 1: "0-1"}), {0, 1}) == [(0, 1)]


def test_an_os_without_cpu_affinity_has_no_siblings(monkeypatch):
    """Not Linux (macOS has no sched_getaffinity): no siblings, one thread per core, nothing measured."""
    monkeypatch.delattr(os, "sched_getaffinity")
    assert products.smt_siblings() == [] and products.threads_per_core() == 1


def test_this_hosts_report_matches_its_topology():
    report = products.kernels()
    assert report.threads_per_core == max((len(g) for g in products.smt_siblings()), default=1)
    assert report.poll_slowdown == products.poll_slowdown() >= 1.0
    if report.threads_per_core == 1:
        assert report.poll_slowdown == 1.0  # no sibling to poll on: nothing measured


def pollers() -> list[psutil.Process]:
    return [p for p in psutil.Process().children() if "sched_yield" in " ".join(p.cmdline())]


def test_the_slowdown_is_timed_beside_a_real_poller_on_the_sibling():
    """The measurement itself (on this host's CPUs, siblings or not): the products run pinned to
    the first CPU, the second timing pair with a polling process pinned to the other, which is
    gone afterwards, and the process's own CPUs are given back."""
    cpus = sorted(os.sched_getaffinity(0))
    pair = (cpus[0], cpus[-1])
    seen = []

    def product_s() -> float:
        seen.append(([p.cpu_affinity() for p in pollers()], os.sched_getaffinity(0)))
        return 0.01

    assert products._slowdown_beside_a_poller(pair, product_s) == 1.0
    assert [s[0] for s in seen] == [[], [], [[pair[1]]], [[pair[1]]]]
    assert all(s[1] == {pair[0]} for s in seen)
    assert os.sched_getaffinity(0) == set(cpus) and pollers() == []


def test_cpus_that_cannot_be_chosen_measure_nothing():
    cpus = os.sched_getaffinity(0)
    timed = []
    assert products._slowdown_beside_a_poller((10_000, 10_001), lambda: timed.append(1) or 0.01) == 1.0
    assert timed == [] and os.sched_getaffinity(0) == cpus and pollers() == []


def test_a_client_polls_only_where_it_costs_less_than_a_wake_up():
    client = object.__new__(RpcClient)
    for slowdown, window, costs in [(1.0, MAX_SPIN_NS, False),  # no sibling: polling is free
                                    (1.5, MIN_SPIN_NS, False),  # 7.5 us taken from the products
                                    (1.5, 4 * FUTEX_WAKE_NS * 2, True),  # 20 us: more than a wake-up
                                    (1.05, 300_000, False), (1.05, 500_000, True),
                                    (3.0, 2 * MAX_SPIN_NS, False)]:  # long requests nap, they do not spin
        client.poll_slowdown = slowdown
        assert client._polling_costs(window) is costs, (slowdown, window)


@pytest.mark.parametrize("slowdown", [1.0, 3.0])
def test_a_client_beside_its_server_sleeps_through_its_replies_and_gets_the_same_answers(
        tiny_server, monkeypatch, slowdown):
    """Where polling would slow the server, the client never spins (no sched_yield between looks):
    it sleeps on its reply word's futex, and the answers are the polling client's."""
    spins = []
    monkeypatch.setattr(rpc_client, "relax", lambda: spins.append(1))
    x = torch.randn(2, HIDDEN)
    with RpcClient(tiny_server.endpoint, 5_000) as plain:
        want = plain.call(Op.QKV, 1, [x]).tensors[0].clone()
    with RpcClient(tiny_server.endpoint, 5_000, data_plane="shm", poll_slowdown=slowdown) as client:
        paths = []
        for _ in range(20):
            reply = client.call(Op.QKV, 1, [x])
            assert torch.equal(reply.tensors[0], want)
            paths.append(reply.path)
    assert all(p.startswith("doorbell") for p in paths[1:]), paths
    assert bool(spins) is (slowdown == 1.0), paths


def test_the_engine_gives_its_client_the_hosts_measurement(monkeypatch, tiny_model_dir, tiny_server):
    from teegpu.model.loading import load_weights
    from teegpu.model.tokenizer import load_tokenizer
    from teegpu.tee.engine import Engine

    monkeypatch.setenv("TEEGPU_POLL_SLOWDOWN", "2.5")
    products.poll_slowdown.cache_clear()
    try:
        engine = Engine.connect(load_weights(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir)),
                                tiny_server.endpoint, data_plane="shm")
        try:
            assert engine.client.poll_slowdown == 2.5
        finally:
            engine.close()
    finally:
        products.poll_slowdown.cache_clear()
