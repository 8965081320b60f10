"""The compatibility layer: every patch finds its targets on the installed versions, applies and undoes
what it says, fails with one line naming the library when a target is gone, and importing the package
patches nothing."""

from __future__ import annotations

import importlib
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
import torch

from finetune import compat, family
from finetune.compat import bitsandbytes as compat_bnb
from finetune.compat import peft as compat_peft
from finetune.compat import torch as compat_torch
from finetune.compat import transformers as compat_transformers
from finetune.compat import trl as compat_trl
from finetune.fast import fusion, lm_head
from finetune.model.load import load_model, resolve_source

pytestmark = pytest.mark.compat

PATCHES = sorted(compat.PATCHES)
TARGETS = [(name, t) for name in PATCHES for t in compat.PATCHES[name].targets]


@pytest.fixture(autouse=True)
def _fresh_checks():
    compat.forget_checks()
    compat_trl._head_code.cache_clear()
    yield
    compat.forget_checks()
    compat_trl._head_code.cache_clear()


def test_the_layer_declares_every_patch():
    libraries = {p.library for p in compat.PATCHES.values()}
    assert libraries == {"torch", "transformers", "peft", "trl", "bitsandbytes"}
    assert len(PATCHES) >= 20
    for patch in compat.PATCHES.values():
        assert patch.name.startswith(patch.library + ".") and patch.checked and len(patch.what) > 40


@pytest.mark.parametrize("name", PATCHES)
def test_each_patch_finds_its_targets_on_the_installed_versions(name):
    patch = compat.PATCHES[name]
    compat.check(patch)
    for target in patch.targets:
        compat.resolve(patch, target)  # raises where a target is gone


def _remove(monkeypatch: pytest.MonkeyPatch, target: compat.Target) -> None:
    """The target gone: its parent replaced by an empty namespace (a module: unimportable)."""
    if not target.path:
        monkeypatch.setitem(sys.modules, target.module, None)
        return
    *parents, _ = target.path.split(".")
    if not parents:
        monkeypatch.setitem(sys.modules, target.module, types.SimpleNamespace())
        return
    owner = importlib.import_module(target.module)
    for part in parents[:-1]:
        owner = getattr(owner, part)
    monkeypatch.setattr(owner, parents[-1], types.SimpleNamespace())


@pytest.mark.parametrize(("name", "target"), TARGETS, ids=[f"{n}:{t}" for n, t in TARGETS])
def test_a_missing_target_is_one_line_naming_the_library(monkeypatch, name, target):
    patch = compat.PATCHES[name]
    _remove(monkeypatch, target)
    with pytest.raises(compat.CompatError) as caught:
        compat.check(patch)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"{patch.library} {compat.version(patch.library)}: ")
    assert f"`{name}`" in message and patch.checked in message
    assert isinstance(caught.value, compat.UserError)  # the CLI prints it as one line, exit 2


def test_trl_renaming_its_chunked_head_is_an_error_not_a_quiet_zero(monkeypatch):
    """TRL's main branch renamed `_fused_forward` to `_chunked_forward`: the head must not be lost silently."""
    import trl.trainer.utils as trl_utils

    def add_fused_lm_head(model, outputs=()):
        def _chunked_forward(self, *args, **kwargs):
            return None

        model.forward = types.MethodType(_chunked_forward, model)

    monkeypatch.setattr(trl_utils, "add_fused_lm_head", add_fused_lm_head)
    model = torch.nn.Linear(2, 2)
    add_fused_lm_head(model)
    with pytest.raises(compat.CompatError, match=r"^trl .*`_fused_forward`.*`trl.chunked_lm_head`"):
        lm_head.patch(model, required=True)
    with pytest.raises(compat.CompatError):
        fusion.apply(model, chunked_head=True)


def test_chunked_head_is_found_by_code_identity():
    from trl.trainer.utils import add_fused_lm_head

    model = load_model(resolve_source("tiny", None), quantization="none", dtype="float32")
    assert not lm_head.patch(model)  # no TRL head: nothing to replace, and not asked to
    with pytest.raises(compat.CompatError, match="carries no chunked LM head"):
        lm_head.patch(model, required=True)
    add_fused_lm_head(model, outputs=("log_probs",))
    trl_forward = model.__dict__["forward"]
    assert compat_trl.is_chunked_head(trl_forward)
    assert lm_head.patch(model, required=True)
    assert model.__dict__["forward"] is not trl_forward
    lm_head.unpatch(model)
    assert model.__dict__["forward"] is trl_forward


def test_torch_settings_apply_inside_and_are_restored():
    config = torch._dynamo.config
    limit, skip = config.recompile_limit, config.skip_nnmodule_hook_guards
    with compat_torch.recompile_limit(limit + 50), compat_torch.hook_guards():
        assert config.recompile_limit == limit + 50 and config.skip_nnmodule_hook_guards is False
    assert (config.recompile_limit, config.skip_nnmodule_hook_guards) == (limit, skip)


def test_lifted_hooks_come_back_with_their_handles():
    module = torch.nn.Linear(2, 2)
    calls = []

    def lifted(*args):
        calls.append("lifted")

    def kept(*args):
        calls.append("kept")

    handle = module.register_forward_hook(lifted)
    module.register_forward_hook(kept)
    with compat_torch.lifted_forward_hooks(module, lambda f: f is lifted):
        module(torch.zeros(1, 2))
    assert calls == ["kept"]
    module(torch.zeros(1, 2))
    assert sorted(calls[1:]) == ["kept", "lifted"]
    handle.remove()
    assert len(compat_torch.hook_dicts(module)["_forward_hooks"]) == 1
    assert compat_torch.has_hooks(module) and not compat_torch.global_forward_hooks()


