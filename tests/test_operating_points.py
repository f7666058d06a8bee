"""Operating points: the Pareto front in (CLIP-T, DINO) on hand-made points, ties included, and the rule that
chooses what ships."""

from __future__ import annotations

import pytest

from subjectops.errors import SubjectopsError
from subjectops.selection.pareto import OperatingPoint, choose, pareto_front

# (CLIP-T, DINO), both higher-is-better
HAND_MADE = {
    "overfit": (0.20, 0.90),
    "overfit-twin": (0.20, 0.90),  # an exact tie with a front point: both stay
    "same-clip-lower-dino": (0.20, 0.80),  # dominated by "overfit" on DINO alone
    "middle": (0.50, 0.50),
    "inside": (0.40, 0.40),  # dominated by "middle" on both
    "underfit": (0.90, 0.10),
    "same-dino-lower-clip": (0.85, 0.10),  # dominated by "underfit" on CLIP-T alone
    "knee": (0.60, 0.45),  # trades DINO for CLIP-T against "middle": on the front
}


def test_front_is_exactly_the_non_dominated_set_with_ties():
    labels = list(HAND_MADE)
    front = [labels[i] for i in pareto_front(list(HAND_MADE.values()))]
    assert front == ["overfit", "overfit-twin", "middle", "underfit", "knee"]
    assert pareto_front([]) == [] and pareto_front([(0.1, 0.1)]) == [0]
    assert pareto_front([(0.3, 0.3)] * 3) == [0, 1, 2]


def points() -> list[OperatingPoint]:
    return [OperatingPoint(label, "plain", {}, clip_t, 0.01, dino, 0.01, 4) for label, (clip_t, dino) in HAND_MADE.items()]


def test_choose_maximises_dino_subject_to_the_clip_t_floor():
    assert choose(points(), None).label == "overfit"
    assert choose(points(), 0.45).label == "middle"
    assert choose(points(), 0.55).label == "knee"
    assert choose(points(), 0.9).label == "underfit"
    with pytest.raises(SubjectopsError, match=r"CLIP-T >= 0.95 \(the highest is 0.9000\)") as err:
        choose(points(), 0.95)
    assert "0.9000" in err.value.fix
