"""One plan: which stages a run has, in order, and which earlier outputs each one reads.

`plan(params)` is the only place that decides, from the stage registry and what the run requires. A stage is in
the plan when it always runs (`brought_by` is None) or when a requirement of the run brings it in:

- the configured method's `requirements()` (from its config, so ablations count): class priors, a latent
  discriminator;
- the inference strategy's `requires` (`infer.strategy`): references and masks come from `refine`, which always
  runs; snapshots (also required when `finetune.snapshots` is set) change what `finetune` keeps, at the steps
  `snapshot_steps(params)` gives;
- `registry.auto_register` requires registration.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from itertools import combinations

from subjectops.errors import SubjectopsError
from subjectops.stages.base import REGISTRATION, SNAPSHOTS
from subjectops.stages.registry import all_stages, get_stage


@dataclass(frozen=True)
class PlannedStage:
    name: str
    inputs: tuple[str, ...]  # the planned stages whose outputs it reads, in plan order


@dataclass(frozen=True)
class Plan:
    method: str
    requirements: tuple[str, ...]
    stages: tuple[PlannedStage, ...]

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.stages]

    def has(self, stage: str) -> bool:
        return stage in self.names

    def inputs(self, stage: str) -> tuple[str, ...]:
        for s in self.stages:
            if s.name == stage:
                return s.inputs
        raise SubjectopsError(f"{get_stage(stage).command} is not in the plan of these params: {self.why_not(stage)}",
                              fix="run it with --if-needed (it then records why it did nothing), or change the params")

    def why_not(self, stage: str) -> str:
        """Why a stage is left out (for the record an `--if-needed` stage writes)."""
        return get_stage(stage).absent_because.format(method=self.method)

    @property
    def branch(self) -> str:
        """The branching stages it has, e.g. `priors+pretrain_disc` or `none` (the Kubeflow branch)."""
        return branch_name([s for s in branching_stages() if self.has(s)])

    def to_dict(self) -> dict:
        return asdict(self)


def branching_stages() -> tuple[str, ...]:
    """The optional stages the Kubeflow pipeline makes one branch for each combination of (the others run in
    every branch and record why when not planned; registration runs through the tracker)."""
    return tuple(s.name for s in all_stages() if s.optional and s.branches and not s.tracked)


def branch_name(optional: list[str] | tuple[str, ...]) -> str:
    return "+".join(optional) or "none"


def branches() -> list[tuple[str, ...]]:
    """Every combination of branching stages, largest first (the Kubeflow pipeline's branches)."""
    optional = branching_stages()
    return [combo for n in range(len(optional), -1, -1) for combo in combinations(optional, n)]


def requirements(params) -> set[str]:
    from subjectops.inference import get_strategy
    from subjectops.methods import configured_method

    needs = set(configured_method(params).requirements()) | set(get_strategy(params.infer.strategy).requires)
    if params.finetune.snapshots:
        needs.add(SNAPSHOTS)
    if params.registry.auto_register:
        needs.add(REGISTRATION)
    return needs


def plan(params) -> Plan:
    """The stages this run has, in order, each with the planned stages it reads."""
    needs = requirements(params)
    planned: list[PlannedStage] = []
    for stage in all_stages():
        if stage.brought_by is None or stage.brought_by in needs:
            done = {s.name for s in planned}
            planned.append(PlannedStage(stage.name, tuple(r for r in stage.reads if r in done)))
    return Plan(params.finetune.method, tuple(sorted(needs)), tuple(planned))


def snapshot_steps(params) -> list[int]:
    """The finetune steps whose snapshots the run keeps: `finetune.snapshots` and those the strategy reads;
    none unless the plan requires snapshots."""
    from subjectops.inference import get_strategy

    if SNAPSHOTS not in requirements(params):
        return []
    strategy = get_strategy(params.infer.strategy)
    return sorted(set(params.finetune.snapshots) | strategy.snapshot_steps(params.infer))


def _flipped(value):
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return 0 if value else 1
    return None


def keys_changing_the_plan(params_data: dict) -> dict[str, set[str]]:
    """Stage name -> the params keys whose change alone alters whether that stage runs or what it reads, found by
    planning variants of `params_data` (a parsed params.yaml) from each method's defaults: every other method and
    inference strategy, a snapshot list, and each boolean or number flipped. DVC lists them (`dvc_yaml`)."""
    from subjectops.config import ConfigError, validate_params
    from subjectops.inference import STRATEGIES
    from subjectops.methods import METHODS
    from subjectops.params_yaml import apply_overrides
    from subjectops.tracking.record import flatten

    def validated(overrides: list[str]):
        return validate_params(apply_overrides(params_data, overrides), source="params with overrides")

    def stages_of(params) -> dict[str, tuple[str, ...]]:
        return {s.name: s.inputs for s in plan(params).stages}

    changes: dict[str, set[str]] = {}
    for method in METHODS:
        base_overrides = [f"finetune.method={method}"]
        base_params = validated(base_overrides)
        base = stages_of(base_params)
        variants = [("finetune.method", f"finetune.method={m}") for m in METHODS if m != method]
        variants += [("infer.strategy", f"infer.strategy={s}") for s in STRATEGIES]
        variants += [("finetune.snapshots", "finetune.snapshots=[1]")]
        leaves = flatten(base_params.model_dump(mode="json"))
        variants += [(key, f"{key}={json.dumps(_flipped(v))}") for key, v in leaves.items() if _flipped(v) is not None]
        for key, override in variants:
            try:
                other = stages_of(validated([*base_overrides, override]))
            except ConfigError:  # e.g. a step count of 0: not a valid run
                continue
            for stage in set(base) | set(other):
                if base.get(stage) != other.get(stage):
                    changes.setdefault(stage, set()).add(key)
    return changes
