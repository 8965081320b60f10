"""Load a DeepSeek-V2 model and tokenizer from an embedded preset, a local folder or a Hub id.

Every source goes through `from_pretrained` of a folder (the embedded presets are written to a cache
folder first), so 4-bit quantization happens in exactly one place for all of them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from huggingface_hub import snapshot_download
from safetensors import safe_open
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BitsAndBytesConfig,
    PreTrainedTokenizerBase,
)
from transformers.utils import logging as hf_logging

from finetune import family
from finetune.compat import bitsandbytes as compat_bnb
from finetune.compat import transformers as compat_transformers
from finetune.errors import UserError, first_line
from finetune.model.presets import EMBEDDED, preset_config
from finetune.model.streaming import deferred_experts, fill_experts
from finetune.model.tokenizer import CHARACTERS, CHAT_TEMPLATE, build_tokenizer

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# The model heads a stage can ask for: next-token prediction, or a sequence score / classifier (`score`).
HEADS = {"causal_lm": AutoModelForCausalLM, "seq_cls": AutoModelForSequenceClassification}


@dataclass(frozen=True)
class Source:
    """Where weights come from: `kind` is "preset", "local" or "hub"; `ref` the name, folder or id."""

    kind: str
    ref: str


def resolve_source(preset: str | None, path: str | None, key: str = "model") -> Source:
    """Decide what `model.preset` / `model.path` point at, without touching the network."""
    if preset is not None:
        return Source("preset", preset)
    assert path is not None
    local = Path(path).expanduser()
    if local.exists():
        check_checkpoint(local, key=f"{key}.path")
        return Source("local", str(local.resolve()))
    if path.startswith((".", "/", "~")) or not _HUB_ID.match(path):
        raise UserError(f"{key}.path: folder not found: {path} (give a local checkpoint folder or a Hub id)")
    return Source("hub", path)


def check_checkpoint(folder: Path, key: str = "model.path") -> None:
    """Fail with what was found unless `folder` holds a DeepSeek-V2 config.json."""
    if not folder.is_dir():
        raise UserError(f"{key}: {folder} is a file, not a checkpoint folder")
    config = folder / "config.json"
    if not config.is_file():
        raise UserError(
            f"{key}: {folder} is not a DeepSeek-V2 checkpoint: no config.json (found: {_found(folder)})"
        )
    try:
        data = json.loads(config.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{key}: {config} is not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise UserError(f"{key}: {config} must hold a JSON object, got a {type(data).__name__}")
    model_type = data.get("model_type")
    if model_type not in family.MODEL_TYPES:
        arch = ", ".join(data.get("architectures") or []) or "no architectures"
        raise UserError(
            f"{key}: {folder} is not a DeepSeek-V2 checkpoint: config.json has model_type "
            f"{model_type!r} ({arch}); expected 'deepseek_v2'"
        )
    try:
        AutoConfig.from_pretrained(folder)
    except Exception as err:  # transformers / huggingface_hub raise many types for bad config fields
        raise UserError(f"{key}: {config}: cannot build the model config ({first_line(err)})") from None
    _check_weights(folder, key)


def _found(folder: Path) -> str:
    """The first few names in a folder, for errors that say what was there instead."""
    return ", ".join(sorted(p.name for p in folder.iterdir())[:8]) or "nothing"


def _check_weights(folder: Path, key: str) -> None:
    """Every safetensors file the checkpoint names exists and has a readable header (no tensor is read)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted({folder / name for name in weight_map.values()})
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as err:
            raise UserError(f"{key}: {index} is not a safetensors index ({first_line(err)})") from None
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise UserError(f"{key}: {index} names {missing[0]}, which is not in {folder}")
    else:
        files = sorted(folder.glob("*.safetensors"))
        if not files:
            raise UserError(
                f"{key}: {folder} has no *.safetensors weights (found: {_found(folder)}); "
                "this toolkit reads safetensors checkpoints"
            )
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as handle:
                handle.keys()
        except Exception as err:  # safetensors raises its own error types for bad headers and sizes
            raise UserError(f"{key}: {path} is not a readable safetensors file ({first_line(err)})") from None


def embedded_checkpoint(preset: str, seed: int) -> Path:
    """Write (once) the seeded random weights and tokenizer of an embedded preset to a cache folder."""
    if preset not in EMBEDDED:
        raise UserError(f"model.preset: {preset!r} is a shape for benchmarks; embedded presets: {EMBEDDED}")
    root = Path(os.environ.get("FINETUNE_CACHE", Path.home() / ".cache" / "finetune"))
    config = preset_config(preset)
    # The folder name carries a digest of the shape and tokenizer, so editing a preset never reuses stale weights.
    digest = hashlib.sha256(
        (config.to_json_string() + CHAT_TEMPLATE + "".join(CHARACTERS)).encode()
    ).hexdigest()[:10]
    folder = root / "embedded" / f"{preset}-seed{seed}-{digest}"
    if (folder / "config.json").is_file():
        return folder
    root.joinpath("embedded").mkdir(parents=True, exist_ok=True)
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    model = family.CausalLM(config)
    torch.random.set_rng_state(generator_state)
    # Write beside the target and rename, so a concurrent or interrupted run never sees half a folder.
    tmp = Path(tempfile.mkdtemp(dir=root / "embedded", prefix=f".{preset}-"))
    hf_logging.disable_progress_bar()  # a few-MB write needs no bar
    try:
        # Under torchrun transformers writes the weights on rank 0 only; the other ranks wait for its folder.
        model.save_pretrained(tmp, is_main_process=True)
    finally:
        hf_logging.enable_progress_bar()
    if not (tmp / "config.json").is_file():
        shutil.rmtree(tmp, ignore_errors=True)
        return _wait_for(folder)
    build_tokenizer().save_pretrained(tmp)
    try:
        tmp.rename(folder)
    except OSError:  # another process won the race; its folder is identical
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _wait_for(folder: Path, seconds: float = 600.0) -> Path:
    """The embedded checkpoint another process is writing, once it has been renamed into place."""
    deadline = time.monotonic() + seconds
    while not (folder / "config.json").is_file():
        if time.monotonic() > deadline:
            raise UserError(f"model.preset: {folder} did not appear (the process writing it stopped?)")
        time.sleep(0.2)
    return folder


