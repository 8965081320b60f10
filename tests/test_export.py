"""`finetune export`: the stage's adapter merged into the base checkpoint's own tensors, streamed.

Expected tensors are computed here independently: `--base original` from the adapter files with plain
safetensors reads, `--base quantized` from the loaded, adapted 4-bit model (its dequantized weights plus
PEFT's and NF4Experts' own deltas).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch
from conftest import base_recipe, write_recipe
from hub_layout import write_hub_checkpoint
from peft.tuners.lora import LoraLayer
from peft.utils import ModulesToSaveWrapper
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, DeepseekV2ForCausalLM

from finetune import pipeline, recipe, rundir
from finetune.cli import main
from finetune.model import adapters
from finetune.model.experts import NF4Experts
from finetune.model.export import base_folder, quantized_linears
from finetune.model.load import Source, embedded_checkpoint, load_model

pytestmark = pytest.mark.compat

IDS = torch.tensor([[5, 89, 76, 93, 76, 89, 90, 76, 33, 7, 72, 73, 74, 75, 6]])
FULL = {"targets": ["mla", "shared_experts", "routed_experts"], "router": "trainable"}
PER_EXPERT = re.compile(r"(.*\.mlp\.experts)\.(\d+)\.(gate|up|down)_proj\.weight")


def checkpoint(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors checkpoint folder, with the index when there is one."""
    index = folder / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else None
    out: dict[str, torch.Tensor] = {}
    for name in files or ["model.safetensors"]:
        out.update(load_file(str(folder / name)))
    return out


def make_stage(
    tmp_path: Path, model: dict, *, trainable_modules=("embeddings",), random_b: bool = False
) -> Path:
    """RUN/sft with a resolved recipe.yaml and an adapter saved right after attach (B = 0, or random)."""
    data = base_recipe(tmp_path)
    data["model"] = model
    data["adapter"].update(FULL, trainable_modules=list(trainable_modules))
    r = recipe.load(write_recipe(tmp_path / "r.yaml", data))
    peft_model = pipeline.plan(r).context.adapted_model()
    if random_b:
        generator = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_B" in name or re.search(r"lora_(gate_up|down)_B$", name):
                    p.copy_(torch.randn(p.shape, generator=generator) * 0.05)
    run = Path(r.output_dir)
    (run / "sft").mkdir(parents=True)
    rundir.write_recipe(r, run)
    adapters.save_adapter(peft_model, run / "sft" / "adapter")
    return run / "sft"


def export(stage: Path, out: Path, *args: str) -> Path:
    assert main(["export", str(stage), "--out", str(out), *args]) == 0
    return out


