"""Tables and figures of the study, built from run directories written by hf_entropy_callback.

    python -m analysis RUNS_DIR [RUNS_DIR ...] --out REPORT_DIR

Modules: `conditions` (finding runs, grouping them into conditions), `loading` (one pass over
the runs into tidy tables), `tables` (the statistics, pingouin / scipy), `figures` (matplotlib),
`report` (the report folder: index.md / index.html, tables as markdown and CSV, PNG figures),
`synthetic` (run directories with known structure, for tests and benchmarks) and
`chaosnli_stats` (entropy-category counts of ChaosNLI files).
"""
