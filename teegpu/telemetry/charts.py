"""The analyzer's PNG: time per op split by component, and a per-call timeline."""
from __future__ import annotations

from collections import defaultdict

SEGMENTS = (  # (label, colour, how to get it from a record)
    ("serialize", "#4c72b0", lambda r: r["serialize_ms"]),
    ("send", "#64b5cd", lambda r: r["send_ms"]),
    ("wire + wake-up", "#dd8452", lambda r: max(0.0, r["wait_ms"] - r["server_compute_ms"] - r["server_overhead_ms"])),
    ("server overhead", "#c44e52", lambda r: r["server_overhead_ms"]),
    ("server compute", "#55a868", lambda r: r["server_compute_ms"]),
    ("receive", "#8172b2", lambda r: r["recv_ms"]),
    ("deserialize", "#937860", lambda r: r["deserialize_ms"]),
)
LANES = ("QKV", "ATTN_SCORES", "ATTN_CONTEXT", "O", "GATE_UP", "DOWN", "LM_HEAD")


def plot(records: list[dict], run: dict, path: str, decode_steps: int = 3) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (bars, timeline) = plt.subplots(2, 1, figsize=(12, 9), gridspec_kw={"height_ratios": [1, 1.2]})
    _breakdown(bars, records)
    _timeline(timeline, records, decode_steps)
    fig.suptitle(f"teegpu RPCs: {run.get('transport')} {run.get('dtype')} on {run.get('device')}, "
                 f"{len(records)} calls", fontsize=13)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _breakdown(ax, records: list[dict]) -> None:
    by_op = defaultdict(list)
    for r in records:
        by_op[(r["op"], r["phase"])].append(r)
    keys = sorted(by_op, key=lambda k: (LANES.index(k[0]) if k[0] in LANES else 99, k[1]))
    labels = [f"{op}\n{phase}" for op, phase in keys]
    bottom = [0.0] * len(keys)
    for label, colour, get in SEGMENTS:
        means = [sum(get(r) for r in by_op[k]) / len(by_op[k]) for k in keys]
        ax.bar(labels, means, bottom=bottom, color=colour, label=label)
        bottom = [b + m for b, m in zip(bottom, means)]
    ax.set_ylabel("mean ms per call")
    ax.set_title("time per call, by op and phase")
    ax.legend(ncol=4, fontsize=8)
    ax.tick_params(axis="x", labelsize=8)


def _timeline(ax, records: list[dict], decode_steps: int) -> None:
    shown = [r for r in records if r["phase"] == "prefill" or (r["phase"] == "decode" and r["token"] <= decode_steps)]
    if not shown or "start_ms" not in shown[0]:
        ax.set_title("timeline: no calls to show")
        return
    t0 = shown[0]["start_ms"]
    lanes = [op for op in LANES if any(r["op"] == op for r in shown)]
    for r in shown:
        y = lanes.index(r["op"])
        x = r["start_ms"] - t0
        ax.broken_barh([(x, r["total_ms"])], (y - 0.35, 0.7), color="#dd8452")
        compute_at = x + r["serialize_ms"] + r["send_ms"] + max(0.0, r["wait_ms"] - r["server_compute_ms"]) / 2
        ax.broken_barh([(compute_at, r["server_compute_ms"])], (y - 0.35, 0.7), color="#55a868")
    firsts = {}
    for r in shown:
        firsts.setdefault((r["phase"], r["token"]), r["start_ms"] - t0)
    for (phase, token), x in firsts.items():
        ax.axvline(x, color="grey", lw=0.8, ls="--")
        ax.text(x, len(lanes) - 0.4, "prefill" if phase == "prefill" else f"token {token}", fontsize=8)
    ax.set_yticks(range(len(lanes)), lanes)
    ax.set_xlabel("ms since the prefill's first call")
    ax.set_title(f"timeline: prefill and {decode_steps} decode steps (orange: round trip, green: server compute)")
