"""The stage-2 reward adapter, reused on the policy's own base: checks, and its score head (notebook 03).

Stage 2 saves a peft LoRA adapter of the base loaded as a 1-output sequence classifier: LoRA weights for
the body plus the classifier head (`score`, via `modules_to_save`). PPO loads those LoRA weights into the
SAME peft model as the policy, under their own adapter name. peft's `load_adapter` on a causal LM puts the
head nowhere (it lands in `unexpected_keys`, without an error), so the head is rebuilt here from the file.

Everything that can be checked is checked before weights load: the folder, the adapter type, the head, and
that the shapes (hidden size, vocabulary, targeted layers) fit this base. An adapter trained on another
base of the same shape only gets a warning: it loads, but its scores mean nothing on this base.

Where the head is read is a fact of training, not of the base: HF's *ForSequenceClassification reads the last
token that is not the pad id the reward trainer set. TRL's RewardTrainer sets pad = EOS on a tokenizer without
a pad token (gpt2, Qwen2.5 bases) and appends EOS, so such a head was trained on the token BEFORE the EOS,
while the base's own config (as on the Hub) may say nothing about pad. Hence the pad id is read from the
tokenizer saved with the adapter (stage 2 and TRL's `save_model` write it there), see
`AutoModelForCausalLMWithValueHead.reward_token_index`.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .errors import MarlInputError
from .value_head import Float32Linear, hidden_and_vocab_size

ADAPTER_CONFIG = "adapter_config.json"
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
PEFT_PREFIX = "base_model.model."
# transformers' XForSequenceClassification heads: `score` for causal LMs, `classifier` for encoders.
HEAD_NAMES = ("score", "classifier")
STAGE2_HINT = "pass the folder written by stage 2 (`marl reward`, `OUT/reward_adapter/`) or a hub id"


@dataclass
class RewardAdapterFiles:
    """A reward adapter on disk, inspected but not loaded: where it is and what its tensors look like."""

    source: str
    folder: Path
    config: dict
    weights_file: Path
    shapes: dict = field(repr=False)      # every saved tensor: key -> shape, from the file header
    head_keys: dict = field(repr=False)   # "weight" (and maybe "bias") -> key of the score head
    pad_token_id: int | None = None       # of the tokenizer saved with the adapter: the pad it was trained with
    eos_token_ids: tuple = ()             # and that tokenizer's EOS


def looks_like_hub_id(name: str) -> bool:
    """`user/repo` or `repo`; a path that starts with `.`, `/` or `~`, or has more parts, is a folder."""
    return re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name) is not None and not name.startswith((".", "~"))


def resolve_adapter_folder(name_or_path, hub_kwargs: dict | None = None) -> Path:
    """A local folder as is; a hub id downloaded (adapter files only) into the local cache."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise MarlInputError(f"reward adapter {name_or_path} is a file; pass the folder that holds {ADAPTER_CONFIG}")
    if not looks_like_hub_id(str(name_or_path)):
        raise MarlInputError(f"reward adapter folder {path} does not exist; {STAGE2_HINT}")
    try:
        from huggingface_hub import snapshot_download

        # the tokenizer files too: its pad id says where the head was trained to read
        patterns = [ADAPTER_CONFIG, *WEIGHT_FILES, "tokenizer*", "special_tokens_map.json"]
        return Path(snapshot_download(str(name_or_path), allow_patterns=patterns, **(hub_kwargs or {})))
    except Exception as err:  # offline, unknown repo, no access: all the same to the user
        raise MarlInputError(f"reward adapter {name_or_path!r} is not a local folder and could not be fetched from "
                             f"the Hugging Face Hub ({type(err).__name__}); {STAGE2_HINT}") from err


def read_shapes(weights_file: Path) -> dict:
    """Shapes of all tensors in an adapter file; for safetensors only the header is read."""
    if weights_file.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(weights_file), "pt") as f:
            return {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
    state = torch.load(weights_file, map_location="cpu", weights_only=True)
    return {key: tuple(value.shape) for key, value in state.items()}


def read_tensors(weights_file: Path, keys) -> dict:
    """Only the named tensors of an adapter file."""
    if weights_file.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(weights_file), "pt") as f:
            return {key: f.get_tensor(key) for key in keys}
    state = torch.load(weights_file, map_location="cpu", weights_only=True)
    return {key: state[key] for key in keys}


