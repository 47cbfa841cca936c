"""Progress bars a saved notebook can still show: plain text, never a Jupyter widget (every notebook).

In a Jupyter kernel with ipywidgets installed, `tqdm.auto` draws a widget bar. A widget's state lives in the
kernel that drew it; the saved notebook keeps only a reference to it, so the same notebook opened in a new
server (a new kernel, the next day) shows "Error displaying widget: model not found" where the bar was.
transformers ("Loading weights"), datasets (map, "Generating train split") and the Trainers all go through
`tqdm.auto`. So marl_utils:

- draws its own bars with `progress_bar`: a text tqdm (in a notebook on stdout: JupyterLab paints stderr red,
  as if something had gone wrong); the live board (`LiveCurves`) is the other progress display;
- keeps model loading and dataset preparation quiet (`no_library_bars`);
- turns any other transformers bar into such a text bar while it runs in a kernel (`text_bars_in_notebooks`,
  installed by `import marl_utils` through transformers' own tqdm hook): a bar the learner's own code causes.
"""

from __future__ import annotations

import contextlib
import sys

__all__ = ["in_jupyter_kernel", "progress_bar", "no_library_bars", "text_bars_in_notebooks"]


def in_jupyter_kernel() -> bool:
    """True inside a Jupyter kernel (JupyterLab, nbclient, Colab), where `tqdm.auto` would pick a widget."""
    shell = sys.modules.get("IPython")
    shell = shell.get_ipython() if shell is not None and hasattr(shell, "get_ipython") else None
    return shell is not None and hasattr(shell, "kernel")


def progress_bar(*args, **kwargs):
    """`tqdm(...)` that is always text: on stdout in a notebook (redrawn in place), on stderr elsewhere."""
    from tqdm.std import tqdm

    if in_jupyter_kernel():
        kwargs.setdefault("file", sys.stdout)
        kwargs.setdefault("ncols", 100)  # a notebook reports no terminal width; tqdm would guess 10 columns
    return tqdm(*args, **kwargs)


@contextlib.contextmanager
def no_library_bars():
    """No transformers ("Loading weights", "Writing model shards") or datasets (map) bars inside the block:
    what loading a model or preparing a dataset shows is noise to the learner. Restored on exit."""
    import datasets
    from transformers.utils import logging as hf_logging

    datasets_on = not datasets.are_progress_bars_disabled()
    transformers_on = hf_logging.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if datasets_on:
            datasets.enable_progress_bars()
        if transformers_on:
            hf_logging.enable_progress_bar()


def _text_bar_hook(factory, args, kwargs):
    from tqdm.auto import tqdm as auto_tqdm

    if factory is auto_tqdm and in_jupyter_kernel():
        return progress_bar(*args, **kwargs)
    return factory(*args, **kwargs)


def text_bars_in_notebooks() -> None:
    """Make transformers' bars text bars in a Jupyter kernel (a no-op elsewhere, and if a hook is already set)."""
    from transformers.utils import logging as hf_logging

    if not hasattr(hf_logging, "set_tqdm_hook"):  # transformers < 5: no hook to install
        return
    previous = hf_logging.set_tqdm_hook(_text_bar_hook)
    if previous not in (None, _text_bar_hook):  # someone else's hook: theirs wins
        hf_logging.set_tqdm_hook(previous)
