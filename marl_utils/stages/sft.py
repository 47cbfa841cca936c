"""Stage 1: supervised fine-tuning of the base on reviews, with TRL's SFTTrainer (notebook 01).

PPO only polishes a policy that already speaks the domain. SFT teaches the base to write movie
reviews; it is the model that stage 2 turns into a reward model and stage 3 into a policy.

The stage is three steps, so that notebook 01 can build the `SFTTrainer` in a cell of its own:

    inputs = prepare_sft(profile, OUT)                       # data, base model, metrics before training
    args = sft_config(profile, inputs.work_dir, epochs=inputs.epochs)
    trainer = SFTTrainer(model=inputs.model, args=args, train_dataset=inputs.train_dataset,
                         processing_class=inputs.tokenizer)
    one_progress_bar(trainer)
    trainer.train()
    result = finish_sft(inputs, trainer)                     # evaluate, sample, save OUT/sft/ atomically

`train_sft` is exactly these steps in one call.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..infra.atomic import atomic_dir
from ..infra.errors import MarlInputError
from ..infra.profiles import TINY_BASE, Profile
from ..infra.runs import prepare_run_dir, read_metrics, stage_dir
# Notebook 01 imports these from here, next to the stage they quieten.
from .trainer_output import LossProgressBar, one_progress_bar, quiet_trainer_setup  # noqa: F401

SAMPLE_PROMPTS = ["This movie", "I watched this film", "The acting was", "The story"]


@dataclass
class SFTResult:
    """What stage 1 produced: where the model is and how well it models held-out reviews."""

    model_dir: Path
    metrics: dict
    log_history: list = field(default_factory=list)


@dataclass
class SFTInputs:
    """What `prepare_sft` sets up: the trainer's inputs, and what `finish_sft` needs after training."""

    profile: Profile
    out: Path
    model: Any
    """The base as a causal LM, float32, on the training device, pad token set."""
    tokenizer: Any
    train_dataset: Any
    """A `datasets.Dataset` with one column, `text` (SFTTrainer adds EOS and tokenizes)."""
    eval_texts: list
    """Held-out reviews; perplexity before and after training is measured on exactly these."""
    epochs: float
    """Passes over `train_dataset`, from the profile's token budget (see `sft_epochs`)."""
    before: dict
    """Metrics of the untrained model and the data: eval_perplexity_before, samples_before, train_tokens, ..."""
    work_dir: str
    """The trainer's scratch folder (deleted by `finish_sft`)."""
    seed: int = 0
    start: float = 0.0


def has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def training_device():
    """Where stages 1-2 train: the GPU if there is one (the Trainer would move the model there anyway)."""
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def ensure_base(profile: Profile, out: Path, train_texts) -> str:
    """The base to fine-tune: a Hub id / folder, or the tiny base built once into `OUT/base/`."""
    if profile.base_model != TINY_BASE:
        return profile.base_model
    base_dir = stage_dir(out, "base")
    if not (base_dir / "config.json").exists():
        from ..data.tiny_base import build_tiny_base

        sizes = dict(profile.tiny_model)
        vocab_size = sizes.pop("vocab_size", 2048)
        print(f"building the tiny base (tokenizer + Llama-style model) in\n  {base_dir}")
        with quiet_trainer_setup():
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


def count_tokens(tokenizer, texts, max_length: int) -> int:
    """Tokens SFT trains on in one epoch: each text plus EOS, cut at `max_length` (as SFTTrainer does)."""
    ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    return sum(min(len(x) + 1, max_length) for x in ids)


def sft_epochs(profile: Profile, train_tokens: int) -> float:
    """Epochs from the token budget: `sft_token_budget / train_tokens`, at least `sft_epochs` (the shipped
    corpus: one), at most `sft_max_epochs`. A small dataset is read several times; without a budget, `sft_epochs`."""
    if not profile.sft_token_budget or train_tokens <= 0:
        return float(profile.sft_epochs)
    return float(min(max(profile.sft_token_budget / train_tokens, profile.sft_epochs), profile.sft_max_epochs))