def find_score_head(shapes: dict, source) -> dict:
    """Keys of the single linear classifier head saved with the adapter, or a clear error."""
    heads, nested = {}, set()
    for key in shapes:
        if ".lora_" in key:
            continue
        module, _, param = key.rpartition(".")
        parts = module.split(".")
        if parts[-1] in HEAD_NAMES:
            heads.setdefault(module, {})[param] = key
        elif any(part in HEAD_NAMES for part in parts):
            nested.add(module)
    if nested and not heads:
        raise MarlInputError(f"the reward adapter {source} has a classifier head with several layers ({sorted(nested)[0]}); "
                             "only a single linear score head (AutoModelForSequenceClassification of a causal LM) "
                             "is supported")
    if not heads:
        raise MarlInputError(f"the reward adapter {source} has no score head: its weights hold LoRA matrices only. "
                             "Train it as stage 2 does, on AutoModelForSequenceClassification(num_labels=1) with "
                             "LoraConfig(task_type='SEQ_CLS'), so that peft saves the `score` head with it")
    if len(heads) > 1:
        raise MarlInputError(f"the reward adapter {source} has several classifier heads ({sorted(heads)}); "
                             "keep exactly one (`score`)")
    head = next(iter(heads.values()))
    if "weight" not in head or len(shapes[head["weight"]]) != 2:
        raise MarlInputError(f"the reward adapter {source} has a score head without a 2-D weight; it is not a linear head")
    return head


def inspect_reward_adapter(source, base_config, base_name_or_path=None, hub_kwargs: dict | None = None):
    """Every check that needs only the adapter's files and the base's config (no weights loaded)."""
    folder = resolve_adapter_folder(source, hub_kwargs)
    config_file = folder / ADAPTER_CONFIG
    if not config_file.exists():
        what = "a full model folder" if (folder / "config.json").exists() else "not a peft adapter folder"
        raise MarlInputError(f"the reward adapter {source} is {what}: {ADAPTER_CONFIG} is missing. The reward model "
                             f"must be a LoRA adapter on the policy's base; {STAGE2_HINT}")
    config = json.loads(config_file.read_text())
    if config.get("peft_type") != "LORA":
        raise MarlInputError(f"the reward adapter {source} is a {config.get('peft_type')} adapter; only LoRA reward "
                             "adapters can share the base with the LoRA policy (train stage 2 with LoraConfig)")
    weights_file = next((folder / name for name in WEIGHT_FILES if (folder / name).exists()), None)
    if weights_file is None:
        raise MarlInputError(f"the reward adapter {source} has {ADAPTER_CONFIG} but no weights "
                             f"({' or '.join(WEIGHT_FILES)}); was its save interrupted? Re-run stage 2")
    shapes = read_shapes(weights_file)
    head = find_score_head(shapes, source)

    hidden, vocab = hidden_and_vocab_size(base_config)
    outputs, head_hidden = shapes[head["weight"]]
    if outputs != 1:
        raise MarlInputError(f"the reward adapter {source} has a head with {outputs} outputs; a reward model has one "
                             "(AutoModelForSequenceClassification(..., num_labels=1))")
    if head_hidden != hidden:
        raise MarlInputError(f"the reward adapter {source} was trained on a base with hidden size {head_hidden}, but "
                             f"this base has hidden size {hidden}: stage 2 and PPO must use the same base model")
    for key, shape in shapes.items():
        if ".lora_embedding_A" in key and shape[-1] != vocab:
            raise MarlInputError(f"the reward adapter {source} was trained on a vocabulary of {shape[-1]} tokens, but "
                                 f"this base has {vocab}: stage 2 and PPO must use the same base and tokenizer")
    tokenizer = check_tokenizer_vocab(folder, vocab, source)
    warn_if_other_base(config.get("base_model_name_or_path"), base_name_or_path, source)
    pad, eos = (None, None) if tokenizer is None else (tokenizer.pad_token_id, tokenizer.eos_token_id)
    return RewardAdapterFiles(str(source), folder, config, weights_file, shapes, head, pad_token_id=pad,
                              eos_token_ids=() if eos is None else (eos,))


def check_tokenizer_vocab(folder: Path, vocab: int, source):
    """The tokenizer saved with the adapter (None if there is none or it cannot be read); it must not produce
    ids past this base's embedding table."""
    if not ((folder / "tokenizer.json").exists() or (folder / "tokenizer_config.json").exists()):
        return None
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except Exception:  # an unreadable tokenizer is not the reward model's business here
        return None
    if len(tokenizer) > vocab:
        raise MarlInputError(f"the tokenizer saved with the reward adapter {source} has {len(tokenizer)} tokens, but "
                             f"this base's vocabulary has {vocab}: stage 2 and PPO must use the same base and tokenizer")
    return tokenizer


def eos_ids(eos) -> set:
    """An EOS id, a list of them (Llama 3, Qwen configs) or None, as a set."""
    return set(eos) if isinstance(eos, (list, tuple)) else ({eos} if eos is not None else set())



def same_name(a: str, b: str) -> bool:
    if os.path.exists(a) and os.path.exists(b):
        return os.path.realpath(a) == os.path.realpath(b)
    return a.rstrip("/") == b.rstrip("/")


def warn_if_other_base(adapter_base, base_name_or_path, source) -> None:
    if adapter_base and base_name_or_path and not same_name(str(adapter_base), str(base_name_or_path)):
        warnings.warn(f"the reward adapter {source} records base_model_name_or_path={adapter_base!r}, but the policy "
                      f"base is {str(base_name_or_path)!r}. If its shapes fit it loads, but its scores are only meaningful "
                      "if both are the same model (stage 2 and PPO must share the base).", UserWarning, stacklevel=3)


