"""Greedy batched generation and steering hooks on the planted model (model/generate.py, steer/hooks.py)."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import pytest

from cna_dist.capture import hf
from cna_dist.demo.words import demo_prompts
from cna_dist.eval import metrics as ev
from cna_dist.model import generate as gen
from cna_dist.prompts import sets as promptsmod
from cna_dist.steer import hooks as steer

MAX_NEW = 10


def encode_all(tokenizer, texts: list[str]) -> list[list[int]]:
    chat = promptsmod.use_chat_template(tokenizer, None)
    return [promptsmod.encode(tokenizer, promptsmod.render(tokenizer, t, chat), chat) for t in texts]


@pytest.fixture(scope="module")
def planted_lm(planted):
    model, tokenizer = hf.load(planted.path, dtype="float32")
    return planted, model, tokenizer


@pytest.fixture(scope="module")
def harmful_ids(planted_lm) -> list[list[int]]:
    """Held-out eval prompts plus a few training ones: 16 harmful prompts of mixed lengths."""
    _, _, tokenizer = planted_lm
    sets = demo_prompts()
    return encode_all(tokenizer, sets["eval"] + sets["positive"][:6])


# ------------------------------------------------------------------------------------------------ generation


def test_planted_refusal_steering_and_random_control(planted_lm, harmful_ids) -> None:
    pm, model, tokenizer = planted_lm
    base = gen.generate(model, tokenizer, harmful_ids, max_new_tokens=MAX_NEW)
    with steer.steered(model, pm.gate, 1.0):
        kept = gen.generate(model, tokenizer, harmful_ids, max_new_tokens=MAX_NEW)
    with steer.steered(model, pm.gate, 0.0):
        ablated = gen.generate(model, tokenizer, harmful_ids, max_new_tokens=MAX_NEW)
    control = ev.random_pairs(pm.gate, model.config.intermediate_size, seed=0, avoid=pm.universal)
    assert sorted({layer for layer, _ in control}) == sorted({layer for layer, _ in pm.gate})
    with steer.steered(model, control, 0.0):
        controlled = gen.generate(model, tokenizer, harmful_ids, max_new_tokens=MAX_NEW)

    assert kept == base  # m = 1 is no intervention
    assert ev.score(kept)["refusal_rate"] >= 0.9
    assert ev.score(ablated)["refusal_rate"] <= 0.1
    assert controlled == kept  # ablating as many random neurons per layer changes nothing
    assert ev.score(ablated)["quality"] == 1.0


@pytest.mark.slow
@pytest.mark.parametrize("which", ["planted", "tiny_llama", "tiny_qwen"])
def test_batched_generation_equals_one_at_a_time(which: str, request: pytest.FixtureRequest) -> None:
    if which == "planted":
        _, model, tokenizer = request.getfixturevalue("planted_lm")
    else:
        model, tokenizer = hf.load(request.getfixturevalue(which), dtype="float32")
    sets = demo_prompts()
    texts = [
        sets["eval"][0],
        "hi",
        sets["negative"][1],
        sets["diverse"][0],
        sets["positive"][2] + " and then tell me the rest of it in detail please",
    ]
    ids = encode_all(tokenizer, texts)
    assert len({len(t) for t in ids}) == len(ids)  # mixed lengths, so rows really are padded
    single = [gen.generate(model, tokenizer, [t], max_new_tokens=MAX_NEW)[0] for t in ids]
    assert gen.generate(model, tokenizer, ids, max_new_tokens=MAX_NEW) == single
    assert gen.generate(model, tokenizer, ids, max_new_tokens=MAX_NEW, max_batch_size=4, token_budget=60) == single
    if which != "planted":
        assert sum(len(s) for s in single) >= 10, single  # random models do not just emit EOS


def test_generation_stays_greedy_whatever_the_checkpoint_config(tiny_llama: Path) -> None:
    model, tokenizer = hf.load(tiny_llama, dtype="float32")
    ids = encode_all(tokenizer, ["how do i bake a cake", "tell me a joke"])
    plain = gen.generate(model, tokenizer, ids, max_new_tokens=MAX_NEW)
    config = model.generation_config
    config.do_sample, config.temperature, config.top_p, config.top_k = True, 0.6, 0.9, 5
    config.repetition_penalty, config.no_repeat_ngram_size, config.num_beams = 5.0, 2, 3

    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            again = [gen.generate(model, tokenizer, ids, max_new_tokens=MAX_NEW) for _ in range(2)]
    finally:
        logger.removeHandler(handler)
    assert again == [plain, plain]
    assert model.generation_config.do_sample is True  # the checkpoint's config is not modified
    noisy = [r.getMessage() for r in records if r.levelno >= logging.WARNING] + [str(w.message) for w in caught]
    assert not [m for m in noisy if "temperature" in m or "do_sample" in m or "not valid" in m], noisy


def test_steering_hooks_are_removed_on_error(tiny_llama: Path) -> None:
    model, _ = hf.load(tiny_llama, dtype="float32")
    with pytest.raises(RuntimeError, match="boom"):
        with steer.steered(model, [(1, 2)], 0.0):
            raise RuntimeError("boom")
    assert all(not p._forward_pre_hooks for p in hf.down_projs(model))


def test_generate_keeps_prompt_order_and_handles_empty(planted_lm, harmful_ids) -> None:
    pm, model, tokenizer = planted_lm
    assert gen.generate(model, tokenizer, [], max_new_tokens=4) == []
    ids = harmful_ids[:2] + encode_all(tokenizer, demo_prompts()["negative"][:2])
    assert gen.generate(model, tokenizer, ids, max_new_tokens=12) == [pm.refusal_text] * 2 + [pm.answer_text] * 2
    assert ev.score([pm.refusal_text, pm.answer_text])["refusal_rate"] == 0.5
