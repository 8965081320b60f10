"""`model.path` at a folder laid out like the deepseek-ai Hub repos (hub_layout.py), for both MLA variants.

Loading must fuse the per-expert keys in expert order, honour the remote-code config's YaRN `rope_scaling`,
never execute the remote code beside the weights, quantize the routed experts, and train end to end.
"""

from __future__ import annotations

import hashlib
import json
import runpy
from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch
from conftest import base_recipe, write_recipe
from hub_layout import REMOTE_CODE_FILES, reference_config, write_hub_checkpoint
from safetensors import safe_open
from safetensors.torch import load_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoModelForCausalLM, DeepseekV2ForCausalLM

from finetune import pipeline, recipe, rundir
from finetune.cli import main
from finetune.errors import UserError
from finetune.model import adapters
from finetune.model.experts import NF4Experts
from finetune.model.load import Source, load_model, load_tokenizer, resolve_source
from finetune.model.tokenizer import build_tokenizer
from finetune.stages import sft

IDS = torch.randint(7, 100, (2, 48), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module", params=[None, 24], ids=["lite-mla", "v2-mla"])
def hub(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp("hub") / "DeepSeek-V2-tiny"
    reference = write_hub_checkpoint(folder, q_lora_rank=request.param, seed=0)
    with torch.no_grad():
        logits = reference(IDS).logits
    return folder, reference, logits


def checkpoint_tensor(folder: Path, key: str) -> torch.Tensor:
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    with safe_open(str(folder / index["weight_map"][key]), framework="pt") as f:
        return f.get_tensor(key)


def test_written_folder_has_the_hub_layout(hub):
    folder, reference, _ = hub
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_deepseek.DeepseekV2ForCausalLM"
    assert config["rope_scaling"]["type"] == "yarn" and "rope_parameters" not in config
    assert config["torch_dtype"] == "bfloat16" and config["aux_loss_alpha"] == 0.001
    weight_map = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(weight_map.values())) == 2
    assert not any(k.endswith(("gate_up_proj", "experts.down_proj")) for k in weight_map)
    # Layer 1's experts straddle the two shards, and there are experts 10 and 11 (text order != number order).
    layer1 = {weight_map[f"model.layers.1.mlp.experts.{j}.down_proj.weight"] for j in range(12)}
    assert len(layer1) == 2 and "model.layers.2.mlp.experts.11.up_proj.weight" in weight_map
    assert checkpoint_tensor(folder, "model.layers.1.mlp.experts.0.gate_proj.weight").dtype == torch.bfloat16
    assert "chat_template" in json.loads((folder / "tokenizer_config.json").read_text())
    # The tripwire works: executing the remote code raises, so a load that ran it could not pass.
    for name in REMOTE_CODE_FILES:
        with pytest.raises(RuntimeError, match="remote code must never run"):
            runpy.run_path(str(folder / name))
    assert reference.config.q_lora_rank == config["q_lora_rank"]


def test_unquantized_load_equals_reference(hub):
    folder, reference, expected = hub
    source = resolve_source(None, str(folder))
    assert source == Source("local", str(folder.resolve()))
    model = load_model(source, quantization="none", dtype="float32")
    cfg = model.config
    assert cfg.model_type == "deepseek_v2" and cfg.q_lora_rank == reference.config.q_lora_rank
    # The remote-code `rope_scaling` (legacy key `type`) becomes native YaRN `rope_parameters`.
    rope = cfg.rope_parameters
    assert (
        rope["rope_type"] == "yarn"
        and rope["factor"] == 4
        and rope["original_max_position_embeddings"] == 128
    )
    assert (cfg.topk_method, cfg.n_group, cfg.topk_group) == (
        reference.config.topk_method,
        reference.config.n_group,
        reference.config.topk_group,
    )
    assert model.model.layers[1].mlp.gate.weight.dtype == torch.float32
    with torch.no_grad():
        logits = model(IDS).logits
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=0)

    # The comparison can see YaRN: the same weights under plain RoPE give other logits.
    plain = reference_config(reference.config.q_lora_rank)
    plain.rope_parameters = {"rope_type": "default", "rope_theta": 10000.0}
    without_yarn = DeepseekV2ForCausalLM(plain).eval()
    without_yarn.load_state_dict(reference.state_dict())
    with torch.no_grad():
        assert (without_yarn(IDS).logits - expected).abs().max() > 1e-2


