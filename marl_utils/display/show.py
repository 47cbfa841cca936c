"""What the notebooks print for a person to read: settings with their meanings, left-aligned tables that wrap
instead of cutting text, sizes in MB, and a word on why the tiny model's text looks broken (notebooks 01-08).

    settings_table(profile, ["ppo_steps", "ppo_init_kl_coef"])    # setting | value | what it means
    readable_table(summary, caption="held-out evaluation, 128 prompts")   # numbers rounded, text in full
    samples_table({"prompt": [...], "after": [...]}, model=model) # + the tiny-model note as its caption

A pandas DataFrame shown as is cuts long text with "...", right-aligns it, and prints floats with six
decimals. These return a pandas Styler instead (HTML: the browser wraps long text at spaces, never mid-word),
so the cell's last line shows it.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import re

__all__ = ["settings_table", "field_meanings", "readable_table", "samples_table", "evaluation_table", "megabytes",
           "share", "TINY_TEXT_NOTE", "tiny_text_note", "parameter_count"]

TINY_MODEL_PARAMETERS = 20_000_000
"""Below this many parameters a model's samples get `TINY_TEXT_NOTE` (the tiny profile's base has ~1M)."""

TINY_TEXT_NOTE = ("These texts come from a model of about {millions:.1f}M parameters (GPT-2 has 124M), trained "
                  "for about a minute on a small synthetic review corpus, with a tokenizer trained on that corpus. "
                  "Words that run together or break off (\"boredteran\") are what a model that small writes: read "
                  "the scores and how the words lean (positive or negative), not the spelling. The gpt2-imdb "
                  "profile writes English.")


def _first_sentence(text: str) -> str:
    text = " ".join(text.split())
    match = re.search(r"(?<=[a-z0-9)\]`'\"])\.\s", text + " ")
    return text[:match.start() + 1] if match else text


def _attribute_docstrings(cls) -> dict[str, str]:
    """{field: docstring} of a class whose fields carry a string literal after them (Profile, PPOConfig)."""
    found = {}
    for klass in reversed(getattr(cls, "__mro__", [cls])):
        try:
            tree = ast.parse(inspect.getsource(klass))
        except (OSError, TypeError, SyntaxError):
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for statement, following in zip(body, body[1:]):
            if isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name) \
                    and isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant) \
                    and isinstance(following.value.value, str):
                found[statement.target.id] = following.value.value
    return found


def field_meanings(obj) -> dict[str, str]:
    """{setting: its first sentence} from the dataclass's `help` metadata (transformers/TRL configs) or from the
    docstring under each field (marl_utils' Profile and PPOConfig)."""
    cls = obj if isinstance(obj, type) else type(obj)
    meanings = {name: _first_sentence(doc) for name, doc in _attribute_docstrings(cls).items()}
    if dataclasses.is_dataclass(cls):
        for field in dataclasses.fields(cls):
            help_text = field.metadata.get("help") if field.metadata else None
            if help_text and field.name not in meanings:
                meanings[field.name] = _first_sentence(help_text)
    return meanings


def _left_aligned(styler, caption=None):
    styler = styler.set_properties(**{"text-align": "left", "white-space": "pre-wrap", "vertical-align": "top"})
    styler = styler.set_table_styles([{"selector": "th", "props": [("text-align", "left")]},
                                      {"selector": "caption", "props": [("text-align", "left"),
                                                                        ("caption-side", "top")]}])
    return styler.set_caption(caption) if caption else styler


def settings_table(obj, names, *, meanings: dict | None = None, caption: str | None = None):
    """The settings `names` of `obj` (a Profile, PPOConfig, SFTConfig...): name, value, and a one-line meaning.

    `meanings` adds or replaces meanings (for a setting whose class documents none).
    """
    import pandas as pd

    known = {**field_meanings(obj), **(meanings or {})}
    if type(obj).__name__ == "Profile":   # its ppo_* sizes fill the PPOConfig fields of the same name (pipeline.py)
        from ..ppo.config import PPOConfig

        config = field_meanings(PPOConfig)
        known = {**{name: config.get(name[4:], config.get(name)) for name in names
                    if name.startswith("ppo_") and (name[4:] in config or name in config)}, **known}
    rows = [{"setting": name, "value": _plain(getattr(obj, name)), "meaning": known.get(name, "")} for name in names]
    return _left_aligned(pd.DataFrame(rows).style.hide(axis="index"), caption)


def _plain(value) -> str:
    """A setting's value as a person writes it: 0.002 not 0.0020000000949949026, enums by their value."""
    value = getattr(value, "value", value)
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple, set)):
        return ", ".join(_plain(v) for v in value) if value else "none"
    return str(value)