def sft_config(profile: Profile, work_dir: str, seed: int = 0, *, epochs: float | None = None):
    """TRL's SFTConfig with its defaults overridden where they are wrong for this tutorial.

    `epochs`: passes over the data (`prepare_sft` computes it from the token budget); default `sft_epochs`.
    """
    from trl import SFTConfig

    cuda = has_cuda()
    return SFTConfig(
        output_dir=work_dir,
        max_length=profile.sft_max_length,
        num_train_epochs=profile.sft_epochs if epochs is None else epochs,
        max_steps=profile.sft_max_steps,
        per_device_train_batch_size=profile.sft_batch_size,
        learning_rate=profile.sft_learning_rate,  # TRL's 2e-5 is far too small for a model from scratch
        lr_scheduler_type="cosine",
        warmup_steps=0.05,
        weight_decay=0.0,
        bf16=False,  # TRL 1.16 turns bf16 on by default; CPUs and T4s want fp32 / fp16
        fp16=cuda,
        # TRL turns checkpointing on (compute for memory we do not need to save). The new name: the old one,
        # gradient_checkpointing, makes transformers 5 print a FutureWarning.
        activation_checkpointing=False,
        packing=False,
        logging_steps=10,  # rows of log_history for the loss plot; `one_progress_bar` keeps them off screen
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        use_cpu=not cuda,
        dataloader_num_workers=0,
        seed=seed,
        optim="adamw_torch",
    )


def finished_sft(output_dir, profile: Profile) -> SFTResult | None:
    """The result of a finished stage 1 in the run folder, or None if it has not run yet."""
    final = stage_dir(prepare_run_dir(output_dir, profile), "sft")
    if not final.exists():
        return None
    metrics = read_metrics(final)
    return SFTResult(final, metrics, metrics.get("log_history", []))


def prepare_sft(profile: Profile, output_dir=None, dataset=None, *, seed: int = 0) -> SFTInputs:
    """Step 1 of stage 1: load the data and the base, measure the untrained model, size the training.

    `dataset` is a `load_imdb` source (default: the profile's). Bad input is rejected before any model loads.
    """
    import torch

    from ..data.loading import load_imdb

    out = prepare_run_dir(output_dir, profile)
    data = load_imdb(dataset or profile.dataset, seed=seed)
    train = data["train"]
    if profile.sft_max_train_examples:
        train = train.select(range(min(profile.sft_max_train_examples, len(train))))
    test = data["test"].select(range(min(profile.sft_eval_examples, len(data["test"]))))
    labels = {"train_label_counts": _label_counts(train["label"]), "eval_label_counts": _label_counts(test["label"])}
    train = train.remove_columns([c for c in train.column_names if c != "text"])
    eval_texts = test["text"]

    torch.manual_seed(seed)
    start = time.perf_counter()
    base = ensure_base(profile, out, data["train"]["text"])
    tokenizer = load_tokenizer(base)
    with quiet_trainer_setup():
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.to(training_device())  # the measurements below are thousands of forwards: not on the CPU if a GPU is there

    train_tokens = count_tokens(tokenizer, train["text"], profile.sft_max_length)
    before = {
        "samples_before": sample_texts(model, tokenizer, max_new_tokens=30, seed=seed),
        "eval_perplexity_before": perplexity(model, tokenizer, eval_texts, max_length=profile.sft_max_length),
        "train_tokens": train_tokens,
        **labels,
    }
    return SFTInputs(profile=profile, out=out, model=model, tokenizer=tokenizer, train_dataset=train,
                     eval_texts=eval_texts, epochs=sft_epochs(profile, train_tokens), before=before,
                     work_dir=tempfile.mkdtemp(prefix="marl-sft-"), seed=seed, start=start)


