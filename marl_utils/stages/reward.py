"""Stage 2: the reward adapter, a LoRA reward model on the SAME base as the policy (notebook 02).

The reward model is the stage-1 model loaded as a sequence classifier (one output: the score) with
a LoRA adapter and a fresh score head, trained with TRL's RewardTrainer on preference pairs:
chosen = a positive review, rejected = a negative one. The Bradley-Terry loss
`-log sigmoid(r(chosen) - r(rejected))` only cares about score differences.

Because it is an adapter on the stage-1 weights, PPO can later score rollouts by switching to this
adapter on the policy's own base instead of holding a second model in memory.

PPO scores SHORT texts (a prompt plus ~20 new tokens), not full reviews. Trained on full reviews
only, a reward model may learn to read the end of a review; so we also train on pairs of prefixes.

The stage is three steps, so that notebook 02 can build the `RewardTrainer` in a cell of its own:

    inputs = prepare_reward(profile, OUT)                    # pairs, classifier, untrained accuracy
    args = reward_config(profile, inputs.work_dir, epochs=inputs.epochs)
    trainer = RewardTrainer(model=inputs.model, args=args, train_dataset=inputs.train_dataset,
                            processing_class=inputs.tokenizer, peft_config=reward_lora_config(profile, inputs.model))
    one_progress_bar(trainer)
    trainer.train()
    result = finish_reward(inputs, trainer)                  # held-out accuracy, save OUT/reward_adapter/

`train_reward_adapter` is exactly these steps in one call.
"""

from __future__ import annotations

import json
import random
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..infra.atomic import atomic_dir
from ..infra.errors import MarlInputError
from ..infra.profiles import Profile
from ..infra.runs import prepare_run_dir, read_metrics, stage_dir
from .sft import has_cuda, train_sft, training_device
from .trainer_output import one_progress_bar, quiet_trainer_setup  # noqa: F401 - notebook 02 imports it here


@dataclass
class RewardResult:
    """What stage 2 produced: the adapter folder and its held-out accuracies."""

    adapter_dir: Path
    metrics: dict
    log_history: list = field(default_factory=list)


def check_sft_dir(sft_dir: str | Path) -> Path:
    """Reject a missing folder or one that holds no model, before any training starts."""
    sft_dir = Path(sft_dir)
    if not sft_dir.is_dir():
        raise MarlInputError(f"SFT model folder {sft_dir} does not exist; run stage 1 first (`marl sft`) "
                             "or pass the folder of a causal LM saved with save_pretrained")
    if not (sft_dir / "config.json").exists() or not any(sft_dir.glob("*.safetensors")) and not any(
            sft_dir.glob("*.bin")):
        raise MarlInputError(f"{sft_dir} is not a saved model (config.json and weights expected); "
                             "point to the stage-1 output folder `OUT/sft/`")
    return sft_dir


def make_pairs(texts, labels, n_pairs: int, seed: int) -> list[tuple[str, str]]:
    """Seeded (chosen, rejected) pairs: each a positive review against a negative one."""
    rng = random.Random(seed)
    pos = [t for t, y in zip(texts, labels) if y == 1]
    neg = [t for t, y in zip(texts, labels) if y == 0]
    if not pos or not neg:
        missing = "positive (label 1)" if not pos else "negative (label 0)"
        raise MarlInputError(f"the dataset has no {missing} reviews, so no preference pairs can be made; "
                             "a reward model needs both labels")
    rng.shuffle(pos)
    rng.shuffle(neg)
    n = min(n_pairs, len(pos), len(neg))
    return list(zip(pos[:n], neg[:n]))


def tokenize_pair(tokenizer, chosen: str, rejected: str, prefix_tokens: int | None, max_length: int) -> dict:
    """Token ids of one pair; a full review ends with EOS, a prefix does not (like a PPO response cut short)."""
    def ids(text):
        tokens = tokenizer(text, add_special_tokens=False)["input_ids"]
        if prefix_tokens is not None:
            return tokens[:prefix_tokens]
        return tokens[: max_length - 1] + [tokenizer.eos_token_id]

    return {"chosen_ids": ids(chosen), "rejected_ids": ids(rejected)}


