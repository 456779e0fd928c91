"""The study's entry points in the repository (not installed).

    python -m analysis RUNS_DIR [RUNS_DIR ...] --out REPORT_DIR     # = hf-entropy-report
    python -m analysis.chaosnli_stats [FILE_OR_FOLDER ...]           # entropy categories of ChaosNLI files

The report itself lives in the library, `hf_entropy_callback.study`, so that an installed
package provides it (`hf-entropy-report`) without a top-level module named `analysis`.
"""
