"""A run as the store holds it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kdlab.health import is_diverged


@dataclass
class RunRecord:
    """One run as stored: its config, status, metrics and timings."""

    run_id: str
    config: dict[str, Any]
    status: str
    label: str | None = None
    epochs_done: int = 0
    final_acc: float | None = None
    best_acc: float | None = None
    best_epoch: int | None = None
    wall_s: float | None = None
    timing: dict[str, float] = field(default_factory=dict)
    device: str | None = None
    versions: dict[str, str] = field(default_factory=dict)
    params: int | None = None
    paper_params: int | None = None
    flops: int | None = None  # per image, at the data's image size (kdlab.models.profile)
    peak_mem_bytes: int | None = None
    error: str | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    checkpoint: str | None = None
    health: str | None = None  # 'ok' or 'diverged: ...'; None for runs finished before kdlab checked
    role: str | None = None  # teacher, student, assistant or distill when a grid planned the run

    @property
    def diverged(self) -> bool:
        """Finished, but its training fell apart (kdlab.health): its accuracy is not a result."""
        return is_diverged(self.health)

    @property
    def model(self) -> str:
        return self.config["model"]

    @property
    def method(self) -> str:
        return self.config["method"]

    @property
    def seed(self) -> int:
        return self.config["seed"]
