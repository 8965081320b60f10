"""`finetune push RUN_DIR/STAGE --repo ID`: a finished stage's adapter folder (PEFT's files, the
routed-expert LoRA and router files, tokenizer, `head.json`) or an export of it (`--export DIR`, a
`finetune export` folder) to a Hub model repo through huggingface_hub, with a generated model card
(README.md: YAML metadata, base, recipe, data, the stage's metrics from summary.json, how to load it).

`--dry-run DIR` writes the folder that would be uploaded, and touches no network. Every check runs before
anything is written or sent. The `push:` key of a stage does the same at the end of the stage
(`push_stage`, called by the pipeline).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from huggingface_hub import CommitOperationAdd, HfApi, ModelCardData, get_token, is_offline_mode
from huggingface_hub.errors import HfHubHTTPError, HFValidationError
from huggingface_hub.utils import validate_repo_id

import finetune
from finetune import recipe as recipe_mod
from finetune import rundir
from finetune.errors import UserError, first_line
from finetune.model.adapter_files import EXPERTS_FILE, HEAD_FILE, ROUTER_FILE
from finetune.stagetypes import STAGE_TYPES

CARD = "README.md"  # the Hub shows it; PEFT's own template card in the adapter folder is replaced
NO_REPO = (
    "--repo: give the Hub repo to push to (e.g. --repo you/model-name); "
    "--dry-run DIR writes what would be uploaded without sending it"
)


@dataclass
class Pushed:
    """What `push` did: the files (repo paths, sorted), and where they went (a folder or a repo URL)."""

    kind: str  # "adapter" or "export"
    files: list[str]
    where: str


def check_repo(repo_id: str | None, key: str = "--repo") -> str:
    """A repo id as the Hub accepts it (`name` or `namespace/name`); checked locally, no network."""
    if not repo_id:
        raise UserError(NO_REPO if key == "--repo" else f"{key}: give the Hub repo id, e.g. you/model-name")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise UserError(f"{key}: {repo_id!r} is not a Hub repo id ({first_line(err)})") from None
    return repo_id


def check_upload(key: str = "push") -> None:
    """What an upload needs before it starts: the network allowed, a token (read locally)."""
    if is_offline_mode():
        raise UserError(
            f"{key}: HF_HUB_OFFLINE is set, so nothing can be uploaded; unset it, or write the folder with "
            "`finetune push RUN_DIR/STAGE --repo ID --dry-run DIR`"
        )
    if get_token() is None:
        raise UserError(f"{key}: no Hugging Face token; set HF_TOKEN or run `hf auth login` (a write token)")


def _finished(stage_dir: Path) -> tuple[dict[str, Any], Any]:
    """The stage's summary and the run's resolved recipe; a stage that did not finish is a user error."""
    summary = rundir.read_summary(stage_dir)
    if summary is None:
        raise UserError(
            f"{stage_dir}: not a finished stage (no summary.json with its adapter/); "
            "give RUN_DIR/STAGE of a finished run"
        )
    resolved = stage_dir.parent / "recipe.yaml"
    if not resolved.is_file():
        raise UserError(f"{resolved}: not found; push reads the run's resolved recipe for the model card")
    return summary, recipe_mod.load(resolved)


def _export_files(export_dir: Path) -> list[Path]:
    if not (export_dir / "config.json").is_file() or not any(export_dir.glob("*.safetensors")):
        raise UserError(
            f"--export {export_dir}: not an export (no config.json and *.safetensors); "
            "make one with `finetune export RUN_DIR/STAGE --out DIR`"
        )
    return [p for p in sorted(export_dir.iterdir()) if p.is_file() and p.name != CARD]


def _hub_id(path: str | None) -> str | None:
    """The recipe's model path when it names a Hub repo (not a local folder), for `base_model`."""
    if path is None or Path(path).expanduser().exists():
        return None
    try:
        validate_repo_id(path)
    except HFValidationError:
        return None
    return path


