"""How often a causal-LM stage samples a right answer where its greedy answer is wrong: what GRPO can
reinforce from that warm start (docs/benchmarks.md, "does the tiny GRPO recipe learn?").

    python benchmarks/sample_coverage.py RUN/sft [--recipe recipes/tiny/grpo.yaml] [--data recipes/data/reverse/test.jsonl]
        [--rows 64] [--samples 8 32] [--temperature 0.4] [--top-p 1.0]

Rows are `messages` conversations: the user turn is the prompt, the assistant turn the answer (exact match)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from transformers import AutoTokenizer

from finetune import recipe as recipe_mod
from finetune.model import adapters
from finetune.model.load import resolve_source

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("stage", type=Path, help="a finished stage folder (its adapter/ is loaded)")
    parser.add_argument("--recipe", type=Path, default=REPO / "recipes" / "tiny" / "grpo.yaml")
    parser.add_argument("--data", type=Path, default=REPO / "recipes" / "data" / "reverse" / "test.jsonl")
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--samples", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--temperature", type=float, default=0.4)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--max-new-tokens", type=int, default=6)
    a = parser.parse_args()

    r = recipe_mod.load(a.recipe, [])
    ctx = recipe_mod.stage_context(r, resolve_source(r.model.preset, r.model.path))
    tok = AutoTokenizer.from_pretrained(str(a.stage / "adapter"))
    tok.padding_side = "left"
    model = adapters.load_adapter(ctx.base_model("causal_lm"), a.stage / "adapter").eval()
    rows = [json.loads(line) for line in a.data.read_text().splitlines()[: a.rows]]
    prompts = [
        tok.apply_chat_template(x["messages"][:1], tokenize=False, add_generation_prompt=True) for x in rows
    ]
    answers = [x["messages"][1]["content"] for x in rows]
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)

    def answers_of(**kwargs) -> list[str]:
        with torch.no_grad():
            out = model.generate(
                **enc, max_new_tokens=a.max_new_tokens, pad_token_id=tok.pad_token_id, **kwargs
            )
        return [
            t.strip() for t in tok.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
        ]

    greedy = answers_of(do_sample=False)
    wrong = [i for i, (g, want) in enumerate(zip(greedy, answers, strict=True)) if g != want]
    result = {
        "rows": len(rows),
        "greedy_em": 1 - len(wrong) / len(rows),
        "temperature": a.temperature,
        "by_samples": {},
    }
    for k in a.samples:
        torch.manual_seed(0)
        sampled = answers_of(
            do_sample=True, temperature=a.temperature, top_k=a.top_k, top_p=a.top_p, num_return_sequences=k
        )
        hits = [[sampled[i * k + j] == answers[i] for j in range(k)] for i in range(len(rows))]
        result["by_samples"][k] = {
            "sampled_em": sum(map(sum, hits)) / (k * len(rows)),
            f"pass@{k}": sum(any(h) for h in hits) / len(rows),
            "greedy_wrong_with_a_right_sample": f"{sum(any(hits[i]) for i in wrong)} / {len(wrong)}",
        }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
