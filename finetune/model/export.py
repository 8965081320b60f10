"""`finetune export`: a stage's adapter merged into the base checkpoint, streamed tensor by tensor.

No model is built. The run's `recipe.yaml` names the base checkpoint; the adapter folder's files are
read directly: PEFT LoRA (`adapter_model.safetensors`: delta `B @ A * alpha/r`, or `alpha/sqrt(r)` with
rsLoRA, `rank_pattern` / `alpha_pattern` honoured) and full trained copies (`modules_to_save`:
embeddings, lm_head), per-expert LoRA (`routed_experts.safetensors`: delta of expert e is
`B[slot] @ A[slot] * alpha/r`, gate_up fused [2I, H] with the gate rows first) and trained routers
(`router.safetensors`), and ESFT's trained experts (`expert_weights.safetensors`: their whole weights
replace theirs, written in the tensor's dtype). Then every shard of the checkpoint is read in order, tensor by tensor, under its
own key (per-expert `mlp.experts.{j}.{gate,up,down}_proj.weight` or the fused `mlp.experts.gate_up_proj`
/ `down_proj`): the delta is added in fp32 and the result written in the tensor's dtype (or `--dtype`);
a tensor without delta is copied byte for byte. Output shards are at most `max_shard_bytes`.

`base="original"` adds the deltas to the checkpoint's own weights. `base="quantized"` first puts every
weight that training saw in 4 bits through the same NF4 round trip (bitsandbytes `quantize_4bit` /
`dequantize_4bit`: the `Linear4bit` layers with blocksize 64 after the cast to `model.dtype`; the routed
experts fused per layer through `NF4Experts.from_weights` with `model.blocksize`), on the GPU if there
is one, so the export computes what the trained 4-bit model computed.

Memory: tensors are read with plain file reads (no memory map) and written as they are produced, so
the peak is about three fp32 copies of the largest changed tensor (unchanged ones are copied in 64 MB
chunks) plus one MoE layer's expert LoRA factors: never a shard, never the model. Measured with
DeepSeek-V2-Lite shapes (benchmarks/export_peak.py, 3 layers, 2 CPU cores): 1.10 GB peak RSS, of which
0.95 GB are the imported libraries. With `base="quantized"` add one MoE layer's routed experts in
`model.dtype` and their NF4 quantization temporaries: on the GPU when there is one, else on the CPU
(9.5 GB peak for a V2-Lite layer).
Everything is written to a temporary folder beside `out`, renamed into place at the end.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import bitsandbytes.functional as bnbf
import torch
from huggingface_hub import snapshot_download
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from finetune import family
from finetune.compat import bitsandbytes as compat_bnb
from finetune.compat import transformers as compat_transformers
from finetune.errors import UserError, first_line
from finetune.model.adapter_files import Adapter, header, read_adapter
from finetune.model.adapters import EXPERTS_FILE, FULL_EXPERTS_FILE, HEAD_FILE
from finetune.model.experts import NF4Experts
from finetune.model.load import embedded_checkpoint, resolve_source
from finetune.model.shards import CODES, DTYPES, BadFile, Entry, Reader, Writer

BASES = ("original", "quantized")
MAX_SHARD_BYTES = 5 * 10**9
LINEAR_BLOCKSIZE = 64  # bitsandbytes Linear4bit's default, which transformers' BitsAndBytesConfig uses
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
)
_EXPERT = re.compile(
    r"(.*\.layers\.(\d+)\.mlp\.experts)\.(?:(\d+)\.(gate|up|down)_proj\.weight|(gate_up|down)_proj)"
)


def base_folder(model: Any) -> Path:
    """The folder of the run's base checkpoint (`model`: the run recipe's `model:` section): embedded
    preset, local folder, or Hub snapshot."""
    source = resolve_source(model.preset, model.path)
    if source.kind == "preset":
        return embedded_checkpoint(source.ref, model.seed)
    if source.kind == "local":
        return Path(source.ref)
    patterns = ["*.safetensors", "*.json", "*.jinja", "*.model", "*.txt", "*.py"]
    try:
        return Path(snapshot_download(source.ref, allow_patterns=patterns))
    except Exception as err:  # offline, unknown repo, gated: all mean "cannot get the base"
        raise UserError(f"model.path: cannot download Hub id {source.ref!r}: {first_line(err)}") from None


def checkpoint_entries(folder: Path) -> list[Entry]:
    """Every tensor of the checkpoint, shard by shard (as named by the index), each in file order."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise UserError(f"{index}: not a valid shard index ({first_line(err)})") from None
        paths = [folder / name for name in files]
    else:
        paths = sorted(folder.glob("*.safetensors"))
    if not paths:
        raise UserError(f"{folder}: no *.safetensors weights in the base checkpoint")
    out: dict[str, Entry] = {}
    for path in paths:
        for key, entry in header(path).items():
            if key in out:
                raise UserError(f"{folder}: tensor {key!r} is in both {out[key].path.name} and {path.name}")
            out[key] = entry
    return list(out.values())


