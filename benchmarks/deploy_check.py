"""Issue 11's targets on a finished study (run through deploy_check.sh, which sets the defaults).

For resnet18_half distilled from resnet18 (and one other family, vgg16 by default), seed 0, KD:
prune + KD recovery + int8 with `kdlab compress` (QAT when int8 loses more than a point), then

1. top-1 of the pruned + int8 model (ONNX Runtime) against the fp32 student's (its ONNX export),
   with the pruned model at most 50% of the student's FLOPs: within 1.0 point;
2. its ONNX Runtime latency at batch 1 on one thread against PyTorch eager fp32 on one thread:
   at least 4x lower than the student's and 10x lower than the teacher's (batch 64 and all
   threads are measured and written too);
3. its ONNX file at least 6x smaller than the fp32 student's.

Writes OUT/deploy-<date>.json (every figure, the CPU's name, the library versions) and prints a
short summary. Nothing is assumed: a figure that was not measured is absent.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from kdlab.deploy.compress import CompressSpec, compress
from kdlab.deploy.export import deploy_versions
from kdlab.deploy.files import model_file
from kdlab.deploy.latency import cpu_model, onnx_latency, torch_latency
from kdlab.deploy.runs import deploy_info, load_run_model
from kdlab.deploy.runtime import dataset_of
from kdlab.store import Store


def find_pair(store: Store, model: str) -> tuple:
    """The newest finished KD run of MODEL at half its teacher's width, from a ce MODEL teacher, seed 0."""
    runs = store.runs("done")
    by_id = {r.run_id: r for r in runs}
    found = [(r, by_id[r.config["teacher"]]) for r in runs
             if r.config["model"] == model and r.config["method"] == "kd" and r.config["seed"] == 0
             and r.config.get("teacher") in by_id and by_id[r.config["teacher"]].config["model"] == model
             and by_id[r.config["teacher"]].config["method"] == "ce"
             and abs(r.config["width"] * 2 - by_id[r.config["teacher"]].config["width"]) < 1e-9]
    if not found:
        sys.exit(f"deploy_check: no finished {model}_half <- {model} kd run (seed 0) in {store.root}")
    return found[-1]


def latency(entries: list[dict], runtime: str, batch: int, threads: int) -> float | None:
    return next((e["median_ms"] for e in entries if e["runtime"] == runtime and e["device"] == "cpu"
                 and e["batch"] == batch and e["threads"] == threads), None)


