"""Distillation methods: each trains a tiny pair, adapters fit every zoo pair, bad args fail clearly."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from kdlab.configure import build_config
from kdlab.data.loader import Batch
from kdlab.errors import UserError
from kdlab.methods import METHODS
from kdlab.models import create_model, list_models
from kdlab.teacher import Teacher

TINY = 1 / 16
CLASSES = 4
NEW_METHODS = ("dkd", "fitnets", "at", "rkd", "sp", "dml", "byot", "eskd", "combo")
FEATURE_METHODS = ("fitnets", "at", "rkd", "sp")
COMBO_ARGS = {"parts": {"kd": 1.0, "rkd": 1.0}}


def make_batch(n: int = 16, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    return Batch(torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, CLASSES, (n,), generator=g),
                 torch.arange(n), torch.zeros(n, dtype=torch.long))


def config(method: str, method_args: dict[str, Any] | None = None, teacher: bool = True, **extra: Any):
    overrides = {"method": method, "width": TINY, "method_args": method_args or {}, **extra}
    if teacher:
        overrides["teacher"] = "test-teacher"
    return build_config("smoke", "resnet18", overrides=overrides)


def needs_teacher(method: str, args: dict[str, Any] | None = None) -> bool:
    if method == "combo":
        return any(METHODS[p].needs_teacher for p in (args or COMBO_ARGS)["parts"])
    return METHODS[method].needs_teacher


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: these models are tiny, and on a busy 2-core machine two threads that
    spin-wait for each other made the module ~9x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


_TEACHERS: dict[str, torch.nn.Module] = {}


def trained_teacher(name: str) -> torch.nn.Module:
    """A teacher fitted for a few steps on the test batch: informative logits, calibrated BatchNorm."""
    if name not in _TEACHERS:
        torch.manual_seed(1)
        model = create_model(name, TINY, CLASSES)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        batch = make_batch()
        for _ in range(10):
            loss = F.cross_entropy(model(batch.x), batch.y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        _TEACHERS[name] = model
    return _TEACHERS[name]


class CountingTeacher(Teacher):
    """A Teacher that counts its forward passes."""

    def __init__(self, model: torch.nn.Module):
        super().__init__(model)
        self.calls = 0

    def logits(self, batch):
        self.calls += 1
        return super().logits(batch)

    def features(self, batch):
        self.calls += 1
        return super().features(batch)


def train(method_name: str, teacher_name: str | None, args: dict[str, Any] | None = None, steps: int = 20):
    """`steps` SGD steps of a resnet18 student (and the method's own parts) on one fixed batch."""
    args = COMBO_ARGS if method_name == "combo" and args is None else args
    teach = needs_teacher(method_name, args)
    cfg = config(method_name, args, teacher=teach)
    torch.manual_seed(0)
    student = create_model("resnet18", TINY, CLASSES)
    teacher_model = trained_teacher(teacher_name) if teach else None
    method = METHODS[method_name](cfg, student, teacher_model)
    teacher = CountingTeacher(teacher_model) if teach else None
    params = [*student.parameters(), *method.parameters()]
    opt = torch.optim.SGD(params, lr=0.02, momentum=0.9)
    batch = make_batch()
    history = []
    student.train()
    method.train()
    method.start_epoch(0)
    for _ in range(steps):
        logits, terms = method(student, batch, teacher)
        assert logits.shape == (len(batch.y), CLASSES)
        assert all(v.dim() == 0 and v.dtype == torch.float32 for v in terms.values()), terms
        loss = sum(terms.values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(float(loss.detach()))
    return history, method, teacher


def decreased(history: list[float]) -> bool:
    return sum(history[-3:]) / 3 < sum(history[:3]) / 3


@pytest.mark.parametrize("name", NEW_METHODS)
def test_method_trains_resnet_to_resnet(name: str) -> None:
    history, method, teacher = train(name, "resnet18")
    assert all(map(lambda v: v == v and abs(v) != float("inf"), history))
    assert decreased(history), history
    if teacher is not None:  # the teacher runs once per step, never twice
        assert teacher.calls == len(history)
        # The teacher is read in __init__ only: none of its weights is the method's.
        own = {id(p) for p in method.parameters()}
        assert not any(id(p) in own for p in teacher.model.parameters())


@pytest.mark.parametrize("name", [*FEATURE_METHODS, "combo"])
def test_feature_method_trains_across_families(name: str) -> None:
    args = {"parts": {"at": 1.0, "sp": 1.0}} if name == "combo" else None
    history, _, _ = train(name, "densenet121", args)
    assert decreased(history), history


@pytest.mark.parametrize(("teacher_name", "student_name"), list(itertools.product(list_models(), list_models())))
def test_feature_adapters_fit_every_zoo_pair(teacher_name: str, student_name: str) -> None:
    torch.manual_seed(0)
    teacher_model = create_model(teacher_name, TINY, CLASSES)
    student = create_model(student_name, TINY, CLASSES)
    teacher = Teacher(teacher_model)
    batch = make_batch(4)
    names = [*FEATURE_METHODS, "byot"] if teacher_name == student_name else FEATURE_METHODS
    for name in names:
        teach = METHODS[name].needs_teacher
        cfg = config(name, teacher=teach, model=student_name)
        method = METHODS[name](cfg, student, teacher_model if teach else None)
        logits, terms = method(student, batch, teacher if teach else None)
        loss = sum(terms.values())
        assert torch.isfinite(loss), (name, terms)
        loss.backward()
        assert logits.shape == (4, CLASSES)
    # DML's peers may be of another family than the student.
    method = METHODS["dml"](config("dml", {"peer_model": teacher_name}, teacher=False, model=student_name),
                            student, None)
    sum(method(student, batch, None)[1].values()).backward()


def test_methods_run_under_bf16_autocast_with_float32_terms() -> None:
    teacher_model = trained_teacher("resnet18")
    teacher = Teacher(teacher_model)
    batch = make_batch(8)
    for name in NEW_METHODS:
        args = COMBO_ARGS if name == "combo" else None
        teach = needs_teacher(name, args)
        student = create_model("resnet18", TINY, CLASSES)
        method = METHODS[name](config(name, args, teacher=teach), student, teacher_model if teach else None)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _, terms = method(student, batch, teacher if teach else None)
        assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in terms.values()), (name, terms)


# --- schedules -------------------------------------------------------------------------------------


def test_dkd_warms_up_linearly() -> None:
    student, teacher_model = create_model("resnet18", TINY, CLASSES), trained_teacher("resnet18")
    method = METHODS["dkd"](config("dkd", {"warmup": 0.5}, epochs=8), student, teacher_model)  # 4 epochs
    batch, teacher = make_batch(8), Teacher(teacher_model)
    student.eval()  # the same outputs at every epoch: only the ramp changes
    nckd = []
    for epoch in range(6):
        method.start_epoch(epoch)
        nckd.append(float(method(student, batch, teacher)[1]["nckd"].detach()))
    assert [v / nckd[-1] for v in nckd] == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0, 1.0], rel=1e-5)


