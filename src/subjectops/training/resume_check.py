"""Whether a checkpoint's state can be resumed: checked against its own folder, its own tensors and the configured
schedule before anything of it is loaded.

state.json sits on a volume anyone with the run folder can edit: `global_step: 1000000000` was trusted ("resuming
from step 1000000000"), training skipped every step, and finetune published weights whose method.json claimed 60
steps while 20 were trained. The config digest shows the parameters are the same; these checks show the state is
the one those parameters produce.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from subjectops.errors import SubjectopsError
from subjectops.training.checkpoints import CHECKPOINT_DIR
from subjectops.training.contract import Phase


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def state_problem(state: dict, path: Path, phases: Sequence[Phase], live: dict) -> str | None:
    """Why the checkpoint `state` read from `path` is not a state of this training (None when it is)."""
    total = sum(phase.steps for phase in phases)
    step = state.get("global_step")
    if not _is_int(step) or not 1 <= step <= total:
        return f"its global_step {step!r} is not a step of this training (1 to {total})"
    named = CHECKPOINT_DIR.match(Path(path).name)
    if not named or int(named.group(1)) != step:
        return f"its global_step {step} is not the step its folder is named after"
    ends = [sum(phase.steps for phase in phases[: i + 1]) for i in range(len(phases))]
    phase = next(i for i, end in enumerate(ends) if step <= end)
    if state.get("phase") != phase:
        return f"its phase {state.get('phase')!r} is not phase {phase} ({phases[phase].name}), where step {step} falls"
    log = state.get("log")
    logged = [record.get("step") for record in log if isinstance(record, dict)] if isinstance(log, list) else None
    if logged != list(range(1, step + 1)):
        return f"its log does not hold steps 1 to {step} once each, in order"
    tensors = state.get("tensors")
    if not isinstance(tensors, dict) or set(tensors) != set(live):
        return f"its tensors are not the {len(live)} tensors this method trains"
    wrong = sorted(k for k, v in live.items() if getattr(tensors[k], "shape", None) != v.shape
                   or getattr(tensors[k], "dtype", None) != v.dtype)
    if wrong:
        return f"{len(wrong)} of its tensors have another shape or dtype than the trained ones, e.g. {wrong[0]}"
    return None


def check_resume_state(state: dict, path: Path, phases: Sequence[Phase], live: dict) -> None:
    problem = state_problem(state, path, phases, live)
    if problem:
        raise SubjectopsError(f"checkpoint {path} cannot be resumed: {problem} (edited or damaged)",
                              fix=f"delete {path}; finetune then resumes from an earlier checkpoint or starts over")
