"""A side stops polling while its thread waits for a CPU (other tenants keep the cores busy), for at
least HOLD_NS, and polls again once the cores are free: CpuWait reads the kernel's run-queue wait."""
from teegpu.transport import doorbell
from teegpu.transport.doorbell import CpuWait


def run(monkeypatch, waits_ns: list[int], step_ns: int) -> list[bool]:
    """contended() at each step of a clock advancing step_ns, the thread having waited waits_ns[i] so far."""
    clock = {"now": 0, "wait": 0}
    monkeypatch.setattr(doorbell.time, "perf_counter_ns", lambda: clock["now"])
    monkeypatch.setattr(doorbell, "_run_queue_wait_ns", lambda: clock["wait"])
    cw, states = CpuWait(), []
    for wait in waits_ns:
        clock["wait"] = wait
        states.append(cw.contended())
        clock["now"] += step_ns
    return states


def test_waiting_for_a_cpu_stops_polling_and_free_cores_resume_it(monkeypatch):
    step = CpuWait.INTERVAL_NS
    busy = [i * step // 2 for i in range(5)]  # half of every interval spent waiting for a CPU
    idle = [busy[-1]] * (CpuWait.HOLD_NS // step + 2)  # then none
    states = run(monkeypatch, busy + idle, step)
    assert states[0] is False and all(states[1:5])  # contended from the second reading on
    assert all(states[5:5 + CpuWait.HOLD_NS // step - 1])  # held while the hold lasts
    assert states[-1] is False  # free cores: polling again


def test_a_little_waiting_is_not_contention(monkeypatch):
    step = CpuWait.INTERVAL_NS
    states = run(monkeypatch, [i * step // 20 for i in range(6)], step)  # 5% of the time
    assert not any(states)
    # a third: what the two sides make themselves (the client polling through a prefill product
    # that runs on every core), no other tenant
    assert not any(run(monkeypatch, [i * step // 3 for i in range(6)], step))


def test_the_real_schedstat_is_read():
    wait = doorbell._run_queue_wait_ns()
    assert wait is None or wait >= 0