def test_dkd_warm_up_scales_with_the_run() -> None:
    student, teacher_model = create_model("resnet18", TINY, CLASSES), trained_teacher("resnet18")

    def ramps(epochs: int) -> list[float]:
        method = METHODS["dkd"](config("dkd", epochs=epochs), student, teacher_model)
        out = []
        for epoch in range(epochs):
            method.start_epoch(epoch)
            out.append(float(method.ramp))  # a buffer: the value a replayed graph reads
        return out

    paper = ramps(240)  # the authors' run: full weight from their 20th epoch
    assert paper[18] < 1.0 and paper[19] == 1.0 and paper[0] == pytest.approx(1 / 20)
    short = ramps(15)  # 20 epochs would be the whole run; 1/12 of it is 1.25 epochs
    assert short[0] == pytest.approx(0.8) and short[1:] == [1.0] * 14


def test_eskd_stops_kd_and_the_teacher_after_stop_epoch() -> None:
    cfg = config("eskd", {"stop_epoch": 2}, epochs=4)
    student, teacher_model = create_model("resnet18", TINY, CLASSES), trained_teacher("resnet18")
    method = METHODS["eskd"](cfg, student, teacher_model)
    teacher, batch = CountingTeacher(teacher_model), make_batch(8)
    for epoch, distilling in [(0, True), (1, True), (2, False), (3, False)]:
        method.start_epoch(epoch)
        calls = teacher.calls
        logits, terms = method(student, batch, teacher)
        assert (float(terms["kd"].detach()) > 0) is distilling
        assert teacher.calls == calls + distilling
        ce = F.cross_entropy(logits.detach().float(), batch.y)
        assert float(terms["ce"].detach()) == pytest.approx(float((cfg.alpha if distilling else 1.0) * ce))
    assert METHODS["eskd"](config("eskd", epochs=7), student, teacher_model).stop_epoch == 3


