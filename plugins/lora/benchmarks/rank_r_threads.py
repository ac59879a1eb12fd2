"""How LoRA's rank-r products and the base's products scale with CPU threads.

A LoRA layer's step adds six rank-r GEMMs to the frozen base's two (``x W^T`` forward, ``g W``
backward): ``x A^T`` and the update's ``addmm`` forward, ``g B``, ``g^T h`` (B's gradient),
``(g B)^T x`` (A's) and the input's ``addmm`` backward. Their FLOPs are a few percent of the base's,
but each is too thin (r = 16 columns or rows) for a second core to help, while the base's products
split over all of them. So LoRA's cost over the frozen floor (``benchmarks/paired_steps.py``,
``limit:frozen``) grows on a CPU whose large GEMMs are fast. This times each product over SmolLM2-135M's
seven projection shapes at one thread and at all of them, and prints a table and writes JSON beside
this script::

    .venv/bin/python plugins/lora/benchmarks/rank_r_threads.py [--tokens 128] [--rounds 300]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "benchmarks"))

from harness import machine, write_json  # noqa: E402  (needs the path above)

#: (in, out) of one SmolLM2-135M decoder layer's projections: q, o, k, v, gate, up, down
SHAPES = ((576, 576), (576, 576), (576, 192), (576, 192), (576, 1536), (576, 1536), (1536, 576))


def products(tokens: int, in_features: int, out_features: int, rank: int) -> dict[str, Callable[[], object]]:
    """The GEMMs of one layer's training step, by name, on random operands of the layer's shapes."""
    x, grad = torch.randn(tokens, in_features), torch.randn(tokens, out_features)
    weight = torch.randn(out_features, in_features)
    lora_A, lora_B = torch.randn(rank, in_features), torch.randn(out_features, rank)
    hidden, grad_hidden = torch.randn(tokens, rank), torch.randn(tokens, rank)
    out, grad_x = torch.randn(tokens, out_features), torch.randn(tokens, in_features)
    return {
        "base: x W^T": lambda: x @ weight.t(),
        "base: g W": lambda: grad @ weight,
        "lora: h = x A^T": lambda: x @ lora_A.t(),
        "lora: out += h B^T": lambda: out.addmm_(hidden, lora_B.t()),
        "lora: g B": lambda: grad @ lora_B,
        "lora: g^T h (B's grad)": lambda: grad.t() @ hidden,
        "lora: (g B)^T x (A's grad)": lambda: grad_hidden.t() @ x,
        "lora: grad_x += (g B) A": lambda: grad_x.addmm_(grad_hidden, lora_A),
    }


def microseconds(fn: Callable[[], object], rounds: int) -> float:
    """Mean wall microseconds of ``fn`` over ``rounds`` calls after ten warm-up calls."""
    for _ in range(10):
        fn()
    start = time.perf_counter()
    for _ in range(rounds):
        fn()
    return (time.perf_counter() - start) / rounds * 1e6


def main() -> None:
    """Time every product at one thread and at all threads, print the table, write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--output", default=str(Path(__file__).with_suffix(".json")))
    ns = parser.parse_args()
    torch.manual_seed(0)
    all_threads = torch.get_num_threads()
    layers = [products(ns.tokens, fan_in, fan_out, ns.rank) for fan_in, fan_out in SHAPES]
    per_threads: dict[int, dict[str, float]] = {}
    for threads in sorted({1, all_threads}):
        torch.set_num_threads(threads)
        per_threads[threads] = {
            name: sum(microseconds(layer[name], ns.rounds) for layer in layers) for name in layers[0]
        }
    torch.set_num_threads(all_threads)
    one, many = per_threads[1], per_threads[all_threads]
    print(f"\nOne SmolLM2-135M decoder layer (7 projections), {ns.tokens} tokens, rank {ns.rank}: us per step\n")
    print(f"| product | 1 thread | {all_threads} threads | speed-up |")
    print("|---|---|---|---|")
    for name in one:
        print(f"| {name} | {one[name]:.0f} | {many[name]:.0f} | {one[name] / many[name]:.2f}x |")
    for prefix in ("base", "lora"):
        total_one = sum(v for k, v in one.items() if k.startswith(prefix))
        total_many = sum(v for k, v in many.items() if k.startswith(prefix))
        print(f"| **all {prefix}** | {total_one:.0f} | {total_many:.0f} | {total_one / total_many:.2f}x |")
    document = {
        "command": "plugins/lora/benchmarks/rank_r_threads.py",
        "settings": vars(ns),
        "machine": machine(),
        "microseconds_by_threads": {str(threads): times for threads, times in per_threads.items()},
    }
    print(f"\nwrote {write_json(ns.output, document)}")


if __name__ == "__main__":
    main()
