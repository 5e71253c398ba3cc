"""MLflow: ``--mlflow URI`` logs each run to a tracking server (``http://host:5000``) or a local
folder (``./mlruns``), in the experiment ``$MLFLOW_EXPERIMENT_NAME`` (default ``kdlab``).

Needs ``pip install 'kdlab[mlflow]'`` (the client, mlflow-skinny). The MLflow run is named by the
kdlab label and tagged with the kdlab run id and teacher; the config goes in as parameters, each
epoch's metrics as steps under the names TensorBoard shows (``train/loss``, ``test/acc``,
``terms/ce``, ``final/acc``: MLflow accepts ``/``), and the checkpoint and the run's report as
artefacts. A resumed kdlab run continues its MLflow run; a run that finished before is logged
from its stored record when asked for again with ``--mlflow`` (unless it is there already).
Calls fail fast (few retries, a short timeout) unless the user set MLflow's own variables, so a
server that is down costs seconds, not minutes, before the warning.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kdlab.loggers.base import Logger, RunStart, epoch_scalars, final_scalars, flat_params, register_logger

if TYPE_CHECKING:
    from kdlab.config import Config
    from kdlab.store import RunRecord

_FAST = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
         "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}
EXPERIMENT = "kdlab"  # unless $MLFLOW_EXPERIMENT_NAME says otherwise


def tracking_uri(uri: str) -> str:
    """A local folder becomes a ``file:`` URI; anything with a scheme is kept as given."""
    if "://" in uri or uri.startswith("file:"):
        return uri
    return Path(uri).expanduser().resolve().as_uri()


@contextmanager
def _mlflow_env(uri: str) -> Iterator[None]:
    """Fail fast over HTTP; allow the file store for a folder the user named (MLflow 3 asks to opt in)."""
    extra = {k: v for k, v in _FAST.items() if k not in os.environ}
    if uri.startswith("file:") and "MLFLOW_ALLOW_FILE_STORE" not in os.environ:
        extra["MLFLOW_ALLOW_FILE_STORE"] = "true"
    os.environ.update(extra)
    try:
        yield
    finally:
        for key in extra:
            os.environ.pop(key, None)


@register_logger
class MlflowLogger(Logger):
    """Params, per-epoch metrics, tags and artefacts of a run in MLflow."""

    name = "mlflow"
    package = "mlflow"
    extra = "mlflow"
    asked = True

    @classmethod
    def wanted(cls, cfg: Config) -> bool:
        return bool(cfg.mlflow)

    @classmethod
    def logged(cls, run: RunStart) -> str | None:
        from mlflow.tracking import MlflowClient

        uri = tracking_uri(run.config["mlflow"])
        with _mlflow_env(uri):
            client = MlflowClient(uri)
            experiment = client.get_experiment_by_name(os.environ.get("MLFLOW_EXPERIMENT_NAME", EXPERIMENT))
            found = experiment and _find(client, experiment.experiment_id, run.run_id)
        if found and found.info.status == "FINISHED":
            return f"MLflow run {found.info.run_id} at {uri}"
        return None  # absent, or left unfinished: (re)logged from the stored record

    def __init__(self, run: RunStart):
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        super().__init__(run)
        self.uri = tracking_uri(run.config["mlflow"])
        with _mlflow_env(self.uri):
            self.client = MlflowClient(self.uri)
            name = os.environ.get("MLFLOW_EXPERIMENT_NAME", EXPERIMENT)
            experiment = self.client.get_experiment_by_name(name)
            experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
            found = _find(self.client, experiment_id, run.run_id)
            if found:  # a resumed kdlab run continues its MLflow run
                self.mlflow_id = found.info.run_id
                self.client.update_run(self.mlflow_id, status="RUNNING")
            else:
                tags = {"kdlab.run_id": run.run_id, "kdlab.teacher": run.teacher or "", "kdlab.label": run.label,
                        "kdlab.model": run.config["model"], "kdlab.method": run.config["method"]}
                self.mlflow_id = self.client.create_run(experiment_id, run_name=run.label, tags=tags).info.run_id
                params = [Param(k, str(v)[:500]) for k, v in flat_params(run.config).items()]
                self.client.log_batch(self.mlflow_id, params=params)
        self.finished = False

    def epoch(self, epoch: int, metrics: dict[str, Any]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        with _mlflow_env(self.uri):
            self.client.log_batch(self.mlflow_id, metrics=[Metric(k, v, now, epoch)
                                                           for k, v in epoch_scalars(metrics).items()])

    def finish(self, record: RunRecord, artefacts: dict[str, Path]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        with _mlflow_env(self.uri):
            self.client.log_batch(self.mlflow_id, metrics=[Metric(k, v, now, record.epochs_done)
                                                           for k, v in final_scalars(record).items()])
            for path in artefacts.values():
                self.client.log_artifact(self.mlflow_id, str(path))
            self.client.set_terminated(self.mlflow_id, status="FINISHED")
        self.finished = True

    def close(self) -> None:
        if not self.finished:  # stopped or failed: the kdlab run can be resumed, and continues this one
            with _mlflow_env(self.uri):
                self.client.set_terminated(self.mlflow_id, status="KILLED")


def _find(client: Any, experiment_id: str, run_id: str) -> Any:
    """The MLflow run tagged with this kdlab run id (the newest), or None."""
    found = client.search_runs([experiment_id], f"tags.`kdlab.run_id` = '{run_id}'", max_results=1)
    return found[0] if found else None
