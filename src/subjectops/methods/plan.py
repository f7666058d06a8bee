"""One plan: which stages a run has, in order, and which earlier outputs each one reads.

`plan(params)` is the only place that decides. `subjectops run`, the stage commands (`--if-needed`, the
inputs finetune and pretrain-disc require), the Kubeflow `configure` step and `models check` all ask it,
and a test checks `dvc.yaml` against it.

A stage is in the plan when it always runs or when something the run needs brings it in:

- the configured method's `requirements()` (from its config, so ablations count): class priors bring
  `priors`, a latent discriminator brings `pretrain_disc`;
- the inference strategy's `requires` (`infer.strategy`): references and masks come from `refine`, which always
  runs; snapshots (also required when `finetune.snapshots` is set) change what `finetune` keeps, read from
  `Plan.requirements`, at the steps `snapshot_steps(params)` gives, and bring `sweep`, which scores every
  snapshot and DreamBlend combination so that `evaluate`'s report draws the Pareto front;
- `registry.auto_register` brings `register`.

A new requirement that brings a new stage gets a row in `STAGES`. This module sits beside the method registry
but is not imported by it: it reads both the methods and the inference strategies, which read the config.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from itertools import combinations, takewhile

from subjectops.errors import SubjectopsError
from subjectops.methods.base import CLASS_PRIORS, LATENT_DISCRIMINATOR

REGISTRATION = "registration"
SNAPSHOTS = "snapshots"


@dataclass(frozen=True)
class StageRule:
    name: str
    reads: tuple[str, ...]  # earlier stages whose outputs it reads when they are planned
    brought_by: str | None = None  # the requirement that puts it in the plan; None: always planned
    absent_because: str = ""  # why it is not planned ({method}: the method's name)


STAGES: tuple[StageRule, ...] = (
    StageRule("refine", ()),
    StageRule("priors", ("refine",), CLASS_PRIORS, "method {method} trains without class-prior images"),
    StageRule("pretrain_disc", ("refine", "priors"), LATENT_DISCRIMINATOR,
              "method {method} uses no latent discriminator"),
    StageRule("finetune", ("refine", "priors", "pretrain_disc")),
    StageRule("infer", ("refine", "finetune")),
    StageRule("sweep", ("refine", "finetune"), SNAPSHOTS,
              "the run keeps no snapshots (finetune.snapshots is empty and the inference strategy reads none)"),
    StageRule("evaluate", ("refine", "infer", "sweep")),
    StageRule("register", ("refine", "finetune", "infer", "evaluate"), REGISTRATION, "registry.auto_register is false"),
)
RULES = {rule.name: rule for rule in STAGES}
# Optional stages before finetune: the Kubeflow pipeline has one branch per combination of them (the later
# optional stages run in every branch: `sweep` records why when it is not needed, `configure` refuses a plan
# without `register`).
TRAINING_OPTIONAL = tuple(r.name for r in takewhile(lambda r: r.name != "finetune", STAGES) if r.brought_by)


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
        raise SubjectopsError(f"{stage.replace('_', '-')} is not in the plan of these params: {self.why_not(stage)}",
                              fix="run it with --if-needed (it then records why it did nothing), or change the params")

    def why_not(self, stage: str) -> str:
        """Why a stage is left out (for the record an `--if-needed` stage writes)."""
        return RULES[stage].absent_because.format(method=self.method)

    @property
    def branch(self) -> str:
        """The optional training stages it has, e.g. `priors+pretrain_disc` or `none` (the Kubeflow branch)."""
        return branch_name([s for s in TRAINING_OPTIONAL if self.has(s)])

    def to_dict(self) -> dict:
        return asdict(self)


def branch_name(optional: list[str] | tuple[str, ...]) -> str:
    return "+".join(optional) or "none"


def branches() -> list[tuple[str, ...]]:
    """Every combination of optional training stages, largest first (the Kubeflow pipeline's branches)."""
    return [combo for n in range(len(TRAINING_OPTIONAL), -1, -1) for combo in combinations(TRAINING_OPTIONAL, n)]


def requirements(params) -> set[str]:
    from subjectops.methods import configured_method

    from subjectops.inference import get_strategy

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
    for rule in STAGES:
        if rule.brought_by is None or rule.brought_by in needs:
            done = {s.name for s in planned}
            planned.append(PlannedStage(rule.name, tuple(r for r in rule.reads if r in done)))
    return Plan(params.finetune.method, tuple(sorted(needs)), tuple(planned))


def snapshot_steps(params) -> list[int]:
    """The finetune steps whose snapshots the run keeps: `finetune.snapshots` and those the strategy reads;
    none unless the plan requires snapshots."""
    from subjectops.inference import get_strategy

    if SNAPSHOTS not in requirements(params):
        return []
    strategy = get_strategy(params.infer.strategy)
    return sorted(set(params.finetune.snapshots) | strategy.snapshot_steps(params.infer))
