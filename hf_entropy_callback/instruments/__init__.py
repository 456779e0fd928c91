"""Opt-in mechanistic instruments, measured at the tracker's tracking points.

Named in one list (`EntropyTracker(..., instruments=["grad_alignment", "grad_norms", "drift"])`,
`AnnotationEntropyCallback(..., instruments=...)`, `run_glue_entropy.py --instruments ...`):

- ``grad_alignment``: cosine similarity of the summed gradients of the clean, ambiguous and contested
  examples (pairwise), and each category's mean-gradient norm (`gradients.py`);
- ``grad_norms``: each example's gradient norm, with mean and median per category (`gradients.py`);
- ``drift``: attention entropy per layer, linear CKA of the representations to the first point per
  layer, and the norm of the weight update per module (`drift.py`).

What they share:

- **Sample.** A fixed, seeded, stratified sample of the first tracked set (the training set):
  `instrument_sample_per_category` examples of each entropy category (`None`: the whole set), drawn
  with `instrument_seed` (`sample.py`). The same examples at every point and on any number of processes.
- **Loss as trained** (gradient instruments): `InstrumentLoss` — class-weighted cross-entropy, KL to
  the annotator distribution, or plain cross-entropy; the callback reads it from a
  `ClassWeightedTrainer` (`loss.py`). Gradients are over the trainable parameters only.
- **Training is not disturbed.** Everything runs inside the tracking point, in eval mode (no dropout;
  the train / eval mode is put back), gradients by `torch.autograd.grad` / `torch.func` (never into
  `.grad`), `requires_grad` untouched, and every random stream (torch CPU and CUDA, numpy, `random`)
  saved and restored around the pass, so a run's weights are bit for bit those of a run without them.
- **Processes.** The sample is sharded over processes like the tracking pass; per-example values are
  gathered, category gradients summed with `all_reduce`; every process ends with the same values and
  the world process zero writes them.
- **Storage** (`hf_entropy_callback.runs`): ``instruments.parquet`` (one row per value per point:
  point, step, instrument, quantity, group, component, value), ``instrument_examples.parquet``
  (per-example values), the run config's ``"instruments"`` entry (names, sample_per_category, seed,
  loss, attention, ...), and in checkpoints ``instrument_reference.npz`` (drift's first-point
  reference, so a resumed run continues it); `load_run` returns the tables as `Run.instruments` and
  `Run.instrument_examples`.
"""

from ..tracker import DEFAULT_SAMPLE_PER_CATEGORY  # defined there: the tracker needs it at import time
from .base import INSTRUMENT_BATCH_SIZE, INSTRUMENTS, Instrument, Measurement, PointContext, parse_instruments
from .drift import linear_cka, readout_attention_entropy, update_norms
from .loss import LOSS_KINDS, InstrumentLoss
from .sample import stratified_sample
from .suite import InstrumentSuite

__all__ = [
    "DEFAULT_SAMPLE_PER_CATEGORY",
    "INSTRUMENTS",
    "INSTRUMENT_BATCH_SIZE",
    "LOSS_KINDS",
    "Instrument",
    "InstrumentLoss",
    "InstrumentSuite",
    "Measurement",
    "PointContext",
    "linear_cka",
    "parse_instruments",
    "readout_attention_entropy",
    "stratified_sample",
    "update_norms",
]
