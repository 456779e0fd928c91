"""The study's report: tables and figures of "Annotation Entropy Predicts Per-Example Learning
Dynamics in LoRA Fine-Tuning", built from run directories.

    hf-entropy-report RUNS_DIR [RUNS_DIR ...] --out REPORT_DIR      # installed console script
    python -m analysis RUNS_DIR ... --out REPORT_DIR                 # the same, from the repository

Modules: `conditions` (finding runs, grouping them into conditions), `loading` (one pass over the
runs into tidy tables), `tables` (the study's tables, from the library's statistics in
`hf_entropy_callback.dynamics`, `.inference` and `.agreement`, pingouin and scipy), `instruments`
(the tables of the tracker's opt-in instruments: gradient alignment, gradient norms, drift), `figures`
(matplotlib panels that draw into an axes), `report` (the report folder) and `cli` (the command).
Imports matplotlib and pingouin, so it is a subpackage the rest of the library never loads.
"""

from .loading import Options, Study, load_study
from .report import Report, ReportFolderError, build_report

__all__ = ["Options", "Report", "ReportFolderError", "Study", "build_report", "load_study"]
