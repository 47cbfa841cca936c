"""The tiny base model of the offline profile: our stand-in for `gpt2` (introduced in notebook 01).

Two parts, both saved with `save_pretrained` so that every later stage loads them with
`AutoTokenizer.from_pretrained` / `AutoModelForCausalLM.from_pretrained`, exactly as it would load
a model from the Hub:

- a byte-level BPE tokenizer trained on the offline corpus, with distinct pad and eos tokens (pad ==
  eos is a classic PPO trap: masks built from `ids != pad` would also hide the real EOS);
- a small Llama-style causal LM built from a config with random weights (SFT then trains all of it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

PAD_TOKEN = "<|pad|>"
EOS_TOKEN = "<|endoftext|>"


def train_tokenizer(texts: Iterable[str], vocab_size: int = 2048):
    """Train a byte-level BPE tokenizer on `texts`; returns a `PreTrainedTokenizerFast`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD_TOKEN, EOS_TOKEN],  # ids 0 and 1
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(list(texts), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        pad_token=PAD_TOKEN,
        eos_token=EOS_TOKEN,
        bos_token=EOS_TOKEN,  # like GPT-2: generation from an empty prompt starts at a review boundary
        padding_side="right",
        model_max_length=1024,
    )
    return tokenizer


def build_tiny_llama(tokenizer, *, hidden_size=128, intermediate_size=352, num_hidden_layers=4,
                     num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                     vocab_size=None, seed=0):
    """A randomly initialised Llama-style causal LM sized for a CPU (about 1-2M parameters)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer) if vocab_size is None else vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        max_position_embeddings=max_position_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def build_tiny_base(out_dir: str | Path, texts: Iterable[str], *, vocab_size: int = 2048, seed: int = 0,
                    **model_sizes) -> Path:
    """Train the tokenizer on `texts`, build the tiny model, save both to `out_dir` atomically."""
    from ..infra.atomic import atomic_dir

    tokenizer = train_tokenizer(texts, vocab_size=vocab_size)
    model = build_tiny_llama(tokenizer, seed=seed, **model_sizes)
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        tokenizer.save_pretrained(tmp)
        model.save_pretrained(tmp)
    return out_dir
