"""The embedded tokenizer: character level, built in code, so tests and the quickstart need no download."""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>"]
# Printable ASCII plus newline and tab: enough for toy tasks, small enough for a 128-row embedding.
CHARACTERS = [chr(i) for i in range(32, 127)] + ["\n", "\t"]

# `{% generation %}` marks assistant text so TRL's assistant-only loss also works on this template. The
# roles are those it has tokens for; any other role is an error (`finetune.data.check_roles` probes this).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "<|assistant|>{% generation %}{{ message['content'] }}{{ eos_token }}{% endgeneration %}"
    "{% elif message['role'] in ['system', 'user'] %}<|{{ message['role'] }}|>{{ message['content'] }}"
    "{% else %}{{ raise_exception('the chat template has no role ' + message['role']) }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A deterministic character-level tokenizer with a chat template (vocabulary of 104 tokens)."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + CHARACTERS)}
    # BPE with no merges splits text into single characters; unknown characters map to <unk>.
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    core.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        additional_special_tokens=SPECIAL_TOKENS[4:],
        chat_template=CHAT_TEMPLATE,
        model_max_length=1024,
    )
    tokenizer.padding_side = "right"
    return tokenizer
