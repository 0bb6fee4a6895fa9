"""The curriculum factor lambda: the reference schedule value by value, and each variant."""

from __future__ import annotations

import itertools

import pytest

from clmae.config import CURRICULUM_SCHEDULES, ConfigError, load_config
from clmae.curriculum import curriculum_factor

E = 200
REFERENCE_E200 = [round(1 - 0.01 * e, 2) for e in range(100)] + [round(-0.01 * (e + 1), 2) for e in range(100)]


def test_reference_values_for_200_epochs():
    values = [curriculum_factor(e, E) for e in range(E)]
    assert REFERENCE_E200[:3] == [1.0, 0.99, 0.98] and REFERENCE_E200[98:102] == [0.02, 0.01, -0.01, -0.02]
    assert REFERENCE_E200[-1] == -1.0
    assert values == pytest.approx(REFERENCE_E200, abs=1e-12)
    assert 0.0 not in values


def test_reference_formula_for_other_lengths():
    assert [curriculum_factor(e, 4) for e in range(4)] == pytest.approx([1.0, 0.5, -0.5, -1.0])
    assert [curriculum_factor(e, 3) for e in range(3)] == pytest.approx([1.0, 1 / 3, -1.0])
    assert curriculum_factor(0, 1) == 1.0


def test_per_epoch_schedule_ignores_the_fraction():
    assert curriculum_factor(10, E, 0.9) == curriculum_factor(10, E, 0.0)


def test_hard_to_easy_is_the_reverse():
    values = [curriculum_factor(e, E, schedule="hard_to_easy") for e in range(E)]
    assert values == pytest.approx([-v for v in REFERENCE_E200], abs=1e-12)
    assert values == pytest.approx(REFERENCE_E200[::-1], abs=1e-12)
    # For an odd E, reversing is not negating: E = 3 gives easy_to_hard 1, 1/3, -1.
    assert [curriculum_factor(e, 3) for e in range(3)] == pytest.approx([1, 1 / 3, -1])
    assert [curriculum_factor(e, 3, schedule="hard_to_easy") for e in range(3)] == pytest.approx([-1, 1 / 3, 1])


@pytest.mark.parametrize(("schedule", "value"), [("partner", 1.0), ("neutral", 0.0), ("adversary", -1.0)])
@pytest.mark.parametrize("granularity", ["epoch", "step"])
def test_constant_schedules(schedule, value, granularity):
    for epoch, fraction in [(0, 0.0), (57, 0.3), (E - 1, 0.99)]:
        assert curriculum_factor(epoch, E, fraction, schedule=schedule, granularity=granularity) == value


def test_per_step_granularity_is_linear_in_training_progress():
    iters = 50
    values = [curriculum_factor(e, 4, i / iters, granularity="step") for e in range(4) for i in range(iters)]
    assert values[0] == 1.0
    assert values[2 * iters] == pytest.approx(0.0)
    assert values[-1] == pytest.approx(-1 + 2 / (4 * iters))
    steps = [b - a for a, b in itertools.pairwise(values)]
    assert steps == pytest.approx([-2 / (4 * iters)] * len(steps))
    # At epoch starts of the first half it agrees with the per-epoch reference.
    assert curriculum_factor(1, 4, 0.0, granularity="step") == curriculum_factor(1, 4)


def test_per_step_hard_to_easy_mirrors_easy_to_hard():
    for epoch, fraction in [(0, 0.0), (3, 0.25), (7, 0.5)]:
        forward = curriculum_factor(epoch, 8, fraction, granularity="step")
        assert curriculum_factor(epoch, 8, fraction, schedule="hard_to_easy", granularity="step") == -forward


def test_every_configured_schedule_is_implemented_and_default_is_reference():
    for schedule in CURRICULUM_SCHEDULES:
        curriculum_factor(0, 10, schedule=schedule)
    cfg = load_config(None)
    assert (cfg.curriculum.schedule, cfg.curriculum.granularity) == ("easy_to_hard", "epoch")


@pytest.mark.parametrize(
    ("epoch", "total", "fraction", "schedule"),
    [(200, 200, 0.0, "easy_to_hard"), (-1, 200, 0.0, "easy_to_hard"), (0, 0, 0.0, "easy_to_hard"),
     (0, 200, 1.0, "easy_to_hard"), (0, 200, 0.0, "sideways")],
)  # fmt: skip
def test_invalid_arguments_raise(epoch, total, fraction, schedule):
    with pytest.raises(ValueError):
        curriculum_factor(epoch, total, fraction, schedule=schedule)


def test_the_renamed_smooth_key_says_what_to_write_instead():
    with pytest.raises(
        ConfigError, match=r"'curriculum.smooth' is now 'curriculum.granularity' \(smooth: true is granularity: step"
    ):
        load_config(None, ["curriculum.smooth=true"])
    with pytest.raises(ConfigError, match=r"config key 'curriculum.granularity'.*'epoch', 'step'"):
        load_config(None, ["curriculum.granularity=iteration"])