def finish_sft(inputs: SFTInputs, trainer) -> SFTResult:
    """Step 3 of stage 1: evaluate the trained model, sample from it, save `OUT/sft/` atomically."""
    shutil.rmtree(inputs.work_dir, ignore_errors=True)
    profile, tokenizer = inputs.profile, inputs.tokenizer
    model = trainer.model
    log_history = [r for r in trainer.state.log_history if "loss" in r]
    ppl = perplexity(model, tokenizer, inputs.eval_texts, max_length=profile.sft_max_length)
    metrics = {
        "profile": profile.name,
        "base_model": profile.base_model,
        "seconds": round(time.perf_counter() - inputs.start, 2),
        "eval_perplexity": ppl,
        "eval_perplexity_before": inputs.before["eval_perplexity_before"],
        "train_examples": len(inputs.train_dataset),
        "train_tokens": inputs.before["train_tokens"],
        "epochs": trainer.state.epoch if trainer.state.epoch is not None else inputs.epochs,
        "eval_examples": len(inputs.eval_texts),
        "train_label_counts": inputs.before["train_label_counts"],
        "eval_label_counts": inputs.before["eval_label_counts"],
        "samples_before": inputs.before["samples_before"],
        "samples_after": sample_texts(model, tokenizer, max_new_tokens=30, seed=inputs.seed),
        "log_history": log_history,
    }
    metrics["learning_note"] = sft_learning_note(profile, metrics)
    final = stage_dir(inputs.out, "sft")
    with atomic_dir(final) as tmp, quiet_trainer_setup():
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print(f"stage 1 (SFT) done in {metrics['seconds']:.0f} s: held-out perplexity {ppl:.2f} "
          f"(before: {metrics['eval_perplexity_before']:.0f}), {metrics['epochs']:.1f} epochs over "
          f"{metrics['train_tokens']:,} tokens\n  saved in {final}")   # a path on its own line: no mid-word wrap
    if metrics["learning_note"]:
        print(f"NOTE: {metrics['learning_note']}")
    return SFTResult(final, metrics, log_history)


def sft_learning_note(profile: Profile, metrics: dict) -> str | None:
    """A sentence saying that SFT learned (almost) nothing, with the likely cause and the fix; None if it learned."""
    before, after = metrics["eval_perplexity_before"], metrics["eval_perplexity"]
    ratio = after / before if before > 0 else float("inf")
    if ratio <= profile.sft_no_learning_ratio:
        return None
    from_scratch = profile.base_model == TINY_BASE
    cause = (f"a base trained from scratch on {metrics['train_tokens']:,} tokens x {metrics['epochs']:.1f} epochs "
             "sees too little text" if from_scratch else
             f"{metrics['epochs']:.1f} epochs at learning rate {profile.sft_learning_rate:g} moved the pretrained "
             "base little")
    return (f"SFT learned almost nothing: held-out perplexity {before:.1f} -> {after:.1f} ({ratio:.2f}x, the profile "
            f"expects at most {profile.sft_no_learning_ratio:g}x). Likely cause: {cause}. Fix: more reviews, more "
            "epochs (a larger sft_token_budget / sft_max_epochs)"
            + (", or a pretrained base (--base-model gpt2, or a local model folder)" if from_scratch else
               ", or a larger sft_learning_rate") + ".")


def _label_counts(labels) -> dict:
    counts = Counter(int(y) for y in labels)
    return {"0": counts.get(0, 0), "1": counts.get(1, 0)}


def train_sft(profile: Profile, output_dir=None, dataset=None, *, seed: int = 0, force: bool = False,
              progress: bool = True) -> SFTResult:
    """Run stage 1 into `OUT/sft/` (reusing a finished one unless `force`), return its metrics.

    `dataset` is a `load_imdb` source (default: the profile's). Bad input is rejected before training.
    The same as `prepare_sft`, an `SFTTrainer` on `sft_config`, `finish_sft` (see the module docstring).
    """
    done = None if force else finished_sft(output_dir, profile)
    if done is not None:
        print(f"stage 1 (SFT) already done, reused:\n  {done.model_dir}")
        return done

    from trl import SFTTrainer

    inputs = prepare_sft(profile, output_dir, dataset, seed=seed)
    try:
        args = sft_config(profile, inputs.work_dir, seed=seed, epochs=inputs.epochs)
        with quiet_trainer_setup():
            trainer = SFTTrainer(model=inputs.model, args=args, train_dataset=inputs.train_dataset,
                                 processing_class=inputs.tokenizer)
        one_progress_bar(trainer, enabled=progress, desc="SFT")
        trainer.train()
    finally:
        shutil.rmtree(inputs.work_dir, ignore_errors=True)
    return finish_sft(inputs, trainer)
