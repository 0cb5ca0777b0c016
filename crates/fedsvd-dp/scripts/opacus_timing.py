#!/usr/bin/env python3
"""Times Opacus's accountants on the fedsvd-dp benchmark tasks.

A reference tool for docs/benchmarks.md, not used by any test or build:
run it with a Python environment that has Opacus 1.x installed, on the same
machine as `cargo bench -p fedsvd-dp --bench accounting`, and compare the
medians. Import time (torch) is excluded; each task is timed in-process,
`--repeats` times, after one warm-up call, like criterion does for ours.

    python crates/fedsvd-dp/scripts/opacus_timing.py [--repeats 7] [--json]

Tasks (δ = 1e-5 throughout, Opacus's default eps_error / tolerance):
  prv_epsilon        PRVAccountant.get_epsilon after history [(1.0, 0.01, 1000)]
  rdp_epsilon        RDPAccountant.get_epsilon after the same history
  calibrate_prv      get_noise_multiplier(target_epsilon=6, sample_rate=0.01,
                     steps=1000, accountant="prv")
  calibrate_rdp      the same with accountant="rdp"
"""

import argparse
import json
import os
import platform
import statistics
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    args = parser.parse_args()

    import opacus
    from opacus.accountants import PRVAccountant, RDPAccountant
    from opacus.accountants.utils import get_noise_multiplier

    delta = 1e-5
    history = [(1.0, 0.01, 1000)]

    def prv_epsilon():
        acc = PRVAccountant()
        acc.history = list(history)
        return acc.get_epsilon(delta=delta)

    def rdp_epsilon():
        acc = RDPAccountant()
        acc.history = list(history)
        return acc.get_epsilon(delta=delta)

    def calibrate(kind):
        return lambda: get_noise_multiplier(
            target_epsilon=6.0,
            target_delta=delta,
            sample_rate=0.01,
            steps=1000,
            accountant=kind,
            epsilon_tolerance=0.01,
        )

    tasks = {
        "prv_epsilon": prv_epsilon,
        "rdp_epsilon": rdp_epsilon,
        "calibrate_prv": calibrate("prv"),
        "calibrate_rdp": calibrate("rdp"),
    }
    results = {}
    for name, task in tasks.items():
        value = task()  # warm-up (imports, caches)
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            task()
            times.append(time.perf_counter() - start)
        results[name] = {
            "value": float(value),
            "median_s": statistics.median(times),
            "min_s": min(times),
            "max_s": max(times),
            "repeats": args.repeats,
        }
    report = {
        "opacus": opacus.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "load_average": os.getloadavg(),
        "tasks": results,
    }
    if args.json:
        print(json.dumps(report))
    else:
        print(f"Opacus {report['opacus']}, Python {report['python']}, "
              f"{report['cpus']} CPUs, load average {report['load_average'][0]:.2f}")
        for name, r in results.items():
            print(f"{name:14s} median {r['median_s'] * 1e3:9.2f} ms  "
                  f"[min {r['min_s'] * 1e3:.2f}, max {r['max_s'] * 1e3:.2f}]  value {r['value']:.6g}")


if __name__ == "__main__":
    main()
