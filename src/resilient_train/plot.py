"""`plot RUN OUT.png`: a run's loss, learning rate and throughput across all of its sessions, and
one panel per other metric it logged (what `training_step` returned besides the loss, device stats).

Each session (one process lifetime, e.g. one Colab VM) is shaded and named in a legend with its
machine and precision, and resume points are marked, so one picture tells the story of a run that
moved between machines. A resumed session re-logs the steps after its checkpoint; per step the
newest session's row wins, in every panel. matplotlib is an optional extra (`pip install 'resilient_train[plot]'`).

Damaged bookkeeping does not stop a plot: rows of `logs/metrics.csv` that do not parse (a torn last
row) are skipped, and a damaged `sessions.json` leaves the sessions unlabelled (one warning line).
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Any, Optional

from resilient_train.errors import NotFoundError, UsageError
from resilient_train.portability import device_kind
from resilient_train.run.folder import RunFolder
from resilient_train.run.metrics import read_rows
from resilient_train.storage import Storage


@dataclass
class Session:
    number: int
    start_step: int
    label: str
    steps: list[int] = field(default_factory=list)
    throughput: list[float] = field(default_factory=list)

    @property
    def end_step(self) -> int:
        return max(self.steps) if self.steps else self.start_step


@dataclass
class RunHistory:
    """Metrics per step (newest session wins) and the sessions that produced them."""

    loss: dict[int, float]
    lr: dict[int, float]
    val_loss: dict[int, float]
    sessions: list[Session]
    extra: dict[str, dict[int, float]] = field(default_factory=dict)  # other metrics, by name, in CSV order


# columns drawn in the fixed panels, or not metrics at all
_OWN_COLUMNS = frozenset({"session", "step", "epoch", "time", "loss", "lr", "samples_per_sec", "val_loss"})


def _float(value: Optional[str]) -> Optional[float]:
    try:
        return float(value) if value not in (None, "") else None
    except ValueError:
        return None


def _label(record: dict[str, Any]) -> str:
    """The machine, precision and world size of a session record ("unknown machine" if odd-shaped)."""
    try:
        world = record.get("world_size", 1)
        return f"{device_kind(record.get('environment', {}))}, {record.get('precision', '?')}" + (f", {world} proc" if world != 1 else "")
    except (AttributeError, TypeError):
        return "unknown machine"


def read_history(run: Storage) -> RunHistory:
    """Parse `logs/metrics.csv` and `sessions.json` of a run."""
    try:
        rows = read_rows(run)
    except FileNotFoundError:
        raise NotFoundError(f"no metrics in '{run.url}' (logs/metrics.csv); has the run logged a step yet?") from None
    sessions = {
        r["session"]: Session(
            number=r["session"],
            start_step=r.get("start_step", 0),
            label=_label(r),
        )
        for r in RunFolder(run).sessions()  # records of the right shape only
    }
    loss: dict[int, tuple[int, float]] = {}
    lr: dict[int, tuple[int, float]] = {}
    val: dict[int, tuple[int, float]] = {}
    extra: dict[str, dict[int, tuple[int, float]]] = {}
    rates: dict[int, tuple[int, float]] = {}
    for row in rows:
        session, step = row["session"], row["step"]
        if session not in sessions:
            sessions[session] = Session(number=session, start_step=0, label="unknown machine")
        for table, key in ((loss, "loss"), (lr, "lr"), (val, "val_loss")):
            value = _float(row.get(key))
            if value is not None and (step not in table or table[step][0] <= session):
                table[step] = (session, value)
        for key, text in row.items():
            if key in _OWN_COLUMNS or not isinstance(key, str):
                continue
            value = _float(text)
            table = extra.setdefault(key, {})
            if value is not None and (step not in table or table[step][0] <= session):
                table[step] = (session, value)
        rate = _float(row.get("samples_per_sec"))
        if rate is not None and _float(row.get("loss")) is not None and (step not in rates or rates[step][0] <= session):
            rates[step] = (session, rate)
    for step, (session, rate) in sorted(rates.items()):  # a killed session's re-logged steps: the resume's
        sessions[session].steps.append(step)
        sessions[session].throughput.append(rate)
    return RunHistory(
        loss={s: v for s, (_, v) in sorted(loss.items())},
        lr={s: v for s, (_, v) in sorted(lr.items())},
        val_loss={s: v for s, (_, v) in sorted(val.items())},
        sessions=[sessions[k] for k in sorted(sessions)],
        extra={key: {s: v for s, (_, v) in sorted(table.items())} for key, table in extra.items() if table},
    )


def plot_run(run_url: str, out: str, title: Optional[str] = None) -> RunHistory:
    """Draw the run's history into `out` (PNG, through fsspec); returns what was drawn."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UsageError("plot needs matplotlib: pip install 'resilient_train[plot]'") from None
    history = read_history(Storage(run_url))
    fig = draw(history, title or run_url, plt)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    folder, _, name = out.rpartition("/")
    Storage(folder or ".").write_bytes(buffer.getvalue(), name)
    return history


def draw(history: RunHistory, title: str, plt: Any) -> Any:
    """The figure: loss (and validation loss), lr, samples/s and one panel per other metric; each
    session shaded in its colour, resume points dashed, and the sessions named in one legend
    (labels written at their start steps overlapped wherever sessions start close together, and
    a killed session and its resume start at the same step)."""
    extra = list(history.extra)
    fig, axes = plt.subplots(3 + len(extra), 1, figsize=(10, 8.5 + 1.9 * len(extra)), sharex=True,
                             gridspec_kw={"height_ratios": [3, 1.2, 1.2] + [1.2] * len(extra)}, squeeze=False)
    ax_loss, ax_lr, ax_rate, *ax_extra = axes[:, 0]
    colors = plt.get_cmap("tab10").colors  # tab10 is a ListedColormap; the stub returns Colormap
    _series(ax_loss, history.loss, "train loss", "C0")
    if history.val_loss:
        _series(ax_loss, history.val_loss, "validation loss", "C3", marker="o")
    _series(ax_lr, history.lr, "learning rate", "C2")
    for ax, name in zip(ax_extra, extra, strict=True):
        _series(ax, history.extra[name], name, "C4", marker="." if len(history.extra[name]) < 50 else None)
        ax.set_ylabel(name, fontsize=8)
    for index, session in enumerate(history.sessions):
        color = colors[index % len(colors)]
        for ax in axes[:, 0]:
            ax.axvspan(session.start_step, session.end_step, color=color, alpha=0.08, lw=0)
            if session.start_step > 0:
                ax.axvline(session.start_step, color=color, ls="--", lw=1)
        ax_rate.plot(session.steps, session.throughput, color=color, marker=".",
                     label=f"session {session.number} (from step {session.start_step}): {session.label}")
    ax_loss.set_ylabel("loss")
    ax_loss.legend(loc="upper right")
    ax_lr.set_ylabel("lr")
    ax_rate.set_ylabel("samples/s")
    axes[-1, 0].set_xlabel("step (dashed lines: resume points)")
    if history.sessions:
        ax_rate.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, borderaxespad=0)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def _series(ax: Any, values: dict[int, float], label: str, color: str, marker: Optional[str] = None) -> None:
    if values:
        ax.plot(list(values), list(values.values()), label=label, color=color, marker=marker, lw=1.2)
