"""scripts/prior_leak_steps.py: the sampler hook reaches every step, and the leak is counted per prompt."""
from __future__ import annotations

from engine.demo import world as W
from scripts import prior_leak_steps as PL
from scripts.learning_table import PRIOR_SETS, non_token_predictions


class _Fixed:
    """A probe whose checker sees a heart for every cross prompt and the prompted shape otherwise."""

    def predict(self, prompts, seed0=0):
        return [{"shape": "heart" if " cross " in f" {p} " else next(s for s in W.TRAIN_SHAPES if s in p)}
                for p in prompts]


def test_measure_counts_right_shapes_and_hearts():
    probe = _Fixed()
    crosses = [sum(s.shape == "cross" for s in non_token_predictions(probe, 48, seed)[0]) for seed in PRIOR_SETS]
    out = PL.measure(probe)
    assert out["right"] == [48 - c for c in crosses]
    assert out["hearts"] == sum(crosses) > 0 and out["total"] == 144 - sum(crosses)


def test_schedules_switch_the_lora_by_step():
    assert [PL.SCHEDULES["steps 0-4"](i) for i in (0, 4, 5, 19)] == [True, True, False, False]
    assert [PL.SCHEDULES["steps 10-19"](i) for i in (9, 10, 19)] == [False, True, True]


def test_probe_calls_the_hook_before_every_step(base, probe):
    seen = []
    probe.use(None)
    probe.on_step_start = lambda i, n, t: seen.append((i, n))
    try:
        probe.generate(["a red circle on a blue background"])
    finally:
        probe.on_step_start = None
    assert seen == [(i, 20) for i in range(20)]
