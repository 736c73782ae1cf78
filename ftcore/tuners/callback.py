"""SparseDeltaCallback: SpIEL's drop-and-regrow inside ``transformers.Trainer``. A module of its own because
importing the Trainer's callback machinery costs seconds and ~140 MB: ftcore loads it only when asked."""

from typing import Optional

from transformers import TrainerCallback

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