def test_experts_class_swap_is_undone():
    original = family.MODELING.DeepseekV2Experts
    ignored = family.PreTrainedModel._keys_to_ignore_on_load_unexpected

    class StandIn(torch.nn.Module):
        pass

    with compat_transformers.experts_class(
        family.MODELING, "DeepseekV2Experts", StandIn, family.PreTrainedModel
    ):
        assert family.MODELING.DeepseekV2Experts is StandIn
        assert family.PreTrainedModel._keys_to_ignore_on_load_unexpected == [r"\.mlp\.experts\."]
    assert family.MODELING.DeepseekV2Experts is original
    assert family.PreTrainedModel._keys_to_ignore_on_load_unexpected == ignored
    missing = compat_transformers.experts_class(
        family.MODELING, "NoSuchExperts", StandIn, family.PreTrainedModel
    )
    with pytest.raises(compat.CompatError, match="NoSuchExperts not found"), missing:
        pass


def test_generation_patches_are_per_instance_and_undone():
    from transformers.generation import utils as generation_utils

    model = load_model(resolve_source("tiny", None), quantization="none", dtype="float32")
    step, caches = object(), object()
    with compat_transformers.auto_compile(model), compat_transformers.served_decode_step(model, step, caches):
        assert model._valid_auto_compile_criteria() is True
        assert model.get_compiled_call(None) is step and model._prepare_static_cache is caches
        assert compat_transformers.static_cache_maker(model) is type(model)._prepare_static_cache
    assert "get_compiled_call" not in vars(model) and "_valid_auto_compile_criteria" not in vars(model)
    check = generation_utils.DeferredStopCheck
    asked = check.__dict__["is_supported"]
    with compat_transformers.deferred_stop_check(True):
        assert check.__dict__["is_supported"] is not asked
    assert check.__dict__["is_supported"] is asked


def test_peft_exact_targets_hide_and_restore_the_model_type():
    from peft.utils import transformers_weight_conversion as conversion

    table = conversion._MODEL_TO_CONVERSION_PATTERN
    before = dict(table)
    assert "deepseek_v2" in table
    with compat_peft.exact_targets(family.MODEL_TYPES):
        assert "deepseek_v2" not in table
    assert table == before
    assert compat_peft.pattern_key(["q_proj", "o_proj"], "model.layers.0.self_attn.q_proj") == "q_proj"


def test_trainer_reporters_and_bnb_rule():
    assert {"tensorboard", "wandb"} <= set(compat_transformers.reporters())
    from transformers import AutoModelForCausalLM

    from finetune.model.presets import preset_config

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(preset_config("tiny"))
    names = compat_transformers.quantized_linear_names(skeleton)
    assert "lm_head" not in names and any(n.endswith("self_attn.o_proj") for n in names)


def test_grpo_reference_and_logs():
    config = types.SimpleNamespace(beta=0.04)
    trainer = types.SimpleNamespace()
    with compat_trl.no_reference_copy(config) as restore:
        assert config.beta == 0.0
        restore(trainer)
    assert config.beta == 0.04 and trainer.beta == 0.04
    with pytest.raises(compat.CompatError, match="`_logs`"):
        compat_trl.logged(types.SimpleNamespace())
    logs = {"prompt": [], "completion": [], "rewards": {}}
    assert compat_trl.logged(types.SimpleNamespace(_logs=logs)) is logs


def test_bitsandbytes_repair_and_repacking():
    import bitsandbytes as bnb

    layer = bnb.nn.Linear4bit(64, 32, bias=False, quant_type="nf4").to("cpu")
    compat_bnb.no_cpu_repacking(torch.nn.Sequential(layer))
    assert layer.support_avx512bf16_for_cpu is False
    compat_bnb.repair_quant_state(layer)
    assert layer.weight.quant_state is not None


def _child(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=600
    )


def test_importing_the_packages_patches_nothing():
    done = _child(
        """
        import importlib, pkgutil, sys
        import bitsandbytes.nn.modules as bnb_modules
        import torch
        import finetune, rewards
        has_avx512bf16 = bnb_modules.has_avx512bf16
        limit = torch._dynamo.config.recompile_limit
        for package in (finetune, rewards):
            for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
                if info.name != "finetune.__main__":
                    importlib.import_module(info.name)
        from finetune import compat, family
        from transformers.models.deepseek_v2 import modeling_deepseek_v2
        assert compat.APPLIED == set(), compat.APPLIED
        assert bnb_modules.has_avx512bf16 is has_avx512bf16
        assert torch._dynamo.config.recompile_limit == limit
        assert family.MODELING.DeepseekV2Experts.__module__ == modeling_deepseek_v2.__name__
        print(len(sys.modules))
        """
    )
    assert done.returncode == 0, done.stderr[-2000:]


def test_the_loader_installs_the_cpu_kernels_it_needs():
    done = _child(
        """
        from finetune import compat
        from finetune.model.load import load_model, resolve_source
        assert compat.APPLIED == set()
        load_model(resolve_source("tiny", None), quantization="nf4", dtype="float32")
        assert {"bitsandbytes.cpu_kernels", "bitsandbytes.no_cpu_repacking"} <= compat.APPLIED, compat.APPLIED
        """
    )
    assert done.returncode == 0, done.stderr[-2000:]


def test_the_architecture_page_lists_every_patch():
    page = (Path(__file__).resolve().parent.parent / "docs" / "architecture.md").read_text()
    assert [name for name in PATCHES if f"| `{name}` |" not in page] == []
