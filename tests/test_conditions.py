"""eval's conditions as plain data: m = 1 shares one generation, and scores come back in a fixed order."""

from __future__ import annotations

from cna_dist.eval.conditions import BASELINE, Condition, distinct_specs, score
from cna_dist.eval.metrics import DEFAULT_REFUSAL_PATTERNS

PAIRS = {"pairs": [[2, 5]], "multiplier": 0.0}
CONDS = [
    Condition("cna", 0.0, PAIRS),
    Condition("random", 0.0, {"pairs": [[3, 1]], "multiplier": 0.0}),
    Condition("cna", 1.0, BASELINE),
    Condition("random", 1.0, BASELINE),
    Condition("caa", 1.0, BASELINE),
]


def test_conditions_that_share_a_spec_generate_once() -> None:
    specs, spec_of = distinct_specs(CONDS)
    assert specs == [PAIRS, {"pairs": [[3, 1]], "multiplier": 0.0}, BASELINE]
    assert spec_of == [0, 1, 2, 2, 2]


def test_scores_in_method_then_multiplier_order_with_samples_and_extras() -> None:
    _, spec_of = distinct_specs(CONDS)
    texts = [["sure, here is how", "first you take"], ["I cannot help with that", "no"], ["I'm sorry", "I cannot"]]
    prompts = ["p0", "p1"]
    results, samples = score(CONDS, texts, spec_of, prompts, DEFAULT_REFUSAL_PATTERNS, 1, {"judge": [0.9, 0.5, 0.1]})
    assert [(r["method"], r["multiplier"]) for r in results] == [
        ("cna", 0.0),
        ("cna", 1.0),
        ("random", 0.0),
        ("random", 1.0),
        ("caa", 1.0),
    ]
    assert [r["refusal_rate"] for r in results] == [0.0, 1.0, 0.5, 1.0, 1.0]
    assert [r["judge"] for r in results] == [0.9, 0.1, 0.5, 0.1, 0.1]
    assert results[-1]["alpha"] == 0.0 and "alpha" not in results[0]
    assert len(samples) == 5 and samples[0] == {
        "method": "cna",
        "multiplier": 0.0,
        "prompt": "p0",
        "completion": "sure, here is how",
    }
