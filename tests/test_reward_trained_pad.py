"""The reward head is read where it was trained to be read, on a base whose config has no pad id (issue 19, 4).

A Hub base such as gpt2 or a Qwen2.5 base ships a config without `pad_token_id` and a tokenizer without a pad
token. TRL's RewardTrainer then pads with EOS (and appends EOS), so its head learnt to read the token BEFORE the
trailing EOS, a fact the base's own files do not record. The reward model as trained is the sequence classifier
with the trainer's pad id in its config, plus the adapter; our scores must equal its scores.
"""

import os

import pytest
import torch
from peft import LoraConfig, PeftModel
from stand_ins import (load_sequence_classifier, make_hub_like_base, make_padless_tokenizer,
                       train_reward_adapter_with_trl)

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from marl_utils.modeling import AutoModelForCausalLMWithValueHead
from marl_utils.ppo import PPOTrainer
from marl_utils.ppo_config import PPOConfig

torch.set_num_threads(1)
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")
TEXTS = ["the movie was great", "bad plot", "i loved this movie a lot it was fun"]


@pytest.fixture(scope="module")
def hub_base(tmp_path_factory):
    """A pad-less base, and one TRL-trained reward adapter saved with its tokenizer and one saved without."""
    from accelerate.state import AcceleratorState

    root = tmp_path_factory.mktemp("hub_base")
    base = make_hub_like_base(root / "base")
    trainer_tokenizer = make_padless_tokenizer()
    with_tok = train_reward_adapter_with_trl(base, trainer_tokenizer, root / "rm", bf16=False)
    without_tok = train_reward_adapter_with_trl(base, make_padless_tokenizer(), root / "rm_bare", bf16=False,
                                                save_tokenizer=False)
    AcceleratorState._reset_state(reset_partial_state=True)
    assert trainer_tokenizer.pad_token_id == trainer_tokenizer.eos_token_id  # what TRL did to it
    assert load_sequence_classifier(base).config.pad_token_id is None  # and not to the base's files
    return base, with_tok, without_tok, trainer_tokenizer


def rows_ending_with_eos(tokenizer, side):
    eos = tokenizer.eos_token_id
    rows = [torch.tensor(tokenizer(t, add_special_tokens=False)["input_ids"] + [eos]) for t in TEXTS]
    width = max(map(len, rows))
    input_ids, attention_mask = torch.full((len(rows), width), eos), torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(width - len(row), width) if side == "left" else slice(0, len(row))
        input_ids[i, span], attention_mask[i, span] = row, 1
    return input_ids, attention_mask


def as_trained(base, adapter, pad_token_id, input_ids, attention_mask):
    """The reward model as TRL trained it: the classifier with the trainer's pad id, plus the adapter."""
    classifier = load_sequence_classifier(base)
    classifier.config.pad_token_id = pad_token_id
    with torch.no_grad():
        return PeftModel.from_pretrained(classifier, str(adapter)).eval()(
            input_ids=input_ids, attention_mask=attention_mask).logits[:, 0]


def lora():
    return LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")


@pytest.mark.parametrize("side", ["left", "right"])
def test_pad_id_comes_from_the_tokenizer_saved_with_the_adapter(hub_base, side):
    base, adapter, _, trainer_tokenizer = hub_base
    input_ids, attention_mask = rows_ending_with_eos(trainer_tokenizer, side)
    model = AutoModelForCausalLMWithValueHead.from_pretrained(str(base), peft_config=lora(),
                                                              reward_adapter=str(adapter))
    assert model.config.pad_token_id is None and model.reward_pad_token_id == trainer_tokenizer.eos_token_id
    ours = model.compute_reward_score(input_ids=input_ids, attention_mask=attention_mask)
    trained = as_trained(base, adapter, trainer_tokenizer.pad_token_id, input_ids, attention_mask)
    torch.testing.assert_close(ours, trained, atol=1e-5, rtol=1e-5)
    per_token = model.compute_reward_score(input_ids=input_ids, attention_mask=attention_mask, per_token=True)
    at_eos = per_token[torch.arange(len(TEXTS)), attention_mask.shape[1] - 1 - attention_mask.flip(-1).argmax(-1)]
    assert (at_eos - trained).abs().min() > 1e-3  # reading at the EOS (the old rule here) would be wrong


def test_without_a_saved_tokenizer_the_trainers_tokenizer_decides(hub_base):
    base, _, bare, _ = hub_base
    model = AutoModelForCausalLMWithValueHead.from_pretrained(str(base), peft_config=lora(), reward_adapter=str(bare))
    assert model.reward_pad_token_id is None  # nothing on disk says how it was padded
    ppo_tokenizer = make_padless_tokenizer()
    ppo_tokenizer.pad_token = ppo_tokenizer.eos_token  # what our error message tells a gpt2 user to do
    trainer = PPOTrainer(PPOConfig(batch_size=3, mini_batch_size=3, max_new_tokens=4), model, ppo_tokenizer)
    assert model.reward_pad_token_id == ppo_tokenizer.eos_token_id
    eos = torch.tensor([ppo_tokenizer.eos_token_id])
    queries = [torch.tensor(ppo_tokenizer(t, add_special_tokens=False)["input_ids"]) for t in TEXTS]
    responses = [torch.cat([q[-1:], eos]) for q in queries]  # each response ends with EOS
    scores = trainer.score(queries, responses)
    rows = [torch.cat([q, r]) for q, r in zip(queries, responses)]
    input_ids = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=ppo_tokenizer.eos_token_id)
    attention_mask = torch.nn.utils.rnn.pad_sequence([torch.ones_like(r) for r in rows], batch_first=True)
    trained = as_trained(base, bare, ppo_tokenizer.pad_token_id, input_ids, attention_mask)
    torch.testing.assert_close(scores, trained, atol=1e-5, rtol=1e-5)


def test_grpo_reward_function_takes_the_pad_id_from_its_tokenizer_too(hub_base):
    from marl_utils.grpo_reward import reward_adapter_reward

    base, _, bare, _ = hub_base
    model = AutoModelForCausalLMWithValueHead.from_pretrained(str(base), peft_config=lora(), reward_adapter=str(bare))
    tokenizer = make_padless_tokenizer()
    tokenizer.pad_token = tokenizer.eos_token
    eos = tokenizer.eos_token_id
    prompt_ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in TEXTS]
    completion_ids = [p[-1:] + [eos] for p in prompt_ids]
    scores = reward_adapter_reward(model, tokenizer).score_ids(prompt_ids, completion_ids)
    rows = [torch.tensor(p + c) for p, c in zip(prompt_ids, completion_ids)]
    input_ids = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=eos)
    attention_mask = torch.nn.utils.rnn.pad_sequence([torch.ones_like(r) for r in rows], batch_first=True)
    torch.testing.assert_close(scores, as_trained(base, bare, eos, input_ids, attention_mask), atol=1e-5, rtol=1e-5)
