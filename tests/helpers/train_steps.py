"""Train the tiny model for a few steps and print the global (all-rank mean) loss of every step as JSON.

    python tests/helpers/train_steps.py DATA --devices 2 --strategy ddp --batch 4 --steps 3
Used by tests/test_training_distributed.py; a script because Lightning's DDP relaunches the command per rank.
"""
import argparse
import json
import os
import signal

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint

from cod.training.data import ImageDataModule
from cod.training.module import CoDTrainingModule


class GlobalLoss(L.Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.losses.append(float(trainer.strategy.reduce(outputs["loss"].detach(), reduce_op="mean")))


class Crash(L.Callback):
    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            print("LOSSES " + json.dumps(trainer.callbacks[0].losses), flush=True)
            os.kill(os.getpid(), signal.SIGKILL)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("data")
    ap.add_argument("--devices", type=int, default=1)
    ap.add_argument("--strategy", default="auto", help="auto, ddp or fsdp2")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--ckpt-dir", help="save last.ckpt here every --ckpt-every steps")
    ap.add_argument("--ckpt-every", type=int, default=3)
    ap.add_argument("--kill-at", type=int, help="SIGKILL this process after this step (a crash)")
    ap.add_argument("--resume", help="checkpoint to resume from")
    ap.add_argument("--export", help="write the EMA model directory here after training")
    a = ap.parse_args()
    L.seed_everything(0, verbose=False)
    module = CoDTrainingModule("tiny-pixel", lr=1e-3, null_condition_p=0.0, ema_decay=0.9)
    data = ImageDataModule(a.data, size=32, batch_size=a.batch)
    record = GlobalLoss()
    callbacks = [record]
    if a.ckpt_dir:
        callbacks.append(ModelCheckpoint(dirpath=a.ckpt_dir, every_n_train_steps=a.ckpt_every, save_last=True))
    if a.kill_at:
        callbacks.append(Crash(a.kill_at))
    strategy = a.strategy
    if strategy == "fsdp2":  # FSDP2 on CPU processes over gloo
        from cod.training.fsdp import FSDP2Strategy

        strategy = FSDP2Strategy()
    trainer = L.Trainer(accelerator="cpu", devices=a.devices, strategy=strategy, max_steps=a.steps,
                        logger=False, enable_checkpointing=bool(a.ckpt_dir), enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0, callbacks=callbacks,
                        use_distributed_sampler=False)
    trainer.fit(module, data, ckpt_path=a.resume)
    if a.export:
        module.save_model_dir(a.export)  # every rank: FSDP2 gathers the shards
    if trainer.is_global_zero:
        print("LOSSES " + json.dumps(record.losses))


if __name__ == "__main__":
    main()
