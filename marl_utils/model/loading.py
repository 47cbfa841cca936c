"""Loading a multi-adapter model: the base (full precision, 8-bit or 4-bit), the policy adapter(s), the critic
adapters, the reward adapter with its score head, or a folder written by `save_pretrained` (notebooks 03-06).

`AutoModelForCausalLMWithValueHead.from_pretrained` is `load_model`. Every check that needs no weights runs
first (arguments, the reward adapter's files against the base's config, adapter names), so bad input fails
in a second, not after a multi-GB download.
"""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

from .critic_adapter import check_critic_supported, copy_reward_head_into, critic_adapter_name
from ..infra.errors import MarlInputError
from .quantization import disable_cpu_inference_packing, load_base, load_base_config, quantization_config_from_flags
from .reward_adapter import check_fits_base, inspect_reward_adapter, load_reward_adapter

MODEL_FILE = "marl_model.json"
CRITICS = ("head", "adapter")
CRITIC_INITS = (None, "reward_adapter")
VALUE_HEADS_FILE = "value_heads.safetensors"


def lora_config_for_causal_lm(peft_config, what: str):
    """Reject non-LoRA configs; a config without a task type becomes a causal-LM one (a copy)."""
    if getattr(peft_config, "peft_type", None) is None or str(getattr(peft_config.peft_type, "value",
                                                                      peft_config.peft_type)) != "LORA":
        raise MarlInputError(f"{what} must be a peft LoraConfig (got {type(peft_config).__name__}); the policy and "
                             "the reward model are LoRA adapters on one base")
    task = getattr(peft_config.task_type, "value", peft_config.task_type)
    if task not in (None, "CAUSAL_LM"):
        raise MarlInputError(f"{what} has task_type={task!r}; a policy adapter needs task_type='CAUSAL_LM'")
    if task is None:
        peft_config = copy.deepcopy(peft_config)
        peft_config.task_type = "CAUSAL_LM"
    return peft_config


def check_adapter_name(name, taken) -> None:
    if not isinstance(name, str) or not name or "." in name:
        raise MarlInputError(f"adapter name {name!r} is not valid: use a non-empty name without dots, e.g. 'policy_1'")
    if name in taken:
        raise MarlInputError(f"an adapter named {name!r} already exists on this model ({sorted(taken)}); pick another name")


def load_model(cls, pretrained_model_name_or_path, *, peft_config=None, reward_adapter=None,
               reward_adapter_name: str = "reward_adapter", policy_adapter_name: str = "default",
               load_in_8bit: bool = False, load_in_4bit: bool = False, quantization_config=None,
               value_head_dropout: float = 0.0, is_trainable: bool = True, critic: str = "head",
               critic_peft_config=None, critic_init: str | None = None, **kwargs):
    """Build `cls` (AutoModelForCausalLMWithValueHead) as its `from_pretrained` documents."""
    from peft import PeftModel, get_peft_model
    from transformers import PreTrainedModel

    source = pretrained_model_name_or_path
    if not 0.0 <= value_head_dropout < 1.0:
        raise MarlInputError(f"value_head_dropout={value_head_dropout} must be in [0, 1)")
    _check_critic_choice(critic, critic_peft_config, critic_init, reward_adapter)
    bnb_config = quantization_config_from_flags(load_in_8bit, load_in_4bit, quantization_config)
    saved = None
    if isinstance(source, (PreTrainedModel, PeftModel)):
        if bnb_config is not None:
            raise MarlInputError("load_in_8bit/load_in_4bit/quantization_config need a path or hub id: a model "
                                 "object is already loaded; load it quantized, or pass its folder")
        base_name = source.name_or_path if isinstance(source, PreTrainedModel) else \
            source.get_base_model().name_or_path
        base_config = source.config if isinstance(source, PreTrainedModel) else source.get_base_model().config
    else:
        saved = _read_saved_model(source)
        base_name = saved["base_model_name_or_path"] if saved else str(source)
        try:
            base_config = load_base_config(base_name, kwargs)
        except MarlInputError as err:
            if not saved:
                raise
            raise MarlInputError(f"{err}. This base is recorded in {Path(source) / MODEL_FILE}: edit "
                                 "base_model_name_or_path there if the base model moved") from err
        check_causal_lm_family(base_config, base_name)
    policy_names = saved["policy_adapter_names"] if saved else (
        list(source.peft_config) if isinstance(source, PeftModel) else [policy_adapter_name])
    if saved is None and not isinstance(source, PeftModel):
        if peft_config is None:
            raise MarlInputError("peft_config is required: the PPO policy is a LoRA adapter on the base"
                                 + (" and reward_adapter is given" if reward_adapter is not None else "")
                                 + "; pass peft_config=LoraConfig(r=16, lora_alpha=32, task_type='CAUSAL_LM')")
        peft_config = lora_config_for_causal_lm(peft_config, "peft_config")
    elif peft_config is not None:
        warnings.warn("peft_config is ignored: the policy adapters come from "
                      f"{'the saved folder' if saved else 'the PeftModel'}; use add_policy_adapter for another")
    if reward_adapter is not None:
        check_adapter_name(reward_adapter_name, set(policy_names))
        hub_kwargs = {k: kwargs[k] for k in ("revision", "token", "cache_dir") if k in kwargs}
        files = inspect_reward_adapter(reward_adapter, base_config, base_name, hub_kwargs)
    for name in policy_names:
        check_adapter_name(name, set())
    critic_names = saved.get("critic_adapter_names", {}) if saved else (
        {name: critic_adapter_name(name) for name in policy_names} if critic == "adapter" else {})
    for name in critic_names.values():
        check_adapter_name(name, set(policy_names) | ({reward_adapter_name} if reward_adapter else set()))

    # -- weights load from here on
    if isinstance(source, (PreTrainedModel, PeftModel)):
        base = source
    else:
        base = load_base(base_name, bnb_config, kwargs)
    disable_cpu_inference_packing(base)
    causal_lm = base.get_base_model() if isinstance(base, PeftModel) else base
    if reward_adapter is not None:
        check_fits_base(files, causal_lm)

    if isinstance(base, PeftModel):
        peft_model = base
    elif saved:
        folder = Path(source)
        first, *others = policy_names
        peft_model = PeftModel.from_pretrained(base, str(_adapter_folder(folder, first)), adapter_name=first,
                                               is_trainable=is_trainable)
        for name in [*others, *critic_names.values()]:
            peft_model.load_adapter(str(_adapter_folder(folder, name)), adapter_name=name,
                                    is_trainable=is_trainable)
    else:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*")  # GPT-2's Conv1D: peft fixes it
            peft_model = get_peft_model(base, peft_config, adapter_name=policy_adapter_name)

    reward_head = None
    if reward_adapter is not None:
        reward_head = load_reward_adapter(peft_model, files, reward_adapter_name)
    if not saved:
        for name, critic_name in critic_names.items():
            if critic_init == "reward_adapter":  # a trainable copy of the reward LoRA; the reward adapter stays
                load_reward_adapter(peft_model, files, critic_name, is_trainable=True)
            else:
                peft_model.add_adapter(critic_name, lora_config_for_causal_lm(
                    critic_peft_config or peft_model.peft_config[name], "critic_peft_config"))

    model = cls(peft_model, policy_names, reward_adapter_name=reward_adapter_name if reward_adapter else None,
                reward_head=reward_head, value_head_dropout=value_head_dropout, is_trainable=is_trainable,
                active_adapter=saved["active_adapter"] if saved else None, critic_adapter_names=critic_names,
                reward_pad_token_id=files.pad_token_id if reward_adapter is not None else None,
                reward_eos_token_ids=files.eos_token_ids if reward_adapter is not None else ())
    if critic_init == "reward_adapter" and not saved:
        for name in policy_names:
            copy_reward_head_into(model.v_heads[name], reward_head)
    if saved:
        from safetensors.torch import load_file

        heads = load_file(str(Path(source) / VALUE_HEADS_FILE), device=str(model.device))
        model.v_heads.load_state_dict(heads, strict=True)
    check_critic_supported(model)
    return model.eval()