def expected_from_files(original: dict[str, torch.Tensor], adapter: Path) -> dict[str, torch.Tensor]:
    """Original tensors plus the exact deltas, read from the adapter files (fp32 sums, original dtypes)."""
    config = json.loads((adapter / "adapter_config.json").read_text())
    out = dict(original)

    def add(key: str, delta: torch.Tensor) -> None:
        out[key] = (original[key].float() + delta).to(original[key].dtype)

    peft = load_file(str(adapter / "adapter_model.safetensors"))
    for key, a in peft.items():
        name = key.removeprefix("base_model.model.")
        if name.endswith(".lora_A.weight"):
            module = name.removesuffix(".lora_A.weight")
            b = peft[f"base_model.model.{module}.lora_B.weight"]
            add(f"{module}.weight", b.float() @ a.float() * (config["lora_alpha"] / config["r"]))
        elif "lora_" not in name and name in original:
            out[name] = a.to(original[name].dtype)
    # TRL trains the adapter of a quantized model in bf16: factors are upcast before multiplying.
    experts = {k: v.float() for k, v in load_file(str(adapter / adapters.EXPERTS_FILE)).items()}
    layers = {int(k.split(".")[1]) for k in experts}
    for layer in layers:
        f = {k.split(".", 2)[2]: v for k, v in experts.items() if k.startswith(f"layers.{layer}.")}
        scale = float(f["lora_alpha"]) / f["lora_gate_up_A"].shape[1]
        for slot, e in enumerate(f["lora_experts"].long().tolist()):
            prefix = f"model.layers.{layer}.mlp.experts.{e}"
            gate_up = f["lora_gate_up_B"][slot] @ f["lora_gate_up_A"][slot] * scale
            add(f"{prefix}.gate_proj.weight", gate_up[: gate_up.shape[0] // 2])
            add(f"{prefix}.up_proj.weight", gate_up[gate_up.shape[0] // 2 :])
            add(f"{prefix}.down_proj.weight", f["lora_down_B"][slot] @ f["lora_down_A"][slot] * scale)
    for key, weight in load_file(str(adapter / adapters.ROUTER_FILE)).items():
        name = f"model.{key.removesuffix('.weight')}.mlp.gate.weight"
        out[name] = weight.to(original[name].dtype)
    return out


@torch.no_grad()
def adapted_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """fp32 weights of the adapted 4-bit model, every delta merged, in transformers' (fused) names."""
    inner = next(m for m in model.modules() if isinstance(m, DeepseekV2ForCausalLM))
    out: dict[str, torch.Tensor] = {}
    for name, module in inner.named_modules():
        if isinstance(module, LoraLayer):
            base = module.get_base_layer().weight
            weight = bnb.functional.dequantize_4bit(base.data, base.quant_state).float()
            a, b = module.lora_A["default"].weight.float(), module.lora_B["default"].weight.float()
            out[f"{name}.weight"] = weight + b @ a * module.scaling["default"]
        elif isinstance(module, bnb.nn.Linear4bit) and ".base_layer" not in name:
            out[f"{name}.weight"] = bnb.functional.dequantize_4bit(
                module.weight.data, module.weight.quant_state
            ).float()
        elif isinstance(module, ModulesToSaveWrapper):
            out[f"{name}.weight"] = module.modules_to_save["default"].weight.float()
        elif isinstance(module, NF4Experts):
            for w in ("gate_up", "down"):
                weight = module.dequantize(w).float()
                if module.has_lora:
                    a, b = getattr(module, f"lora_{w}_A").float(), getattr(module, f"lora_{w}_B").float()
                    weight[module.lora_experts] += torch.bmm(b, a) * module.lora_scale
                out[f"{name}.{w}_proj"] = weight
    for name, param in inner.named_parameters():
        if ".lora_" not in name and ".base_layer." not in name and ".experts." not in name:
            out.setdefault(re.sub(r"\.(original_module|modules_to_save\.default)", "", name), param.float())
    if inner.config.tie_word_embeddings:  # the checkpoint has no lm_head tensor
        out.pop("lm_head.weight", None)
    return out


def fused(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-expert Hub keys stacked into transformers' fused [E, 2I, H] / [E, H, I] keys."""
    out = {k: v for k, v in tensors.items() if not PER_EXPERT.fullmatch(k)}
    prefixes = {m[1] for k in tensors if (m := PER_EXPERT.fullmatch(k))}
    for p in prefixes:
        n = sum(1 for k in tensors if k.startswith(p + ".") and k.endswith("down_proj.weight"))
        gate, up, down = (
            torch.stack([tensors[f"{p}.{j}.{w}_proj.weight"] for j in range(n)])
            for w in ("gate", "up", "down")
        )
        out[f"{p}.gate_up_proj"] = torch.cat([gate, up], dim=1)
        out[f"{p}.down_proj"] = down
    return out


def assert_bitwise_equal(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert list(got) == list(want) or sorted(got) == sorted(want)
    for key, tensor in want.items():
        assert got[key].dtype == tensor.dtype and got[key].shape == tensor.shape, key
        assert torch.equal(got[key].view(torch.uint8), tensor.view(torch.uint8)), key


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hub") / "DeepSeek-V2-tiny"
    write_hub_checkpoint(folder, q_lora_rank=None, seed=0)
    return folder


HUB_MODEL = {"quantization": "nf4", "dtype": "float32"}


@pytest.mark.parametrize("layout", ["embedded", "hub"])
def test_untrained_adapter_exports_the_checkpoint_bit_for_bit(tmp_path, hub, layout, capsys):
    model = {"preset": "tiny", **HUB_MODEL} if layout == "embedded" else {"path": str(hub), **HUB_MODEL}
    stage = make_stage(tmp_path, model)
    base = base_folder(recipe.load(stage.parent / "recipe.yaml").model)
    out = export(stage, tmp_path / "merged")
    assert "merged" in capsys.readouterr().out.strip().splitlines()[-1]
    assert_bitwise_equal(checkpoint(out), checkpoint(base))
    # Same safetensors content, same side files; the Hub repo's 2 shards fit in one 5 GB output shard.
    for name in ("config.json", "generation_config.json", "tokenizer_config.json", "tokenizer.json"):
        assert (out / name).read_bytes() == (base / name).read_bytes(), name
    if layout == "hub":
        assert (
            len(set(json.loads((base / "model.safetensors.index.json").read_text())["weight_map"].values()))
            == 2
        )
        assert (out / "modeling_deepseek.py").is_file()  # the remote code named by auto_map, never run
    plain = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert type(plain.model.layers[1].mlp.experts).__name__ == "DeepseekV2Experts"


def test_trained_stage_exports_original_plus_deltas_and_the_4bit_model(tmp_path):
    data = base_recipe(tmp_path, learning_rate=1e-2, max_steps=3)
    data["adapter"].update(FULL, trainable_modules=["embeddings"])
    r = recipe.load(write_recipe(tmp_path / "r.yaml", data))
    pipeline.run(r)
    stage = tmp_path / "run" / "sft"
    trained = load_file(str(stage / "adapter" / adapters.EXPERTS_FILE))
    assert trained["layers.1.lora_down_B"].abs().max() > 0  # the deltas below are real

    original = checkpoint(embedded_checkpoint("tiny", 0))
    got = checkpoint(export(stage, tmp_path / "original"))
    want = expected_from_files(original, stage / "adapter")
    assert list(got) == list(want) and all(got[k].dtype == want[k].dtype for k in want)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-6, atol=1e-7, msg=key)
    assert not torch.equal(
        got["model.layers.1.mlp.experts.3.up_proj.weight"],
        original["model.layers.1.mlp.experts.3.up_proj.weight"],
    )

    ctx = pipeline.plan(r).context
    adapted = adapters.load_adapter(ctx.base_model(), stage / "adapter").eval()
    out = export(stage, tmp_path / "quantized", "--base", "quantized")
    reference = adapted_weights(adapted)
    exported = fused(checkpoint(out))
    assert sorted(exported) == sorted(reference)
    for key, tensor in reference.items():
        torch.testing.assert_close(exported[key], tensor, rtol=0, atol=1e-6, msg=key)

    plain = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    base = ctx.base_model().eval()
    with torch.no_grad():
        merged, lora, untouched = plain(IDS).logits, adapted(IDS).logits, base(IDS).logits
    gap, effect = (merged - lora).abs().max(), (lora - untouched).abs().max()
    assert effect > 0.1 and gap < 1e-4 * effect, (gap, effect)


@pytest.mark.parametrize("q_lora_rank", [None, 24], ids=["lite-mla", "v2-mla"])
def test_hub_layout_quantized_export_equals_the_loaded_4bit_model(tmp_path, q_lora_rank):
    folder = tmp_path / "hub"
    write_hub_checkpoint(folder, q_lora_rank=q_lora_rank, seed=1)
    stage = make_stage(tmp_path, {"path": str(folder), **HUB_MODEL}, trainable_modules=(), random_b=True)
    exported = fused(checkpoint(export(stage, tmp_path / "q", "--base", "quantized", "--dtype", "float32")))
    loaded = load_model(Source("local", str(folder)), quantization="nf4", dtype="float32")
    reference = adapted_weights(adapters.load_adapter(loaded, stage / "adapter"))
    assert sorted(exported) == sorted(reference)
    for key, tensor in reference.items():
        torch.testing.assert_close(exported[key], tensor, rtol=0, atol=1e-6, msg=key)
    # --base original on the bf16 per-expert shards: original + exact deltas, written back in bf16.
    original = checkpoint(folder)
    got, want = checkpoint(export(stage, tmp_path / "o")), expected_from_files(original, stage / "adapter")
    assert sorted(got) == sorted(want)
    for key in want:
        assert got[key].dtype == torch.bfloat16
        torch.testing.assert_close(got[key].float(), want[key].float(), rtol=1e-2, atol=1e-6, msg=key)
    assert sum(not torch.equal(got[k], original[k]) for k in want) > 50


def test_quantized_weights_are_the_linear4bit_layers_of_the_loaded_model():
    for preset in ("tiny", "tiny-v2"):
        model = load_model(Source("preset", preset), quantization="nf4", dtype="float32")
        linear4bit = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
        assert quantized_linears(embedded_checkpoint(preset, 0)) == linear4bit
        assert "lm_head.weight" not in linear4bit and "model.layers.1.mlp.gate.weight" not in linear4bit


def test_fused_expert_keys_export_like_per_expert_keys(tmp_path):
    stage = make_stage(tmp_path / "a", {"preset": "tiny", **HUB_MODEL}, random_b=True)
    # The same weights, routed experts stored under transformers' fused keys.
    source = embedded_checkpoint("tiny", 0)
    folder = tmp_path / "fused"
    folder.mkdir()
    save_file(fused(checkpoint(source)), str(folder / "model.safetensors"), metadata={"format": "pt"})
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (folder / name).write_bytes((source / name).read_bytes())
    # A config that names a quantization (as a pre-quantized upload would): the export drops it.
    config = json.loads((source / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "quantization_config": {"load_in_4bit": True}}))
    run = stage.parent
    text = (run / "recipe.yaml").read_text()
    for base in ("original", "quantized"):
        (run / "recipe.yaml").write_text(text)
        per_expert = fused(checkpoint(export(stage, tmp_path / f"per-expert-{base}", "--base", base)))
        (run / "recipe.yaml").write_text(text.replace("  preset: tiny\n", f"  path: {folder}\n"))
        got = checkpoint(export(stage, tmp_path / f"fused-{base}", "--base", base))
        assert json.loads((tmp_path / f"fused-{base}" / "config.json").read_text()) == config
        assert sorted(got) == sorted(per_expert)
        for key in got:
            torch.testing.assert_close(got[key], per_expert[key], rtol=0, atol=1e-6, msg=key)


def test_small_shards_write_an_index_and_load(tmp_path, capsys):
    stage = make_stage(tmp_path, {"preset": "tiny", **HUB_MODEL}, random_b=True)
    whole = export(stage, tmp_path / "one")
    sharded = export(stage, tmp_path / "many", "--max-shard-size", "40KB")
    files = sorted(p.name for p in sharded.glob("*.safetensors"))
    assert len(files) > 3 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    for path in sharded.glob("*.safetensors"):
        tensors = load_file(str(path))
        assert len(tensors) == 1 or sum(t.numel() * t.element_size() for t in tensors.values()) <= 40_000
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(files)
    assert_bitwise_equal(checkpoint(sharded), checkpoint(whole))
    models = [AutoModelForCausalLM.from_pretrained(f, dtype=torch.float32).eval() for f in (whole, sharded)]
    with torch.no_grad():
        assert torch.equal(models[0](IDS).logits, models[1](IDS).logits)


def test_stage_tokenizer_and_dtype_cast(tmp_path):
    stage = make_stage(tmp_path, {"preset": "tiny", **HUB_MODEL})
    base = embedded_checkpoint("tiny", 0)
    # The stage saved its tokenizer (training chat template) beside the adapter: that one is exported.
    (stage / "adapter" / "tokenizer.json").write_bytes((base / "tokenizer.json").read_bytes())
    config = json.loads((base / "tokenizer_config.json").read_text())
    (stage / "adapter" / "tokenizer_config.json").write_text(json.dumps({**config, "model_max_length": 77}))
    (stage / "adapter" / "chat_template.jinja").write_text("{{ 'stage template' }}")
    out = export(stage, tmp_path / "bf16", "--dtype", "bfloat16")
    assert (out / "chat_template.jinja").read_text() == "{{ 'stage template' }}"
    assert json.loads((out / "tokenizer_config.json").read_text())["model_max_length"] == 77
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    tensors = checkpoint(out)
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    original = checkpoint(base)
    assert all(torch.equal(tensors[k], original[k].to(torch.bfloat16)) for k in original)
