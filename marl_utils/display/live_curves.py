"""Training curves redrawn in place while a run trains, like d2l's ProgressBoard (notebooks 01-05).

    board = LiveCurves({"env/score_mean": "reward", "objective/kl": "KL (nats per response)"}, every=5, total=50)
    trainer.train(prompts, callback=board, progress=False)  # board(trainer, entry) after every step
    board.close()                            # last redraw and a summary: first -> last value
    board.replay(saved_log_rows, seconds=60)   # a run finished earlier (a reused stage): drawn once, closed

    trainer.add_callback(board.hf_callback())  # the same for a transformers Trainer (SFTTrainer, RewardTrainer)
    trainer.train(prompts, callback=board.callback("8-bit"))   # one series per run, several runs on one board

In Jupyter the board is ONE output that is replaced every `every` steps: a short status table (step, seconds
per step, the last training batch's value of every panel, one column per series) over a PNG of the curves.
Nothing is a widget, so a saved notebook reopens with the last picture and table instead of "Error displaying
widget" (what a tqdm widget bar leaves behind: see `marl_utils.infra.progress`; hence `progress=False` above, the
board is the progress display). Outside a notebook (a script, a terminal, CI logs) it prints the table every
`every` steps instead, and draws nothing until `close()` or `figure` asks.

`add(values, series=...)` takes any dict of floats (a trainer's history entry, a `Trainer` log row); keys
the board does not plot are ignored. Several series (e.g. two policies) share each panel, one colour each.
"""

from __future__ import annotations

import io
import math
import time

from ..infra.errors import MarlInputError

__all__ = ["LiveCurves", "rounded_for_reading"]


def rounded_for_reading(value: float) -> str:
    """A value with the digits a reader can use: 2 decimals below 10, 1 below 100, none above (-0.0679 -> -0.07)."""
    size = abs(value)
    text = f"{value:.2f}" if size < 10 else f"{value:.1f}" if size < 100 else f"{value:,.0f}"
    return "0.00" if text == "-0.00" else text