def check_causal_lm_family(config, name) -> None:
    """A base of a family transformers cannot load as a causal LM (T5, CLIP, ...) is refused by name, before
    any weights load (tests/test_architectures.py lists the families PPO is checked on)."""
    from transformers import AutoModelForCausalLM

    if type(config) not in AutoModelForCausalLM._model_mapping:
        family = getattr(config, "model_type", None) or type(config).__name__
        raise MarlInputError(f"base model {name!r} is a {family!r} model, which transformers has no causal LM class "
                             "for (AutoModelForCausalLM): PPO here trains a LoRA policy on a decoder-only causal LM "
                             "(Llama, GPT-2, Qwen, Gemma, Mistral, ...); pass one of those")


def _check_critic_choice(critic, critic_peft_config, critic_init, reward_adapter) -> None:
    if critic not in CRITICS:
        raise MarlInputError(f"critic={critic!r} is unknown; use 'head' (value head on the policy's hidden state) or "
                             "'adapter' (a critic LoRA adapter of its own on the same base)")
    if critic_init not in CRITIC_INITS:
        raise MarlInputError(f"critic_init={critic_init!r} is unknown; use None (a fresh critic adapter) or "
                             "'reward_adapter' (start from a copy of the reward adapter)")
    if critic == "head" and (critic_peft_config is not None or critic_init is not None):
        raise MarlInputError("critic_peft_config and critic_init need critic='adapter'")
    if critic_init == "reward_adapter" and reward_adapter is None:
        raise MarlInputError("critic_init='reward_adapter' copies the reward adapter: pass reward_adapter= too")
    if critic_init == "reward_adapter" and critic_peft_config is not None:
        raise MarlInputError("critic_init='reward_adapter' takes the reward adapter's LoRA config; drop "
                             "critic_peft_config")


def _read_saved_model(source):
    """The json written by `save_pretrained`, or None for a base model; an adapter folder is refused."""
    folder = Path(source).expanduser()
    if (folder / MODEL_FILE).exists():
        info = json.loads((folder / MODEL_FILE).read_text())
        if not (folder / VALUE_HEADS_FILE).exists():
            raise MarlInputError(f"{folder} has {MODEL_FILE} but no {VALUE_HEADS_FILE}; the save was incomplete")
        return info
    if (folder / "adapter_config.json").exists() and not (folder / "config.json").exists():
        raise MarlInputError(f"{folder} is a peft adapter, not a model: pass the base model it was trained on as the "
                             "first argument (and a stage-2 adapter as reward_adapter=)")
    return None


def _adapter_folder(folder: Path, name: str) -> Path:
    return folder if name == "default" else folder / name  # peft's save layout