def readable_table(data, *, digits: int = 2, caption: str | None = None, index: bool = True):
    """A DataFrame (or what builds one) as a left-aligned table: floats to `digits` decimals, text in full,
    wrapped at spaces; `caption` above it (say where the numbers come from)."""
    import pandas as pd

    frame = data if isinstance(data, pd.DataFrame) else pd.DataFrame(data)
    styler = frame.style.format(precision=digits, thousands=",", na_rep="-")
    if not index:
        styler = styler.hide(axis="index")
    return _left_aligned(styler, caption)


def parameter_count(model) -> int:
    """Parameters of a model object, or of the safetensors files in a saved model's folder (no weights load)."""
    from pathlib import Path

    if hasattr(model, "parameters"):
        return sum(p.numel() for p in model.parameters())
    import math

    from safetensors import safe_open

    total = 0
    for file in sorted(Path(model).glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            total += sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    return total


def tiny_text_note(model=None, parameters: int | None = None) -> str | None:
    """`TINY_TEXT_NOTE` for a model (object or saved folder) under `TINY_MODEL_PARAMETERS` parameters (None for a
    larger one)."""
    if parameters is None and model is not None:
        parameters = parameter_count(model)
    if parameters is None or parameters >= TINY_MODEL_PARAMETERS:
        return None
    return TINY_TEXT_NOTE.format(millions=parameters / 1e6)


def samples_table(columns, *, model=None, parameters: int | None = None, caption: str | None = None,
                  digits: int = 2):
    """Sampled texts side by side, in full and left-aligned; with a small model (`model`: an object or its saved
    folder), the note on its broken words joins the caption."""
    note = tiny_text_note(model, parameters)
    caption = " ".join(part for part in (caption, note) if part) or None
    return readable_table(columns, digits=digits, caption=caption, index=False)


def megabytes(n_bytes: float) -> float:
    """Bytes as MB (10^6 bytes, as disks and downloads count them), rounded to what a reader compares: 0.01 MB
    from 1 MB up (3363456 -> 3.36), three significant digits below (41216 -> 0.0412)."""
    mb = n_bytes / 1e6
    return round(mb, 2) if abs(mb) >= 1 else float(f"{mb:.3g}")


def share(part: float, whole: float) -> str:
    """'3.2%' (two significant digits below 10%, '100%' for the whole): a part's share, for a table."""
    ratio = 100 * part / whole
    return f"{ratio:.2g}%" if ratio < 10 else f"{ratio:.0f}%"


EVAL_COLUMNS = {"reward_mean": "reward (score)", "kl_mean": "KL to reference (nats per response)",
                "response_tokens_mean": "tokens per response", "eos_frac": "share ending with EOS",
                "distinct_2": "distinct-2"}
"""`PPOTrainer.evaluate` keys -> the column a reader sees (the same units as the live board's panels)."""


def evaluation_table(results: dict, *, prompts: int | None = None, digits: int = 2):
    """One row per held-out evaluation (`{"before": trainer.evaluate(...), "after": ...}`), readable columns,
    and a caption that says these numbers are the held-out prompts', not the training batches' of the board."""
    import pandas as pd

    rows = {label: {EVAL_COLUMNS[k]: v for k, v in result.items() if k in EVAL_COLUMNS}
            for label, result in results.items()}
    where = f"{prompts} held-out prompts" if prompts else "the held-out prompts"
    caption = (f"Held-out evaluation: {where}, never trained on, one sampled response each (the live board "
               "above shows the training batches, another sample: its last values differ).")
    return readable_table(pd.DataFrame(rows).T, digits=digits, caption=caption)
