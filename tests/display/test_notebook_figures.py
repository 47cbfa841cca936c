"""Live curves, the PPO diagnostics figure and the roles diagram (marl_utils.display.live_curves, plotting, roles_diagram)."""

import base64

import matplotlib
import pytest

matplotlib.use("Agg")

from marl_utils import MarlInputError
from marl_utils.display.live_curves import LiveCurves
from marl_utils.display.plots import PPO_DIAGNOSTICS, plot_ppo_diagnostics
from marl_utils.display.roles_diagram import ROLES, draw_roles_diagram


def entry(step, reward):
    return {"step": step, "env/score_mean": reward, "objective/kl": 0.5 * step, "sample/response": "text"}


def test_text_fallback_prints_every_n_steps_and_a_summary(capsys):
    board = LiveCurves({"env/score_mean": "reward", "objective/kl": "KL"}, every=2, total=5, notebook=False)
    for step in range(1, 6):
        board(None, entry(step, step / 10))
    board.close()
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split(",")[0].split(".")[0] for line in lines[::3]] == ["step 2/5", "step 4/5", "done: 5 steps in 0 s"]
    assert lines[3] == "step 4/5, 0.00 s per step. Last training batch:"
    assert lines[4].split() == ["reward", "0.40"] and lines[5].split() == ["KL", "2.00"]
    assert lines[7].split() == ["reward", "0.10", "->", "0.50"] and lines[8].split() == ["KL", "0.50", "->", "2.50"]
    board.close()  # a second close prints nothing more
    assert capsys.readouterr().out == ""


def test_figure_holds_every_point_of_every_series():
    board = LiveCurves(["env/score_mean", "objective/kl"], every=100, notebook=False)
    for step in range(1, 8):
        board.callback("policy_pos")(None, entry(step, 1.0))
        board.callback("policy_neg")(None, {"step": step, "env/score_mean": -1.0, "objective/kl": float("nan")})
    fig = board.figure
    reward_axis, kl_axis = fig.axes
    assert [len(line.get_xdata()) for line in reward_axis.lines] == [7, 7]
    assert [len(line.get_xdata()) for line in kl_axis.lines] == [7]  # NaN values are not drawn
    assert [t.get_text() for t in reward_axis.get_legend().get_texts()] == ["policy_pos", "policy_neg"]


def test_notebook_mode_updates_one_display_in_place(monkeypatch):
    shown, updated = [], []

    class Handle:
        def update(self, obj, **kwargs):
            updated.append(obj)

    def fake_display(obj, raw=False, display_id=None):
        shown.append(obj)
        return Handle()

    import IPython.display

    monkeypatch.setattr(IPython.display, "display", fake_display)
    board = LiveCurves({"env/score_mean": "reward"}, every=3, total=9, smooth=3, notebook=True)
    for step in range(1, 10):
        board(None, entry(step, step))
    board.close()
    assert len(shown) == 2  # one text line and one picture, created once
    assert len(updated) == 2 * 3  # steps 6 and 9, then close: text + picture each time
    texts = [u["text/plain"] for u in updated if isinstance(u, dict)]
    assert texts[0].startswith("step 6/9") and texts[-1].startswith("done: 9 steps")
    assert all(img.data.startswith(b"\x89PNG") for img in updated if not isinstance(img, dict))


def test_replay_of_a_saved_run_draws_once_and_says_where_it_came_from(monkeypatch):
    shown, updated = [], []

    class Handle:
        def update(self, obj, **kwargs):
            updated.append(obj)

    def fake_display(obj, **kwargs):
        shown.append(obj)
        return Handle()

    import IPython.display

    monkeypatch.setattr(IPython.display, "display", fake_display)
    board = LiveCurves({"loss": "training loss"}, every=2, notebook=True)
    board.replay([{"step": 10 * i, "loss": 3.0 - 0.1 * i} for i in range(1, 26)], seconds=63.4)
    assert board.closed and len(shown) == 2 and updated == []   # one picture and one summary, no redraw per row
    summary = shown[0]["text/plain"]
    assert summary.startswith("from the saved run: 250 steps (the stage took 63 s). Saved training logs"), summary
    assert "2.90 -> 0.50" in summary