def card(stage_dir: Path, repo_id: str, kind: str, summary: dict[str, Any], r: Any, files: list[str]) -> str:
    """The README.md of the pushed folder: YAML metadata, then what it is, its data, metrics, how to load."""
    name = stage_dir.name
    stage = r.stages[name]
    head = json.loads((stage_dir / "adapter" / HEAD_FILE).read_text()) if HEAD_FILE in files else None
    classifier = head is not None or STAGE_TYPES[stage.type].head == "seq_cls"
    base_id = _hub_id(r.model.path)
    base_text = r.model.path or f"the embedded `{r.model.preset}` preset (seed {r.model.seed})"
    data = ModelCardData(
        base_model=base_id,
        library_name="peft" if kind == "adapter" else "transformers",
        pipeline_tag="text-classification" if classifier else "text-generation",
        tags=["finetune", stage.type, "deepseek_v2", "moe", *(["lora"] if kind == "adapter" else [])],
    )
    experts = EXPERTS_FILE in files
    a = r.adapter
    lines = [
        f"---\n{data.to_yaml()}\n---",
        f"# {repo_id}",
        "",
        f"Stage `{name}` (`type: {stage.type}`) of the recipe `{r.name}`, trained with "
        f"finetune {finetune.__version__}"
        + (" and merged into the base checkpoint (`finetune export`)." if kind == "export" else "."),
        "",
        f"- Base model: {base_text}, loaded as `{r.model.quantization}` ({r.model.dtype}).",
        f"- Adapter: LoRA r={a.r}, alpha={a.alpha} on {', '.join(a.targets)}"
        + (f"; routed-expert LoRA (`{EXPERTS_FILE}`)" if experts else "")
        + (f"; trained router (`{ROUTER_FILE}`)" if ROUTER_FILE in files else "")
        + ".",
        "",
        "## Data",
        "",
        "```yaml",
        yaml.safe_dump({"data": _plain(stage.data)}, sort_keys=False).rstrip(),
        "```",
        "",
        "## Metrics",
        "",
        "From the stage's `summary.json`:",
        "",
        "| metric | value |",
        "|---|---|",
        *(f"| {k} | {json.dumps(v)} |" for k, v in rundir.summary_numbers(summary).items()),
        "",
        "## Load it",
        "",
        *_how_to_load(repo_id, kind, r.model, base_id, experts or ROUTER_FILE in files, head),
        "",
        "## Recipe",
        "",
        "```yaml",
        r.to_yaml().rstrip(),
        "```",
        "",
    ]
    return "\n".join(lines)


def _plain(section: Any) -> Any:
    return (
        section.model_dump(mode="json", exclude_defaults=True) if hasattr(section, "model_dump") else section
    )


def _how_to_load(
    repo_id: str, kind: str, model: Any, base_id: str | None, ours: bool, head: dict | None
) -> list[str]:
    base = base_id or "BASE_MODEL"  # a local folder or an embedded preset: the user's own copy
    auto = "AutoModelForSequenceClassification" if head is not None else "AutoModelForCausalLM"
    if kind == "export":
        return [
            "A plain transformers checkpoint (the adapter merged in):",
            "",
            "```python",
            f"from transformers import {auto}, AutoTokenizer",
            f'model = {auto}.from_pretrained("{repo_id}")',
            f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}")',
            "```",
            "",
            f"With vLLM: `vllm serve {repo_id}`.",
        ]
    if ours:
        return [
            "The adapter holds LoRA on the routed experts (or a trained router), which PEFT does not load: "
            "load it with finetune on the base, loaded as the run loaded it,",
            "",
            "```python",
            "from huggingface_hub import snapshot_download",
            "from finetune.model.adapters import load_adapter",
            "from finetune.model.load import load_model, resolve_source",
            "",
            f'folder = snapshot_download("{repo_id}")',
            f"source = resolve_source({model.preset!r}, {model.path!r})",
            f'base = load_model(source, quantization="{model.quantization}", dtype="{model.dtype}", '
            f"seed={model.seed})",
            "model = load_adapter(base, folder)",
            "```",
            *(
                ["", "A classifier or reward model is read with `finetune predict` (its `head.json`)."]
                if head is not None
                else []
            ),
            "",
            "or merge it into the base checkpoint for transformers / vLLM: "
            "`finetune export RUN_DIR/STAGE --out DIR`.",
        ]
    extra = f", num_labels={len(head.get('labels') or []) or 1}" if head is not None else ""
    return [
        "A PEFT LoRA adapter:",
        "",
        "```python",
        f"from transformers import {auto}",
        "from peft import PeftModel",
        "",
        f'base = {auto}.from_pretrained("{base}"{extra})',
        f'model = PeftModel.from_pretrained(base, "{repo_id}")',
        "```",
    ]


