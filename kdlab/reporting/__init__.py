"""The study's report: the paper's Tables 1-3 from the runs store, with statistics over seeds.

A *study* is the runs of one store that share dataset, preset and recipe (any setting that differs
from the preset's value for that model, such as `epochs=5`, starts a study of its own, so runs
trained differently are never averaged together). Within a study:

- The study's *teacher width* W is the preset's teacher width (`config.PRESET_WIDTHS`: 1.0 for
  paper and fast, 0.125 for smoke). Display names are relative to it: `resnet18` at W,
  `resnet18_half` at W/2, `resnet18@0.25` otherwise.
- A finished cross-entropy (`ce`) run is a *teacher* (role T) if some run names it as its
  teacher or its width is at least W; otherwise it is a *student-alone baseline* (role S). Using
  the preset's width rather than the largest width found keeps the roles right in a partial
  store that holds only students.
- A run of any other method is a distillation run. With a teacher (a run id, looked up in the
  store for its model and width, or `file:<sha>` for an external checkpoint) it fills the cell
  (student, teacher, method) of Tables 2-3; without one (online or self-distillation) it fills
  (student, method). Method labels carry non-default hyperparameters: `kd(T=4, alpha=0.5)`.
- A distillation run of seed s is paired with the ce run of the same student model, width and
  seed: accuracy gain = KD final_acc - alone final_acc, tested with a paired t-test over seeds.

Headline accuracy is always the last epoch's test accuracy (final_acc); best_acc selects on the
test set and only appears as an extra. Runs that are not finished never enter a table; they are
listed under `missing`, with the runs the grid's shape expects but the store does not hold.

One module per job: `model` (the dataclasses), `naming` (names, roles, recipes), `build` (the
tables from the store), `statistics` (per row and cell), `text` and `sections` (formatting),
`to_markdown`, `to_latex`, `to_csv`, `to_json` (one per format), `output` (files and the API).
"""

from kdlab.reporting.build import build_report
from kdlab.reporting.model import Cell, Missing, ModelRow, NoiseRow, Report, Study
from kdlab.reporting.naming import display_name, method_label
from kdlab.reporting.output import FILE_NAMES, FORMATS, render, report, write_report
from kdlab.reporting.sections import noise_summary
from kdlab.reporting.text import fmt_duration, fmt_gain, fmt_summary, fmt_time
from kdlab.reporting.to_latex import latex_escape

__all__ = [
    "FILE_NAMES", "FORMATS", "Cell", "Missing", "ModelRow", "NoiseRow", "Report", "Study", "build_report",
    "display_name", "fmt_duration", "fmt_gain", "fmt_summary", "fmt_time", "latex_escape", "method_label",
    "noise_summary", "render", "report", "write_report",
]
