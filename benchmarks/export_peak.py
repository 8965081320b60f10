"""Wall time and peak host memory of `finetune export` on a DeepSeek-V2-Lite-shaped checkpoint.

Writes, with seeded random bf16 weights, a checkpoint folder in the deepseek-ai Hub layout of
DeepSeek-V2-Lite (its remote-code config.json, per-expert keys, 4 safetensors shards + index; 31.4 GB at
the full 27 layers), a run folder whose recipe.yaml points at it, and an adapter written directly (no
training): LoRA r=16 on the MLA projections of every layer and routed-expert LoRA (rank --expert-r) on
all 64 experts of every MoE layer, every B nonzero. Then runs `finetune export` in a subprocess per
`--base` and reports its wall seconds and peak resident set size (the child's own `ru_maxrss`, from
`os.wait4`), and checks a few exported tensors against base + delta computed here.

Disk: the checkpoint, the adapter (about 1.5 % of it) and one export at a time, about 2x the checkpoint
(63 GB at 27 layers), checked before anything is written; `--export-dir` puts the exports on another disk
(or /dev/shm). Everything is deleted at the end unless --keep. The checkpoint is written one shard at a
time (safetensors' own writer, so this process holds one 8 GB shard at the peak); the export runs in a
process of its own, started from a small launcher so that its peak RSS is its own.

    python benchmarks/export_peak.py --layers 3 --dir /tmp/bench --out-json export.json       # small, CPU
    python benchmarks/export_peak.py --dir /scratch/bench --out-json export.json              # full V2-Lite
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

# deepseek-ai/DeepSeek-V2-Lite config.json (remote code), num_hidden_layers set by --layers.
V2_LITE = {
    "architectures": ["DeepseekV2ForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "auto_map": {
        "AutoConfig": "configuration_deepseek.DeepseekV2Config",
        "AutoModel": "modeling_deepseek.DeepseekV2Model",
        "AutoModelForCausalLM": "modeling_deepseek.DeepseekV2ForCausalLM",
    },
    "aux_loss_alpha": 0.001,
    "bos_token_id": 100000,
    "eos_token_id": 100001,
    "first_k_dense_replace": 1,
    "hidden_act": "silu",
    "hidden_size": 2048,
    "initializer_range": 0.02,
    "intermediate_size": 10944,
    "kv_lora_rank": 512,
    "max_position_embeddings": 163840,
    "model_type": "deepseek_v2",
    "moe_intermediate_size": 1408,
    "moe_layer_freq": 1,
    "n_group": 1,
    "n_routed_experts": 64,
    "n_shared_experts": 2,
    "norm_topk_prob": False,
    "num_attention_heads": 16,
    "num_experts_per_tok": 6,
    "num_hidden_layers": 27,
    "num_key_value_heads": 16,
    "pretraining_tp": 1,
    "q_lora_rank": None,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "rms_norm_eps": 1e-06,
    "rope_scaling": {
        "beta_fast": 32,
        "beta_slow": 1,
        "factor": 40,
        "mscale": 0.707,
        "mscale_all_dim": 0.707,
        "original_max_position_embeddings": 4096,
        "type": "yarn",
    },
    "rope_theta": 10000,
    "routed_scaling_factor": 1.0,
    "scoring_func": "softmax",
    "seq_aux": True,
    "tie_word_embeddings": False,
    "topk_group": 1,
    "topk_method": "greedy",
    "torch_dtype": "bfloat16",
    "transformers_version": "4.39.3",
    "use_cache": True,
    "v_head_dim": 128,
    "vocab_size": 102400,
}
MLA = ("q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")
POOL = 1 << 26  # random bf16 values drawn once; tensors are windows of it at random offsets


def shapes(c: dict) -> dict[str, tuple[int, ...]]:
    """Every tensor of the checkpoint in the Hub's names, in layer order."""
    h, heads = c["hidden_size"], c["num_attention_heads"]
    qk = c["qk_nope_head_dim"] + c["qk_rope_head_dim"]
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (c["vocab_size"], h)}
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}"
        out |= {
            f"{p}.input_layernorm.weight": (h,),
            f"{p}.self_attn.q_proj.weight": (heads * qk, h),
            f"{p}.self_attn.kv_a_proj_with_mqa.weight": (c["kv_lora_rank"] + c["qk_rope_head_dim"], h),
            f"{p}.self_attn.kv_a_layernorm.weight": (c["kv_lora_rank"],),
            f"{p}.self_attn.kv_b_proj.weight": (
                heads * (c["qk_nope_head_dim"] + c["v_head_dim"]),
                c["kv_lora_rank"],
            ),
            f"{p}.self_attn.o_proj.weight": (h, heads * c["v_head_dim"]),
            f"{p}.post_attention_layernorm.weight": (h,),
        }
        if i < c["first_k_dense_replace"]:
            inter = c["intermediate_size"]
            out |= {f"{p}.mlp.{w}_proj.weight": (inter, h) for w in ("gate", "up")}
            out[f"{p}.mlp.down_proj.weight"] = (h, inter)
            continue
        inter, shared = c["moe_intermediate_size"], c["moe_intermediate_size"] * c["n_shared_experts"]
        out[f"{p}.mlp.gate.weight"] = (c["n_routed_experts"], h)
        for j in range(c["n_routed_experts"]):
            out |= {f"{p}.mlp.experts.{j}.{w}_proj.weight": (inter, h) for w in ("gate", "up")}
            out[f"{p}.mlp.experts.{j}.down_proj.weight"] = (h, inter)
        out |= {f"{p}.mlp.shared_experts.{w}_proj.weight": (shared, h) for w in ("gate", "up")}
        out[f"{p}.mlp.shared_experts.down_proj.weight"] = (h, shared)
    out["model.norm.weight"] = (h,)
    out["lm_head.weight"] = (c["vocab_size"], h)
    return out