def quantized_linears(folder: Path) -> set[str]:
    """Checkpoint keys of the weights that 4-bit loading turns into bitsandbytes `Linear4bit`.

    The same rule as transformers' bnb quantizer, applied to a meta-device skeleton of the model:
    every plain `nn.Linear` but the ones it skips (output embeddings, tied and fp32-kept modules).
    """
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))
    return {f"{name}.weight" for name in compat_transformers.quantized_linear_names(model)}


def _expert_key(key: str) -> tuple[str, int, int | None, str] | None:
    """(experts prefix, layer, expert or None when fused, `gate`/`up`/`down`/`gate_up`) of a routed-expert key."""
    found = _EXPERT.fullmatch(key)
    if found is None:
        return None
    prefix, layer, expert, proj, fused = found.groups()
    return prefix, int(layer), None if expert is None else int(expert), proj or fused


class _Merger:
    """The value of each output tensor: base (original or NF4 round trip) plus its delta."""

    def __init__(self, adapter: Adapter, entries: list[Entry], base: str, model: Any, folder: Path):
        self.adapter, self.reader = adapter, Reader()
        self.by_key = {e.key: e for e in entries}
        self.layers: dict[int, str] = {}  # MoE layer → experts prefix
        self.expert_keys: dict[str, list[Entry]] = {}  # prefix → all its expert tensors
        for e in entries:
            if found := _expert_key(e.key):
                self.layers[found[1]] = found[0]
                self.expert_keys.setdefault(found[0], []).append(e)
        self.quantized = base == "quantized"
        self.linears: set[str] = set()
        if self.quantized:
            m = model
            if m.quantization != "nf4":
                raise UserError(
                    "--base quantized: this run trained on 16-bit weights (model.quantization: none)"
                )
            self.linears = quantized_linears(folder)
            self.dtype, self.blocksize, self.double_quant = (
                getattr(torch, m.dtype),
                m.blocksize,
                m.double_quant,
            )
            self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self._layer_cache: dict[str, list] = {}  # prefix → [gate_up, down, keys left]
        self._lora_cache: tuple[int, dict[str, torch.Tensor]] | None = None
        self._full_cache: tuple[tuple[int, str], torch.Tensor] | None = None
        self._check()

    def _check(self) -> None:
        """Every change must name a checkpoint tensor of the right shape (before anything is written)."""
        a = self.adapter
        for key, (lora_a, lora_b, _) in a.linear.items():
            shape = self._target(key, "LoRA").shape
            if shape != (lora_b.shape[0], lora_a.shape[1]):
                raise UserError(
                    f"{a.folder}: LoRA for {key} is {lora_b.shape[0]}x{lora_a.shape[1]}, the checkpoint tensor {list(shape)}"
                )
        for key, entry in list(a.full.items()):
            if (
                key == "lm_head.weight"
                and key not in self.by_key
                and "model.embed_tokens.weight" in self.by_key
            ):
                # Tied embeddings: PEFT saves the one trained copy under both names.
                a.full.setdefault("model.embed_tokens.weight", a.full.pop(key))
                continue
            if self._target(key, "trained copy").shape != entry.shape:
                raise UserError(
                    f"{a.folder}: trained {key} has shape {list(entry.shape)}, the checkpoint {list(self.by_key[key].shape)}"
                )
        for layer, lora in a.experts.items():
            where = a.folder / EXPERTS_FILE
            if layer not in self.layers:
                raise UserError(f"{where}: layer {layer} has no routed experts in the base checkpoint")
            n_experts, two_i, hidden = self._expert_shape(self.layers[layer])
            n, r = len(lora.experts), lora.entries["lora_gate_up_A"].shape[1]
            want = {"lora_gate_up_A": (n, r, hidden), "lora_gate_up_B": (n, two_i, r)}
            want |= {"lora_down_A": (n, r, two_i // 2), "lora_down_B": (n, hidden, r)}
            wrong = [p for p, s in want.items() if lora.entries[p].shape != s]
            if wrong or len(set(lora.experts)) != n or not all(0 <= e < n_experts for e in lora.experts):
                raise UserError(
                    f"{where}: layer {layer}: expert LoRA does not fit {n_experts} experts of {two_i // 2}x{hidden}"
                )
        for layer, full in a.full_experts.items():
            where = a.folder / FULL_EXPERTS_FILE
            if layer not in self.layers:
                raise UserError(f"{where}: layer {layer} has no routed experts in the base checkpoint")
            n_experts, two_i, hidden = self._expert_shape(self.layers[layer])
            n = len(full.experts)
            fits = full.gate_up.shape == (n, two_i, hidden) and full.down.shape == (n, hidden, two_i // 2)
            if not fits or len(set(full.experts)) != n or not all(0 <= e < n_experts for e in full.experts):
                raise UserError(
                    f"{where}: layer {layer}: trained experts do not fit {n_experts} experts of {two_i // 2}x{hidden}"
                )
        if self.quantized:
            for prefix in self.expert_keys:
                self._expert_shape(prefix)

    def _target(self, key: str, what: str) -> Entry:
        if key not in self.by_key:
            raise UserError(
                f"{self.adapter.folder}: {what} for {key!r} names no tensor of the base checkpoint "
                "(an adapter of another model?)"
            )
        return self.by_key[key]

    def _expert_shape(self, prefix: str) -> tuple[int, ...]:
        """(experts, 2I, H) of a layer; per-expert keys must be complete."""
        entries = {e.key: e for e in self.expert_keys[prefix]}
        if f"{prefix}.gate_up_proj" in entries and f"{prefix}.down_proj" in entries:
            return entries[f"{prefix}.gate_up_proj"].shape
        n = len(entries) // 3
        keys = [f"{prefix}.{j}.{p}_proj.weight" for j in range(n) for p in ("gate", "up", "down")]
        if set(keys) != set(entries):
            raise UserError(f"base checkpoint: the routed-expert tensors of {prefix} are incomplete")
        intermediate, hidden = entries[keys[0]].shape
        return n, 2 * intermediate, hidden

    def _is_quantized(self, key: str) -> bool:
        return key in self.linears or (self.quantized and _expert_key(key) is not None)

    def changes(self, e: Entry) -> bool:
        """Whether the tensor may differ from the checkpoint's (else it is copied through)."""
        a, expert = self.adapter, _expert_key(e.key)
        lora = e.key in a.linear or (expert is not None and expert[1] in a.experts)
        return lora or e.key in a.full or self._trained(e) is not None or self._is_quantized(e.key)

    def _trained(self, e: Entry) -> list[tuple[int | None, torch.Tensor]] | None:
        """ESFT's trained experts in tensor `e`, as (index in a fused tensor or None, weight in fp32)."""
        found = _expert_key(e.key)
        if found is None or found[1] not in self.adapter.full_experts:
            return None
        _, layer, expert, proj = found
        full = self.adapter.full_experts[layer]
        if expert is not None and expert not in full.experts:
            return None
        which = "down" if proj == "down" else "gate_up"
        if self._full_cache is None or self._full_cache[0] != (layer, which):
            self._full_cache = None  # one layer's one weight at a time
            self._full_cache = ((layer, which), self.reader.tensor(getattr(full, which)).float())
        weights = self._full_cache[1]
        if expert is None:  # fused [E, N, K]
            return list(zip(full.experts, weights, strict=True))
        w = weights[full.experts.index(expert)]
        return [(None, w if proj in ("down", "gate_up") else w.chunk(2)[0 if proj == "gate" else 1])]

    def value(self, e: Entry) -> torch.Tensor | None:
        """The merged tensor in fp32, or None when it equals the checkpoint's (no delta, or B = 0)."""
        if e.key in self.adapter.full:
            return self.reader.tensor(self.adapter.full[e.key]).float()
        trained = self._trained(e)
        if trained is not None and trained[0][0] is None:  # one expert's tensor: the trained weight itself
            return trained[0][1].contiguous()
        quantized, factors = self._is_quantized(e.key), self._factors(e)
        if not quantized and not factors and trained is None:
            return None
        value = self._quantized(e) if quantized else self.reader.tensor(e).float()
        for expert, b, a, scale in factors:  # value (+)= scale * B @ A, in place, in fp32
            (value if expert is None else value[expert]).addmm_(b, a, alpha=scale)
        for expert, weight in trained or ():  # ESFT's trained experts replace theirs whole
            value[expert] = weight
        return value

    def _factors(self, e: Entry) -> list[tuple[int | None, torch.Tensor, torch.Tensor, float]]:
        """The LoRA products to add, as (expert index in a fused tensor or None, B, A, scale); B = 0 skipped."""
        if e.key in self.adapter.linear:
            lora_a, lora_b, scale = self.adapter.linear[e.key]
            b = self.reader.tensor(lora_b).float()
            return [(None, b, self.reader.tensor(lora_a).float(), scale)] if b.any() else []
        found = _expert_key(e.key)
        if found is None or found[1] not in self.adapter.experts:
            return []
        _, layer, expert, proj = found
        lora, t = self.adapter.experts[layer], self._lora(layer)
        w = "down" if proj == "down" else "gate_up"
        a, b = t[f"lora_{w}_A"], t[f"lora_{w}_B"]
        if expert is None:  # fused [E, N, K]: every adapted expert
            pairs = [(j, b[slot], a[slot]) for slot, j in enumerate(lora.experts)]
        elif expert in lora.experts:
            slot = lora.experts.index(expert)
            rows = b[slot] if w == "down" else b[slot].chunk(2)[0 if proj == "gate" else 1]  # gate rows first
            pairs = [(None, rows, a[slot])]
        else:
            pairs = []
        return [(j, rows, a_e, lora.scale) for j, rows, a_e in pairs if rows.any()]

    def _lora(self, layer: int) -> dict[str, torch.Tensor]:
        """One MoE layer's expert LoRA factors in fp32 (only the last layer used is kept)."""
        if self._lora_cache is None or self._lora_cache[0] != layer:
            self._lora_cache = None
            parts = self.adapter.experts[layer].entries
            self._lora_cache = (layer, {p: self.reader.tensor(e).float() for p, e in parts.items()})
        return self._lora_cache[1]

    def _quantized(self, e: Entry) -> torch.Tensor:
        """The weight as the 4-bit model held it: NF4-quantized, dequantized to `model.dtype`, in fp32."""
        if e.key in self.linears:  # as bitsandbytes' Params4bit quantizes a Linear4bit weight
            compat_bnb.install_cpu_kernels()
            w = self.reader.tensor(e).to(self.device, self.dtype)
            packed, state = bnbf.quantize_4bit(
                w, blocksize=LINEAR_BLOCKSIZE, compress_statistics=self.double_quant, quant_type="nf4"
            )
            return bnbf.dequantize_4bit(packed, state).cpu().float()
        prefix, _, expert, proj = _expert_key(e.key)
        if prefix not in self._layer_cache:
            self._layer_cache[prefix] = [*self._experts_round_trip(prefix), len(self.expert_keys[prefix])]
        cached = self._layer_cache[prefix]
        cached[2] -= 1
        if cached[2] == 0:  # the layer's last expert tensor: drop the layer
            del self._layer_cache[prefix]
        weight = cached[1] if proj == "down" else cached[0]
        if expert is not None:
            weight = weight[expert] if proj == "down" else weight[expert].chunk(2)[0 if proj == "gate" else 1]
        return weight.float()

    def _experts_round_trip(self, prefix: str) -> tuple[torch.Tensor, torch.Tensor]:
        """A layer's experts fused and quantized exactly as `streaming.fill_experts` does, dequantized."""
        entries = {e.key: e for e in self.expert_keys[prefix]}

        def get(key: str) -> torch.Tensor:
            return self.reader.tensor(entries[key]).to(self.device)

        if f"{prefix}.gate_up_proj" in entries:
            gate_up, down = get(f"{prefix}.gate_up_proj"), get(f"{prefix}.down_proj")
        else:
            n = len(entries) // 3

            def stack(p: str) -> torch.Tensor:
                return torch.stack([get(f"{prefix}.{j}.{p}_proj.weight") for j in range(n)])

            gate_up, down = torch.cat([stack("gate"), stack("up")], dim=1), stack("down")
        module = NF4Experts.from_weights(
            gate_up,
            down,
            torch.nn.Identity(),
            blocksize=self.blocksize,
            double_quant=self.double_quant,
            compute_dtype=self.dtype,
        )
        del gate_up, down
        return module.dequantize("gate_up").cpu(), module.dequantize("down").cpu()


def _shards(entries: list[Entry], sizes: dict[str, int], limit: int) -> list[list[Entry]]:
    shards: list[list[Entry]] = [[]]
    used = 0
    for e in entries:
        if shards[-1] and used + sizes[e.key] > limit:
            shards.append([])
            used = 0
        shards[-1].append(e)
        used += sizes[e.key]
    return shards


def _shard_name(i: int, n: int) -> str:
    return "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"


@dataclass(frozen=True)
class Result:
    folder: Path
    nbytes: int
    shards: int
    tensors: int
    auto_class: str = "AutoModelForCausalLM"  # what loads it: AutoModelForSequenceClassification for a head


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: is a file; give a folder for the exported checkpoint")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UserError(f"--out {out}: folder is not empty; pass --overwrite to replace it")


def export(
    stage_dir: str | Path,
    out: str | Path,
    read_model: Callable[[Path], Any],
    *,
    base: str = "original",
    dtype: str | None = None,
    overwrite: bool = False,
    max_shard_bytes: int = MAX_SHARD_BYTES,
    progress: bool = False,
) -> Result:
    """Write `out` as a transformers checkpoint: the base checkpoint's tensors with the stage's adapter
    merged. `model`: the run's `model:` section, which `read_model` gets from the run's resolved recipe
    (`recipe.yaml`, read by the caller: the recipe layer sits above the model code)."""
    stage_dir, out = Path(stage_dir), Path(out).absolute()
    if base not in BASES:
        raise UserError(f"--base: {base!r}; choose one of {', '.join(BASES)}")
    adapter_dir, resolved = stage_dir / "adapter", stage_dir.parent / "recipe.yaml"
    if not (adapter_dir / "adapter_config.json").is_file():
        raise UserError(f"{stage_dir}: no adapter/ folder here; give RUN_DIR/STAGE of a finished run")
    if not resolved.is_file():
        raise UserError(f"{resolved}: not found; export needs the run's resolved recipe")
    _check_out(out, overwrite)
    model = read_model(resolved)
    adapter = read_adapter(adapter_dir)
    try:
        folder = base_folder(model)
    except UserError as err:
        raise UserError(f"{resolved}: base checkpoint: {err}") from None
    for inside in (folder.resolve(), stage_dir.resolve()):
        if out.resolve() == inside or out.resolve() in inside.parents:
            raise UserError(f"--out {out}: would replace {inside}, which the export reads")
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"{folder}/config.json: {first_line(err)}") from None
    entries = checkpoint_entries(folder)
    if _head(adapter_dir) == "seq_cls":
        entries, config = _classifier(entries, config, adapter, folder, adapter_dir)
    merger = _Merger(adapter, entries, base, model, folder)
    code = {
        e.key: CODES[getattr(torch, dtype)] if dtype and e.torch_dtype.is_floating_point else e.dtype
        for e in entries
    }
    sizes = {e.key: math.prod(e.shape) * DTYPES[code[e.key]].itemsize for e in entries}
    shards = _shards(entries, sizes, max_shard_bytes)

    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.partial-"))
    except OSError as err:
        raise UserError(f"--out {out}: cannot create the folder ({first_line(err)})") from None
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    try:
        _write(tmp, shards, code, merger, progress)
        _write_side_files(tmp, folder, adapter_dir, config, dtype)
        _replace(tmp, out)
    except (OSError, BadFile) as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"--out {out}: export failed, nothing written ({first_line(err)})") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        merger.reader.close()
    auto = "AutoModelForSequenceClassification" if _head(adapter_dir) == "seq_cls" else "AutoModelForCausalLM"
    return Result(out, sum(sizes.values()), len(shards), len(entries), auto)


def _head(adapter_dir: Path) -> str:
    """`seq_cls` for an adapter trained on a sequence classifier / reward model (PEFT task SEQ_CLS)."""
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    return "seq_cls" if config.get("task_type") == "SEQ_CLS" else "causal_lm"


def _classifier(
    entries: list[Entry], config: dict, adapter, folder: Path, adapter_dir: Path
) -> tuple[list[Entry], dict]:
    """A classifier's checkpoint: the base without `lm_head`, plus the trained `score` head (a tensor the
    base checkpoint does not have, streamed from the adapter file), under a classifier config."""
    score = adapter.full.get("score.weight")
    if score is None:
        raise UserError(f"{adapter_dir}: a SEQ_CLS adapter without its trained `score` head")
    own = (adapter_dir / "tokenizer_config.json").is_file()
    tokenizer = AutoTokenizer.from_pretrained(adapter_dir if own else folder)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    head_file = adapter_dir / HEAD_FILE  # written by the classify and reward stages
    head = json.loads(head_file.read_text()) if head_file.is_file() else {}
    names = head.get("labels")
    if names is not None and len(names) == score.shape[0]:
        labels = {str(i): name for i, name in enumerate(names)}
    else:
        labels = config.get("id2label") if len(config.get("id2label") or {}) == score.shape[0] else None
        labels = labels or {str(i): f"LABEL_{i}" for i in range(score.shape[0])}
    edited = {
        **config,
        "architectures": [family.SEQUENCE_CLASSIFICATION_ARCHITECTURE],
        "id2label": labels,
        "label2id": {name: int(i) for i, name in labels.items()},
        "pad_token_id": pad,
    }
    if head.get("multi_label"):
        edited["problem_type"] = "multi_label_classification"
    elif head.get("labels"):  # a classifier's head (a reward model's scores one value, unlabelled)
        edited["problem_type"] = "single_label_classification"
    kept = [e for e in entries if e.key != "lm_head.weight"]
    return [*kept, dataclasses.replace(score, key="score.weight")], edited


def _write(
    tmp: Path, shards: list[list[Entry]], code: dict[str, str], merger: _Merger, progress: bool
) -> None:
    names = [_shard_name(i, len(shards)) for i in range(len(shards))]
    with tqdm(total=sum(map(len, shards)), unit="tensor", desc="export", disable=not progress) as bar:
        for name, shard in zip(names, shards, strict=True):
            writer = Writer(tmp / name, [(e.key, code[e.key], e.shape) for e in shard])
            for e in shard:
                value = merger.value(e) if merger.changes(e) else None
                if value is None and code[e.key] == e.dtype:
                    merger.reader.copy(e, writer)
                else:
                    value = merger.reader.tensor(e) if value is None else value
                    writer.write(e.key, value.to(DTYPES[code[e.key]]))
                bar.update()
            writer.close()
    if len(shards) > 1:
        weight_map = {e.key: name for name, shard in zip(names, shards, strict=True) for e in shard}
        total = sum(math.prod(e.shape) * DTYPES[code[e.key]].itemsize for s in shards for e in s)
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _side_files(folder: Path, adapter_dir: Path, config: dict) -> Iterator[Path]:
    """Tokenizer (the stage's own when it saved one), generation config, remote code named by auto_map."""
    own = (adapter_dir / "tokenizer_config.json").is_file() or (adapter_dir / "tokenizer.json").is_file()
    tokenizer_dir = adapter_dir if own else folder
    yield from (tokenizer_dir / n for n in TOKENIZER_FILES if (tokenizer_dir / n).is_file())
    yield from (folder / n for n in ("generation_config.json",) if (folder / n).is_file())
    modules = {ref.split(".")[0] for ref in (config.get("auto_map") or {}).values() if isinstance(ref, str)}
    yield from (folder / f"{m}.py" for m in sorted(modules) if (folder / f"{m}.py").is_file())


def _write_side_files(tmp: Path, folder: Path, adapter_dir: Path, config: dict, dtype: str | None) -> None:
    """config.json (the original's, verbatim unless it names a quantization or --dtype casts), and the rest."""
    edited = {k: v for k, v in config.items() if k != "quantization_config"}
    if dtype:
        for key in [k for k in ("torch_dtype", "dtype") if k in edited] or ["torch_dtype"]:
            edited[key] = dtype
    if edited == json.loads((folder / "config.json").read_text()):  # untouched: keep the file verbatim
        shutil.copyfile(folder / "config.json", tmp / "config.json")
    else:
        (tmp / "config.json").write_text(json.dumps(edited, indent=2) + "\n")
    for path in _side_files(folder, adapter_dir, config):
        shutil.copyfile(path, tmp / path.name)


def _replace(tmp: Path, out: Path) -> None:
    """Move the finished folder to `out`; an existing `out` is set aside first and deleted last."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
    try:
        tmp.rename(out)
    except OSError:
        if old is not None:
            old.rename(out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