def test_nf4_load_quantizes_experts_and_keeps_router(hub):
    folder, reference, expected = hub
    model = load_model(resolve_source(None, str(folder)), quantization="nf4", dtype="float32")
    moe_layers = [i for i, layer in enumerate(model.model.layers) if hasattr(layer.mlp, "experts")]
    assert moe_layers == [1, 2]
    attn = model.model.layers[1].self_attn
    query = ["q_proj"] if reference.config.q_lora_rank is None else ["q_a_proj", "q_b_proj"]
    for name in [*query, "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"]:
        assert isinstance(getattr(attn, name), bnb.nn.Linear4bit), name
    intermediate = reference.config.moe_intermediate_size
    for i in moe_layers:
        mlp = model.model.layers[i].mlp
        assert isinstance(mlp.experts, NF4Experts) and mlp.experts.num_experts == 12
        router = mlp.gate.weight
        assert router.dtype == torch.float32
        assert torch.equal(router, checkpoint_tensor(folder, f"model.layers.{i}.mlp.gate.weight").float())
        # Each expert's 4-bit weights approximate that expert's own checkpoint tensors (not a neighbour's).
        gate_up, down = (
            mlp.experts.dequantize("gate_up", torch.float32),
            mlp.experts.dequantize("down", torch.float32),
        )
        for j in range(12):
            prefix = f"model.layers.{i}.mlp.experts.{j}"
            pairs = [
                (gate_up[j, :intermediate], "gate_proj"),
                (gate_up[j, intermediate:], "up_proj"),
                (down[j], "down_proj"),
            ]
            for got, proj in pairs:
                want = checkpoint_tensor(folder, f"{prefix}.{proj}.weight").float()
                assert (got - want).norm() < 0.2 * want.norm(), (i, j, proj)
    with torch.no_grad():
        logits = model(IDS).logits
    cos = torch.nn.functional.cosine_similarity(logits.flatten(), expected.flatten(), dim=0)
    assert cos > 0.9


def test_tokenizer_loads_with_inline_chat_template(hub):
    folder, *_ = hub
    tokenizer = load_tokenizer(resolve_source(None, str(folder)))
    embedded = build_tokenizer()
    assert tokenizer.chat_template == embedded.chat_template
    text = "reverse: abcd"
    assert tokenizer(text)["input_ids"] == embedded(text)["input_ids"]
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text


