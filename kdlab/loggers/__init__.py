"""Loggers: where a run is shown besides the runs database (TensorBoard, MLflow).

Importing this package registers every logger. The loop talks to one `RunLoggers` object.
"""

from kdlab.loggers import mlflow, tensorboard  # noqa: F401  (imported to register the loggers)
from kdlab.loggers.base import LOGGERS, Logger, RunLoggers, RunStart, check_available, register_logger, start_loggers

__all__ = ["LOGGERS", "Logger", "RunLoggers", "RunStart", "check_available", "register_logger", "start_loggers"]
