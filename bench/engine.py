"""Engine throughput on one core against a bare loop doing the same threshold comparisons.

Both see the same pre-built samples: five parameters of the example CAR-T protocol in its
expansion phase, each read once a second: slow drifts, short spikes, an excursion an hour.
Prints one JSON object as its last line.
"""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path

from pocd.engine import Engine
from pocd.model import NS, Run, Sample
from pocd.settings import load_protocol

N = 1_000_000
ROUNDS = 3
PROTOCOL = Path(__file__).resolve().parent.parent / "config/protocols/cart-tct-3.1.toml"


def main() -> None:
    protocol = load_protocol(PROTOCOL)
    phase = protocol.phase("expansion")
    params = [p for p in protocol.parameters if phase.limits[p].monitored]
    sources = {p: ("dev", p) for p in params}
    centre = {
        p: ((phase.limits[p].alert_low or 0.0) + (phase.limits[p].alert_high or 0.0)) / 2
        for p in params
    }
    rng = random.Random(1)
    t0 = time.time_ns()
    samples = []
    for i in range(N):
        p = params[i % len(params)]
        k = i // len(params)  # each parameter is read once a second
        lim = phase.limits[p]
        width = (lim.alert_high or 0.0) - (lim.alert_low or 0.0)
        value = (
            centre[p] + 0.35 * width * math.sin(2 * math.pi * k / 600) + rng.gauss(0, width / 500)
        )
        if rng.random() < 0.01:  # a spike now and then: a breach shorter than the on-delay
            value += rng.choice((-0.9, 0.9)) * width
        if 300 <= k % 3600 < 400:  # once an hour, 100 s beyond the alert limit
            value += 0.8 * width
        samples.append(Sample("dev", p, t0 + k * NS + i % len(params), value))

    run = Run("R", "B", "S", "UTC", protocol.id, protocol.version, protocol.hash, "op", t0)
    phases = [p.id for p in protocol.phases]
    events = 0
    engine_s = math.inf
    for _ in range(ROUNDS):  # the best of a few rounds, as the machine is shared
        engine = Engine(run, protocol, sources)
        for name in phases[: phases.index("expansion") + 1]:
            engine.enter_phase(name, t0, "bench")
        start = time.perf_counter()
        events = sum(len(engine.on_sample(sample)) for sample in samples)
        engine_s = min(engine_s, time.perf_counter() - start)

    limits = {
        p: (
            phase.limits[p].action_low,
            phase.limits[p].alert_low,
            phase.limits[p].alert_high,
            phase.limits[p].action_high,
        )
        for p in params
    }
    breaches = 0
    bare_s = math.inf
    for _ in range(ROUNDS):
        breaches = 0
        start = time.perf_counter()
        for sample in samples:
            lo2, lo1, hi1, hi2 = limits[sample.point]
            value = sample.value
            if lo2 is not None and value < lo2:
                breaches += 1
            if lo1 is not None and value < lo1:
                breaches += 1
            if hi1 is not None and value > hi1:
                breaches += 1
            if hi2 is not None and value > hi2:
                breaches += 1
        bare_s = min(bare_s, time.perf_counter() - start)

    engine_rate = N / engine_s
    bare_rate = N / bare_s
    print(f"engine: {engine_rate:,.0f} samples/s ({events} events)")
    checks = 4 * bare_rate
    print(f"bare loop: {bare_rate:,.0f} samples/s ({checks:,.0f} checks/s, {breaches} breaches)")
    result = {
        "samples": N,
        "engine_samples_per_s": round(engine_rate),
        "bare_samples_per_s": round(bare_rate),
        "bare_checks_per_s": round(4 * bare_rate),
        "events": events,
        "ratio": round(engine_rate / bare_rate, 3),
        "target_ratio": 0.1,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
