"""What a training stage shows while it runs: one progress bar, no log tables, no setup noise (notebooks 01-02).

The Trainer prints a dict of numbers at every logging step (a growing table in Jupyter), and building a TRL
trainer or loading a model adds bars and log lines of its own. `one_progress_bar` and `quiet_trainer_setup`
leave one bar with the latest loss; the logged rows stay in `trainer.state.log_history` for the plots.
"""

from __future__ import annotations

import contextlib

from transformers import TrainerCallback


@contextlib.contextmanager
def quiet_trainer_setup():
    """Silence what building a TRL trainer (or loading / saving a model) prints that the learner did not cause and
    cannot act on: the datasets progress bars of SFTTrainer's preprocessing ("Adding EOS", "Tokenizing", ...),
    transformers' "Loading weights" / "Writing model shards" bars and its info/warning log lines (per-key load
    reports). All are restored on exit, so the stage shows one progress bar: training's.

    Library *warnings* are not filtered here but in `marl_utils.infra.known_warnings`, the one place for them. Our own
    configs use transformers' new name `activation_checkpointing`, so its `gradient_checkpointing` deprecation
    warning never appears.
    """
    from transformers.utils import logging as hf_logging

    from ..infra.progress import no_library_bars

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with no_library_bars():
            yield
    finally:
        hf_logging.set_verbosity(verbosity)


class LossProgressBar(TrainerCallback):
    """One tqdm bar over the optimizer steps, the last logged loss as its postfix (see `one_progress_bar`)."""

    def __init__(self, desc: str):
        self.desc, self.bar = desc, None

    def on_train_begin(self, args, state, control, **kwargs):
        from ..infra.progress import progress_bar  # text, never a widget that a reopened notebook cannot draw

        if state.is_world_process_zero:
            self.bar = progress_bar(total=state.max_steps, desc=self.desc)

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.bar is not None and logs and "loss" in logs:
            self.bar.set_postfix(loss=f"{float(logs['loss']):.3f}")

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def one_progress_bar(trainer, enabled: bool = True, desc: str | None = None):
    """Replace the Trainer's log printing (a dict per logging step, or a table in Jupyter) by one progress bar.

    The bar shows the latest loss; every logged row still lands in `trainer.state.log_history` for the plots.
    `enabled=False` shows nothing at all. Returns the trainer.
    """
    from transformers import PrinterCallback, ProgressCallback

    printers = (PrinterCallback, ProgressCallback)
    try:
        from transformers.utils.notebook import NotebookProgressCallback

        printers += (NotebookProgressCallback,)
    except ImportError:  # that callback needs IPython
        pass
    for callback in [c for c in trainer.callback_handler.callbacks if isinstance(c, printers)]:
        trainer.remove_callback(callback)
    if enabled:
        trainer.add_callback(LossProgressBar(desc or type(trainer).__name__.removesuffix("Trainer")))
    return trainer
