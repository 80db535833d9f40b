"""Likely causes of a resume that is not exact, from recorded facts: the comparison, the config,
the environment in the manifest and the exactness labels the sessions recorded (never log text)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence, TextIO

from resilient_train.tools.check_resume.compare import FinalState, Section, config_changes
from resilient_train.tools.check_resume.records import ResumeFact


@dataclass
class Facts:
    """What the diagnosis looks at; gathered from the comparison, the config and the session records."""

    config_changed: list[str] = field(default_factory=list)
    data_position_differs: bool = False
    weights_differ: bool = False
    optimizer_differs: bool = False
    trainer_rng_differs: list[str] = field(default_factory=list)
    num_workers: int = 0
    on_gpu: bool = False
    validation: bool = False
    straight_runs_agree: Optional[bool] = None  # None: not checked
    first_loss_step: Optional[int] = None
    resume_points: list[int] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)  # the resumes' recorded exactness labels
    unlabelled: int = 0  # resumes whose record holds no label (older run folders): exactness unknown


@dataclass(frozen=True)
class Cause:
    title: str  # short: it ends the one-line error
    advice: str  # why it is suspected and what to do

    def __str__(self) -> str:
        return f"{self.title}: {self.advice}"


def _nondeterminism(facts: Facts) -> list[Cause]:
    if facts.straight_runs_agree is not False:
        return []
    if facts.on_gpu:
        return [Cause(
            "nondeterministic GPU kernels",
            "two uninterrupted runs differ too, so no resume can match one; torch.are_deterministic_algorithms_enabled() "
            "is false unless the task enables it: call torch.use_deterministic_algorithms(True) in build, set "
            "CUBLAS_WORKSPACE_CONFIG=:4096:8 and check again")]
    return [Cause(
        "randomness the trainer does not seed",
        "two uninterrupted runs differ too: a generator seeded from time or os.urandom (random.Random(), "
        "numpy.random.default_rng() or torch.Generator().seed() without a seed); seed it from cfg.seed")]


def _rng(facts: Facts) -> list[Cause]:
    causes: list[Cause] = []
    if facts.trainer_rng_differs:
        if facts.validation:
            causes.append(Cause(
                "model mode",
                "the trainer's RNG streams end in other states and validation ran: dropout drew random numbers on other "
                "steps, as when code switches modules with .eval()/.train() itself and a resumed session trains in "
                "another mode"))
        causes.append(Cause(
            "a different number of random draws",
            f"the trainer's RNG streams ({', '.join(facts.trainer_rng_differs[:4])}) end in other states: a resumed "
            "session draws a different number of random numbers than an uninterrupted one (dropout in another mode, "
            "randomness drawn only on the first steps of a session)"))
    elif (facts.weights_differ or facts.optimizer_differs) and facts.straight_runs_agree is not False:
        causes.append(Cause(
            "RNG streams the trainer does not see",
            "the weights differ while the trainer's RNG states (python, torch, numpy, cuda) match, so the task draws "
            "from a generator of its own (a torch.Generator, random.Random or numpy Generator made in build, or state "
            "in a module-level variable) that restarts at every resume; draw from the global torch/random/numpy RNGs, "
            "which checkpoints keep"))
        if facts.validation:
            causes.append(Cause(
                "model mode",
                "validation ran in this check; code that switches modules with .eval()/.train() itself can leave "
                "BatchNorm or dropout in another mode after a resume"))
    return causes


def diagnose(facts: Facts) -> list[Cause]:
    """Likely causes, most likely first; each says what to do about it."""
    causes = _nondeterminism(facts)
    if facts.config_changed:
        causes.append(Cause("a changed config", f"the interrupted run trained with other values for {', '.join(facts.config_changed[:5])}"))
    odd_labels = [label for label in facts.labels if not label.startswith("bit-exact")]
    if odd_labels:
        causes.append(Cause("the resume said so", f"the trainer labelled a resume {odd_labels[0]}"))
    if facts.data_position_differs:
        causes.append(Cause(
            "data order",
            "the runs end at another place in the data (epoch, cursor or samples seen): a custom sampler or "
            "batch_sampler the trainer cannot fast-forward, or a dataset whose length changes"))
    if facts.num_workers > 0:
        causes.append(Cause(
            "DataLoader workers' RNG",
            f"trainer.num_workers={facts.num_workers}: randomness in __getitem__ or collate_fn can depend on which "
            "worker runs a batch; check again with trainer.num_workers=0 to confirm"))
    causes += _rng(facts)
    if facts.on_gpu and facts.straight_runs_agree is None:
        causes.append(Cause("nondeterministic GPU kernels",
                            "torch.are_deterministic_algorithms_enabled() is false unless the task enables it"))
    if not causes and facts.unlabelled:
        causes.append(Cause("unknown", f"{facts.unlabelled} resume(s) recorded no exactness label (a run folder older "
                                       "than the label record), the others were labelled bit-exact; please report this with the task"))
    if not causes:
        causes.append(Cause("unknown", "every resume was labelled bit-exact; please report this with the task"))
    return causes


def gather_facts(straight: FinalState, interrupted: FinalState, sections: list[Section],
                 resumes: Sequence[ResumeFact]) -> Facts:
    """The facts of one check: its comparison, the interrupted run's config and its resumes' records."""
    by_name = {s.name: s for s in sections}
    trainer_cfg = interrupted.config.get("trainer", {}) if isinstance(interrupted.config, dict) else {}
    workers = trainer_cfg.get("num_workers", 0)
    accelerator = str(trainer_cfg.get("accelerator", "auto"))
    gpus = (straight.manifest.get("environment") or {}).get("gpus") or []
    on_gpu = bool(gpus) and accelerator in ("auto", "gpu", "cuda")
    loss = by_name.get("losses")
    first_loss = None
    for d in (loss.differences if loss else []):
        if d.max_abs is not None and d.where.rsplit(" ", 1)[-1].isdigit():
            first_loss = int(d.where.rsplit(" ", 1)[-1])
            break
    resumed = [r for r in resumes if r.resumed_from is not None]
    return Facts(
        config_changed=config_changes(straight.config, interrupted.config),
        data_position_differs=bool(by_name["data position"].differences),
        weights_differ=bool(by_name["model weights"].differences),
        optimizer_differs=bool(by_name["optimizer"].differences),
        trainer_rng_differs=[d.where.replace("RNG stream ", "") for d in by_name["RNG streams"].differences],
        num_workers=workers if isinstance(workers, int) else 0,
        on_gpu=on_gpu,
        validation=any(column == "val_loss" for column, _ in straight.metrics),
        first_loss_step=first_loss,
        resume_points=[r.resumed_from for r in resumed if r.resumed_from is not None],
        labels=[r.label for r in resumes if r.label],
        unlabelled=sum(1 for r in resumed if r.label is None),
    )


def explain(facts: Facts, out: TextIO) -> list[Cause]:
    """Print what the second straight run showed, where the losses part, and the likely causes."""
    if facts.straight_runs_agree:
        out.write("a second straight run ends bit-exactly like the first: the task is deterministic, the interruptions "
                  "cause the difference\n")
    else:
        out.write("a second straight run differs from the first too: the task is not deterministic\n")
    after = [p for p in facts.resume_points if facts.first_loss_step is not None and p < facts.first_loss_step]
    if after:
        out.write(f"losses first differ at step {facts.first_loss_step}, after the resume from step {max(after)}\n")
    causes = diagnose(facts)
    out.write("likely cause" + ("s, most likely first" if len(causes) > 1 else "") + ":\n")
    for cause in causes:
        out.write(f"  - {cause}\n")
    return causes