def check(store: Store, model: str, args: argparse.Namespace) -> dict:
    student, teacher = find_pair(store, model)
    spec = CompressSpec(prune=args.prune, int8=True, epochs=args.epochs, calibration=512,
                        overrides={"compile": "none"})  # a few epochs: compiling would cost more than it saves
    t0 = time.perf_counter()
    steps = {s.what: s.record for s in compress(store, student, spec, data_dir=args.data_dir, quiet=True,
                                                silent=True, log=lambda m: print(f"  {m}", flush=True))}
    compress_s = time.perf_counter() - t0
    fp32, pruned_fp32 = steps["student fp32"], steps["pruned fp32"]
    final = steps.get("pruned qat int8") or steps["pruned int8"]
    info = {k: deploy_info(store.root, r.run_id) for k, r in (("fp32", fp32), ("pruned", pruned_fp32),
                                                             ("final", final))}
    batches, threads = [1, 64], sorted({1, args.threads})
    images = dataset_of(student.config, args.data_dir).test.images
    shape = (images.shape[3], images.shape[1], images.shape[2])
    eager_student = torch_latency(load_run_model(student, store.root), shape, batches, threads, args.seconds)
    # The teacher only at batch 1 (the target's setting): its batch 64 on one thread takes seconds per call.
    eager_teacher = torch_latency(load_run_model(teacher, store.root), shape, [1], threads, args.seconds)
    ort_final = onnx_latency(model_file(store, final), batches, threads, args.seconds)
    ort_student = onnx_latency(model_file(store, fp32), batches, threads, args.seconds)
    b1 = {name: latency(entries, runtime, 1, 1) for name, entries, runtime in (
        ("final_ort", ort_final, "onnxruntime"), ("student_eager", eager_student, "torch-eager"),
        ("teacher_eager", eager_teacher, "torch-eager"))}
    flops_ratio = info["pruned"]["flops"] / info["fp32"]["flops"]
    drop = fp32.final_acc - final.final_acc
    speedup_student = b1["student_eager"] / b1["final_ort"]
    speedup_teacher = b1["teacher_eager"] / b1["final_ort"]
    size_ratio = info["fp32"]["size_bytes"] / info["final"]["size_bytes"]
    return {
        "student": student.run_id, "teacher": teacher.run_id, "final_model": final.run_id,
        "qat_used": "pruned qat int8" in steps, "compress_seconds": compress_s, "recovery_epochs": args.epochs,
        "prune_ratio": args.prune, "runs": {k: r.run_id for k, r in steps.items()},
        "accuracy": {"student_fp32_torch": student.final_acc, "student_fp32_onnx": fp32.final_acc,
                     "pruned_fp32_onnx": pruned_fp32.final_acc, "final_int8_onnx": final.final_acc,
                     "teacher_torch": teacher.final_acc},
        "flops": {"student": info["fp32"]["flops"], "pruned": info["pruned"]["flops"], "ratio": flops_ratio},
        "size_bytes": {"student_fp32_onnx": info["fp32"]["size_bytes"], "final_int8_onnx": info["final"]["size_bytes"],
                       "ratio": size_ratio},
        "latency": {"final_int8_onnxruntime": ort_final, "student_fp32_onnxruntime": ort_student,
                    "student_fp32_torch_eager": eager_student, "teacher_fp32_torch_eager": eager_teacher},
        "batch1_one_thread_ms": b1,
        "targets": {
            "1_flops_at_most_50pct": flops_ratio <= 0.5, "1_within_1_point": drop <= 1.0, "1_points_lost": drop,
            "2_4x_vs_student_eager": speedup_student >= 4, "2_speedup_vs_student": speedup_student,
            "2_10x_vs_teacher_eager": speedup_teacher >= 10, "2_speedup_vs_teacher": speedup_teacher,
            "3_6x_smaller": size_ratio >= 6, "3_size_ratio": size_ratio},
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs_dir")
    p.add_argument("--families", default="resnet18,vgg16")
    p.add_argument("--prune", type=float, default=0.3)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--seconds", type=float, default=1.0)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--data-dir")
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args()
    store = Store(args.runs_dir, create=False)
    t0 = time.perf_counter()
    results = {}
    for model in args.families.split(","):
        print(f"deploy_check: {model}_half <- {model}", flush=True)
        results[model] = check(store, model, args)
    store.close()
    summary = {"cpu": cpu_model(), "versions": deploy_versions(), "wall_seconds": time.perf_counter() - t0,
               "when": datetime.now(timezone.utc).isoformat(timespec="seconds"), "settings": vars(args),
               "families": results}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"deploy-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}.json"
    path.write_text(json.dumps(summary, indent=2))
    print(f"\nCPU: {summary['cpu']}; {summary['wall_seconds']:.0f} s in all; wrote {path}")
    for model, r in results.items():
        t, a, b1, size = r["targets"], r["accuracy"], r["batch1_one_thread_ms"], r["size_bytes"]
        met = {1: t["1_within_1_point"] and t["1_flops_at_most_50pct"],
               2: t["2_4x_vs_student_eager"] and t["2_10x_vs_teacher_eager"], 3: t["3_6x_smaller"]}
        verdict = {k: "met" if v else "NOT met" for k, v in met.items()}
        print(f"{model}_half: pruned {r['prune_ratio']:g} to {r['flops']['ratio']:.0%} of the FLOPs, "
              f"{r['recovery_epochs']} recovery epochs{', QAT' if r['qat_used'] else ''}")
        print(f"  1. acc {a['final_int8_onnx']:.2f}% vs fp32 student {a['student_fp32_onnx']:.2f}% "
              f"({-t['1_points_lost']:+.2f}): {verdict[1]}")
        print(f"  2. b1 one thread: int8 ORT {b1['final_ort']:.3f} ms, student eager {b1['student_eager']:.3f} ms "
              f"({t['2_speedup_vs_student']:.1f}x), teacher eager {b1['teacher_eager']:.3f} ms "
              f"({t['2_speedup_vs_teacher']:.1f}x): {verdict[2]}")
        print(f"  3. size {size['final_int8_onnx'] / 1e6:.2f} MB vs {size['student_fp32_onnx'] / 1e6:.2f} MB "
              f"({t['3_size_ratio']:.1f}x): {verdict[3]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
