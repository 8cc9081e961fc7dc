"""core/metrics: the refusal classifier, the paper's 4-gram quality and the random same-layer control, exactly."""

from __future__ import annotations

import pytest

from cna_dist.eval import metrics as ev

# ---------------------------------------------------------------------------------------------------- score


def test_score_exact_values() -> None:
    texts = [
        "I'm sorry, I can't help with that.",  # refusal; 7 words, 4 distinct 4-grams
        "go go go go go go",  # 3 grams, 1 distinct
        "ok",  # under 4 words: 1.0
        "x " * 600 + "I cannot help",
    ]  # the refusal phrase starts after 500 characters: not a refusal
    assert [ev.quality(t) for t in texts] == [1.0, 1 / 3, 1.0, 4 / 600]
    assert [ev.is_refusal(t) for t in texts] == [True, False, False, False]
    result = ev.score(texts)
    assert result == {"refusal_rate": 0.25, "quality": pytest.approx((1.0 + 1 / 3 + 1.0 + 4 / 600) / 4), "n": 4}


def test_score_custom_patterns_and_errors() -> None:
    assert ev.score(["NOPE.", "fine"], patterns=[r"\bnope\b"])["refusal_rate"] == 0.5  # case-insensitive
    assert ev.score(["I am sorry"], patterns=[])["refusal_rate"] == 0.0
    with pytest.raises(ValueError, match=r"\(unclosed"):
        ev.score(["x"], patterns=[r"ok", r"(unclosed"])
    with pytest.raises(ValueError, match="no texts"):
        ev.score([])


# --------------------------------------------------------------------------------------------- random control


def test_random_pairs_matches_layers_and_avoids() -> None:
    pairs = [(1, 0), (1, 5), (3, 2), (3, 7), (3, 9), (6, 1)]
    avoid = [(1, 1), (1, 2), (3, 3), (6, 0)]
    got = ev.random_pairs(pairs, width=20, seed=0, avoid=avoid)
    assert got == sorted(got) and len(set(got)) == len(got)
    assert [layer for layer, _ in got] == [1, 1, 3, 3, 3, 6]
    assert not set(got) & (set(pairs) | set(avoid))
    assert all(0 <= j < 20 for _, j in got)
    assert ev.random_pairs(pairs, 20, 0, avoid) == got
    assert ev.random_pairs(pairs, 20, 1, avoid) != got


def test_random_pairs_is_uniform_enough_and_exhaustive() -> None:
    # Exactly enough free neurons: the control must take all of them.
    assert ev.random_pairs([(0, 0), (0, 1)], width=4, seed=3) == [(0, 2), (0, 3)]
    seen = {j for seed in range(200) for _, j in ev.random_pairs([(2, 0)], width=6, seed=seed)}
    assert seen == {1, 2, 3, 4, 5}


def test_random_pairs_errors() -> None:
    with pytest.raises(ValueError, match="layer 2"):
        ev.random_pairs([(2, 0), (2, 1), (2, 2)], width=5, seed=0)
    with pytest.raises(ValueError, match="layer 0"):
        ev.random_pairs([(0, 0)], width=3, seed=0, avoid=[(0, 1), (0, 2)])
    with pytest.raises(ValueError, match="outside"):
        ev.random_pairs([(0, 9)], width=3, seed=0)