def _write_folder(dest: Path, sources: list[Path], text: str) -> list[str]:
    """`dest` holding the files: weights hard-linked where the file system allows (an export can be many
    GB; nobody edits a safetensors file in place), the small files copied (editing one there must not
    change the run's)."""
    for path in sources:
        try:
            if path.suffix != ".safetensors":
                raise OSError
            os.link(path, dest / path.name)
        except OSError:
            shutil.copy2(path, dest / path.name)
    (dest / CARD).write_text(text)
    return sorted(p.name for p in dest.iterdir())


def push(
    stage_dir: str | Path,
    repo_id: str | None,
    *,
    export_dir: str | Path | None = None,
    private: bool = False,
    dry_run: str | Path | None = None,
    token: str | None = None,
) -> Pushed:
    """Upload the stage's adapter (or `export_dir`) with its card to `repo_id` (created if missing), or
    with `dry_run` write that folder there instead. Every check first: a failure writes and sends nothing."""
    stage_dir = Path(stage_dir)
    repo_id = check_repo(repo_id)
    summary, r = _finished(stage_dir)
    if stage_dir.name not in r.stages:
        raise UserError(f"{stage_dir}: the run's recipe has no stage {stage_dir.name!r}")
    if export_dir is not None:
        kind, sources = "export", _export_files(Path(export_dir))
    else:
        adapter = stage_dir / "adapter"
        kind, sources = "adapter", [p for p in sorted(adapter.iterdir()) if p.is_file() and p.name != CARD]
    names = [p.name for p in sources]
    if kind == "export":  # the card reads the adapter's files for what it changes
        names += [p.name for p in (stage_dir / "adapter").iterdir() if p.name in (EXPERTS_FILE, ROUTER_FILE)]
    text = card(stage_dir, repo_id, kind, summary, r, names)
    if dry_run is not None:
        dest = Path(dry_run)
        if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
            raise UserError(f"--dry-run {dest}: exists and is not an empty folder; give a new folder")
        with rundir.replaced_folder(dest) as tmp:
            files = _write_folder(tmp, sources, text)
        return Pushed(kind, files, str(dest))
    check_upload()
    # huggingface_hub reads HF_ENDPOINT once, at import; read here, a later setting counts too.
    api = HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None, token=token)
    # One commit of the files where they are (no copy of a many-GB export) and the card from memory.
    operations = [CommitOperationAdd(path_in_repo=p.name, path_or_fileobj=str(p)) for p in sources]
    operations.append(CommitOperationAdd(path_in_repo=CARD, path_or_fileobj=text.encode()))
    files = sorted(op.path_in_repo for op in operations)
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        api.create_commit(
            repo_id=repo_id,
            operations=operations,
            repo_type="model",
            commit_message=f"finetune push: {r.name} / {stage_dir.name} ({kind})",
        )
    except Exception as err:
        if not _network_error(err):
            raise
        raise UserError(f"push {repo_id}: the upload failed ({first_line(err)})") from None
    return Pushed(kind, files, str(url))


def _network_error(err: Exception) -> bool:
    """The Hub's HTTP errors and its HTTP client's transport errors (connection refused, timeouts): the
    client library is huggingface_hub's choice (httpx, `httpx2` in 2.x), so it is told by module."""
    return isinstance(err, HfHubHTTPError | OSError) or type(err).__module__.split(".")[0] in (
        "httpx",
        "httpx2",
    )


def push_stage(
    stage_dir: Path, repo_id: str, *, private: bool, export: bool, export_fn: Callable[[Path, Path], Any]
) -> Pushed:
    """A stage's `push:` key: the adapter, or its export (written by `export_fn(stage_dir, folder)` into a
    temporary folder of the run directory, deleted after the upload)."""
    key = f"stages.{stage_dir.name}.push"
    check_upload(key)
    retry = (
        f"export it with `finetune export {stage_dir} --out DIR`, then `finetune push {stage_dir} --repo {repo_id} "
        "--export DIR`"
        if export
        else f"push it with `finetune push {stage_dir} --repo {repo_id}`"
    )
    try:
        if not export:
            return push(stage_dir, repo_id, private=private)
        with tempfile.TemporaryDirectory(prefix=".push-export-", dir=stage_dir.parent) as tmp:
            export_fn(stage_dir, Path(tmp) / "export")
            return push(stage_dir, repo_id, export_dir=Path(tmp) / "export", private=private)
    except UserError as err:
        raise UserError(f"{key}: the stage finished but was not pushed ({err}); {retry}") from None