# --- combo -----------------------------------------------------------------------------------------


class CountingStudent(torch.nn.Module):
    """Wraps a student and counts its forward passes, whichever entry point is used."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.model(x)

    def forward_with_features(self, x):
        self.calls += 1
        return self.model.forward_with_features(x)


@pytest.mark.parametrize("parts", [{"kd": 1.0, "rkd": 1.0}, {"kd": 1.0, "dkd": 0.5}, {"at": 1.0, "fitnets": 2.0},
                                   {"dml": 1.0, "byot": 1.0}])
def test_combo_runs_student_and_teacher_once(parts: dict[str, float]) -> None:
    args = {"parts": parts}
    teach = needs_teacher("combo", args)
    student = create_model("resnet18", TINY, CLASSES)
    teacher_model = trained_teacher("resnet18") if teach else None
    method = METHODS["combo"](config("combo", args, teacher=teach), student, teacher_model)
    counting, teacher = CountingStudent(student), CountingTeacher(teacher_model) if teach else None
    logits, terms = method(counting, make_batch(8), teacher)
    assert counting.calls == 1
    assert teacher is None or teacher.calls == 1
    assert all(k == "ce" or k.split(".", 1)[0] in parts for k in terms)
    sum(terms.values()).backward()


def test_combo_equals_weighted_parts_with_ce_counted_once() -> None:
    student, teacher_model = create_model("resnet18", TINY, CLASSES), trained_teacher("resnet18")
    student.eval()
    batch, teacher = make_batch(8), Teacher(teacher_model)
    combo = METHODS["combo"](config("combo", {"parts": {"rkd": 2.0, "kd": 0.5}}), student, teacher_model)
    with torch.no_grad():
        _, terms = combo(student, batch, teacher)
        _, kd_terms = METHODS["kd"](config("kd"), student, teacher_model)(student, batch, teacher)
        _, rkd_terms = METHODS["rkd"](config("rkd"), student, teacher_model)(student, batch, teacher)
    assert float(terms["kd.kd"]) == pytest.approx(0.5 * float(kd_terms["kd"]), rel=1e-5)
    assert float(terms["rkd.rkd_angle"]) == pytest.approx(2.0 * float(rkd_terms["rkd_angle"]), rel=1e-5)
    # CE once, at the largest weight: max(0.5 * alpha, 2.0 * 1.0) = 2.
    assert float(terms["ce"]) == pytest.approx(2.0 * float(rkd_terms["ce"]), rel=1e-5)
    order = [k.split(".")[0] for k in terms if k != "ce"]
    assert order == sorted(order)  # parts run in sorted order, whatever order they were written in
    summed = METHODS["combo"](config("combo", {"parts": {"rkd": 2.0, "kd": 0.5}, "ce_once": False}), student,
                              teacher_model)
    with torch.no_grad():
        _, terms = summed(student, batch, teacher)
    assert "ce" not in terms and {"kd.ce", "rkd.ce"} <= set(terms)


def test_combo_passes_part_args_and_epochs() -> None:
    args = {"parts": {"dkd": 1.0, "rkd": 1.0}, "args": {"rkd": {"angle": 0}, "dkd": {"warmup": 0.25}}}
    method = METHODS["combo"](config("combo", args), create_model("resnet18", TINY, CLASSES),
                              trained_teacher("resnet18"))
    assert method.parts["rkd"].args["angle"] == 0
    method.start_epoch(5)
    assert method.parts["dkd"].ramp == 1.0 and method.parts["dkd"].epoch == 5


# --- bad arguments ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("method", "args", "message"), [
    ("dkd", {"gamma": 1.0}, "has no argument 'gamma'"),
    ("dkd", {"beta": -1.0}, "beta must be >= 0"),
    ("dkd", {"warmup": 20}, "warmup is a fraction of the run's epochs"),
    ("fitnets", {"beta": -100}, "beta must be >= 0"),
    ("fitnets", {"kernel": 5}, "kernel must be 1 or 3"),
    ("fitnets", {"teacher_stage": "middle"}, "teacher_stage must be an integer or null"),
    ("at", {"beta": -1}, "beta must be >= 0"),
    ("at", {"p": 0}, "p must be > 0"),
    ("rkd", {"angle": -50}, "angle must be >= 0"),
    ("rkd", {"distance": "25"}, "distance must be a number"),
    ("sp", {"gamma": -3000}, "gamma must be >= 0"),
    ("sp", {"stages": []}, "stages must be a non-empty list"),
    ("dml", {"peers": 0}, "peers must be >= 1"),
    ("dml", {"peer_model": "alexnet"}, "unknown peer_model 'alexnet'"),
    ("dml", {"kl": -1}, "kl must be >= 0"),
    ("byot", {"alpha": 2}, "alpha must be in [0, 1]"),
    ("byot", {"lambda": -0.03}, "lambda must be >= 0"),
    ("eskd", {"stop_epoch": -1}, "stop_epoch must be >= 0"),
    ("eskd", {"stop_epoch": 3}, "KD would never stop"),
    ("combo", {}, "needs parts"),
    ("combo", {"parts": {"kd": 1, "mixup": 1}}, "unknown part 'mixup'"),
    ("combo", {"parts": {"combo": 1}}, "unknown part 'combo'"),
    ("combo", {"parts": {"kd": 1, "rkd": -1}}, "weight of part 'rkd' must be >= 0"),
    ("combo", {"parts": {"kd": 1}, "args": {"rkd": {}}}, "not one of the parts"),
    ("combo", {"parts": {"kd": 1, "rkd": 1}, "args": {"rkd": {"angle": -1}}}, "angle must be >= 0"),
    ("combo", {"parts": {"kd": 1, "rkd": 1}, "args": {"rkd": {"colour": 1}}}, "has no argument 'colour'"),
    ("combo", {"parts": {"kd": 1}, "weights": {}}, "has no argument 'weights'"),
])
def test_bad_method_args_are_user_errors(method: str, args: dict[str, Any], message: str) -> None:
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace("]", r"\]")):
        config(method, args)


@pytest.mark.parametrize("method", ["dkd", "fitnets", "at", "rkd", "sp", "eskd"])
def test_teacher_methods_need_a_teacher(method: str) -> None:
    with pytest.raises(UserError, match="needs a teacher"):
        config(method, teacher=False)


def test_combo_with_a_teacher_part_needs_a_teacher() -> None:
    with pytest.raises(UserError, match="needs a teacher"):
        config("combo", {"parts": {"dml": 1, "kd": 1}}, teacher=False)
    config("combo", {"parts": {"dml": 1, "byot": 1}}, teacher=False)


def test_stage_beyond_the_model_is_a_user_error() -> None:
    student, teacher_model = create_model("resnet18", TINY, CLASSES), create_model("vgg16", TINY, CLASSES)
    METHODS["fitnets"](config("fitnets", {"teacher_stage": 4}), student, teacher_model)  # vgg16 has 5
    with pytest.raises(UserError, match=r"student \(resnet18\) has 4 stages"):
        METHODS["fitnets"](config("fitnets", {"student_stage": 4}), student, teacher_model)
    with pytest.raises(UserError, match="has 4 stages"):
        METHODS["sp"](config("sp", {"stages": [0, -5]}), student, teacher_model)


def test_every_new_method_documents_itself() -> None:
    for name in NEW_METHODS:
        cls = METHODS[name]
        assert cls.paper and cls.__module__.startswith("kdlab.methods.")
        doc = (cls.__doc__ or "") + (__import__(cls.__module__, fromlist=["x"]).__doc__ or "")
        assert all(arg in doc for arg in cls.defaults), (name, cls.defaults)
