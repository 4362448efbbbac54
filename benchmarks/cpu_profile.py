"""Where the time of a CPU train step goes: XLA's ops grouped by kind, from a profiler trace.

    python benchmarks/cpu_profile.py [--preset=shakespeare_char_cpu] [--steps=20] [--without_attention]

Prints the step's milliseconds and, per kind of op (``dot`` and ``dot_general`` are matrix products,
attention's batched ones among the ``dot``; fusions go by their name), the op time per step from
start to completion, summed over ops (XLA runs independent ops concurrently, so the column adds up
to more than the step), and the ops per step.
``--without_attention`` replaces the attention core (scores, softmax, weighted values) by q + k + v:
not a model, a way to measure what attention costs inside the compiled step. Random tokens, as in
``cpu_speed.py``.
"""

from __future__ import annotations

import argparse
import bisect
import collections
import gzip
import json
import re
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
from cpu_speed import compiled_step, time_steps  # noqa: E402

from gpt_jax import attention  # noqa: E402


def op_times(trace_dir: str, steps: int) -> dict[str, tuple[float, float]]:
    """{kind: (op milliseconds per step, ops per step)} from the trace: each XLA op is an event
    at its start and an ``end: NAME`` event at its completion."""
    files = sorted(Path(trace_dir).rglob("*.trace.json.gz"))
    if not files:
        return {}
    events = [e for e in json.load(gzip.open(files[-1]))["traceEvents"] if e.get("ph") == "X"]
    starts, ends = collections.defaultdict(list), collections.defaultdict(list)
    for e in events:
        if e["name"].startswith("end: "):
            ends[e["name"][5:]].append(e["ts"] + e["dur"])
        else:
            starts[e["name"]].append(e["ts"])
    total, count = collections.Counter(), collections.Counter()
    for name, finished in ends.items():
        kind = re.sub(r"[.\d]+$", "", name)
        begins = sorted(starts[name])
        for done in finished:  # an op of one name runs once at a time: its start is the latest before
            i = bisect.bisect_right(begins, done)
            if i:
                total[kind] += done - begins[i - 1]
                count[kind] += 1
    return {k: (total[k] / steps / 1000, count[k] / steps) for k, _ in total.most_common()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="shakespeare_char_cpu")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--without_attention", action="store_true")
    args = parser.parse_args()

    if args.without_attention:
        attention.attention_xla = lambda q, k, v, visible, dropout=None: q + k + v
    _, state, x, y, step, _ = compiled_step(args.preset)
    times, state = time_steps(step, state, x, y, args.steps, repeats=3)
    times = [t * 1000 for t in times]
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir):
            for _ in range(args.steps):
                state, metrics = step(state, x, y)
            jax.block_until_ready(metrics)
        kinds = op_times(trace_dir, args.steps)

    what = "without the attention core" if args.without_attention else "as trained"
    print(f"preset {args.preset}, {what}: {statistics.median(times):.1f} ms/step "
          f"(repeats: {', '.join(f'{t:.1f}' for t in times)}), jax {jax.__version__}, "
          f"{jax.devices()[0].device_kind}")
    if not kinds:
        print("the trace holds no XLA op events (this JAX version traces differently)")
    else:
        print(f"op time per step, summed over ops: {sum(ms for ms, _ in kinds.values()):.1f} ms")
        for kind, (ms, n) in list(kinds.items())[:15]:
            print(f"  {ms:7.2f} ms  {n:5.1f} ops  {kind}")
    flag = " --without_attention" if args.without_attention else ""
    print(f"reproduce: python benchmarks/cpu_profile.py --preset={args.preset} --steps={args.steps}{flag}")


if __name__ == "__main__":
    main()
