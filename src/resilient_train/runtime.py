"""Building Lightning Fabric from the trainer config and the hardware actually present."""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
from datetime import timedelta
from typing import Any, Iterator, Optional

import torch
from lightning_fabric import Fabric
from lightning_fabric.utilities.exceptions import MisconfigurationException

from resilient_train.config import TrainerConfig
from resilient_train.errors import MAIN_PID_VAR, UsageError

log = logging.getLogger("resilient_train")


def auto_precision(accelerator: str = "auto") -> str:
    """bf16-mixed from compute capability 8.0, 16-mixed (with GradScaler) below, 32-true on CPU.

    `torch.cuda.is_bf16_supported()` answers True on a T4 (capability 7.5) through emulation, which
    is slow and not what users want, so the choice reads the capability itself.
    """
    if accelerator in ("auto", "cuda", "gpu") and torch.cuda.is_available():
        major, _ = torch.cuda.get_device_capability()
        return "bf16-mixed" if major >= 8 else "16-mixed"
    return "32-true"


def resolve_precision(requested: str, accelerator: str) -> str:
    return auto_precision(accelerator) if requested == "auto" else requested


def build_fabric(cfg: TrainerConfig, precision: Optional[str] = None) -> Fabric:
    """A Fabric for this config; `launch()` is left to the caller (it may spawn processes)."""
    _check_accelerator(cfg.accelerator)
    try:
        return Fabric(
            accelerator=cfg.accelerator,
            devices=cfg.devices,
            strategy=cfg.strategy,
            num_nodes=elastic_num_nodes(cfg.num_nodes),
            precision=precision or resolve_precision(cfg.precision, cfg.accelerator),  # type: ignore[arg-type]  # Fabric checks it
        )
    except (MisconfigurationException, ValueError, TypeError) as exc:  # devices/strategy/precision this machine cannot do
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"trainer settings do not fit this machine: {first}") from None


def elastic_num_nodes(configured: int) -> int:
    """The nodes torchrun's rendezvous gave this worker group, else `trainer.num_nodes`.

    With an elastic node range (`torchrun --nnodes=1:2`) torchrun starts the worker group again on
    whichever nodes are left, with the same command line, so `trainer.num_nodes` names the most
    nodes, not the ones present; Fabric refuses a world size other than devices x num_nodes. The
    round's world size (WORLD_SIZE over LOCAL_WORLD_SIZE processes per node) is the truth then.
    """
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_torchelastic_launched():
        return configured
    try:
        world, local = int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_WORLD_SIZE"])
    except (KeyError, ValueError):
        return configured
    if local < 1 or world % local:
        return configured  # nodes of different sizes: leave it to Fabric's own check and message
    nodes = world // local
    if nodes != configured and int(os.environ.get("RANK", "0")) == 0:
        log.info("torchrun's rendezvous gave %d node(s) of %d process(es); trainer.num_nodes=%d is read as the most "
                 "nodes: running on %d", nodes, local, configured, nodes)
    return nodes


def _check_accelerator(accelerator: str) -> None:
    """A GPU asked for by name on a machine without one: one line saying what to do (exit 2)."""
    if accelerator == "cuda" and not torch.cuda.is_available():
        raise UsageError("trainer.accelerator=cuda but torch sees no CUDA GPU here (torch.cuda.is_available() is False); "
                         "use trainer.accelerator=auto (or cpu), or on a GPU machine install a CUDA build of torch "
                         f"(this one is {torch.__version__})")
    mps = getattr(torch.backends, "mps", None)
    if accelerator == "gpu" and not torch.cuda.is_available() and not (mps is not None and mps.is_available()):
        raise UsageError("trainer.accelerator=gpu but torch sees no GPU here; use trainer.accelerator=auto (or cpu), "
                         "or on a GPU machine install a CUDA build of torch")


def effective_precision(fabric: Fabric, requested: str) -> str:
    """The precision Fabric really runs: it swaps 16-mixed for bf16-mixed on CPU, for one."""
    plugin = getattr(getattr(fabric, "strategy", None), "precision", None)
    value = getattr(plugin, "precision", None)
    return value if isinstance(value, str) else requested


def release_process_groups_at_exit() -> None:
    """Destroy the process groups before the interpreter starts tearing itself down.

    A gloo process group left alive at exit is destroyed during interpreter finalization, when its
    worker threads may still hold tensors whose release needs the GIL: the process then aborts
    ("terminate called without an active exception", SIGABRT) after the run already ended well,
    and a stopped run exits -6 instead of 75. An `atexit` hook runs while the interpreter is whole.
    Registered once per process; a no-op when the groups are already gone.
    """
    global _RELEASE_REGISTERED
    if _RELEASE_REGISTERED:
        return
    _RELEASE_REGISTERED = True
    atexit.register(_destroy_process_groups)