def test_hf_callback_feeds_logged_rows():
    from transformers import TrainerControl, TrainerState, TrainingArguments

    board = LiveCurves({"loss": "training loss"}, every=100, notebook=False)
    callback = board.hf_callback(close_at_end=False)
    state = TrainerState()
    state.max_steps, state.global_step = 30, 10
    args = TrainingArguments(output_dir="unused", report_to="none")
    callback.on_train_begin(args, state, TrainerControl())
    callback.on_log(args, state, TrainerControl(), logs={"loss": 2.5, "learning_rate": 1e-3})
    state.global_step = 20
    callback.on_log(args, state, TrainerControl(), logs={"train_runtime": 3.0})
    assert board.total == 30
    assert board.points[""]["loss"] == [(10.0, 2.5)]
    assert board.status_text().startswith("step 20/30")  # the Trainer's step, not the number of logged rows
    assert "Latest training log:" in board.status_text()   # a logged row is a mean over steps, not one batch


def test_status_is_a_left_aligned_table_that_fits_a_notebook_line():
    board = LiveCurves({"env/score_mean": "reward (score)", "objective/kl": "KL to reference (nats per response)"},
                       every=100, total=50, notebook=False)
    for step in range(1, 4):
        board.callback("8-bit")(None, {"step": step, "env/score_mean": -0.0679 * step, "objective/kl": 4.56 * step})
        board.callback("4-bit")(None, {"step": step, "env/score_mean": 1.8123, "objective/kl": float("nan")})
    head, columns, reward, kl = board.status_text(final=True).splitlines()
    assert head.startswith("done: 3 steps in") and head.endswith("Training batches, first step -> last step:")
    assert columns.split() == ["8-bit", "4-bit"]
    assert reward.split() == ["reward", "(score)", "-0.07", "->", "-0.20", "1.81", "->", "1.81"]
    assert kl.split()[-4:] == ["4.56", "->", "13.7", "-"]   # 2 decimals below 10, 1 below 100; "-": no value
    assert reward.index("-0.07") == kl.index("4.56") == columns.index("8-bit")   # columns line up, left-aligned
    assert max(len(line) for line in board.status_text(final=True).splitlines()) <= 90


def test_rounded_for_reading():
    from marl_utils.display.live_curves import rounded_for_reading

    assert [rounded_for_reading(v) for v in (-0.0679, -0.001, 9.994, 10, 11.44, 123.4, 3363456)] == \
        ["-0.07", "0.00", "9.99", "10.0", "11.4", "123", "3,363,456"]


def test_save_writes_a_png(tmp_path):
    board = LiveCurves(["env/score_mean"], notebook=False)
    board.add({"env/score_mean": 1.0})
    board.save(tmp_path / "curves.png")
    assert (tmp_path / "curves.png").read_bytes().startswith(b"\x89PNG")


def test_bad_settings_are_refused():
    with pytest.raises(MarlInputError, match="at least one metric"):
        LiveCurves([])
    with pytest.raises(MarlInputError, match="positive integer"):
        LiveCurves(["loss"], every=0)


def test_ppo_diagnostics_draws_the_six_numbers_with_target_kl_and_beta():
    keys = [*PPO_DIAGNOSTICS, "objective/kl_coef"]
    history = [{key: 0.1 * step for key in keys} for step in range(10)]
    fig = plot_ppo_diagnostics(history, target_kl=6.0)
    titles = [ax.get_title() for ax in fig.axes if ax.get_visible() and ax.get_title()]
    assert titles == list(PPO_DIAGNOSTICS.values())
    assert set(PPO_DIAGNOSTICS) == {"objective/kl", "ppo/policy/approxkl", "ppo/policy/clipfrac", "objective/entropy",
                                    "ppo/val/explained_variance", "ppo/loss/value"}
    kl_ax = fig.axes[0]
    assert any(list(line.get_ydata()) == [6.0, 6.0] for line in kl_ax.get_lines()), "no target-KL line"
    beta_ax = [ax for ax in fig.axes if ax is not kl_ax and ax.bbox.bounds == kl_ax.bbox.bounds]
    assert beta_ax and list(beta_ax[0].get_lines()[0].get_ydata()) == [r["objective/kl_coef"] for r in history]
    with pytest.raises(MarlInputError, match="ppo/loss/value"):
        plot_ppo_diagnostics([{k: 1.0 for k in keys if k != "ppo/loss/value"}])
    with pytest.raises(MarlInputError, match="objective/kl_coef"):
        plot_ppo_diagnostics([{k: 1.0 for k in PPO_DIAGNOSTICS}])


def test_roles_diagram_draws_four_roles_on_one_base(tmp_path):
    fig = draw_roles_diagram(save_to=tmp_path / "roles.png")
    texts = [t.get_text() for t in fig.axes[0].texts]
    for role, *_ in ROLES:
        assert role in texts
    assert sum("ONE base model" in t for t in texts) == 1  # drawn once, under every role
    assert any("adapters\ndisabled" == t for t in texts)
    png = (tmp_path / "roles.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(base64.b64encode(png)) > 10_000
