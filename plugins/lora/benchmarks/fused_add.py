"""One LoRA layer's training step (forward and backward): PEFT's plain forward against ours.

PEFT's forward adds ``lora_B(lora_A(x)) * scaling`` to the base output in two passes over a
``tokens x out`` tensor, and its backward makes one more; ours (``hf_lowrank_lora.fused_add``)
scales the rank-r hidden and lets ``addmm`` take the sum, and on a plain frozen ``nn.Linear`` base
:class:`~hf_lowrank_lora.FusedLoraLinear` makes the whole layer one autograd node. The same layer
object runs all three ways (the variant put in and taken out of PEFT's ``lora_variant`` slot, the
class switched between PEFT's ``Linear`` and ``FusedLoraLinear``), one step each per round in an
order that rotates, and each ratio to PEFT's is the median over rounds of the steps' ratio, so the
machine's drift cancels. The base weight stays frozen and the input requires a gradient, as in a
model. Prints a table and writes JSON beside this script::

    .venv/bin/python plugins/lora/benchmarks/fused_add.py [--tokens 128,1024] [--rounds 200]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora.layer import Linear as PeftLoraLinear

from hf_lowrank_lora import FusedAddLoraVariant, FusedLoraLinear

#: How each timed step runs the layer: its class, and whether it has the fused-add variant.
MODES = {"peft": (PeftLoraLinear, False), "variant": (PeftLoraLinear, True), "one_node": (FusedLoraLinear, True)}

#: (in, out) of SmolLM2-135M's projections: q/o, gate/up, down (k/v are 576 x 192)
SHAPES = ((576, 576), (576, 1536), (1536, 576))


def peft_layer(in_features: int, out_features: int, rank: int) -> Any:
    """A frozen linear layer with one PEFT LoRA adapter whose B is non-zero (a trained-looking adapter).

    Typed ``Any``: PEFT leaves its layers' attributes (``lora_variant``, ``lora_B``) untyped."""
    model = get_peft_model(
        torch.nn.Sequential(torch.nn.Linear(in_features, out_features, bias=False)),
        LoraConfig(r=rank, lora_alpha=rank, target_modules=["0"]),
    )
    layer = model.base_model.model[0]
    torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.01)
    return layer


def step_seconds(layer: Any, x: torch.Tensor, grad: torch.Tensor) -> float:
    """Wall seconds of one forward and backward (gradients of x, A and B), gradients then dropped."""
    start = time.perf_counter()
    layer(x).backward(grad)
    elapsed = time.perf_counter() - start
    x.grad = None
    for param in layer.parameters():
        param.grad = None
    return elapsed


def measure(in_features: int, out_features: int, tokens: int, rank: int, rounds: int) -> dict[str, float]:
    """Median step time of every one of :data:`MODES` and the median over rounds of each mode / PEFT's."""
    torch.manual_seed(0)
    layer = peft_layer(in_features, out_features, rank)
    x = torch.randn(tokens, in_features, requires_grad=True)
    grad = torch.randn(tokens, out_features)
    names = list(MODES)
    times: dict[str, list[float]] = {name: [] for name in names}
    for index in range(rounds + 5):  # the first five rounds warm up
        shift = index % len(names)
        for name in names[shift:] + names[:shift]:
            layer_class, with_variant = MODES[name]
            layer.__class__ = layer_class
            if with_variant:
                layer.lora_variant["default"] = FusedAddLoraVariant()
            else:
                layer.lora_variant.pop("default", None)
            seconds = step_seconds(layer, x, grad)
            if index >= 5:
                times[name].append(seconds)
    result = {f"{name}_ms": statistics.median(times[name]) * 1e3 for name in names}
    for name in names[1:]:
        result[f"{name}_ratio"] = statistics.median(o / p for o, p in zip(times[name], times["peft"], strict=True))
    return result


def main() -> None:
    """Measure every shape at every token count, print the table, write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", default="128,1024", help="rows of the layer input, comma separated")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", default=str(Path(__file__).with_suffix(".json")))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    print(
        "| tokens | in x out | PEFT ms | variant ms | one node ms | variant / PEFT | one node / PEFT |\n"
        "|---|---|---|---|---|---|---|"
    )
    for tokens in (int(t) for t in args.tokens.split(",")):
        for in_features, out_features in SHAPES:
            result = measure(in_features, out_features, tokens, args.rank, args.rounds)
            rows.append({"tokens": tokens, "in": in_features, "out": out_features, **result})
            print(
                f"| {tokens} | {in_features} x {out_features} | {result['peft_ms']:.3f} | {result['variant_ms']:.3f} "
                f"| {result['one_node_ms']:.3f} | {result['variant_ratio']:.3f} | {result['one_node_ratio']:.3f} |",
                flush=True,
            )
    document = {
        "command": " ".join(sys.argv),
        "settings": vars(args),
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": args.threads},
        "results": rows,
    }
    Path(args.output).write_text(json.dumps(document, indent=2) + "\n")
    print(f"\nwrote {args.output}")


if __name__ == "__main__":
    main()
