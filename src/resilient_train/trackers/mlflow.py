"""MLflow: one MLflow run for the whole resilient run; each session continues it by id.

A metric's history is append-only (no API deletes an entry), so a re-logged step has one entry per
session that logged it. Every row also logs a `session` metric at its step, the run's latest values
are the newest session's, and the run carries `resilient_train.session` tags.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
from typing import Any, Iterator

from resilient_train.trackers.base import FAILED, FINISHED, STOPPED, SessionInfo, StartError, log, why

_MLFLOW_STATUS = {FINISHED: "FINISHED", STOPPED: "KILLED", FAILED: "FAILED"}
_MLFLOW_BATCH = 100  # params / tags per log_batch call (the REST API's limit)
_MLFLOW_NAME = re.compile(r"[^\w\-. :/]")  # characters MLflow refuses in param, tag and metric names


class MlflowTracker:
    """One MLflow run for the whole resilient run; each session continues it by id."""

    name = "mlflow"
    package = "mlflow"
    needs_run_id = True

    def __init__(self, info: SessionInfo) -> None:
        from mlflow import MlflowClient
        from mlflow.entities import Param, RunTag
        from mlflow.exceptions import MlflowException

        uri = info.logging.mlflow_tracking_uri
        if uri and _is_file_store(uri):
            # MLflow 3 refuses a file store unless told otherwise; the user chose one here
            # (on Colab, a folder on Drive is the store that outlives the VM)
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        try:
            self._client = client = MlflowClient(tracking_uri=uri)
            with _quick_http():  # an unreachable server: one short try, not minutes of retries before step 1
                client.search_experiments(max_results=1)  # the store opens lazily: fail here, with a hint
        except Exception as exc:
            if uri:
                raise
            raise StartError(f"{why(exc)}; set logging.mlflow_tracking_uri (file:///a/folder, a server URL, "
                               "or sqlite:///mlflow.db with the full mlflow package)") from None
        self._session = info.session
        self._ops: list[Any] = []
        record = info.ids.get(self.name)
        existing = None
        if record.get("run_id"):
            try:
                existing = client.get_run(record["run_id"])
            except MlflowException as exc:
                if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                    raise
                log.warning("mlflow: run %s is not in %s (an earlier session's store?); starting a new MLflow run",
                            record["run_id"], client.tracking_uri)
        if existing is None:
            experiment = client.get_experiment_by_name(info.project)
            experiment_id = experiment.experiment_id if experiment is not None else client.create_experiment(info.project)
            created = client.create_run(experiment_id, run_name=info.run_name, tags={"resilient_train.run_dir": info.run.url})
            self.run_id = created.info.run_id
            info.ids.remember(self.name, {"run_id": self.run_id, "experiment_id": experiment_id, "tracking_uri": client.tracking_uri})
            logged: dict[str, str] = {}
        else:
            self.run_id = existing.info.run_id
            client.update_run(self.run_id, status="RUNNING")
            logged = dict(existing.data.params)
        this_session = json.dumps({"start_step": info.start_step, **info.params.environment}, default=str)[:5000]
        params, tags = [], {"resilient_train.session": str(info.session), f"resilient_train.session.{info.session}": this_session}
        tags.update({_mlflow_name(f"env.{key}"): str(value)[:5000] for key, value in info.params.environment.items()})
        for key, value in info.params.config.items():
            name, text = _mlflow_name(key), str(value)[:500]
            if name not in logged:
                params.append(Param(name, text))
            elif logged[name] != text:  # params cannot change in MLflow: the newest value is a tag
                tags[f"config.{name}"] = text
        tag_list = [RunTag(key, value) for key, value in tags.items()]
        for start in range(0, max(len(params), len(tag_list)), _MLFLOW_BATCH):
            client.log_batch(self.run_id, params=params[start:start + _MLFLOW_BATCH], tags=tag_list[start:start + _MLFLOW_BATCH])

    def log(self, step: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(_mlflow_name(key), value, now, step) for key, value in values.items()]
        metrics.append(Metric("session", float(self._session), now, step))  # tells re-logged steps apart
        # asynchronous: a slow or unreachable server must not hold up training steps
        self._ops.append(self._client.log_batch(self.run_id, metrics=metrics, synchronous=False))

    def flush(self) -> None:
        pass

    def close(self, outcome: str = FINISHED) -> None:
        ops, self._ops = self._ops, []
        try:
            for op in ops:
                if op is not None:
                    op.wait()
        finally:
            self._client.set_terminated(self.run_id, status=_MLFLOW_STATUS.get(outcome, "FINISHED"))


def _is_file_store(uri: str) -> bool:
    return uri.startswith("file:") or "://" not in uri and not uri.startswith(("sqlite:", "databricks", "postgresql", "mysql"))


def _mlflow_name(key: str) -> str:
    return _MLFLOW_NAME.sub("_", key)[:250]


@contextlib.contextmanager
def _quick_http(timeout: str = "10", retries: str = "0") -> Iterator[None]:
    """MLflow's HTTP timeout and retries, shortened for the start-up probe (a user's own settings win)."""
    names = {"MLFLOW_HTTP_REQUEST_TIMEOUT": timeout, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": retries}
    changed = [name for name in names if name not in os.environ]
    for name in changed:
        os.environ[name] = names[name]
    try:
        yield
    finally:
        for name in changed:
            os.environ.pop(name, None)