class LiveCurves:
    """One panel per metric key, one line per series, redrawn every `every` steps (see the module docstring).

    panels: {history key: panel title} or a list of keys. total: steps expected (shown as "step 5/50").
    smooth: moving-average window drawn over the raw (faint) curve. notebook: None = detect Jupyter.
    """

    def __init__(self, panels, *, every: int = 5, total: int | None = None, smooth: int = 1, title: str | None = None,
                 notebook: bool | None = None):
        panels = dict(panels) if isinstance(panels, dict) else {key: key for key in panels}
        if not panels:
            raise MarlInputError("LiveCurves needs at least one metric key to plot, e.g. ['env/score_mean']")
        if not isinstance(every, int) or every < 1:
            raise MarlInputError(f"LiveCurves(every={every!r}) must be a positive integer (redraw every N steps)")
        from .plots import _in_notebook

        self.panels, self.every, self.total, self.smooth, self.title = panels, every, total, smooth, title
        self.notebook = _in_notebook() if notebook is None else notebook
        self.points: dict[str, dict[str, list[tuple[float, float]]]] = {}  # series -> key -> [(step, value)]
        self._counts: dict[str, int] = {}
        self._start = None
        self._last_step = 0.0  # the largest step seen: a Trainer logs every `logging_steps` steps, not every step
        # where the numbers of the status table come from (a Trainer logs the mean of the steps since its last log)
        self.source = ("Last training batch", "Training batches, first step -> last step")
        self._text_handle = self._image_handle = None
        self._figure = None
        self.closed = False
        self._replaying = False
        self._saved_run: dict | None = None   # set by replay(): the curves are a finished run's, not this one's

    # ------------------------------------------------------------------------------------------ feeding
    def add(self, values: dict, *, step=None, series: str = "") -> None:
        """Record one step of `series`; redraw when the last series has reached a multiple of `every` steps."""
        if self._start is None:
            self._start = time.perf_counter()
        count = self._counts.get(series, 0) + 1
        self._counts[series] = count
        x = float(step) if step is not None else float(count)
        self._last_step = max(self._last_step, x)
        curves = self.points.setdefault(series, {key: [] for key in self.panels})
        for key in self.panels:
            value = values.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                curves[key].append((x, float(value)))
        # with several series (two policies taking turns) redraw once all of them have reported the step
        if not self._replaying and series == list(self._counts)[-1] and count % self.every == 0:
            self._show()

    def replay(self, rows, *, seconds: float | None = None, series: str = "") -> None:
        """Draw a finished run from its saved log rows (a stage reused from disk), once, then close the board.

        The summary says the curves come from the saved run and how long that stage took (`seconds`, when it
        recorded it), not how long the replay took.
        """
        self.source = ("Saved training log", "Saved training logs, first -> last")
        self._saved_run = {"seconds": seconds}
        self._replaying = True
        try:
            for row in rows:
                self.add(row, step=row.get("step"), series=series)
        finally:
            self._replaying = False
        self.close()

    def __call__(self, trainer, entry: dict) -> None:
        """`PPOTrainer.train(callback=board)`: one history entry per step. Returns None: never stops training."""
        self.add(entry, step=entry.get("step"))

    def callback(self, series: str):
        """A `PPOTrainer.train` callback that draws its run as `series` (several runs on one board, notebook 04)."""
        def add_entry(trainer, entry: dict) -> None:
            self.add(entry, step=entry.get("step"), series=series)

        return add_entry

    def hf_callback(self, series: str = "", close_at_end: bool = True):
        """A transformers `TrainerCallback` that feeds every logged row (loss, accuracy, ...) to this board."""
        from transformers import TrainerCallback

        board = self

        class _LiveCurvesCallback(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):
                board.source = ("Latest training log", "Training logs, first -> last")
                if board.total is None and state.max_steps > 0:
                    board.total = state.max_steps

            def on_log(self, args, state, control, logs=None, **kwargs):
                if state.is_world_process_zero and logs:
                    board.add(logs, step=state.global_step, series=series)

            def on_train_end(self, args, state, control, **kwargs):
                if close_at_end and state.is_world_process_zero:
                    board.close()

        return _LiveCurvesCallback()

    # ------------------------------------------------------------------------------------------ output
    def status_text(self, final: bool = False) -> str:
        """Where the run is, and the latest value of every panel and series, as a small left-aligned table:

            step 25/50, 0.81 s per step. Last training batch:
                                                  8-bit   4-bit
            reward (score)                        1.23    1.10
            KL to reference (nats per response)   4.56    12.4

        (final: "done: 50 steps in 41 s. Training batches, first step -> last step:" and "first -> last").
        One row per panel and one column per series, each line short enough not to wrap in a notebook; the
        numbers are the training batches' (the held-out evaluation a notebook prints after is another sample).
        """
        series = list(self.points)
        steps = int(self._last_step)
        seconds = time.perf_counter() - self._start if self._start is not None else 0.0
        if final and self._saved_run is not None:
            took = self._saved_run["seconds"]
            took = f" (the stage took {took:.0f} s)" if took is not None else ""
            head = f"from the saved run: {steps} steps{took}. {self.source[1]}:"
        elif final:
            head = f"done: {steps} steps in {seconds:.0f} s. {self.source[1]}:"
        else:
            where = f"step {steps}/{self.total}" if self.total else f"step {steps}"
            head = f"{where}, {seconds / max(steps, 1):.2f} s per step. {self.source[0]}:"
        rows = [[""] + series] if any(series) else []
        for key, title in self.panels.items():
            cells = []
            for name in series:
                curve = self.points[name][key]
                if not curve:
                    cells.append("-")
                elif final:
                    cells.append(f"{rounded_for_reading(curve[0][1])} -> {rounded_for_reading(curve[-1][1])}")
                else:
                    cells.append(rounded_for_reading(curve[-1][1]))
            if any(cell != "-" for cell in cells):
                rows.append([title] + cells)
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))] if rows else []
        lines = ["   ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
        return "\n".join([head] + lines)

    @property
    def figure(self):
        """The curves as a matplotlib Figure (not a pyplot one, so Jupyter does not show it a second time)."""
        self._figure = self._draw()
        return self._figure

    def save(self, path) -> None:
        """Write the current curves as a PNG (atomically: a killed run leaves the old file or the new one)."""
        from .plots import _save

        _save(self.figure, path)

    def close(self) -> None:
        """Draw the last state and replace the status line by a summary (printed outside a notebook)."""
        if self.closed:
            return
        self.closed = True
        if not self.points:
            return
        if self.notebook:
            self._update_notebook(self.status_text(final=True))
        else:
            print(self.status_text(final=True), flush=True)

    def _show(self) -> None:
        if self.notebook:
            self._update_notebook(self.status_text())
        else:
            print(self.status_text(), flush=True)

    def _update_notebook(self, line: str) -> None:
        from IPython.display import Image, display

        png = self._png()
        text = {"text/plain": line}
        if self._text_handle is None:
            self._text_handle = display(text, raw=True, display_id=True)
            self._image_handle = display(Image(data=png), display_id=True)
        else:
            self._text_handle.update(text, raw=True)
            self._image_handle.update(Image(data=png))

    def _png(self) -> bytes:
        buffer = io.BytesIO()
        self.figure.savefig(buffer, format="png", dpi=80)
        return buffer.getvalue()

    def _draw(self):
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        from .plots import _smooth, set_count_axis

        n = len(self.panels)
        fig = Figure(figsize=(max(3.6 * n, 5.4), 2.9))  # one panel alone is drawn wider, not as a thumbnail
        FigureCanvasAgg(fig)
        axes = fig.subplots(1, n, squeeze=False)[0]
        colors = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown"]
        for ax, (key, title) in zip(axes, self.panels.items()):
            for color, name in zip(colors * 4, self.points):
                curve = self.points[name][key]
                if not curve:
                    continue
                xs, ys = [p[0] for p in curve], [p[1] for p in curve]
                smoothed = self.smooth > 1 and len(ys) >= self.smooth
                ax.plot(xs, ys, color=color, alpha=0.35 if smoothed else 1.0, label=None if smoothed else (name or None))
                if smoothed:
                    ax.plot(xs, _smooth(ys, self.smooth), color=color, label=name or None)
            set_count_axis(ax, key)
            if self.total:
                ax.set_xlim(0, self.total)
            ax.set_title(title, fontsize=10)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
        if len(self.points) > 1:
            axes[0].legend(fontsize=8)
        if self.title:
            fig.suptitle(self.title, fontsize=11)
        fig.tight_layout()
        return fig
