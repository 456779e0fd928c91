"""Run by tests/test_multiprocess.py under torchrun: a tiny tracked training run on CPU processes."""

import json
import sys

import torch
from tiny import args, no_dropout, setup, validation_copy
from transformers import TrainerCallback

from hf_entropy_callback import AnnotationEntropyCallback, ClassWeightedTrainer


class FirstGrads(TrainerCallback):
    """Saves the first step's (DDP-averaged) gradients of the classifier."""

    def __init__(self, path):
        self.path, self.done = path, False

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if not self.done and state.is_world_process_zero:
            torch.save(
                {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}, self.path
            )
        self.done = True


def main(out, per_device_batch, n_tracked):
    tok, model, raw, train = setup("bert", n=50)
    # an odd-sized tracked set, so a distributed sampler would have to pad it
    val = validation_copy(raw, n_tracked)
    # All instruments on a sample of 5 per category (15 examples: shards of 8 and 7 under two processes).
    cb = AnnotationEntropyCallback(
        {"train": raw, "validation": val},
        track_every=2,
        batch_size=4,
        instruments=["grad_alignment", "grad_norms", "drift"],
        instrument_sample_per_category=5,
    )
    trainer = ClassWeightedTrainer(
        model=no_dropout(model),
        args=args(out, per_device_train_batch_size=per_device_batch, num_train_epochs=2, max_grad_norm=0.0),
        # 48 = 3 x (2 x 8): no process gets a padded training batch, so both runs see the same data
        train_dataset=train.select(range(48)),
        processing_class=tok,
        callbacks=[FirstGrads(f"{out}/first_grads.pt"), cb],
    )
    trainer.train()
    if trainer.is_world_process_zero():
        with open(f"{out}/world.json", "w") as fh:
            json.dump({"world_size": trainer.args.world_size, "process_index": trainer.args.process_index}, fh)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
