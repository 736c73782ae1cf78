"""ftcore inside ``transformers.Trainer``: SparseDeltaCallback (SpIEL's drop-and-regrow) and
SaveAdapterCallback (the adapter at every checkpoint). A module of its own because importing the Trainer's
callback machinery costs seconds and ~140 MB: ftcore loads it only when asked."""

import os
from typing import Optional

from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..api import save_adapter

from .scheduler import SparseDeltaScheduler


class SparseDeltaCallback(TrainerCallback):
    """Runs a SparseDeltaScheduler inside ``transformers.Trainer``: ``Trainer(..., callbacks=[SparseDeltaCallback()])``.
    Takes the scheduler's keyword arguments; total_steps defaults to the Trainer's max_steps."""

    def __init__(self, **scheduler_kwargs):
        self.scheduler_kwargs = scheduler_kwargs
        self.scheduler: Optional[SparseDeltaScheduler] = None

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        options = dict(self.scheduler_kwargs)
        options.setdefault("total_steps", state.max_steps or None)
        self.scheduler = SparseDeltaScheduler(model, optimizer, **options)

    def on_step_end(self, args, state, control, **kwargs):
        if self.scheduler is not None:
            self.scheduler.step()


class SaveAdapterCallback(TrainerCallback):
    """Saves the ftcore adapter into each checkpoint the Trainer writes (``<checkpoint>/<folder>``), and at the
    end of training into ``<output_dir>/<folder>``: a few MB where the Trainer's own checkpoint holds the whole
    model. The Trainer calls callbacks on every rank, which is what save_adapter needs under FSDP and DeepSpeed
    (a collective); rank 0 writes."""

    def __init__(self, folder: str = "ftcore_adapter"):
        self.folder = folder

    def on_save(self, args, state, control, model=None, **kwargs):
        checkpoint = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        save_adapter(model, os.path.join(checkpoint, self.folder), overwrite=True)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        save_adapter(model, os.path.join(args.output_dir, self.folder), overwrite=True)