class Random:
    """Seeded random tensors, fast: windows of one pool of N(0, 0.02) bf16 values at random offsets."""

    def __init__(self, seed: int):
        self.generator = torch.Generator().manual_seed(seed)
        self.pool = (torch.randn(2 * POOL, generator=self.generator) * 0.02).to(torch.bfloat16)

    def tensor(self, shape: tuple[int, ...], dtype=torch.bfloat16) -> torch.Tensor:
        n = math.prod(shape)
        out = torch.empty(n, dtype=torch.bfloat16)
        for start in range(0, n, POOL):
            size = min(POOL, n - start)
            offset = int(torch.randint(0, POOL, (1,), generator=self.generator))
            out[start : start + size] = self.pool[offset : offset + size]
        return out.view(shape).to(dtype)


def write_checkpoint(folder: Path, config: dict, n_shards: int, rng: Random) -> int:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    generation = {"bos_token_id": 100000, "eos_token_id": 100001, "do_sample": True, "temperature": 0.3}
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    tensors = shapes(config)
    sizes = {k: 2 * math.prod(s) for k, s in tensors.items()}
    total, keys = sum(sizes.values()), list(tensors)
    weight_map, start = {}, 0
    for i in range(n_shards):
        name = f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors"
        end, used = start, 0
        while end < len(keys) and (used < total / n_shards or i == n_shards - 1):
            used += sizes[keys[end]]
            end += 1
        shard = {}
        for key in keys[start:end]:
            norm = key.endswith("norm.weight")
            shard[key] = torch.ones(tensors[key], dtype=torch.bfloat16) if norm else rng.tensor(tensors[key])
        save_file(shard, str(folder / name), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(shard, name)
        del shard
        start = end
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return total


def write_run(run: Path, checkpoint: Path, config: dict, r: int, expert_r: int, rng: Random, dtype) -> int:
    """recipe.yaml and sft/adapter/ (PEFT LoRA on MLA, routed-expert LoRA on all experts)."""
    import yaml
    from peft import LoraConfig

    from finetune import recipe

    adapter = run / "sft" / "adapter"
    adapter.mkdir(parents=True)
    data = {
        "name": "export-bench",
        "output_dir": str(run),
        "model": {"path": str(checkpoint), "quantization": "nf4", "dtype": "bfloat16"},
        "adapter": {"r": r, "alpha": 2 * r, "expert_r": expert_r, "targets": ["mla", "routed_experts"]},
        "stages": {"sft": {"type": "sft", "data": {"train": str(run / "train.jsonl")}}},
    }
    (run / "recipe.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    recipe.load(run / "recipe.yaml")  # the export reads it: it must be a valid recipe
    tensors = shapes(config)
    modules = [k.removesuffix(".weight") for k in tensors if k.split(".")[-2] in MLA]
    LoraConfig(r=r, lora_alpha=2 * r, target_modules=modules, task_type="CAUSAL_LM").save_pretrained(adapter)
    lora = {}
    for m in modules:
        out_dim, in_dim = tensors[f"{m}.weight"]
        lora[f"base_model.model.{m}.lora_A.weight"] = rng.tensor((r, in_dim), dtype)
        lora[f"base_model.model.{m}.lora_B.weight"] = rng.tensor((out_dim, r), dtype)
    save_file(lora, str(adapter / "adapter_model.safetensors"))
    h, inter, n = config["hidden_size"], config["moe_intermediate_size"], config["n_routed_experts"]
    experts = {}
    for i in range(config["first_k_dense_replace"], config["num_hidden_layers"]):
        experts |= {
            f"layers.{i}.lora_gate_up_A": rng.tensor((n, expert_r, h), dtype),
            f"layers.{i}.lora_gate_up_B": rng.tensor((n, 2 * inter, expert_r), dtype),
            f"layers.{i}.lora_down_A": rng.tensor((n, expert_r, inter), dtype),
            f"layers.{i}.lora_down_B": rng.tensor((n, h, expert_r), dtype),
            f"layers.{i}.lora_experts": torch.arange(n),
            f"layers.{i}.lora_alpha": torch.tensor(float(2 * expert_r)),
        }
    if experts:
        save_file(experts, str(adapter / "routed_experts.safetensors"))
    return sum(p.stat().st_size for p in adapter.iterdir())


def _read(folder: Path, key: str) -> torch.Tensor:
    index = folder / "model.safetensors.index.json"
    name = json.loads(index.read_text())["weight_map"][key] if index.is_file() else "model.safetensors"
    with safe_open(str(folder / name), framework="pt") as f:
        return f.get_tensor(key)


def check(out: Path, checkpoint: Path, run: Path, config: dict) -> float:
    """Largest error of a few exported tensors against checkpoint + delta computed here (--base original)."""
    adapter = run / "sft" / "adapter"
    lora_config = json.loads((adapter / "adapter_config.json").read_text())
    scale = lora_config["lora_alpha"] / lora_config["r"]
    layer = config["num_hidden_layers"] - 1
    worst = 0.0
    with safe_open(str(adapter / "adapter_model.safetensors"), framework="pt") as f:
        m = f"model.layers.{layer}.self_attn.kv_b_proj"
        a, b = (f.get_tensor(f"base_model.model.{m}.lora_{x}.weight").float() for x in "AB")
        want = (_read(checkpoint, f"{m}.weight").float() + b @ a * scale).to(torch.bfloat16)
        worst = max(worst, (_read(out, f"{m}.weight").float() - want.float()).abs().max().item())
    if layer >= config["first_k_dense_replace"]:
        with safe_open(str(adapter / "routed_experts.safetensors"), framework="pt") as f:
            t = {p: f.get_tensor(f"layers.{layer}.lora_{p}").float() for p in ("gate_up_A", "gate_up_B")}
            s = float(f.get_tensor(f"layers.{layer}.lora_alpha")) / t["gate_up_A"].shape[1]
        j = config["n_routed_experts"] - 1
        key = f"model.layers.{layer}.mlp.experts.{j}.up_proj.weight"
        delta = (t["gate_up_B"][j] @ t["gate_up_A"][j] * s)[config["moe_intermediate_size"] :]
        want = (_read(checkpoint, key).float() + delta).to(torch.bfloat16)
        worst = max(worst, (_read(out, key).float() - want.float()).abs().max().item())
    return worst


# Runs the export as its own child and prints that child's peak RSS. The export must not be a direct child
# of this (large) process: Linux carries a process's peak RSS across exec, so a child forked from here
# would report this process's peak as its own. This launcher is small when it forks.
LAUNCHER = """
import json, resource, subprocess, sys
code = subprocess.run(sys.argv[2:], stdout=open(sys.argv[1], "w"), stderr=subprocess.STDOUT).returncode
print(json.dumps({"returncode": code, "maxrss_kb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))
"""


def run_export(run: Path, out: Path, base: str) -> dict:
    """`finetune export` in a grandchild process: wall seconds and its peak RSS (ru_maxrss)."""
    cmd = [sys.executable, "-m", "finetune", "export", str(run / "sft"), "--out", str(out), "--base", base]
    log = run / f"export-{base}.log"
    start = time.perf_counter()
    launched = subprocess.run(
        [sys.executable, "-c", LAUNCHER, str(log), *cmd], capture_output=True, text=True
    )
    seconds = time.perf_counter() - start
    text = log.read_text() if log.exists() else launched.stderr
    try:
        child = json.loads(launched.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        raise SystemExit(f"export launcher failed:\n{launched.stderr[-3000:]}") from None
    if child["returncode"] != 0:
        raise SystemExit(f"export failed (exit {child['returncode']}):\n{text[-3000:]}")
    return {
        "base": base,
        "seconds": round(seconds, 1),
        "peak_rss_gb": round(child["maxrss_kb"] * 1024 / 1e9, 3),  # Linux: ru_maxrss in KiB
        "output_gb": round(sum(p.stat().st_size for p in out.iterdir()) / 1e9, 3),
        "last_line": text.strip().splitlines()[-1],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--layers", type=int, default=27, help="decoder layers (27 = DeepSeek-V2-Lite)")
    parser.add_argument(
        "--dir", type=Path, default=Path("export-bench"), help="work folder (deleted unless --keep)"
    )
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--expert-r", type=int, default=16)
    parser.add_argument("--adapter-dtype", choices=["bfloat16", "float32"], default="bfloat16",
                        help="bfloat16: what TRL saves for a 4-bit model's adapter")  # fmt: skip
    parser.add_argument("--base", nargs="+", choices=["original", "quantized"], default=["original"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--export-dir", type=Path, help="where the exports go (default: --dir), e.g. another disk or /dev/shm"
    )
    parser.add_argument("--out-json", type=Path)
    parser.add_argument("--keep", action="store_true", help="keep the checkpoint, run and export folders")
    args = parser.parse_args()

    config = {**V2_LITE, "num_hidden_layers": args.layers}
    weights = 2 * sum(math.prod(shape) for shape in shapes(config).values())  # bf16 bytes
    exports = args.export_dir or args.dir
    for folder in {args.dir, exports}:
        folder.mkdir(parents=True, exist_ok=True)
        if any(folder.iterdir()):
            raise SystemExit(f"{folder} is not empty")
    # The checkpoint (+ about 2 % of adapter) and one export at a time: twice the checkpoint on one disk.
    same_disk = os.stat(args.dir).st_dev == os.stat(exports).st_dev
    needs = {args.dir: 1.02 * weights + (weights if same_disk else 0)} | (
        {} if same_disk else {exports: weights}
    )
    for folder, need in needs.items():
        free = shutil.disk_usage(folder).free
        if free < need:
            raise SystemExit(
                f"{folder}: {free / 1e9:.1f} GB free, the benchmark needs {need / 1e9:.1f} GB there"
            )
    report: dict = {"layers": args.layers, "shards": args.shards, "cpus": os.cpu_count()}
    try:
        rng = Random(args.seed)
        checkpoint, run = args.dir / "DeepSeek-V2-Lite-random", args.dir / "run"
        start = time.perf_counter()
        report["checkpoint_gb"] = round(write_checkpoint(checkpoint, config, args.shards, rng) / 1e9, 3)
        dtype = getattr(torch, args.adapter_dtype)
        report["adapter_gb"] = round(
            write_run(run, checkpoint, config, args.r, args.expert_r, rng, dtype) / 1e9, 3
        )
        report["write_seconds"] = round(time.perf_counter() - start, 1)
        del rng
        print(json.dumps(report), flush=True)
        # What the libraries alone take (the same imports as the export, no work): the export's own share.
        imports = "import finetune.model.export, finetune.recipe, peft, trl, bitsandbytes"
        launched = subprocess.run(
            [sys.executable, "-c", LAUNCHER, os.devnull, sys.executable, "-c", imports],
            capture_output=True,
            text=True,
        )
        report["libraries_rss_gb"] = round(
            json.loads(launched.stdout.splitlines()[-1])["maxrss_kb"] * 1024 / 1e9, 3
        )
        report["exports"] = []
        for base in args.base:
            out = exports / f"export-{base}"
            result = run_export(run, out, base)
            if base == "original":
                result["max_abs_error_vs_expected"] = check(out, checkpoint, run, config)
            report["exports"].append(result)
            print(json.dumps(result), flush=True)
            if not args.keep:
                shutil.rmtree(out)
    finally:
        if not args.keep:
            for folder in {args.dir, exports}:
                shutil.rmtree(folder, ignore_errors=True)
    if args.out_json:
        args.out_json.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
