"""A DataLoader worker killed by a signal (issue 18 item 10): SIGTERM to the whole process group, as
Docker and Kubernetes send, also kills the workers, and torch's SIGCHLD handler raises a plain
RuntimeError in the main thread wherever it is; in a metrics write that read `could not write
logs/metrics.csv (RuntimeError: DataLoader worker ... is killed by signal: Terminated)`. The real
handler and a real killed child are used; the run's own stop (exit 75) is tests/test_stop_signals.py's."""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.utils.data._utils import signal_handling

from resilient_train.run.metrics import MetricsLogger
from resilient_train.storage import Storage


def test_a_killed_dataloader_worker_is_said_and_not_blamed_on_the_csv(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    previous = signal.getsignal(signal.SIGCHLD)
    monkeypatch.setattr(signal_handling, "_SIGCHLD_handler_set", False)
    worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    key = 918273  # the id torch keys a DataLoader iterator's worker pids by
    torch._C._set_worker_pids(key, (worker.pid,))
    logger = MetricsLogger(Storage(str(tmp_path)), session=1)

    def write_while_the_worker_dies(rows: list) -> None:
        worker.terminate()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # torch's SIGCHLD handler raises in here
            time.sleep(0.005)

    monkeypatch.setattr(logger, "_write", write_while_the_worker_dies)
    logger.log(1, loss=0.5)
    try:
        signal_handling._set_SIGCHLD_handler()
        with caplog.at_level(logging.WARNING, logger="resilient_train"):
            logger.flush()
    finally:
        torch._C._remove_worker_pids(key)
        signal.signal(signal.SIGCHLD, previous)
        worker.wait()
    assert "a DataLoader worker was killed by a signal" in caplog.text, caplog.text
    assert "could not write logs/metrics.csv" not in caplog.text
    assert logger._pending  # the row is written at the next flush


def test_a_worker_death_handled_inside_the_stop_handler_does_not_lose_the_stop(monkeypatch: pytest.MonkeyPatch) -> None:
    # a group SIGTERM: the workers' SIGCHLDs can come while the stop handler runs, and CPython
    # then runs torch's SIGCHLD handler nested in it, before it is quieted (seen once in CI: exit 1)
    from resilient_train import preemption

    calls = []
    real = preemption._quiet_worker_deaths

    def nested_death_first() -> None:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("DataLoader worker (pid 4242) is killed by signal: Terminated. ")
        real()

    monkeypatch.setattr(preemption, "_quiet_worker_deaths", nested_death_first)
    previous = signal.getsignal(signal.SIGCHLD)
    stop = preemption.StopRequest(["SIGUSR1"])
    try:
        stop._handle(signal.SIGTERM, None)  # raises nothing
    finally:
        signal.signal(signal.SIGCHLD, previous)
    assert stop.reason == "SIGTERM" and len(calls) == 2


class _BatchLostInTransfer(torch.utils.data.Dataset):
    """From item `stop_at` on: a stop signal comes, then the fetch fails as a batch coming from a
    worker the signal killed fails before torch has noticed the worker is gone (the connection its
    tensors were passed through is reset); with `signal_first=False`, the failure comes alone."""

    def __init__(self, stop_at: int, error: BaseException, signal_first: bool = True) -> None:
        self.stop_at, self.error, self.signal_first = stop_at, error, signal_first
        self.x = torch.randn(64, 4, generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.stop_at >= 0 and index == self.stop_at:
            if self.signal_first:
                import os

                os.kill(os.getpid(), signal.SIGUSR1)  # the run's own handler takes it in this thread
            raise self.error
        return self.x[index], self.x[index].sum(dim=0, keepdim=True)


def _fit_losing_a_batch(run_dir: Path, error: BaseException, signal_first: bool = True) -> None:
    from torch import nn

    from resilient_train import Trainer

    model = nn.Linear(4, 1)
    trainer = Trainer(run_dir=str(run_dir), max_steps=40, batch_size=1, every_n_steps=2, progress_bar=False,
                      accelerator="cpu", devices=1, stop_signals=["SIGUSR1"])
    data = torch.utils.data.DataLoader(_BatchLostInTransfer(5, error, signal_first), batch_size=1, shuffle=False)
    trainer.fit(model, lambda p: torch.optim.SGD(p, lr=0.01), data,
                training_step=lambda m, batch: nn.functional.mse_loss(m(batch[0]), batch[1]))


@pytest.mark.parametrize("error", [ConnectionResetError(104, "Connection reset by peer"), EOFError(), BrokenPipeError(32, "Broken pipe")])
def test_a_batch_lost_in_transfer_after_a_stop_signal_ends_the_run_with_75(tmp_path: Path, error: BaseException) -> None:
    from resilient_train.errors import StoppedMidStep

    with pytest.raises(StoppedMidStep) as stopped:
        _fit_losing_a_batch(tmp_path / "run", error)
    assert stopped.value.code == 75 and stopped.value.step == 5  # steps 1-5 done, step 6 lost its batch
    assert f"batch was lost with the stop ({type(error).__name__}" in str(stopped.value)  # what happened, not a guess
    assert stopped.value.last_checkpoint is not None and stopped.value.last_checkpoint.endswith("step-000000004")


# what gloo raises in a rank whose peer's process went away in the middle of a collective
_GLOO_PEER_GONE = RuntimeError("[third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:29095. "
                               "This is typically caused by a remote worker crashing.")


def test_a_collective_left_by_another_rank_after_a_stop_signal_ends_the_run_with_75(tmp_path: Path) -> None:
    from resilient_train.errors import StoppedMidStep

    with pytest.raises(StoppedMidStep) as stopped:
        _fit_losing_a_batch(tmp_path / "run", _GLOO_PEER_GONE)
    assert stopped.value.code == 75 and stopped.value.step == 5
    assert "another rank left in the middle of it (RuntimeError: [third_party/gloo" in str(stopped.value)
    assert "batch was lost" not in str(stopped.value)


@pytest.mark.parametrize("error", [_GLOO_PEER_GONE, RuntimeError("a task bug")], ids=["peer-gone", "task-bug"])
def test_a_runtime_error_without_a_stop_is_not_taken_for_one(tmp_path: Path, error: BaseException) -> None:
    with pytest.raises(RuntimeError) as raised:
        _fit_losing_a_batch(tmp_path / "run", error, signal_first=False)
    assert raised.value is error


def test_a_task_bug_after_a_stop_signal_is_not_taken_for_the_stop(tmp_path: Path) -> None:
    error = RuntimeError("shape mismatch in the task")
    with pytest.raises(RuntimeError) as raised:
        _fit_losing_a_batch(tmp_path / "run", error)
    assert raised.value is error


def test_a_connection_error_without_a_stop_is_not_taken_for_one(tmp_path: Path) -> None:
    with pytest.raises(ConnectionResetError):
        _fit_losing_a_batch(tmp_path / "run", ConnectionResetError(104, "Connection reset by peer"), signal_first=False)


@pytest.mark.slow
@pytest.mark.parametrize("bound", ["by the model", "by the data"])
def test_sigterm_to_the_whole_process_group_with_dataloader_workers_exits_75_and_resumes_exactly(bound: str, tmp_path: Path) -> None:
    # what `docker stop`, Kubernetes and a terminal's Ctrl-C deliver: the signal reaches the run and
    # its DataLoader workers at once; the workers die of it, the run must still save and say 75
    import os

    from conftest import TINY_TASK, committed_steps_on_disk, start_cli, wait_for
    from helpers import assert_same_weights, run_cli_inprocess
    from safetensors.torch import load_file

    # by the model: the loop is in its step when the signal comes, and saves at the step's end;
    # by the data: it waits on its workers, which die of the signal before the batch is ready, so
    # that step cannot finish (StoppedMidStep) and resume starts from the newest checkpoint
    slow = "task.sleep=0.1" if bound == "by the model" else "task.fetch_sleep=0.05"
    settings = ["trainer.max_steps=24", "checkpoint.every_n_steps=4", "checkpoint.keep_last=null", slow, "trainer.num_workers=2"]
    straight = run_cli_inprocess("run", TINY_TASK, "--run-dir", str(tmp_path / "straight"), *settings)
    assert straight.returncode == 0, straight.stderr[-2000:]

    run_dir = tmp_path / "group"
    proc = start_cli("run", TINY_TASK, "--run-dir", str(run_dir), *settings)  # its own process group
    wait_for(lambda: proc.poll() is not None or committed_steps_on_disk(run_dir))
    os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err[-2000:]
    assert "Traceback" not in err
    # a loaded machine can leave even a model-bound step waiting on its workers: either way is a stop
    said = ("stopped at step", "stopped during step") if bound == "by the model" else ("stopped during step",)
    assert any(words in err for words in said), err[-2000:]
    step = committed_steps_on_disk(run_dir)[-1]
    assert 4 <= step < 24

    resumed = run_cli_inprocess("resume", str(run_dir))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    for name in ("straight", "group"):
        run_cli_inprocess("export", str(tmp_path / name), str(tmp_path / f"{name}.safetensors"), check=True)
    assert_same_weights(load_file(str(tmp_path / "group.safetensors")), load_file(str(tmp_path / "straight.safetensors")))


@pytest.mark.slow
def test_sigterm_to_the_process_group_during_validation_saves_the_step_exits_75_and_resumes_exactly(tmp_path: Path) -> None:
    import os

    from conftest import TINY_TASK, committed_steps_on_disk, start_cli, wait_for
    from helpers import assert_same_weights, run_cli_inprocess
    from safetensors.torch import load_file

    settings = ["trainer.max_steps=16", "checkpoint.every_n_steps=4", "checkpoint.keep_last=null", "trainer.val_every_n_steps=4",
                "task.val_workers=2", "task.val_fetch_sleep=0.05"]
    straight = run_cli_inprocess("run", TINY_TASK, "--run-dir", str(tmp_path / "straight"), *settings)
    assert straight.returncode == 0, straight.stderr[-2000:]

    run_dir, marker = tmp_path / "group", tmp_path / "validating"
    proc = start_cli("run", TINY_TASK, "--run-dir", str(run_dir), *settings, f"task.val_marker={marker}")
    wait_for(lambda: proc.poll() is not None or marker.exists())  # the first validation (step 4) has begun
    os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err[-2000:]
    assert "validation cut short" in err and "stopped at step 4" in err and "Traceback" not in err, err[-2000:]
    assert committed_steps_on_disk(run_dir) == [4]  # the step was whole: saved

    resumed = run_cli_inprocess("resume", str(run_dir))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    for name in ("straight", "group"):
        run_cli_inprocess("export", str(tmp_path / name), str(tmp_path / f"{name}.safetensors"), check=True)
    assert_same_weights(load_file(str(tmp_path / "group.safetensors")), load_file(str(tmp_path / "straight.safetensors")))


def test_only_a_stop_signal_explains_a_lost_batch_or_a_peer_that_left() -> None:
    from resilient_train import preemption
    from resilient_train.errors import BATCH_LOST, PEER_LEFT

    lost, peer_gone = ConnectionResetError(104, "Connection reset by peer"), _GLOO_PEER_GONE
    deadline = preemption.StopRequest(["SIGUSR1"])
    deadline.request("session budget")  # a deadline kills no worker and makes no rank leave
    assert deadline.explains(lost) is None and deadline.explains(peer_gone) is None

    previous = signal.getsignal(signal.SIGCHLD)
    signalled = preemption.StopRequest(["SIGUSR1"])
    try:
        signalled._handle(signal.SIGUSR1, None)
    finally:
        signal.signal(signal.SIGCHLD, previous)
    assert signalled.explains(lost) == BATCH_LOST and signalled.explains(peer_gone) == PEER_LEFT
    assert signalled.explains(RuntimeError("a task bug")) is None


def test_a_stop_exits_75_except_in_a_child_that_fabrics_launcher_started(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    from resilient_train.errors import MAIN_PID_VAR, TrainingStopped

    monkeypatch.delenv(MAIN_PID_VAR, raising=False)
    assert TrainingStopped(3, "SIGTERM").code == 75  # a process of its own, or a torchrun worker
    monkeypatch.setenv(MAIN_PID_VAR, str(os.getpid()))
    assert TrainingStopped(3, "SIGTERM").code == 75  # the main process
    monkeypatch.setenv(MAIN_PID_VAR, str(os.getppid() + 1))
    assert TrainingStopped(3, "SIGTERM").code == 75  # it inherited the variable from a grandparent: no child of Fabric's
    monkeypatch.setenv(MAIN_PID_VAR, str(os.getppid()))
    assert TrainingStopped(3, "SIGTERM").code == 0  # a child: the main process says 75 for the run
    assert TrainingStopped(3, "SIGTERM", code=75).code == 75  # a mid-step stop under NCCL keeps the watch (loop/train.py)


def test_taking_the_children_off_the_observer_ends_its_watch(monkeypatch: pytest.MonkeyPatch) -> None:
    """runtime.stop_watching_children relies on Lightning's observer watching the launcher's own
    list of child processes; a Lightning that copied it would make the fix silently do nothing."""
    from types import SimpleNamespace

    from lightning_fabric.plugins.environments import LightningEnvironment
    from lightning_fabric.strategies.launchers import subprocess_script

    from resilient_train.runtime import stop_watching_children

    started = []
    monkeypatch.setattr(subprocess_script._ChildProcessObserver, "start", lambda self: started.append(self))
    launcher = subprocess_script._SubprocessScriptLauncher(LightningEnvironment(), num_processes=2, num_nodes=1)
    child = subprocess.Popen([sys.executable, "-c", "raise SystemExit(75)"])
    child.wait()
    launcher.procs.append(child)
    subprocess_script._launch_process_observer(launcher.procs)  # what launch() does after starting the children
    observer = started[0]
    killed = []
    monkeypatch.setattr(observer, "_terminate_all", lambda: killed.append(True))
    assert observer._run() and killed  # watched: a child's 75 ends the main process

    killed.clear()
    stop_watching_children(SimpleNamespace(strategy=SimpleNamespace(launcher=launcher)))
    assert observer._run() and not killed  # no longer watched


def test_only_fabrics_children_are_told_who_the_main_process_is(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    from resilient_train.errors import MAIN_PID_VAR
    from resilient_train.runtime import children_know_their_parent

    monkeypatch.delenv(MAIN_PID_VAR, raising=False)
    with children_know_their_parent():
        assert os.environ[MAIN_PID_VAR] == str(os.getpid())  # what the children's environment is copied from
    assert MAIN_PID_VAR not in os.environ  # a `resume` this process starts later is no child of Fabric's
    monkeypatch.setenv(MAIN_PID_VAR, "12345")
    with children_know_their_parent():
        pass
    assert os.environ[MAIN_PID_VAR] == "12345"  # a child keeps what its parent told it