def test_bytelevel_tokenizer_declared_as_llama_keeps_spaces(tmp_path):
    # The Hub repos name `LlamaTokenizerFast` over a ByteLevel tokenizer.json; loading it as a Llama
    # (Metaspace) tokenizer would drop every space. A 256-byte alphabet with no merges stands in for it.
    specials = ["<bos>", "<eos>"]
    vocab = {tok: i for i, tok in enumerate(specials + sorted(pre_tokenizers.ByteLevel.alphabet()))}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens(specials)
    core.save(str(tmp_path / "tokenizer.json"))
    config = {
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": specials[0],
        "eos_token": specials[1],
        "pad_token": specials[1],
        "legacy": True,
        "model_max_length": 16384,
        "tokenizer_class": "LlamaTokenizerFast",
        "chat_template": build_tokenizer().chat_template,
    }
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tokenizer = load_tokenizer(Source("local", str(tmp_path)))
    ids = tokenizer("hello world\n  x", add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == "hello world\n  x"
    assert tokenizer.chat_template == build_tokenizer().chat_template


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_recipe_trains_mla_and_expert_lora_end_to_end(hub, tmp_path, capsys):
    folder, *_ = hub
    before = _digest(folder)
    data = base_recipe(tmp_path, max_steps=2, learning_rate=1e-2, per_device_train_batch_size=2)
    data["model"] = {"path": str(folder), "quantization": "nf4", "dtype": "float32"}
    data["adapter"]["targets"] = ["mla", "routed_experts"]
    # Greedy generation, although the folder's generation_config.json (as on the Hub) samples.
    heldout = {"data": data["stages"]["sft"]["data"]["train"], "max_samples": 2, "max_new_tokens": 4}
    data["stages"]["sft"]["heldout"] = heldout
    r = recipe.load(write_recipe(tmp_path / "r.yaml", data))
    plan = pipeline.plan(r, fetch=True)
    model = plan.context.adapted_model()
    tensors = lambda: dict([*model.named_parameters(), *model.named_buffers()])  # noqa: E731
    frozen = {n: t.detach().clone() for n, t in tensors().items() if "lora_" not in n}
    expert_lora = {n: t.detach().clone() for n, t in tensors().items() if ".experts.lora_" in n}
    (tmp_path / "run").mkdir()
    rundir.write_recipe(r, tmp_path / "run")
    summary = sft.run("sft", r.stages["sft"], plan.inputs["sft"], plan.context, model=model)
    assert summary["train"]["steps"] == 2
    assert summary["heldout"]["before"]["n"] == 2 == summary["heldout"]["after"]["n"]
    now = tensors()
    assert all(torch.equal(now[n], t) for n, t in frozen.items())  # NF4 packs, router, norms: untouched
    assert any(n.endswith("_B") and not torch.equal(now[n], t) for n, t in expert_lora.items())

    adapter = tmp_path / "run" / "sft" / "adapter"
    assert (adapter / "adapter_config.json").is_file()
    assert (adapter / adapters.EXPERTS_FILE).is_file()
    source = resolve_source(None, str(folder))
    reloaded = adapters.load_adapter(load_model(source, quantization="nf4", dtype="float32"), adapter)
    layers = adapters.expert_layers(reloaded)
    assert sorted(layers) == [1, 2] and all(layer.has_lora for layer in layers.values())
    saved = load_file(str(adapter / adapters.EXPERTS_FILE))
    for index, layer in layers.items():
        assert torch.equal(layer.lora_down_B, saved[f"layers.{index}.lora_down_B"])
        assert layer.lora_down_B.abs().max() > 0  # trained: B starts at zero

    merged_dir = tmp_path / "merged"
    # --base quantized: the trained 4-bit model itself (the default merges into the original 16-bit weights).
    stage = str(tmp_path / "run" / "sft")
    assert main(["export", stage, "--out", str(merged_dir), "--dtype", "float32", "--base", "quantized"]) == 0
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32)
    untouched = load_model(source, quantization="nf4", dtype="float32")
    for m in (reloaded, merged, untouched):
        m.eval()
    with torch.no_grad():
        adapted, plain, base = reloaded(IDS).logits, merged(IDS).logits, untouched(IDS).logits
    effect, gap = (adapted - base).abs().max(), (plain - adapted).abs().max()
    assert effect > 1e-2 and gap < 0.1 * effect, (gap, effect)
    # The run read the checkpoint folder and wrote nothing into it.
    assert _digest(folder) == before


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            "deepseek_v3",
            r"not a DeepSeek-V2 checkpoint: config\.json has model_type 'deepseek_v3' "
            r"\(DeepseekV3ForCausalLM\); expected 'deepseek_v2'",
        ),
        (
            "no-config",
            r"not a DeepSeek-V2 checkpoint: no config\.json \(found: .*model\.safetensors\.index\.json",
        ),
    ],
)
def test_wrong_checkpoint_is_a_one_line_user_error(tmp_path, edit, message):
    folder = tmp_path / "ckpt"
    write_hub_checkpoint(folder, q_lora_rank=None)
    config = folder / "config.json"
    if edit == "no-config":
        config.unlink()
    else:
        data = json.loads(config.read_text())
        data.update(model_type=edit, architectures=["DeepseekV3ForCausalLM"])
        config.write_text(json.dumps(data))
    with pytest.raises(UserError, match=message) as err:
        resolve_source(None, str(folder))
    assert "\n" not in str(err.value) and str(err.value).startswith("model.path: ")
