"""Tiny local stand-ins for hub models, so tests exercise the hub-loading code paths offline.

Import from any test in this folder: `from stand_ins import make_tiny_llama, make_reward_adapter`.

- `make_tiny_llama` / `make_tiny_gpt2`: a randomly initialised causal LM (hidden 32-64, 2 layers) saved with
  `save_pretrained` next to a small word-level tokenizer whose pad and eos tokens differ.
- `make_reward_adapter`: what stage 2 (TRL's RewardTrainer + peft `LoraConfig(task_type="SEQ_CLS")`) writes:
  a peft LoRA adapter folder for the 1-output sequence classifier of a base, score head included. We skip
  the training and randomise the LoRA B matrices and the head instead, so scores differ between inputs.
- `plain_reward_model`: the stage-2 reward model as plain peft loads it, the reference for our scores.
- `make_imdb_hub_folder`: a small dataset laid out like `stanfordnlp/imdb` on the Hub (parquet shards, a dataset
  card naming the splits, each split SORTED by label, an `unsupervised` split with label -1).
"""

from __future__ import annotations

from pathlib import Path

import torch

PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"

TEXTS = [
    "the movie was great and the acting was wonderful",
    "the film was bad and the plot was boring",
    "i loved this movie a lot it was fun",
    "terrible acting and a dull story i hated it",
    "a wonderful film with great music",
    "boring dull and far too long",
]


def make_tokenizer(texts=TEXTS, padding_side: str = "right"):
    """A word-level `PreTrainedTokenizerFast` trained on `texts`; ids: pad 0, eos 1, unk 2."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    words = Tokenizer(models.WordLevel(unk_token=UNK))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    words.decoder = decoders.WordPiece(prefix="##")  # joins word tokens with spaces
    words.train_from_iterator(list(texts), trainers.WordLevelTrainer(special_tokens=[PAD, EOS, UNK]))
    return PreTrainedTokenizerFast(tokenizer_object=words, pad_token=PAD, eos_token=EOS, unk_token=UNK,
                                   padding_side=padding_side, model_input_names=["input_ids", "attention_mask"])


def _save(model, tokenizer, out_dir) -> Path:
    out_dir = Path(out_dir)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def make_tiny_llama(out_dir, vocab_size: int | None = None, hidden: int = 32, layers: int = 2, seed: int = 0,
                    **config_kwargs) -> Path:
    """Save a random Llama-style causal LM (and its tokenizer) to `out_dir`; vocab defaults to the tokenizer's."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = make_tokenizer()
    sizes = dict(intermediate_size=2 * hidden, num_attention_heads=4, num_key_value_heads=4,
                 max_position_embeddings=128)
    config = LlamaConfig(
        vocab_size=vocab_size or len(tokenizer), hidden_size=hidden, num_hidden_layers=layers,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id, **{**sizes, **config_kwargs},
    )
    torch.manual_seed(seed)
    return _save(LlamaForCausalLM(config), tokenizer, out_dir)


def make_tiny_gpt2(out_dir, vocab_size: int | None = None, hidden: int = 32, layers: int = 2, seed: int = 0,
                   **config_kwargs) -> Path:
    """Save a random GPT-2-style causal LM (Conv1D layers, `n_embd`, dropout 0.1 like gpt2) to `out_dir`."""
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = make_tokenizer()
    config = GPT2Config(
        vocab_size=vocab_size or len(tokenizer), n_embd=hidden, n_layer=layers, n_head=4, n_positions=128,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id, **config_kwargs,
    )
    torch.manual_seed(seed)
    return _save(GPT2LMHeadModel(config), tokenizer, out_dir)


MAKE_BASE = {"llama": make_tiny_llama, "gpt2": make_tiny_gpt2}
LORA_TARGETS = {"llama": ["q_proj", "v_proj"], "gpt2": ["c_attn"]}


def load_sequence_classifier(base_dir):
    """The base as a 1-output sequence classifier, quietly (its fresh `score` head is expected)."""
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return AutoModelForSequenceClassification.from_pretrained(base_dir, num_labels=1, dtype=torch.float32)
    finally:
        hf_logging.set_verbosity(verbosity)


