#!/usr/bin/env python3
"""Compares two seeded `fedsvd run` folders (the same configuration on the
GPU and on the CPU) by the issue's acceptance: per round, training and
evaluation losses within 1e-3 relative, epsilon identical, sampled clients
identical, accuracy within one test example. Exit status 1 on a mismatch."""
import json
import sys


def rounds(folder):
    with open(f"{folder}/metrics.jsonl") as f:
        return [json.loads(line) for line in f if line.strip()]


def close(a, b, rel=1e-3):
    return abs(a - b) <= rel * max(abs(a), abs(b), 1e-12)


def main(gpu_dir, cpu_dir):
    gpu, cpu = rounds(gpu_dir), rounds(cpu_dir)
    with open(f"{cpu_dir}/data.json") as f:
        test = json.load(f)["test_examples"]
    ok = len(gpu) == len(cpu) and len(gpu) > 0
    print(f"rounds: gpu {len(gpu)}, cpu {len(cpu)}; {test} test examples")
    for g, c in zip(gpu, cpu):
        checks = {
            "sampled clients": g["sampled_clients"] == c["sampled_clients"],
            "epsilon": g["max_epsilon"] == c["max_epsilon"]
            and g["client_epsilon"] == c["client_epsilon"],
            "train loss": close(g["train_loss"], c["train_loss"]),
            "eval loss": close(g["eval_loss"], c["eval_loss"]),
            "accuracy": abs(g["eval_accuracy"] - c["eval_accuracy"]) * test <= 1 + 1e-9,
        }
        print(
            f"round {g['round']}: train loss {g['train_loss']:.6f} / {c['train_loss']:.6f}, "
            f"eval loss {g['eval_loss']:.6f} / {c['eval_loss']:.6f}, "
            f"accuracy {g['eval_accuracy']:.4f} / {c['eval_accuracy']:.4f}, "
            f"eps {g['max_epsilon']} / {c['max_epsilon']}: "
            + ", ".join(k + (" ok" if v else " MISMATCH") for k, v in checks.items())
        )
        ok &= all(checks.values())
    for name in ("gpu", "cpu"):
        folder = gpu_dir if name == "gpu" else cpu_dir
        with open(f"{folder}/summary.json") as f:
            s = json.load(f)
        print(f"{name}: device {s.get('device')}, wall {s.get('wall_seconds')} s")
    print("federated GPU vs CPU:", "MATCH" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
