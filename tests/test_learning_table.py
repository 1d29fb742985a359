"""The whole concept x metric table (issue 14): every held-out shape as a subject and every held-out texture as a
style, all with the one subject / style preset + demo_settings, judged on the `report` and the `fresh` seeds and
colour pairs (scripts/learning_table.py; the presets were chosen on the `tune` set).

About 9 trainings of 1-2 minutes each on one CPU thread, which the default suite cannot afford: these run only
when asked for, `python -m pytest -m learning_table` (or `python scripts/learning_table.py` for the table alone).
The default suite keeps the heart subject, the checkered style and prior preservation (tests/test_learning.py).
"""
from __future__ import annotations

import pytest

from engine.demo import world as W
from scripts.learning_table import THRESHOLDS, Row, kind_of, markdown, measure, train_concept

ROWS: list[Row] = []


@pytest.fixture(autouse=True)
def _only_when_asked(request):
    if "learning_table" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("the full learning table runs with: python -m pytest -m learning_table")


@pytest.mark.learning_table
@pytest.mark.parametrize("concept", W.HELD_OUT_SHAPES + W.HELD_OUT_TEXTURES)
def test_concept_is_learned_with_the_shared_preset(tmp_path_factory, base, probe, concept):  # noqa: F811
    import time

    t0, c0 = time.time(), time.process_time()
    lora = train_concept(base, concept, tmp_path_factory.mktemp(concept))
    misses = {}
    for seed_set in ("report", "fresh"):
        row = Row(f"{concept} ({seed_set})", kind_of(concept), {}, time.time() - t0)
        row.metrics = measure(probe, lora, concept, seed_set)
        row.cpu_s = time.process_time() - c0
        ROWS.append(row)
        misses |= {f"{k} ({seed_set})": (v, THRESHOLDS[k]) for k, v in row.metrics.items()
                   if v < THRESHOLDS.get(k, 0.0)}
    print("\n" + markdown(ROWS))
    assert not misses, f"{concept}: (measured, needed) {misses}"
