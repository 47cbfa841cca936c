"""Stage 1: supervised fine-tuning of the base on reviews, with TRL's SFTTrainer (notebook 01).

PPO only polishes a policy that already speaks the domain. SFT teaches the base to write movie
reviews; it is the model that stage 2 turns into a reward model and stage 3 into a policy.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from .atomic import atomic_dir
from .errors import MarlInputError
from .profiles import TINY_BASE, Profile
from .runs import prepare_run_dir, read_metrics, stage_dir

SAMPLE_PROMPTS = ["This movie", "I watched this film", "The acting was", "The story"]


@dataclass
class SFTResult:
    """What stage 1 produced: where the model is and how well it models held-out reviews."""

    model_dir: Path
    metrics: dict
    log_history: list = field(default_factory=list)


def has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def ensure_base(profile: Profile, out: Path, train_texts) -> str:
    """The base to fine-tune: a Hub id / folder, or the tiny base built once into `OUT/base/`."""
    if profile.base_model != TINY_BASE:
        return profile.base_model
    base_dir = stage_dir(out, "base")
    if not (base_dir / "config.json").exists():
        from .tiny_base import build_tiny_base

        sizes = dict(profile.tiny_model)
        vocab_size = sizes.pop("vocab_size", 2048)
        print(f"building the tiny base (tokenizer + Llama-style model) in {base_dir}")
        build_tiny_base(base_dir, train_texts, vocab_size=vocab_size, **sizes)
    return str(base_dir)


def load_tokenizer(name_or_path: str):
    """Load a tokenizer and make sure it has a pad token distinct from EOS (PPO masks need it)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError) as err:  # a typo'd folder, an unknown hub id, or the hub offline
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise MarlInputError(f"cannot load the base model {name_or_path!r} ({first_line}); pass a local model "
                             "folder, or a hub id that is cached or reachable (HF_HUB_OFFLINE must be unset to "
                             "download)") from None
    if tokenizer.eos_token is None:
        raise MarlInputError(f"tokenizer of {name_or_path} has no eos token; set tokenizer.eos_token first")
    if tokenizer.pad_token is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        # GPT-2 ships without a pad token. A dedicated one keeps EOS visible to every mask.
        tokenizer.add_special_tokens({"pad_token": "<|pad|>"})
    return tokenizer


def perplexity(model, tokenizer, texts, *, max_length: int = 128, batch_size: int = 16) -> float:
    """Token-level perplexity exp(mean NLL) of `texts` (each followed by EOS) under `model`."""
    import torch

    model.eval()
    total_nll, total_tokens = 0.0, 0
    device = next(model.parameters()).device
    with torch.no_grad():
        for start in range(0, len(texts), batch_size):
            chunk = [t + tokenizer.eos_token for t in texts[start:start + batch_size]]
            enc = tokenizer(chunk, return_tensors="pt", padding=True, truncation=True,
                            max_length=max_length, add_special_tokens=False).to(device)
            logits = model(**enc).logits[:, :-1].float()
            targets = enc.input_ids[:, 1:]
            mask = enc.attention_mask[:, 1:].bool()
            nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
            total_nll += nll[mask].sum().item()
            total_tokens += mask.sum().item()
    return math.exp(total_nll / max(total_tokens, 1))


def sample_texts(model, tokenizer, prompts=SAMPLE_PROMPTS, *, max_new_tokens: int = 40, seed: int = 0,
                 do_sample: bool = True) -> list[str]:
    """Continue each prompt (plain sampling, fixed seed) and return prompt + continuation."""
    import torch

    model.eval()
    device = next(model.parameters()).device
    torch.manual_seed(seed)
    out = []
    with torch.no_grad():
        for prompt in prompts:
            enc = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).to(device)
            ids = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=do_sample, top_k=0,
                                 top_p=1.0, pad_token_id=tokenizer.pad_token_id)
            out.append(tokenizer.decode(ids[0], skip_special_tokens=True))
    return out


