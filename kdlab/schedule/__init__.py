"""The grid: what runs a study is made of, and one scheduler that runs them on any executor.

    plan.py       GridSpec -> PlannedRun list (ids known before anything trains)
    scheduler.py  run_grid(): readiness, grouping, numbering, counting, the summary line
    work.py       what a training process does with a group (teachers resolved, runs claimed)
    executors/    this process, local worker processes, Ray tasks

Entry point: `run_grid(plan(spec), runs_dir, workers=..., ray=...)`, then `summary(counts)`.
"""