def in_out_features(module):
    """(in, out) of a layer LoRA can target: Linear (also bitsandbytes'), GPT-2's Conv1D, Embedding."""
    if isinstance(module, nn.Embedding):
        return module.num_embeddings, module.embedding_dim
    if hasattr(module, "in_features") and hasattr(module, "out_features"):
        return module.in_features, module.out_features
    if type(module).__name__ == "Conv1D":  # weight stored [in, out]
        return tuple(module.weight.shape)
    return None


def lora_shape_problem(kind: str, shape: tuple, features) -> str | None:
    """Why a saved LoRA tensor of `kind` (A, B, embedding_A, embedding_B) cannot fit a layer, if it cannot."""
    fan_in, fan_out = features
    expected = {"A": (-1, fan_in), "embedding_A": (-1, fan_in), "B": (0, fan_out), "embedding_B": (0, fan_out)}
    if kind not in expected:
        return None
    dim, size = expected[kind]
    if len(shape) < 2 or shape[dim] != size:
        return f"lora_{kind} {list(shape)} vs layer ({fan_in} -> {fan_out})"
    return None


def check_fits_base(files: RewardAdapterFiles, causal_lm) -> None:
    """Every saved tensor must land on a layer of this base with the right shape (base loaded, adapter not).

    Also: a full copy of a base weight saved with the adapter (peft does this when embeddings are targeted)
    must equal this base's, or loading it would silently change the reference model too.
    """
    modules = dict(causal_lm.named_modules())
    params = dict(causal_lm.named_parameters())
    head = set(files.head_keys.values())
    problems = []
    for key, shape in files.shapes.items():
        if key in head:
            continue
        path = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
        if ".lora_" in path:
            module_path, _, rest = path.partition(".lora_")
            kind = rest.split(".")[0]
            module = modules.get(module_path)
            features = in_out_features(module) if module is not None else None
            if module is None:
                problems.append(f"{module_path}: no such layer in this base")
            elif features is not None and (why := lora_shape_problem(kind, shape, features)):
                problems.append(f"{module_path}: {why}")
            continue
        param_path = path.replace(".base_layer.", ".")
        param = params.get(param_path)
        if param is None:
            problems.append(f"{param_path}: no such weight in this base")
        elif tuple(param.shape) != tuple(shape):
            problems.append(f"{param_path}: {list(shape)} vs {list(param.shape)} in this base")
        elif ".base_layer." in path and param.is_floating_point():
            saved = read_tensors(files.weights_file, [key])[key]
            if not torch.equal(saved.to(param.dtype), param.detach().cpu()):
                problems.append(f"{param_path}: the adapter carries a copy of this weight that differs from the base")
    if problems:
        listed = "; ".join(problems[:3]) + (f"; ... ({len(problems)} in all)" if len(problems) > 3 else "")
        raise MarlInputError(f"the reward adapter {files.source} does not fit this base: {listed}. It was trained on "
                             "a different base model; stage 2 and PPO must use the same base")


def load_score_head(files: RewardAdapterFiles, device=None) -> nn.Linear:
    """The reward model's score head as a frozen `Linear(hidden, 1)` that computes in float32 under autocast too."""
    tensors = read_tensors(files.weights_file, files.head_keys.values())
    weight = tensors[files.head_keys["weight"]]
    bias = tensors.get(files.head_keys.get("bias"))
    head = Float32Linear(weight.shape[1], weight.shape[0], bias=bias is not None, dtype=torch.float32, device=device)
    with torch.no_grad():
        head.weight.copy_(weight.float())
        if bias is not None:
            head.bias.copy_(bias.float())
    return head.requires_grad_(False)


def load_reward_adapter(peft_model, files, name, is_trainable: bool = False) -> nn.Linear:
    """The reward LoRA into the policy's peft model (frozen), and the score head peft leaves behind.

    `is_trainable=True` loads a trainable copy under another name (a critic started from the reward model);
    its config then says what it is on this model: a causal-LM LoRA without the classifier head.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*")
        result = peft_model.load_adapter(str(files.folder), adapter_name=name, is_trainable=is_trainable)
    if is_trainable:
        config = peft_model.peft_config[name]
        config.task_type, config.modules_to_save = "CAUSAL_LM", None
    head_keys = set(files.head_keys.values())
    left_out = [key for key in result.unexpected_keys if key not in head_keys]
    missing = [key for key in result.missing_keys if name in key]
    if left_out or missing:
        raise MarlInputError(f"the reward adapter {files.source} did not load cleanly into this base (not loaded: "
                             f"{(left_out or missing)[:3]}); stage 2 and PPO must use the same base model")
    device = next(peft_model.get_base_model().get_output_embeddings().parameters()).device
    return load_score_head(files, device)