_RELEASE_REGISTERED = False


def _destroy_process_groups() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - exiting anyway; a peer that is gone cannot be waited for
            pass


def join_elastic_process_group(fabric: Fabric) -> None:
    """Under torchrun, join the process group through store keys unique to this restart.

    torchelastic restarts a failed worker group with the same store (the agent's) and the same
    group names, so a restarted worker can read a dead worker's address left by the previous
    attempt, connect to nothing and fail ("Gloo connectFullMesh failed ... Connection refused")
    with whichever rank came second. Prefixing every key with the restart count keeps attempts
    apart. The world size joins the prefix because a node joining an elastic range (`--nnodes=1:2`)
    restarts the group without counting a restart. Fabric then finds the group initialised and
    uses it. A group of one process (the last node of an elastic range, one process per node) has
    no peers to mix up: Fabric starts it as usual.
    """
    import torch.distributed as dist

    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if restart is None or not dist.is_available() or dist.is_initialized():
        return
    if restart != "0" and fabric.global_rank == 0:
        world_now = fabric.world_size
        log.info("torchrun restarted the worker group (restart %s, %d process%s): continuing the run",
                 restart, world_now, "" if world_now == 1 else "es")
    if fabric.world_size <= 1:
        return
    strategy: Any = fabric.strategy
    environment = strategy.cluster_environment
    rank, world = environment.global_rank(), environment.world_size()
    timeout = getattr(strategy, "_timeout", None) or timedelta(minutes=30)
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"  # the agent hosts the store
    store = dist.TCPStore(environment.main_address, environment.main_port, world, is_master=not agent_store and rank == 0,
                          timeout=timeout, multi_tenant=not agent_store)
    run_id = os.environ.get("TORCHELASTIC_RUN_ID", "run")
    prefixed = dist.PrefixStore(f"resilient_train/{run_id}/attempt-{restart}-world-{world}/", store)
    backend_of = getattr(strategy, "_get_process_group_backend", None)
    backend = backend_of() if callable(backend_of) else ("nccl" if fabric.device.type == "cuda" else "gloo")
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = environment.main_address, str(environment.main_port)
    extra: dict[str, Any] = {}
    if fabric.device.type == "cuda":  # as Fabric does: NCCL starts eagerly on this rank's own GPU
        extra["device_id"] = fabric.device
    dist.init_process_group(backend, store=prefixed, rank=rank, world_size=world, timeout=timeout, **extra)


@contextlib.contextmanager
def children_know_their_parent() -> Iterator[None]:
    """While Fabric starts the other processes of `trainer.devices=N`, their environment names
    this process as the main one (errors.MAIN_PID_VAR), so they exit 0 after a stop and leave 75
    to it (errors.stop_exit_code). Taken out of this process's environment again afterwards: a
    process it starts later (`!python -m resilient_train resume` from a notebook) is no child of
    Fabric's. A process that already has it is such a child (or was started by one) and keeps it.
    """
    if MAIN_PID_VAR in os.environ:
        yield
        return
    os.environ[MAIN_PID_VAR] = str(os.getpid())
    try:
        yield
    finally:
        os.environ.pop(MAIN_PID_VAR, None)


def stop_watching_children(fabric: Fabric) -> None:
    """Take the processes Fabric's launcher started for `trainer.devices=N` off its observer, once
    every rank is past the collectives of its end: the final commit, or a stop they agreed on
    (a no-op for other launchers and on other ranks).

    From then on a child may be done first (its last collective behind it) while this process
    still closes the mirror and the trackers, and a child's interpreter sometimes aborts in its
    teardown after its work is done (-6). Lightning's observer SIGKILLs this process as soon as a
    child's exit code is not 0, which would turn this process's 75 (or 0) into -9. The observer
    watches the launcher's own list of processes, so emptying that list ends the watch.
    """
    launcher = getattr(fabric.strategy, "launcher", None)
    children = getattr(launcher, "procs", None)
    if isinstance(children, list):
        children.clear()


def peers_notice_a_leaver(fabric: Fabric) -> bool:
    """Whether a rank waiting in a collective gets an error when another rank's process leaves:
    gloo says "Connection closed by peer" at once; NCCL raises nothing in the waiting thread (its
    watchdog ends the process at the collective's timeout). True on a single process."""
    if fabric.world_size == 1:
        return True
    import torch.distributed as dist

    return dist.is_initialized() and dist.get_backend() == "gloo"