def build_pair_dataset(tokenizer, pairs, prefix_lengths, max_length: int, seed: int):
    """Full-review pairs plus the same number of prefix pairs with a seeded prefix length each."""
    from datasets import Dataset

    rng = random.Random(seed)
    rows = [tokenize_pair(tokenizer, c, r, None, max_length) for c, r in pairs]
    if prefix_lengths:
        rows += [tokenize_pair(tokenizer, c, r, rng.choice(prefix_lengths), max_length) for c, r in pairs]
    rng.shuffle(rows)
    return Dataset.from_list(rows)


def score_ids(model, batch_ids, pad_token_id: int, batch_size: int = 32):
    """One score per sequence from a sequence-classification model, right-padded batches."""
    import torch

    model.eval()
    device = next(model.parameters()).device
    scores = []
    with torch.no_grad():
        for start in range(0, len(batch_ids), batch_size):
            chunk = batch_ids[start:start + batch_size]
            width = max(len(x) for x in chunk)
            ids = torch.full((len(chunk), width), pad_token_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i, x in enumerate(chunk):
                ids[i, : len(x)] = torch.tensor(x)
                mask[i, : len(x)] = 1
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
            scores.append(logits[:, 0].float().cpu())
    return torch.cat(scores)


def score_texts(model, tokenizer, texts, *, prefix_tokens: int | None = None, max_length: int = 128):
    """Scores of plain texts (full review + EOS, or its first `prefix_tokens` tokens)."""
    batch = [tokenize_pair(tokenizer, t, t, prefix_tokens, max_length)["chosen_ids"] for t in texts]
    return score_ids(model, batch, tokenizer.pad_token_id)


def pairwise_accuracy(model, tokenizer, pairs, *, prefix_tokens=None, max_length=128) -> float:
    """Fraction of held-out pairs where the chosen review scores higher than the rejected one."""
    chosen = score_texts(model, tokenizer, [c for c, _ in pairs], prefix_tokens=prefix_tokens, max_length=max_length)
    rejected = score_texts(model, tokenizer, [r for _, r in pairs], prefix_tokens=prefix_tokens,
                           max_length=max_length)
    return (chosen > rejected).float().mean().item()


def reward_target_modules(profile: Profile, model=None):
    """The layers the reward LoRA adapts: `profile.lora_target_modules`, else every linear layer of the body
    ("all-linear"); plus the input embeddings when `profile.reward_lora_embeddings` (then `model`, the
    classifier from `prepare_reward`, is needed to name its layers)."""
    if not profile.reward_lora_embeddings:
        return list(profile.lora_target_modules) if profile.lora_target_modules else "all-linear"
    if model is None:
        raise MarlInputError("reward_lora_embeddings=True: pass the model (reward_lora_config(profile, "
                             "inputs.model)) so the embedding layer can be named")
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    names = set(profile.lora_target_modules or ())
    if not names:  # what peft's "all-linear" picks: every linear layer except the classifier head
        head = {"score", "classifier", "lm_head"}
        names = {name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                 if isinstance(module, (nn.Linear, Conv1D)) and name.rsplit(".", 1)[-1] not in head}
    embeddings = model.get_input_embeddings()
    names |= {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if module is embeddings}
    return sorted(names)


def reward_lora_config(profile: Profile, model=None):
    """peft's LoraConfig of the reward adapter (`model`: the classifier, needed when embeddings are adapted)."""
    from peft import LoraConfig

    return LoraConfig(
        task_type="SEQ_CLS",  # peft then also trains and saves the new score head (modules_to_save)
        r=profile.reward_lora_r,
        lora_alpha=profile.reward_lora_alpha,
        lora_dropout=0.0,
        bias="none",
        target_modules=reward_target_modules(profile, model),
    )


def reward_epochs(profile: Profile, n_rows: int) -> float:
    """Epochs from the pair budget: `reward_pair_budget / n_rows` (full-review and prefix pairs together), at
    least `reward_epochs` (the shipped corpus: one), at most `reward_max_epochs`; no budget: `reward_epochs`."""
    if not profile.reward_pair_budget or n_rows <= 0:
        return float(profile.reward_epochs)
    return float(min(max(profile.reward_pair_budget / n_rows, profile.reward_epochs), profile.reward_max_epochs))


def reward_config(profile: Profile, work_dir: str, seed: int = 0, *, epochs: float | None = None):
    """TRL's RewardConfig with defaults fixed for this tutorial (fp32 on CPU, no checkpointing).

    `epochs`: passes over the pairs (`prepare_reward` computes it from the pair budget); default `reward_epochs`.
    """
    from trl import RewardConfig

    cuda = has_cuda()
    return RewardConfig(
        output_dir=work_dir,
        max_length=profile.reward_max_length,
        num_train_epochs=profile.reward_epochs if epochs is None else epochs,
        max_steps=profile.reward_max_steps,
        per_device_train_batch_size=profile.reward_batch_size,
        learning_rate=profile.reward_learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=0.05,
        center_rewards_coefficient=0.01,  # keeps scores near 0, which keeps PPO's reward scale sane
        bf16=False,
        fp16=cuda,
        activation_checkpointing=False,  # the new name of gradient_checkpointing (which warns), off as in SFT
        logging_steps=10,  # rows of log_history for the plots; `one_progress_bar` keeps them off screen
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        use_cpu=not cuda,
        dataloader_num_workers=0,
        seed=seed,
        optim="adamw_torch",
    )


def load_reward_model(sft_dir, tokenizer, adapter_dir=None):
    """The stage-1 model as a 1-output sequence classifier, with the reward adapter if given."""
    import torch
    from transformers import AutoConfig

    from ..model.sequence_classifier import sequence_classifier_class

    classifier = sequence_classifier_class(AutoConfig.from_pretrained(sft_dir))  # Granite, Cohere have none in HF
    with quiet_trainer_setup():  # "score.weight newly initialized" is expected here
        model = classifier.from_pretrained(sft_dir, num_labels=1, dtype=torch.float32)
    model.config.pad_token_id = tokenizer.pad_token_id
    if adapter_dir is not None:
        from peft import PeftModel

        with quiet_trainer_setup():
            model = PeftModel.from_pretrained(model, adapter_dir)
    return model


@dataclass
class RewardInputs:
    """What `prepare_reward` sets up: the trainer's inputs, and what `finish_reward` needs after training."""

    profile: Profile
    out: Path
    sft_dir: Path
    model: Any
    """The stage-1 model as a 1-output sequence classifier (fresh score head), on the training device."""
    tokenizer: Any
    train_dataset: Any
    """A `datasets.Dataset` of token ids, columns chosen_ids and rejected_ids (full reviews and prefixes)."""
    eval_pairs: list
    """Held-out (chosen, rejected) texts; the untrained baseline and the final accuracy use exactly these."""
    epochs: float
    """Passes over `train_dataset`, from the profile's pair budget (see `reward_epochs`)."""
    untrained: dict
    """untrained_accuracy and untrained_prefix_accuracy of the fresh score head."""
    work_dir: str
    """The trainer's scratch folder (deleted by `finish_reward`)."""
    seed: int = 0
    start: float = 0.0


def finished_reward(output_dir, profile: Profile) -> RewardResult | None:
    """The result of a finished stage 2 in the run folder, or None if it has not run yet."""
    final = stage_dir(prepare_run_dir(output_dir, profile), "reward_adapter")
    if not final.exists():
        return None
    metrics = read_metrics(final)
    return RewardResult(final, metrics, metrics.get("log_history", []))


def prepare_reward(profile: Profile, output_dir=None, dataset=None, *, sft_dir=None, seed: int = 0,
                   progress: bool = True) -> RewardInputs:
    """Step 1 of stage 2: preference pairs, the stage-1 model as a classifier, its untrained accuracy.

    Builds stage 1 first if `OUT/sft/` is missing (and no `sft_dir` is given). Bad input fails before training.
    """
    import torch
    from transformers import AutoTokenizer

    from ..data.loading import load_imdb

    out = prepare_run_dir(output_dir, profile)
    data = load_imdb(dataset or profile.dataset, seed=seed)  # validates the dataset before any training
    train_pairs = make_pairs(data["train"]["text"], data["train"]["label"], profile.reward_train_pairs, seed)
    eval_pairs = make_pairs(data["test"]["text"], data["test"]["label"], profile.reward_eval_pairs, seed + 1)
    if sft_dir is None:
        sft_dir = stage_dir(out, "sft")
        if not sft_dir.exists():

            print("stage 1 output missing: running SFT first")
            train_sft(profile, out, dataset, seed=seed, progress=progress)
    sft_dir = check_sft_dir(sft_dir).resolve()

    start = time.perf_counter()
    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(sft_dir)
    if tokenizer.pad_token is None:
        raise MarlInputError(f"the tokenizer in {sft_dir} has no pad token; save the stage-1 tokenizer with one")
    model = load_reward_model(str(sft_dir), tokenizer)
    # The baseline scores 2 x 2 x reward_eval_pairs texts: on the GPU when there is one, not on the CPU before
    # the Trainer would move the model. It uses the same held-out pairs as the final accuracy, no more.
    model.to(training_device())
    max_len = profile.reward_max_length
    prefix = profile.reward_eval_prefix_tokens
    untrained = {
        "untrained_accuracy": pairwise_accuracy(model, tokenizer, eval_pairs, max_length=max_len),
        "untrained_prefix_accuracy": pairwise_accuracy(model, tokenizer, eval_pairs, prefix_tokens=prefix,
                                                       max_length=max_len),
    }
    train_ds = build_pair_dataset(tokenizer, train_pairs, profile.reward_prefix_tokens, max_len, seed)
    return RewardInputs(profile=profile, out=out, sft_dir=sft_dir, model=model, tokenizer=tokenizer,
                        train_dataset=train_ds, eval_pairs=eval_pairs, epochs=reward_epochs(profile, len(train_ds)),
                        untrained=untrained, work_dir=tempfile.mkdtemp(prefix="marl-reward-"), seed=seed,
                        start=start)


def finish_reward(inputs: RewardInputs, trainer) -> RewardResult:
    """Step 3 of stage 2: held-out accuracies of the trained adapter, save `OUT/reward_adapter/` atomically."""
    shutil.rmtree(inputs.work_dir, ignore_errors=True)
    profile, tokenizer, eval_pairs = inputs.profile, inputs.tokenizer, inputs.eval_pairs
    model = trainer.model
    max_len, prefix = profile.reward_max_length, profile.reward_eval_prefix_tokens
    log_history = [r for r in trainer.state.log_history if "loss" in r]
    metrics = {
        "profile": profile.name,
        "sft_dir": str(inputs.sft_dir),
        "seconds": round(time.perf_counter() - inputs.start, 2),
        "eval_accuracy": pairwise_accuracy(model, tokenizer, eval_pairs, max_length=max_len),
        "eval_prefix_accuracy": pairwise_accuracy(model, tokenizer, eval_pairs, prefix_tokens=prefix,
                                                  max_length=max_len),
        "eval_prefix_tokens": prefix,
        **inputs.untrained,
        # A fingerprint of the trained model: anyone loading the saved folder must get these scores back.
        "check_texts": [c for c, _ in eval_pairs[:4]],
        "check_scores": score_texts(model, tokenizer, [c for c, _ in eval_pairs[:4]], max_length=max_len).tolist(),
        "train_pairs": len(inputs.train_dataset),
        "epochs": trainer.state.epoch if trainer.state.epoch is not None else inputs.epochs,
        "eval_pairs": len(eval_pairs),
        "log_history": log_history,
    }
    metrics["learning_note"] = reward_learning_note(profile, metrics)
    final = stage_dir(inputs.out, "reward_adapter")
    with atomic_dir(final) as tmp, quiet_trainer_setup():
        # LoRA on the embeddings does not change them: the base copy peft would add to the file is OUT/sft's.
        model.save_pretrained(tmp, save_embedding_layers=False)
        tokenizer.save_pretrained(tmp)
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print(f"stage 2 (reward adapter) done in {metrics['seconds']:.0f} s: held-out accuracy "
          f"{metrics['eval_accuracy']:.3f} (untrained {metrics['untrained_accuracy']:.3f}), "
          f"{prefix}-token prefixes {metrics['eval_prefix_accuracy']:.3f}, {metrics['epochs']:.1f} epochs over "
          f"{metrics['train_pairs']:,} pairs\n  saved in {final}")
    if metrics["learning_note"]:
        print(f"NOTE: {metrics['learning_note']}")
    return RewardResult(final, metrics, log_history)


def reward_learning_note(profile: Profile, metrics: dict) -> str | None:
    """A sentence saying that stage 2 learned (almost) nothing, with the likely cause and the fix; None if it learned.

    The last logged training-pair accuracy tells the two failures apart: pairs learnt by heart that do not carry
    over to held-out reviews (labels that do not follow the texts, or too few reviews), or pairs not even fitted.
    """
    accuracy = metrics["eval_accuracy"]
    if accuracy >= profile.reward_no_learning_accuracy:
        return None
    train_accuracy = next((r["accuracy"] for r in reversed(metrics["log_history"]) if "accuracy" in r), None)
    head = (f"the reward adapter learned almost nothing: held-out pair accuracy {accuracy:.2f} (chance is 0.50, the "
            f"profile expects at least {profile.reward_no_learning_accuracy:g})")
    if train_accuracy is not None and train_accuracy >= 0.8:
        return (f"{head}, while it ranks its training pairs right {train_accuracy:.0%} of the time. Likely cause: "
                "labels that do not follow the texts (check that 1 = positive) or too few reviews, so it learnt "
                f"the {metrics['train_pairs']:,} training pairs by heart. Fix: check the labels, add labelled "
                "reviews, or start from a pretrained base (--base-model).")
    fitted = f" (training pairs: {train_accuracy:.0%} right)" if train_accuracy is not None else ""
    return (f"{head}{fitted}. Likely cause: too little training, {metrics['epochs']:.1f} epochs over "
            f"{metrics['train_pairs']:,} pairs at learning rate {profile.reward_learning_rate:g}. Fix: more epochs "
            "(a larger reward_pair_budget / reward_max_epochs), more labelled reviews, or a pretrained base "
            "(--base-model).")


def train_reward_adapter(profile: Profile, output_dir=None, dataset=None, *, sft_dir=None, seed: int = 0,
                         force: bool = False, progress: bool = True) -> RewardResult:
    """Run stage 2 into `OUT/reward_adapter/` (building stage 1 first if it is missing).

    The same as `prepare_reward`, a `RewardTrainer` on `reward_config` with `peft_config=reward_lora_config(...)`,
    then `finish_reward` (see the module docstring).
    """
    done = None if force else finished_reward(output_dir, profile)
    if done is not None:
        print(f"stage 2 (reward adapter) already done, reused:\n  {done.adapter_dir}")
        return done

    from trl import RewardTrainer

    inputs = prepare_reward(profile, output_dir, dataset, sft_dir=sft_dir, seed=seed, progress=progress)
    try:
        args = reward_config(profile, inputs.work_dir, seed, epochs=inputs.epochs)
        with quiet_trainer_setup():
            trainer = RewardTrainer(model=inputs.model, args=args, train_dataset=inputs.train_dataset,
                                    processing_class=inputs.tokenizer,
                                    peft_config=reward_lora_config(profile, inputs.model))
        one_progress_bar(trainer, enabled=progress, desc="reward adapter")
        trainer.train()
    finally:
        shutil.rmtree(inputs.work_dir, ignore_errors=True)
    return finish_reward(inputs, trainer)
