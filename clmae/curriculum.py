"""The curriculum factor lambda (SPEC section 5): how the CMM weighs the MAE's reconstruction error.

+1 = partner (the CMM hides what is easy to rebuild), 0 = neutral, -1 = adversary (hides what is hard to
rebuild). lambda is a pure function of the training position, so a resumed run gets the same values.
"""

from __future__ import annotations

CURRICULUM_SCHEDULES = ("easy_to_hard", "hard_to_easy", "partner", "neutral", "adversary")
CURRICULUM_GRANULARITIES = ("epoch", "step")


def _easy_to_hard(epoch: int, total_epochs: int, epoch_fraction: float, per_step: bool) -> float:
    if per_step:
        return 1 - 2 * (epoch + epoch_fraction) / total_epochs
    # The reference formula: the second half is shifted by one epoch so that the values are symmetric
    # (E = 200: 1.00, 0.99, ..., 0.01, -0.01, ..., -1.00) and lambda is never exactly 0.
    if epoch < total_epochs / 2:
        return 1 - 2 * epoch / total_epochs
    return 1 - 2 * (epoch + 1) / total_epochs


def curriculum_factor(
    epoch: int,
    total_epochs: int,
    epoch_fraction: float = 0.0,
    *,
    schedule: str = "easy_to_hard",
    granularity: str = "epoch",
) -> float:
    """lambda at `epoch` (0-based) of `total_epochs`, `epoch_fraction` in [0, 1) of the way through it.

    easy_to_hard: +1 -> -1 (the reference curriculum); hard_to_easy: -1 -> +1; partner, neutral, adversary:
    constant +1, 0, -1. granularity "epoch" (the reference's) changes lambda once per epoch and ignores
    `epoch_fraction`; "step" puts every iteration on the same line, linear in the training progress
    t = (epoch + epoch_fraction) / total_epochs: lambda = 1 - 2t for easy_to_hard. A short run then passes
    through neutral instead of jumping (with 2 epochs and per-epoch values: +1, then -1).
    """
    if total_epochs < 1 or not 0 <= epoch < total_epochs:
        raise ValueError(f"epoch must be in [0, total_epochs), got epoch={epoch}, total_epochs={total_epochs}")
    if not 0.0 <= epoch_fraction < 1.0:
        raise ValueError(f"epoch_fraction must be in [0, 1), got {epoch_fraction}")
    if granularity not in CURRICULUM_GRANULARITIES:
        raise ValueError(
            f"unknown curriculum granularity {granularity!r}; one of {', '.join(CURRICULUM_GRANULARITIES)}"
        )
    per_step = granularity == "step"
    if schedule == "easy_to_hard":
        return _easy_to_hard(epoch, total_epochs, epoch_fraction, per_step)
    if schedule == "hard_to_easy":
        # easy_to_hard played backwards (SPEC: "reversed"). Per epoch that is the reference value of epoch
        # E-1-e, which equals -lambda(e) only for an even E; for the per-step line, reversal is negation.
        if per_step:
            return -_easy_to_hard(epoch, total_epochs, epoch_fraction, per_step)
        return _easy_to_hard(total_epochs - 1 - epoch, total_epochs, 0.0, per_step)
    constants = {"partner": 1.0, "neutral": 0.0, "adversary": -1.0}
    if schedule in constants:
        return constants[schedule]
    raise ValueError(f"unknown curriculum schedule {schedule!r}; one of {', '.join(CURRICULUM_SCHEDULES)}")
