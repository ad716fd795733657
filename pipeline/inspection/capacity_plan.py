"""A capacity plan from measured costs: how many generation and annotation GPUs keep N training
GPUs busy, what that makes per second and what an accepted instance costs (``bsgal plan``).

The costs come from a run's shards (the ``cost_*`` columns: device-seconds per candidate and
stage, `pipeline.run.costs`) or from a ``benchmarks/gpu_check.py`` results file (images/s of
generation and annotation alone, ms per training step). With ``t`` trainer device-seconds per
candidate (scoring + training; one device per trainer worker), ``N`` trainer workers ask for

    D = N / t candidates/s,

and a stage that costs ``c_s`` device-seconds per candidate needs ``D x c_s`` devices of its
unit (rounded up: a fraction of a GPU idles the trainers). The cost per accepted instance is
the devices' seconds per candidate over the acceptance rate (the run's; for a gpu_check file,
an assumed one, said so). Cluster sizes follow `deploy/cluster.yaml`'s node types: one GPU per
``gen-gpu`` and ``ann-gpu`` node, ``train-gpu`` nodes of 4.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from pipeline.errors import UserError
from pipeline.storage.row_names import COST_STAGES

#: The stages that run beside the trainer, and the trainer's own.
FEEDING_STAGES = ("generate", "annotate", "check")
TRAINER_STAGES = ("score", "train")
#: GPUs per node of each node type of deploy/cluster.yaml (and the KubeRay groups).
NODE_GPUS = {"gen-gpu": 1, "ann-gpu": 1, "train-gpu": 4}
#: Candidates per training step that gpu_check measures the step with.
GPU_CHECK_CANDIDATES_PER_STEP = 8


class PlanError(UserError, ValueError):
    """The costs cannot give a plan (none recorded, a stage never timed); says what to do."""


@dataclass(frozen=True)
class StageCosts:
    """Device-seconds per candidate by stage and the unit of each (``GPU`` / ``CPU``).

    ``accept_rate`` is accepted / candidates (None: not known); ``source`` says where the
    figures come from; ``assumed`` lists what was not measured but set.
    """

    per_candidate: dict[str, float]
    units: dict[str, str]
    accept_rate: float | None
    source: str
    assumed: list[str] = field(default_factory=list)

    @property
    def trainer_seconds(self) -> float:
        return sum(self.per_candidate.get(s, 0.0) for s in TRAINER_STAGES)


@dataclass(frozen=True)
class Plan:
    """What ``train_workers`` trainer workers need (see the module docstring)."""

    train_workers: int
    costs: StageCosts
    candidates_per_s: float
    devices: dict[str, float]          # stage -> devices needed (unrounded)
    rounded: dict[str, int]            # stage -> devices to give (rounded up)
    cost_per_accepted: float | None    # device-seconds of all stages per accepted instance
    nodes: dict[str, int]              # node type -> worker nodes


def costs_from_cost_table(rows: list[dict[str, Any]], accepted: int, candidates: int,
                          source: str) -> StageCosts:
    """:class:`StageCosts` from `pipeline.inspection.costs.cost_by_stage`'s rows."""
    by_stage = {r["stage"]: r for r in rows if r["stage"] in COST_STAGES}
    per = {s: float(by_stage[s]["per_candidate"] or 0.0) for s in COST_STAGES if s in by_stage}
    units = {s: str(by_stage[s]["unit"]).removesuffix("-s") for s in per}
    return StageCosts(per, units, accepted / candidates if candidates else None, source)


def costs_from_run(uri: str, storage_options: dict | None = None) -> StageCosts:
    """The cost columns of a run's shards, averaged over its candidates."""
    from pipeline.inspection.costs import cost_by_stage
    from pipeline.inspection.query import DecisionQuery

    with DecisionQuery(uri, storage_options=storage_options) as q:
        table = cost_by_stage(q)
        if table is None:
            raise PlanError(f"{uri}: its shards record no costs (written before schema 2.2); "
                            "plan from a newer run or from a gpu_check results file")
        counts = q.rows("SELECT count(*) AS n, count(*) FILTER (WHERE decision = 'accepted') "
                        "AS accepted FROM selected")[0]
    return costs_from_cost_table(table.rows, int(counts["accepted"]), int(counts["n"]),
                                 f"the cost columns of {uri} ({counts['n']} candidates)")


def costs_from_gpu_check(doc: dict[str, Any], source: str,
                         accept_rate: float) -> StageCosts:
    """:class:`StageCosts` of a ``gpu_check.json``: generation at its best batch size,
    annotation, the default selection's training step shared by its 8 candidates; the
    checks (CPU, not measured there) are taken as free."""
    try:
        gen = 1.0 / max(r["images_per_s"] for r in doc["generation"]["rows"])
        ann = 1.0 / float(doc["annotation"]["images_per_s"])
        step = {r["method"]: r for r in doc["training"]["rows"]}["default"]
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as exc:
        raise PlanError(f"{source}: not a gpu_check results file with generation, annotation "
                        f"and training parts ({type(exc).__name__}: {exc}); run "
                        "benchmarks/gpu_check.py with all its parts") from None
    trainer = float(step["ms_per_step"]) / 1000.0 / GPU_CHECK_CANDIDATES_PER_STEP
    unit = "CPU" if doc.get("smoke") else "GPU"
    per = {"generate": gen, "annotate": ann, "check": 0.0, "score": 0.0, "train": trainer}
    units = {s: unit for s in per} | {"check": "CPU"}
    return StageCosts(per, units, accept_rate, f"{source} ({doc.get('device', '?')})",
                      assumed=[f"acceptance rate {accept_rate:.0%} (--accept-rate)",
                               "checks free (CPU, not measured by gpu_check)"])


