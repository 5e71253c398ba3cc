"""The engine: one training step and one evaluation step for runs trained side by side.

A group of runs shares one loader, so each batch is made once. Per step: the batch is copied into
fixed buffers, each teacher that a run needs runs once for all its students, then every run takes
its optimisation step. On a GPU each of these is a CUDA graph (`kdlab.graphs.Captured`) and every
run replays on a CUDA stream of its own, so that the small kernels of several small models overlap
on the card instead of waiting for each other. On a CPU the same code runs eagerly, in turn.

The engine keeps each job's device state (`RunState`: sums, stream, captured steps); a job itself
(`kdlab.job`) is what the run is. A group's graphs, and the memory they and the group's models hold,
are released when the group ends (`Engine.close`), so that a grid's peak memory is one group's, not two.

Nothing in a step waits for the device: losses, accuracies and the first non-finite step are
summed on the device (`RunningSums`) and read by the loop every `SYNC_EVERY` steps.

In a run on several processes (`kdlab.distributed`) each process steps its slice of every batch;
the student and the method's own parts train as one DistributedDataParallel module, and sums are
added over the processes when they are read.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdlab import distributed, graphs
from kdlab.data.loader import Batch, DeviceLoader
from kdlab.graphs import DDP_WARMUP_CALLS, WARMUP_CALLS, Captured
from kdlab.job import Job, Setup, autocast_for
from kdlab.teacher import Teacher
from kdlab.timing import SegmentTimer


class RunningSums:
    """A run's per-epoch sums on its device, updated in place, so that a step captured in a CUDA graph
    updates the same tensors at every replay."""

    def __init__(self, device: torch.device):
        self.device = device
        self.loss = torch.zeros((), device=device)
        self.correct = torch.zeros((), device=device, dtype=torch.long)
        self.steps = torch.zeros((), device=device, dtype=torch.long)
        self.bad = torch.full((), -1, device=device, dtype=torch.long)  # first non-finite step, -1: none
        self.terms: dict[str, Tensor] = {}

    def reset(self) -> None:
        for t in (self.loss, self.correct, self.steps, *self.terms.values()):
            t.zero_()
        self.bad.fill_(-1)

    def add(self, loss: Tensor, logits: Tensor, y: Tensor, terms: dict[str, Tensor]) -> None:
        self.bad.copy_(torch.where((self.bad < 0) & ~torch.isfinite(loss), self.steps, self.bad))
        self.steps += 1
        self.loss += loss
        self.correct += (logits.argmax(1) == y).sum()
        for name, value in terms.items():
            if name not in self.terms:
                if graphs.capturing():
                    # A sum created inside a graph would be re-zeroed at every replay.
                    raise RuntimeError(f"loss term {name!r} first appeared while the step was captured")
                self.terms[name] = torch.zeros((), device=self.device)
            self.terms[name] += value.detach().float()

    def read(self, world: int = 1) -> dict[str, Any]:
        """Host copies (waits for the device): steps, mean loss, correct count, first bad step, mean
        terms; over all processes of the run (each process's loss is the mean over its slice)."""
        values = distributed.all_reduce(torch.stack([self.loss, self.correct.float(), *self.terms.values()]))
        bad = int(distributed.all_reduce(self.bad.clone(), "max"))
        steps = max(1, int(self.steps)) * world
        host = values.tolist()
        return {"steps": int(self.steps), "loss": host[0] / steps, "correct": round(host[1]), "bad": bad,
                "terms": {k: v / steps for k, v in zip(self.terms, host[2:], strict=True)}}


@dataclass
class RunState:
    """What the engine keeps on the device for one job: its running sums, its stream, and its captured
    training and evaluation steps (released with the group, `Engine.close`)."""

    sums: RunningSums
    eval_sums: tuple[Tensor, Tensor]  # (loss sum, correct) over the test split
    stream: Any
    trainable: nn.Module  # student + method as one module (DistributedDataParallel-wrapped)
    train_step: Captured | None = None
    eval_step: Captured | None = None
    lr: float = 0.0  # the last step's learning rate, for the record

    def setup_s(self) -> float:
        """Wall time spent warming up and capturing the job's steps (compilation included)."""
        return sum(c.setup_s for c in (self.train_step, self.eval_step) if c is not None)


class TeacherOutputs:
    """A teacher's outputs for the current batch, in buffers allocated once and reused for the whole
    group: students' captured steps read these addresses, whichever of the teacher's graphs (logits
    only, or with stage features) produced this batch's values."""

    def __init__(self) -> None:
        self.logits: Tensor | None = None
        self.features: list[Tensor] | None = None

    def write(self, feats: list[Tensor] | None, logits: Tensor) -> None:
        self.logits = _keep(self.logits, logits)
        if feats is not None:
            if self.features is None:
                self.features = [_keep(None, f) for f in feats]
            else:
                for buf, f in zip(self.features, feats, strict=True):
                    buf.copy_(f)


def _keep(buf: Tensor | None, value: Tensor) -> Tensor:
    if buf is None:
        if graphs.capturing():  # a buffer born inside a graph would live in that graph's memory
            raise RuntimeError("a teacher's output buffer must be allocated before capture")
        buf = torch.empty_like(value)
    return buf.copy_(value)


class Engine:
    """Steps a group of jobs that share `train` and `test` loaders (see the module's docstring)."""

    def __init__(self, jobs: list[Job], train: DeviceLoader, test: DeviceLoader, device: torch.device,
                 precision: str, world: distributed.World | None = None):
        self.jobs, self.train, self.test, self.device, self.world = jobs, train, test, device, world
        self.graphs = graphs.supported(device) and all(j.cfg.graphs for j in jobs)
        self.autocast = autocast_for(device, precision)
        self.batch = _blank(train)  # the fixed buffers every step reads
        self.eval_batch = _blank(test)
        self.teacher_steps: dict[tuple[int, str], Captured] = {}
        self.teacher_outputs: dict[int, TeacherOutputs] = {}
        self.teacher_timers: dict[int, SegmentTimer] = {}
        # This engine's own stream for teacher warm-ups and captures (a stream shared with a live
        # engine could see this group's graphs released while the other's still run).
        self.teacher_stream = graphs.new_stream(device) if self.graphs else None
        self._needs: list[tuple[Teacher, str]] = []
        self._states: dict[int, RunState] = {id(job): self._attach(job) for job in jobs}

    def state(self, job: Job) -> RunState:
        """The engine's device state of one of its jobs."""
        return self._states[id(job)]

    def _attach(self, job: Job) -> RunState:
        s = job.s
        stream = graphs.new_stream(self.device) if self.graphs else None
        s.optimizer.param_groups[0]["lr"] = s.lr  # fused SGD reads the tensor: no host value in the step
        trainable: nn.Module = _Trainable(s, self.batch, job.teacher)
        if self.world is not None:
            from torch.nn.parallel import DistributedDataParallel

            # Built on the stream its graph will be captured on (PyTorch's CUDA-graph notes on DDP).
            with torch.cuda.stream(stream) if stream is not None else nullcontext():
                trainable = DistributedDataParallel(
                    trainable, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        state = RunState(RunningSums(self.device), (torch.zeros((), device=self.device),
                                                    torch.zeros((), device=self.device, dtype=torch.long)),
                         stream, trainable)

        def train_body() -> None:
            with s.autocast():
                logits, terms = state.trainable()
            loss = sum(terms.values())
            if s.scaler is None:
                loss.backward()
                s.optimizer.step()
            else:  # fp16: scaled backward; fused SGD unscales, and skips a step whose gradients overflowed
                s.scaler.scale(loss).backward()
                s.scaler.step(s.optimizer)
                s.scaler.update()
            state.sums.add(loss.detach(), logits.detach(), self.batch.y, terms)

        def eval_body() -> None:
            batch, (loss_sum, correct) = self.eval_batch, state.eval_sums
            with torch.no_grad(), s.autocast():
                logits = s.student_fn(batch.x)
            loss = F.cross_entropy(logits.float(), batch.y, reduction="none")
            loss_sum += (loss * batch.mask).sum()
            correct += ((logits.argmax(1) == batch.y) & batch.mask).sum()

        state.train_step = Captured(train_body, self.device, enabled=self.graphs,
                                    name=f"the training step of {job.name}", stream=stream,
                                    before=lambda: s.optimizer.zero_grad(set_to_none=True),
                                    warmup=DDP_WARMUP_CALLS if self.world is not None else WARMUP_CALLS)
        state.eval_step = Captured(eval_body, self.device, enabled=self.graphs, name=f"the evaluation of {job.name}",
                                   stream=stream)
        return state

    # ---- training --------------------------------------------------------------------------------

    def start_epoch(self, jobs: list[Job], epoch: int) -> None:
        for job in jobs:
            job.s.student.train()
            job.s.method.train()
            job.s.method.start_epoch(epoch)
            self.state(job).sums.reset()
        self._needs = self._teacher_needs(jobs)

    def step(self, jobs: list[Job], batch: Batch, lrs: list[float]) -> None:
        """One optimisation step of every job on `batch`, with the given learning rates."""
        self.batch.copy_(batch)
        for teacher, needs in self._needs:
            self._run_teacher(teacher, needs)
        states = [self.state(job) for job in jobs]
        with graphs.fan_out([state.stream for state in states]) as streams:
            for job, state, lr, stream in zip(jobs, states, lrs, streams, strict=True):
                with stream:
                    job.s.lr.fill_(lr)
                    with job.timer("step"):
                        state.train_step(job.s.method.graph_key())
                state.lr = lr

    def _teacher_needs(self, jobs: list[Job]) -> list[tuple[Teacher, str]]:
        """Each teacher the jobs read this epoch, with "features" if any of its students needs them."""
        needs: dict[int, tuple[Teacher, str]] = {}
        for job in jobs:
            need = job.s.method.teacher_needs() if job.teacher is not None else None
            if need is None:
                continue
            _, known = needs.get(id(job.teacher), (job.teacher, "logits"))
            needs[id(job.teacher)] = (job.teacher, "features" if "features" in (need, known) else "logits")
        return list(needs.values())

    def _run_teacher(self, teacher: Teacher, needs: str) -> None:
        key = (id(teacher), needs)
        if key not in self.teacher_steps:
            out = self.teacher_outputs.setdefault(id(teacher), TeacherOutputs())

            def forward() -> None:
                with self.autocast():
                    feats, logits = teacher.run(self.batch.x, features=needs == "features")
                out.write(feats, logits)

            self.teacher_steps[key] = Captured(forward, self.device, enabled=self.graphs, stream=self.teacher_stream,
                                               name=f"the forward of teacher {teacher.run_id or ''}".strip())
            self.teacher_timers.setdefault(id(teacher), SegmentTimer(self.device))
        with self.teacher_timers[id(teacher)]("teacher"):
            self.teacher_steps[key]()
        out = self.teacher_outputs[id(teacher)]
        # Features only when this batch's were computed: a student reading older ones would be wrong.
        teacher.hold(self.batch, out.features if needs == "features" else None, out.logits)

    def teacher_seconds(self, job: Job) -> float:
        """The job's share of its teacher's forward time in this engine so far: the teacher's time split
        evenly among the students it serves here (`kdlab.accounting` adds the share before a resume)."""
        if job.teacher is None or id(job.teacher) not in self.teacher_timers:
            return 0.0
        students = sum(j.teacher is job.teacher for j in self.jobs)
        return self.teacher_timers[id(job.teacher)].collect().get("teacher", 0.0) / students

    # ---- evaluation ------------------------------------------------------------------------------

    def evaluate(self, jobs: list[Job]) -> dict[str, tuple[float, float]]:
        """Mean cross-entropy and accuracy (percent) of each job's student on the test split, in eval
        mode, keyed by run id."""
        states = [self.state(job) for job in jobs]
        for job, state in zip(jobs, states, strict=True):
            job.s.student.eval()
            for t in state.eval_sums:
                t.zero_()
        for batch in self.test.epoch(0):
            self.eval_batch.copy_(batch)
            with graphs.fan_out([state.stream for state in states]) as streams:
                for job, state, stream in zip(jobs, states, streams, strict=True):
                    with stream, job.timer("eval"):
                        state.eval_step()
        out = {}
        for job, state in zip(jobs, states, strict=True):
            job.s.student.train()
            loss_sum, correct = (distributed.all_reduce(t.clone()) for t in state.eval_sums)
            out[job.run_id] = (float(loss_sum) / self.test.n, float(correct) / self.test.n * 100)
        return out

    def read(self, job: Job) -> dict[str, Any]:
        """The job's running sums so far this epoch (over all processes of the run), and its training
        accuracy (percent): each step covered one whole (global) batch."""
        state = self.state(job)
        sums = state.sums.read(self.world.size if self.world is not None else 1)
        sums["acc"] = sums["correct"] / max(1, sums["steps"] * self.train.batch_size) * 100
        sums["lr"] = state.lr
        return sums

    # ---- the end of a group ----------------------------------------------------------------------

    def close(self) -> None:
        """Release every graph of the group (steps, evaluations, teachers, retired ones), the buffers
        they read and the teachers' held outputs; then return the memory to the device. The jobs keep
        their records (history, timing); their models stay with the caller until it drops them."""
        if self.graphs:
            graphs.synchronize()  # nothing may still be replaying when a graph is released
        states = [self.state(job) for job in self.jobs]
        steps = [c for state in states for c in (state.train_step, state.eval_step) if c is not None]
        for step in (*steps, *self.teacher_steps.values()):
            step.release()
        for job, state in zip(self.jobs, states, strict=True):
            graphs.return_stream(self.device, state.stream)
            state.train_step = state.eval_step = state.trainable = state.stream = None
            if job.teacher is not None:
                job.teacher.drop()
        graphs.return_stream(self.device, self.teacher_stream)
        self.teacher_steps.clear()
        self.teacher_outputs.clear()
        self._needs = []
        self.batch = self.eval_batch = self.teacher_stream = None
        if self.graphs:
            graphs.release_memory()


class _Trainable(nn.Module):
    """The student and the method's own parts as one module whose call is one training forward on the
    engine's fixed batch: what DistributedDataParallel wraps, so that every trained parameter's
    gradient is averaged over the processes. (The batch and teacher are not call arguments: DDP
    would copy the batch, and the teacher's outputs are shared by the batch's identity.)"""

    def __init__(self, s: Setup, batch: Batch, teacher: Teacher | None):
        super().__init__()
        self.student_fn, self.method = s.student_fn, s.method
        self._batch, self._teacher = batch, teacher

    def forward(self) -> tuple[Tensor, dict[str, Tensor]]:
        return self.method(self.student_fn, self._batch, self._teacher)


def _blank(loader: DeviceLoader) -> Batch:
    """Fixed buffers shaped like the loader's batches (memory format included)."""
    return next(loader.epoch(0)).clone()
