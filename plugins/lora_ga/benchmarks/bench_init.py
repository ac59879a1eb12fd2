"""LoRA-GA initialisation on SmolLM2-135M, all-linear, r=16: ours vs peft.preprocess_loraga vs exact.

Each variant runs in a fresh process (peak RSS = resource.getrusage ru_maxrss), on the same
``--batches`` batches of ``--batch-size`` x ``--seq-len`` tokens of the packaged text:

* ``lora_step``   two LoRA training steps (AdamW) on the first batch: the memory yardstick (1.1x goal)
* ``reference``   exact G by plain autograd on the weights, exact SVD: the subspaces to agree with
* ``peft``        peft.preprocess_loraga + get_peft_model(init_lora_weights="lora_ga")
* ``ours_*``      this plugin's on_train_begin hook: ``full`` (default, 4 layer groups), ``full_g1``
                  (one group: one pass, more memory), ``sketch``

Subspace agreement of a layer = ||P_ref^T Q_est||_F^2 / r (1 = same subspace), for A's row space
(reference: top-r right singular vectors of G) and B's column space (left vectors r+1..2r),
averaged over the 210 layers. Usage: ``python bench_init.py`` (prints a table, writes bench_init.json).
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
VARIANTS = ["lora_step", "reference", "peft", "ours_full_g1", "ours_full", "ours_sketch"]
R = 16


def _setup(args):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_lowrank_plugins.app.data import load_blocks
    from hf_lowrank_plugins.app.embedded import default_model_dir

    torch.manual_seed(0)
    model_dir = default_model_dir()
    tok = AutoTokenizer.from_pretrained(model_dir)
    train, _ = load_blocks(
        None, tok, args["seq_len"], max_blocks=args["batches"] * args["batch_size"] + 2, eval_blocks=1
    )
    loader = torch.utils.data.DataLoader(train, batch_size=args["batch_size"], shuffle=False)
    batches = [b for _, b in zip(range(args["batches"]), loader, strict=False)]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return model, batches


def _agreement(ref, factors):
    import torch

    a_scores, b_scores = [], []
    for name, (A, B) in factors.items():
        Vr, Ur2 = ref[name]
        qa = torch.linalg.qr(A.float().t())[0]
        qb = torch.linalg.qr(B.float())[0]
        a_scores.append(float((Vr @ qa).pow(2).sum() / R))
        b_scores.append(float((Ur2.t() @ qb).pow(2).sum() / R))
    return sum(a_scores) / len(a_scores), sum(b_scores) / len(b_scores), min(a_scores), min(b_scores)


def _lora_factors(model):
    from peft.tuners.lora import LoraLayer

    out = {}
    for n, m in model.named_modules():
        if isinstance(m, LoraLayer):
            key = n.replace("base_model.model.", "")
            out[key] = (m.lora_A["default"].weight.detach(), m.lora_B["default"].weight.detach())
    return out


def run_variant(variant: str, args: dict) -> dict:
    """Run one variant in this process and return its figures."""
    import torch

    model, batches = _setup(args)
    model.train()
    result: dict = {"variant": variant}
    t0 = time.perf_counter()
    if variant == "lora_step":
        from peft import LoraConfig, get_peft_model

        peft_model = get_peft_model(model, LoraConfig(r=R, lora_alpha=16, target_modules="all-linear"))
        opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-4)
        for _ in range(2):
            peft_model(**batches[0]).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    elif variant == "reference":
        for p in model.parameters():
            p.requires_grad_(False)
        weights = {
            n: m.weight
            for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head")
        }
        for w in weights.values():
            w.requires_grad_(True)
        for b in batches:
            model(**b).loss.backward()
        ref = {}
        for n, w in weights.items():
            U, S, Vh = torch.linalg.svd(w.grad / len(batches), full_matrices=False)
            ref[n] = (Vh[:R].contiguous(), U[:, R : 2 * R].contiguous())
        torch.save(ref, HERE / ".reference_subspaces.pt")
    elif variant == "peft":
        from peft import LoraConfig, get_peft_model
        from peft.tuners.lora.config import LoraGAConfig
        from peft.tuners.lora.loraga import preprocess_loraga

        # preprocess_loraga runs before get_peft_model, so it cannot expand "all-linear": name the layers
        names = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        cfg = LoraConfig(
            r=R,
            lora_alpha=16,
            use_rslora=True,
            target_modules=names,
            init_lora_weights="lora_ga",
            lora_ga_config=LoraGAConfig(),
        )

        def train_step():
            for b in batches:
                model(**b).loss.backward()

        preprocess_loraga(model, cfg, train_step)
        model = get_peft_model(model, cfg)
    else:
        import hf_lowrank_plugins as hlp

        fields = {
            "ours_full": {"estimator": "full"},
            "ours_full_g1": {"estimator": "full", "ga_layer_groups": 1},
            "ours_sketch": {"estimator": "sketch"},
        }[variant]
        adapted = hlp.attach(model, "lora_ga", r=R, ga_batches=len(batches), **fields)
        t0 = time.perf_counter()  # the estimate + init only, as for PEFT (whose attach is the init)
        adapted.begin_training(batches)
        model = adapted.model
    result["seconds"] = time.perf_counter() - t0
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if variant not in ("lora_step", "reference"):
        ref = torch.load(HERE / ".reference_subspaces.pt")
        a, b, amin, bmin = _agreement(ref, _lora_factors(model))
        result.update(agree_A=a, agree_B=b, agree_A_min=amin, agree_B_min=bmin)
    return result


def main() -> None:
    """Run every variant in a fresh process, print a table, write bench_init.json."""
    args = {"batches": 4, "batch_size": 2, "seq_len": 64}
    if len(sys.argv) > 1 and sys.argv[1] == "--variant":
        print("RESULT " + json.dumps(run_variant(sys.argv[2], args)))
        return
    results = []
    for variant in VARIANTS:
        partial = HERE / f".partial_{variant}.json"  # lets a rerun skip the variants already measured
        if partial.exists():
            results.append(json.loads(partial.read_text()))
            continue
        proc = subprocess.run([sys.executable, __file__, "--variant", variant], capture_output=True, text=True)
        line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        if proc.returncode or not line:
            print(proc.stderr[-3000:])
            raise SystemExit(f"variant {variant} failed")
        results.append(json.loads(line[-1][7:]))
        partial.write_text(json.dumps(results[-1]))
        print(results[-1], flush=True)
    step_peak = results[0]["peak_rss_mb"]
    print(f"\n{args['batches']} batches x {args['batch_size']} x {args['seq_len']} tokens, r={R}, all-linear, fp32\n")
    print("| variant | init s | peak RSS MB | / LoRA step peak | agree A (mean, min) | agree B (mean, min) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in results:
        agree = (
            f"{r['agree_A']:.4f}, {r['agree_A_min']:.3f} | {r['agree_B']:.4f}, {r['agree_B_min']:.3f}"
            if "agree_A" in r
            else "- | -"
        )
        print(
            f"| {r['variant']} | {r['seconds']:.1f} | {r['peak_rss_mb']:.0f} | {r['peak_rss_mb'] / step_peak:.2f}x | {agree} |"
        )
    (HERE / "bench_init.json").write_text(json.dumps({"settings": args, "rank": R, "results": results}, indent=2))
    for path in [HERE / ".reference_subspaces.pt", *HERE.glob(".partial_*.json")]:
        path.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