def _location(source: Source, seed: int) -> str:
    return str(embedded_checkpoint(source.ref, seed)) if source.kind == "preset" else source.ref


@contextlib.contextmanager
def _hub_errors(source: Source) -> Iterator[None]:
    """A Hub id that cannot be fetched (no network, no such repo, gated) is a user error, not a crash."""
    try:
        yield
    except OSError as err:
        if source.kind != "hub":
            raise
        raise UserError(f"model.path: cannot load Hub id {source.ref!r}: {first_line(err)}") from None


def load_tokenizer(source: Source, seed: int = 0) -> PreTrainedTokenizerBase:
    with _hub_errors(source):
        tokenizer = AutoTokenizer.from_pretrained(_location(source, seed))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    source: Source,
    *,
    quantization: str = "nf4",
    dtype: str = "bfloat16",
    double_quant: bool = True,
    blocksize: int = 64,
    attn_implementation: str | None = None,
    experts_implementation: str | None = None,
    seed: int = 0,
    head: str = "causal_lm",
    num_labels: int | None = None,
    pad_token_id: int | None = None,
    labels: list[str] | None = None,
    multi_label: bool = False,
) -> torch.nn.Module:
    """The native `DeepseekV2ForCausalLM` (`head="seq_cls"`: `DeepseekV2ForSequenceClassification` with
    `num_labels` outputs, pooling the last token that is not `pad_token_id`); with `quantization ==
    "nf4"` its linear layers (bitsandbytes) and its routed experts (`NF4Experts`) are 4-bit. The router,
    the norms and the `score` head keep their dtype."""
    compat_bnb.install_cpu_kernels()  # before any Linear4bit is built: the same numbers on every CPU
    torch_dtype = DTYPES[dtype]
    kwargs: dict = {"dtype": torch_dtype, **_head_config(head, num_labels, pad_token_id, labels, multi_label)}
    if quantization == "nf4":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=double_quant,
            bnb_4bit_compute_dtype=torch_dtype,
        )
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    # transformers 5.25 turned Hub kernels on by default (5.24: off): they would be downloaded at load and
    # swap the norms' and MLPs' forwards under our fused regions and numeric tests; we bring our own.
    kwargs["use_kernels"] = False
    if torch.cuda.is_available():
        # One full replica per process: data parallelism through accelerate, not a split model.
        kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", 0))}
    location = _location(source, seed)
    nf4 = quantization == "nf4"
    with _hub_errors(source), deferred_experts() if nf4 else contextlib.nullcontext(), _new_head_quiet(head):
        model = HEADS[head].from_pretrained(location, **kwargs)
    if model.config.model_type not in family.MODEL_TYPES:
        raise UserError(f"model: loaded a {model.config.model_type!r} model, expected DeepSeek-V2")
    if nf4:
        if source.kind == "hub":  # from_pretrained has fetched the shards; this resolves the cached folder
            with _hub_errors(source):
                location = snapshot_download(location, allow_patterns=["*.safetensors", "*.json"])
        fill_experts(
            model, location, blocksize=blocksize, double_quant=double_quant, compute_dtype=torch_dtype
        )
    if experts_implementation:
        model.set_experts_implementation(experts_implementation)
    compat_bnb.no_cpu_repacking(model)
    return model


@contextlib.contextmanager
def _new_head_quiet(head: str) -> Iterator[None]:
    """A causal-LM checkpoint has no `score` head (trained with, then loaded from, the adapter) and an
    unused `lm_head`: not worth transformers' load report on every classifier load."""
    if head == "causal_lm":
        yield
        return
    with compat_transformers.ignored_load_keys(family.SequenceClassification, [r"^score\."], [r"^lm_head\."]):
        yield


def _head_config(
    head: str,
    num_labels: int | None,
    pad_token_id: int | None,
    labels: list[str] | None = None,
    multi_label: bool = False,
) -> dict:
    """Config overrides of a head: a classifier's label count and names, its problem type, and the pad
    id its pooling looks for."""
    if head not in HEADS:
        raise ValueError(f"unknown model head {head!r}; heads: {', '.join(HEADS)}")
    if head == "causal_lm":
        return {}
    overrides: dict = {"num_labels": num_labels or 1}
    if pad_token_id is not None:
        overrides["pad_token_id"] = pad_token_id
    if labels is not None:
        overrides["id2label"] = dict(enumerate(labels))
        overrides["label2id"] = {n: i for i, n in enumerate(labels)}
    if multi_label:
        overrides["problem_type"] = "multi_label_classification"
    return overrides


def model_skeleton(
    source: Source, seed: int = 0, head: str = "causal_lm", num_labels: int | None = None
) -> torch.nn.Module | None:
    """The model's module tree on the meta device (no weights), to check targets; None for a Hub id."""
    if source.kind == "hub":
        return None
    try:
        config = AutoConfig.from_pretrained(_location(source, seed), **_head_config(head, num_labels, None))
        with torch.device("meta"):
            return HEADS[head].from_config(config)
    except (ValueError, TypeError, KeyError, AttributeError, OSError) as err:
        raise UserError(
            f"model.path: {source.ref}/config.json: cannot build the model ({first_line(err)})"
        ) from None
