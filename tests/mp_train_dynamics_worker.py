"""Run by tests/test_train_dynamics.py under torchrun (and alone, as the reference): tiny runs recording train dynamics.

mp_train_dynamics_worker.py OUT PER_DEVICE_BATCH N [N ...]   one run per N (training examples) in OUT/n<N>
"""

import json
import sys

from tiny import args, no_dropout, setup

from hf_entropy_callback import ClassWeightedTrainer


def main(out, per_device_batch, sizes):
    for n in sizes:
        tok, model, _, train = setup("bert", n=n)
        trainer = ClassWeightedTrainer(
            model=no_dropout(model),
            args=args(f"{out}/n{n}", per_device_train_batch_size=per_device_batch, num_train_epochs=2),
            train_dataset=train,
            processing_class=tok,
            record_train_dynamics=True,
        )
        trainer.train()
        if trainer.is_world_process_zero():
            with open(f"{out}/n{n}/world.json", "w") as fh:
                json.dump({"world_size": trainer.args.world_size}, fh)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), [int(v) for v in sys.argv[3:]])
