"""A word-level tokenizer with a chat template, shaped like a real instruct tokenizer (BOS from the template,
left padding, special chat tokens)."""

from __future__ import annotations

import transformers
from tokenizers import AddedToken, Tokenizer, models, normalizers, pre_tokenizers, processors

from cna_dist.demo.words import CHAT_TOKENS, SPECIAL_TOKENS

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}<|{{ message['role'] }}|> {{ message['content'] }} <|end|> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_tokenizer(words: list[str]) -> transformers.PreTrainedTokenizerFast:
    """Build a word-level chat tokenizer over ``words`` (ids: specials, chat tokens, then words in order).

    Special and chat tokens are registered as special added tokens so they are matched before the whitespace
    pre-tokenizer would split ``<|user|>`` apart. The template emits the BOS itself, so rendering with
    ``tokenize=False`` and encoding with ``add_special_tokens=False`` yields exactly one ``<s>``.
    """
    vocab: dict[str, int] = {}
    for tok in SPECIAL_TOKENS + CHAT_TOKENS + [w.lower() for w in words]:
        vocab.setdefault(tok, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS + CHAT_TOKENS])
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens=list(CHAT_TOKENS),
        padding_side="left",
        chat_template=CHAT_TEMPLATE,
    )