def load_costs(source: str, storage_options: dict | None = None,
               accept_rate: float | None = None) -> StageCosts:
    """A run folder (its shards) or a ``*.json`` gpu_check results file."""
    if source.endswith(".json"):
        from pipeline.storage.filesystem import filesystem

        fs, path = filesystem(source, storage_options)
        try:
            with fs.open(path, "rb") as fh:
                doc = json.loads(fh.read())
        except (OSError, ValueError) as exc:
            raise PlanError(f"{source}: cannot be read as JSON ({type(exc).__name__}: "
                            f"{exc})") from None
        return costs_from_gpu_check(doc, source, 0.7 if accept_rate is None else accept_rate)
    costs = costs_from_run(source, storage_options)
    if accept_rate is not None:
        costs = StageCosts(costs.per_candidate, costs.units, accept_rate, costs.source,
                           [f"acceptance rate {accept_rate:.0%} (--accept-rate) instead of "
                            "the run's"])
    return costs


def make_plan(costs: StageCosts, train_workers: int) -> Plan:
    """The plan for ``train_workers`` trainer workers (module docstring)."""
    if train_workers < 1:
        raise PlanError(f"--train-gpus {train_workers}: at least 1")
    t = costs.trainer_seconds
    if t <= 0:
        raise PlanError(f"{costs.source}: no trainer time recorded (score + train = 0): the "
                        "run decided no candidate; plan from a run that trained on some")
    demand = train_workers / t
    devices = {s: demand * costs.per_candidate.get(s, 0.0) for s in FEEDING_STAGES}
    # Every stage needs one actor at least; 1e-9: a product such as 2.0000000001 is 2.
    rounded = {s: max(1, math.ceil(v - 1e-9)) for s, v in devices.items()}
    spent = sum(costs.per_candidate.get(s, 0.0) for s in COST_STAGES)
    per_accepted = spent / costs.accept_rate if costs.accept_rate else None
    gpu = {s: costs.units.get(s) == "GPU" for s in (*FEEDING_STAGES, "train")}
    nodes = {"gen-gpu": math.ceil(rounded["generate"] / NODE_GPUS["gen-gpu"])
             if gpu["generate"] else 0,
             "ann-gpu": math.ceil(rounded["annotate"] / NODE_GPUS["ann-gpu"])
             if gpu["annotate"] else 0,
             "train-gpu": math.ceil(train_workers / NODE_GPUS["train-gpu"]) if gpu["train"]
             else 0}
    return Plan(train_workers, costs, demand, devices, rounded, per_accepted, nodes)


#: Per feeding stage: its config keys (actors, GPUs per actor, CPUs per actor).
STAGE_KEYS = {"generate": ("generation.concurrency", "generation.num_gpus",
                           "generation.num_cpus"),
              "annotate": ("annotation.concurrency", "annotation.num_gpus",
                           "annotation.num_cpus"),
              "check": ("annotation.check_concurrency", "annotation.check_num_gpus",
                        "annotation.check_num_cpus")}


def run_overrides(plan: Plan) -> list[str]:
    """``section.key=value`` for the run: one device (of the stage's unit) per actor, as many
    actors as the plan gives; the trainer workers on GPUs where they ran on GPUs."""
    out = []
    for stage, (actors, gpus, cpus) in STAGE_KEYS.items():
        on_gpu = plan.costs.units.get(stage) == "GPU"
        out += [f"{actors}={plan.rounded[stage]}", f"{gpus}={1 if on_gpu else 0}"]
        if not on_gpu:
            out.append(f"{cpus}=1")
    on_gpu = plan.costs.units.get("train") == "GPU"
    return out + [f"training.num_workers={plan.train_workers}",
                  f"training.use_gpu={'true' if on_gpu else 'false'}"]


def cluster_overrides(plan: Plan) -> dict[str, Any]:
    """The counts to set in deploy/cluster.yaml (and the KubeRay groups' ``replicas``)."""
    types = {name: {"min_workers": n, "max_workers": n} for name, n in plan.nodes.items()}
    return {"max_workers": sum(plan.nodes.values()), "available_node_types": types}


def plan_text(plan: Plan) -> str:
    c = plan.costs
    lines = [f"plan from {c.source}:"]
    for s in COST_STAGES:
        if s in c.per_candidate:
            lines.append(f"  {s:<9} {c.per_candidate[s]:.4g} {c.units.get(s, '?')}-s per "
                         "candidate")
    lines.append("(the trainer's part, score + train, on one device per worker)")
    lines.append(f"{plan.train_workers} training worker(s) decide "
                 f"{plan.candidates_per_s:.3g} candidates/s; to keep them busy:")
    for s in FEEDING_STAGES:
        unit = c.units.get(s, "?")
        lines.append(f"  {s:<9} {plan.devices[s]:.3g} {unit}s -> {plan.rounded[s]} "
                     f"actor(s) of one {unit}")
    if plan.cost_per_accepted is not None:
        units = {c.units.get(s) for s in COST_STAGES if c.per_candidate.get(s)}
        unit = units.pop() if len(units) == 1 else "device"
        lines.append(f"cost per accepted instance: {plan.cost_per_accepted:.3g} {unit}-s "
                     f"(acceptance {c.accept_rate:.0%})")
    lines.append("run overrides: " + " ".join(run_overrides(plan)))
    nodes = ", ".join(f"{k} {v}" for k, v in plan.nodes.items())
    lines.append(f"cluster (deploy/cluster.yaml min_workers = max_workers; KubeRay replicas): "
                 f"{nodes}" + ("" if all(plan.nodes.values()) else
                               " (0: that stage ran on CPUs, which any node's CPUs serve)"))
    lines += [f"assumed: {a}" for a in c.assumed]
    return "\n".join(lines)
