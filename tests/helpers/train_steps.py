"""Train the tiny model for a few steps and print the global (all-rank mean) loss of every step as JSON.

    python tests/helpers/train_steps.py DATA --devices 2 --strategy ddp --batch 4 --steps 3
Used by tests/test_training_distributed.py; a script because Lightning's DDP relaunches the command per rank.
"""
import argparse
import json

import lightning as L

from cod.training.data import ImageDataModule
from cod.training.module import CoDTrainingModule


class GlobalLoss(L.Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.losses.append(float(trainer.strategy.reduce(outputs["loss"].detach(), reduce_op="mean")))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("data")
    ap.add_argument("--devices", type=int, default=1)
    ap.add_argument("--strategy", default="auto")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=3)
    a = ap.parse_args()
    L.seed_everything(0, verbose=False)
    module = CoDTrainingModule("tiny-pixel", lr=1e-3, null_condition_p=0.0, ema_decay=0.9)
    data = ImageDataModule(a.data, size=32, batch_size=a.batch, shuffle=False)
    record = GlobalLoss()
    trainer = L.Trainer(accelerator="cpu", devices=a.devices, strategy=a.strategy, max_steps=a.steps,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0, callbacks=[record])
    if a.devices == 1:
        # Lightning gives each DDP rank a shuffled DistributedSampler (seed 0); the same sampler with one
        # replica yields exactly the union of the ranks' batches, step by step.
        from torch.utils.data import DataLoader, DistributedSampler

        from cod.training.data import collate_skipping

        data.setup("fit")
        loader = DataLoader(data.train_set, batch_size=a.batch, collate_fn=collate_skipping, drop_last=True,
                            sampler=DistributedSampler(data.train_set, num_replicas=1, rank=0, shuffle=True, seed=0))
        trainer.fit(module, loader)
    else:
        trainer.fit(module, data)
    if trainer.is_global_zero:
        print("LOSSES " + json.dumps(record.losses))


if __name__ == "__main__":
    main()