def make_reward_adapter(base_dir, out_dir, seed: int = 0, r: int = 4, target_modules=None, save_tokenizer=True,
                        **lora_kwargs) -> Path:
    """Write a stage-2-style reward adapter (peft SEQ_CLS LoRA + score head) for the base in `base_dir`."""
    import warnings

    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer

    classifier = load_sequence_classifier(base_dir)
    config = LoraConfig(task_type="SEQ_CLS", r=r, lora_alpha=2 * r, lora_dropout=0.0,
                        target_modules=target_modules, **lora_kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # GPT-2's Conv1D "fan_in_fan_out" notice
        model = get_peft_model(classifier, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        # peft starts LoRA B at zero (adapter = identity); random B and head make the adapter matter.
        for name, param in model.named_parameters():
            if "lora_B" in name or "lora_embedding_B" in name or name.endswith("score.modules_to_save.default.weight"):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    if save_tokenizer:
        AutoTokenizer.from_pretrained(base_dir).save_pretrained(out_dir)
    return out_dir


def plain_reward_model(base_dir, adapter_dir):
    """The stage-2 reward model exactly as plain peft loads it: sequence classifier + adapter, eval, fp32."""
    from peft import PeftModel

    return PeftModel.from_pretrained(load_sequence_classifier(base_dir), str(adapter_dir)).eval()


def batch(tokenizer, texts, padding_side: str = "right") -> dict:
    """Token ids and attention mask of `texts`, padded on `padding_side`."""
    tokenizer.padding_side = padding_side
    return dict(tokenizer(list(texts), return_tensors="pt", padding=True))


IMDB_CARD = """---
configs:
- config_name: plain_text
  data_files:
  - split: train
    path: plain_text/train-*
  - split: test
    path: plain_text/test-*
  - split: unsupervised
    path: plain_text/unsupervised-*
  default: true
---
"""


def make_imdb_hub_folder(out_dir, n_train: int = 200, n_test: int = 1000, n_unsupervised: int = 20, seed: int = 0) -> Path:
    """Write `out_dir` as `stanfordnlp/imdb` is stored on the Hub: `plain_text/{split}-00000-of-00001.parquet`,
    a card whose YAML names the splits, label a ClassLabel (neg, pos), and, like the real thing, each of train
    and test sorted by label (all negative reviews first) plus an unlabelled `unsupervised` split (label -1).
    `datasets.load_dataset(str(out_dir))` reads it as it would read the Hub repository. Texts come from the
    offline corpus generator, with its `<br /><br />` markup."""
    import datasets

    from marl_utils.corpus import generate_corpus

    out_dir = Path(out_dir)
    corpus = generate_corpus(seed=seed, n_train=n_train + n_unsupervised, n_test=n_test)  # sizes: even numbers
    features = datasets.Features({"text": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["neg", "pos"])})
    unsupervised = [{"text": r["text"], "label": -1} for r in corpus["train"][n_train:n_train + n_unsupervised]]
    splits = {"train": sorted(corpus["train"][:n_train], key=lambda r: r["label"]),
              "test": sorted(corpus["test"], key=lambda r: r["label"]), "unsupervised": unsupervised}
    (out_dir / "plain_text").mkdir(parents=True, exist_ok=True)
    for split, rows in splits.items():
        table = datasets.Dataset.from_list(rows, features=features)
        table.to_parquet(str(out_dir / "plain_text" / f"{split}-00000-of-00001.parquet"))
    (out_dir / "README.md").write_text(IMDB_CARD)
    return out_dir


def make_padless_tokenizer(texts=TEXTS):
    """Like `make_tokenizer` (eos 1, unk 2) but WITHOUT a pad token, as gpt2 and the Qwen2.5 bases ship."""
    tokenizer = make_tokenizer(texts)
    tokenizer.pad_token = None
    return tokenizer


def make_hub_like_base(out_dir, seed: int = 0) -> Path:
    """A tiny Llama saved as Hub bases often are: no `pad_token_id` in its config, a tokenizer without pad."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = make_padless_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, intermediate_size=64,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id)
    assert config.pad_token_id is None
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return Path(out_dir)


def train_reward_adapter_with_trl(base_dir, tokenizer, out_dir, *, steps: int = 2, bf16: bool | None = None,
                                  save_tokenizer: bool = True, seed: int = 0) -> Path:
    """A few steps of TRL's RewardTrainer (LoRA, SEQ_CLS) on the base in `base_dir`, saved with `save_model`.

    `bf16=None` keeps RewardConfig's own default (bf16 on), the setting that used to leak into a later PPOTrainer.
    Reviews end with EOS, as stage 2 and TRL's own tokenisation write them. TRL sets pad = EOS on a tokenizer
    without a pad token (in place, on `tokenizer`) and in the classifier's config, not in the base's files.
    """
    import shutil
    import tempfile
    import warnings

    from datasets import Dataset
    from peft import LoraConfig
    from trl import RewardConfig, RewardTrainer

    eos = tokenizer.eos_token_id
    words = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"] + [eos]  # noqa: E731
    rows = [{"chosen_ids": words(c), "rejected_ids": words(r)} for c, r in zip(TEXTS[0::2], TEXTS[1::2])]
    work = tempfile.mkdtemp(prefix="trl-reward-")
    try:
        args = RewardConfig(output_dir=work, max_steps=steps, per_device_train_batch_size=2, learning_rate=0.05,
                            report_to="none", save_strategy="no", use_cpu=True, seed=seed, logging_steps=1,
                            **({} if bf16 is None else {"bf16": bf16}))
        torch.manual_seed(seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer = RewardTrainer(model=load_sequence_classifier(base_dir), args=args,
                                    train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                                    peft_config=LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8,
                                                           target_modules=["q_proj", "v_proj"]))
            trainer.train()
            with torch.no_grad():  # LoRA B starts at zero: make the adapter matter after so few steps
                generator = torch.Generator().manual_seed(seed)
                for name, param in trainer.model.named_parameters():
                    if "lora_B" in name:
                        param.add_(torch.randn(param.shape, generator=generator) * 0.3)
            trainer.model.save_pretrained(out_dir)
        if save_tokenizer:
            tokenizer.save_pretrained(out_dir)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return Path(out_dir)