def sft_config(profile: Profile, work_dir: str, seed: int = 0):
    """TRL's SFTConfig with its defaults overridden where they are wrong for this tutorial."""
    from trl import SFTConfig

    cuda = has_cuda()
    return SFTConfig(
        output_dir=work_dir,
        max_length=profile.sft_max_length,
        num_train_epochs=profile.sft_epochs,
        max_steps=profile.sft_max_steps,
        per_device_train_batch_size=profile.sft_batch_size,
        learning_rate=profile.sft_learning_rate,  # TRL's 2e-5 is far too small for a model from scratch
        lr_scheduler_type="cosine",
        warmup_steps=0.05,
        weight_decay=0.0,
        bf16=False,  # TRL 1.16 turns bf16 on by default; CPUs and T4s want fp32 / fp16
        fp16=cuda,
        gradient_checkpointing=False,  # TRL's default trades compute for memory we do not need to save
        packing=False,
        logging_steps=10,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        use_cpu=not cuda,
        dataloader_num_workers=0,
        seed=seed,
        optim="adamw_torch",
    )


def train_sft(profile: Profile, output_dir=None, dataset=None, *, seed: int = 0, force: bool = False,
              progress: bool = True) -> SFTResult:
    """Run stage 1 into `OUT/sft/` (reusing a finished one unless `force`), return its metrics.

    `dataset` is a `load_imdb` source (default: the profile's). Bad input is rejected before training.
    """
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from .data import load_imdb

    out = prepare_run_dir(output_dir, profile)
    final = stage_dir(out, "sft")
    if final.exists() and not force:
        print(f"stage 1 (SFT) already done: {final}")
        return SFTResult(final, read_metrics(final), read_metrics(final).get("log_history", []))

    data = load_imdb(dataset or profile.dataset, seed=seed)
    train = data["train"]
    if profile.sft_max_train_examples:
        train = train.select(range(min(profile.sft_max_train_examples, len(train))))
    train = train.remove_columns([c for c in train.column_names if c != "text"])
    eval_texts = data["test"]["text"][: profile.sft_eval_examples]

    torch.manual_seed(seed)
    start = time.perf_counter()
    base = ensure_base(profile, out, data["train"]["text"])
    tokenizer = load_tokenizer(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id

    samples_before = sample_texts(model, tokenizer, max_new_tokens=30, seed=seed)
    ppl_before = perplexity(model, tokenizer, eval_texts[:64], max_length=profile.sft_max_length)

    from trl import SFTTrainer

    work_dir = tempfile.mkdtemp(prefix="marl-sft-")
    try:
        args = sft_config(profile, work_dir, seed=seed)
        args.disable_tqdm = not progress
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # keep the notebook readable: no per-key load reports
        try:
            trainer = SFTTrainer(model=model, args=args, train_dataset=train, processing_class=tokenizer)
        finally:
            hf_logging.set_verbosity(verbosity)
        trainer.train()
        log_history = [r for r in trainer.state.log_history if "loss" in r]
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)

    model = trainer.model
    ppl = perplexity(model, tokenizer, eval_texts, max_length=profile.sft_max_length)
    samples_after = sample_texts(model, tokenizer, max_new_tokens=30, seed=seed)
    metrics = {
        "profile": profile.name,
        "base_model": profile.base_model,
        "seconds": round(time.perf_counter() - start, 2),
        "eval_perplexity": ppl,
        "eval_perplexity_before": ppl_before,
        "train_examples": len(train),
        "eval_examples": len(eval_texts),
        "samples_before": samples_before,
        "samples_after": samples_after,
        "log_history": log_history,
    }
    with atomic_dir(final) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print(f"stage 1 (SFT) done in {metrics['seconds']:.0f}s: held-out perplexity {ppl:.2f} "
          f"(before: {ppl_before:.0f}) -> {final}")
    return SFTResult(final, metrics, log_history)
