"""One adapter per row of a batch on one peft model, and logits the way the model itself makes them (notebooks 03, 06).

The fused rollout runs [policy rows; reference rows; reward rows; critic rows] through the base once, and the
critic's training forward runs [policy rows; critic rows]: every LoRA layer (and every `modules_to_save` copy)
must add the right adapter to each row. peft can do that per layer (`forward(..., adapter_names=[...])`), and
its own entry point injects the names with forward pre-hooks that it removes only when the block ends
normally: after an out-of-memory error or Ctrl-C they stay, and the next forward of the same row count runs
rows through the wrong adapters. `adapter_rows` registers the hooks itself and removes them in `finally`.

Only the policy and reference rows need logits (only policy rows during training). `causal_lm_rows` runs the
causal LM's OWN forward, so whatever it does after its last hidden state (Gemma-2's logit softcapping,
Cohere's `logit_scale`, Granite's `logits_scaling`, ...) is done exactly as `generate` does it, and cuts the
batch after the decoder body, so the vocabulary projection runs on the first `keep` rows only. The output
layer therefore sees a prefix of the rows, and gets the prefix of the adapter names.
"""

from __future__ import annotations

import contextlib

import torch

BASE = "__base__"  # peft's name for "no adapter" in a per-row batch
# ModulesToSaveWrapper routes rows only around these module types (peft 0.21, utils/other.py)
ROUTABLE_WRAPPED = (torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)


def routed_layers(peft_model) -> list:
    """Every module that adds an adapter to its rows: LoRA layers and peft's training wrappers (modules_to_save)."""
    from peft.tuners.lora import LoraLayer
    from peft.utils.other import AuxiliaryTrainingWrapper

    return [m for m in peft_model.modules() if isinstance(m, (LoraLayer, AuxiliaryTrainingWrapper))]


def output_layer_modules(peft_model) -> set:
    """ids of the output layer (lm_head) and its parts: LoRA or modules_to_save wrappers on it included."""
    output = peft_model.get_base_model().get_output_embeddings()
    return {id(m) for m in output.modules()} if output is not None else set()


def per_row_problem(peft_model, names) -> str | None:
    """None when every layer can run each of `names` on its own rows in one batch, else why not.

    Asks peft's own per-layer check (DoRA, merged adapters, layer types without per-row support) and the
    modules_to_save wrappers' module types, so the answer is what peft really does with this model.
    """
    from peft.tuners.lora import LoraLayer
    from peft.utils.other import ModulesToSaveWrapper

    names = list(dict.fromkeys(names))
    for path, module in peft_model.named_modules():
        if isinstance(module, LoraLayer):
            try:
                module._check_forward_args(torch.empty(len(names), 0), adapter_names=names)
            except (ValueError, TypeError) as err:
                dora = [n for n in names if module.use_dora.get(n, False)]
                reason = f"adapter {dora[0]!r} uses DoRA" if dora else str(err)
                return f"{path}: {reason} (peft cannot run it per row)"
        elif isinstance(module, ModulesToSaveWrapper) and any(n in module.modules_to_save for n in names):
            if not isinstance(module.original_module, ROUTABLE_WRAPPED):
                return (f"{path}: modules_to_save holds a {type(module.original_module).__name__}, which peft "
                        "cannot run per row")
    return None


def wrapper_names(module, names: list) -> list:
    """Rows of an adapter without its own copy in a modules_to_save wrapper run through the original module."""
    saved = getattr(module, "modules_to_save", None)
    if saved is None:
        return names
    return [n if n in saved else BASE for n in names]


@contextlib.contextmanager
def adapter_rows(peft_model, names_for):
    """Inside, each LoRA layer / modules_to_save wrapper adds adapter `names_for(rows, is_output)[i]` to row i.

    `names_for` gets the layer's row count and whether it is part of the output layer; the hooks are gone
    on exit, whatever happened inside.
    """
    from peft.utils.other import AuxiliaryTrainingWrapper

    output = output_layer_modules(peft_model)

    def hook_for(module):
        is_output, is_wrapper = id(module) in output, isinstance(module, AuxiliaryTrainingWrapper)

        def inject(_, args, kwargs):
            x = args[0] if args else next(iter(kwargs.values()))
            names = names_for(x.shape[0], is_output)
            kwargs["adapter_names"] = wrapper_names(module, names) if is_wrapper else names
            return args, kwargs
        return inject

    handles = []
    try:
        for module in routed_layers(peft_model):
            handles.append(module.register_forward_pre_hook(hook_for(module), with_kwargs=True))
        yield
    finally:
        for handle in handles:
            handle.remove()


def fixed_rows(names: list):
    """`names_for` of a batch laid out once: the output layer sees the first rows only (see `causal_lm_rows`).

    Some layers see the batch flattened to [B*T, H] (OPT's fc1/fc2): each sequence's T rows are contiguous
    there, so its adapter name is repeated T times.
    """
    def names_for(rows: int, is_output: bool) -> list:
        if is_output:
            return names[:rows]
        if rows != len(names) and rows % len(names) == 0:
            return [name for name in names for _ in range(rows // len(names))]
        return names
    return names_for


def causal_lm_rows(causal_lm, keep: int, logits_to_keep: int = 0, **inputs):
    """(logits [keep,K,V] of the first `keep` rows, made by the model's own forward; last hidden state [B,T,H]).

    A forward hook cuts the body's output to the first `keep` rows before the output layer: the rows that
    need no logits (reward, critic) cost no vocabulary projection. K = `logits_to_keep` (0: every position).
    """
    # the module whose output the output layer reads (OPT's CausalLM calls `model.decoder`, not `model`)
    body, captured = causal_lm.get_decoder() if hasattr(causal_lm, "get_decoder") else causal_lm.base_model, {}
    if body is causal_lm or body is None:
        raise TypeError(f"{type(causal_lm).__name__} has no separate decoder body to read hidden states from")

    def cut(_, args, output):
        if isinstance(output, tuple):
            captured["hidden"] = output[0]
            return (output[0][:keep],) + tuple(output[1:])
        captured["hidden"] = output.last_hidden_state
        output.last_hidden_state = output.last_hidden_state[:keep]
        return output

    handle = body.register_forward_hook(cut)
    try:
        out = causal_lm(**inputs, logits_to_keep=logits_to_keep, use_cache=False, return_dict=True)
    finally:
        handle.remove()
    if "hidden" not in captured:
        raise TypeError(f"{type(causal_lm).__name__}.forward does not call its decoder {type(body).__name__}: "
                        "use PPOConfig(fused_rollout=False) and critic='head' with this model")
    return out.logits, captured["hidden"]
