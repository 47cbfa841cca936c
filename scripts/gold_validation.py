"""Validate the gold reward (marl_utils/data/gold_reward.py) against the corpus labels and the reward adapter (issue 21).

    python scripts/gold_validation.py [--output-dir runs/tiny] [--samples 256]

Prints, on the held-out split of the offline corpus:
- how often the sign of the gold reward is the label (full reviews, and their first 24 tokens: prompts and
  short responses look like that), and how many sentences it scores exactly as the generator did;
- Pearson and Spearman correlations of the gold reward with the reward adapter's scores (the proxy PPO
  optimises) on full reviews, on 24-token prefixes, and on what the SFT policy writes from PPO prompts
  (partial, sometimes ungrammatical text: where PPO works);
and writes the scatter plots to notebooks/figures/gold_vs_proxy.png and the numbers to
notebooks/figures/gold_validation.json. Builds stages 1-2 of the tiny profile first if they are missing.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

FIGURES = Path(__file__).resolve().parent.parent / "notebooks" / "figures"


def correlations(gold, proxy) -> dict:
    import pandas as pd

    gold, proxy = pd.Series(list(gold), dtype=float), pd.Series(list(proxy), dtype=float)
    # Spearman = Pearson of the ranks (ties get their average rank; pandas' own method needs scipy)
    return {"pearson": round(gold.corr(proxy), 4), "spearman": round(gold.rank().corr(proxy.rank()), 4),
            "n": len(gold)}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", default=None, help="run folder of the tiny profile (default: runs/tiny)")
    parser.add_argument("--samples", type=int, default=256, help="SFT-policy continuations to score")
    parser.add_argument("--figures", default=str(FIGURES), help="where the PNG and json go")
    args = parser.parse_args(argv)

    import torch
    from transformers import AutoTokenizer

    from marl_utils.data.corpus import generate_reviews
    from marl_utils.data.loading import clean_text, load_imdb
    from marl_utils.data.gold_reward import gold_score, gold_scores, sentence_scores
    from marl_utils.stages.ppo_parts import build_ppo_parts, ensure_earlier_stages
    from marl_utils.display.plots import _plt, _save
    from marl_utils.ppo.trainer import PPOTrainer
    from marl_utils.ppo.evaluation import decode_text
    from marl_utils.infra.profiles import PROFILES
    from marl_utils.data.prompts import load_prompts
    from marl_utils.stages.reward import load_reward_model, score_texts
    from marl_utils.infra.runs import default_output_dir, prepare_run_dir, stage_dir

    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    profile = PROFILES["tiny"]
    out = prepare_run_dir(args.output_dir or default_output_dir(profile), profile)
    ensure_earlier_stages(profile, out, progress=False)
    sft_dir, reward_dir = stage_dir(out, "sft"), stage_dir(out, "reward_adapter")
    prefix = profile.reward_eval_prefix_tokens
    reward_metrics = json.loads((reward_dir / "metrics.json").read_text())
    results = {"reward_adapter": {k: reward_metrics.get(k) for k in ("eval_accuracy", "eval_prefix_accuracy")}}

    # 1. the gold reward against the labels (and the generator's own sentence scores)
    test = load_imdb("offline")["test"]
    texts, labels = list(test["text"]), list(test["label"])
    gold_full = gold_scores(texts)
    tokenizer = AutoTokenizer.from_pretrained(sft_dir)
    prefixes = [tokenizer.decode(tokenizer(t, add_special_tokens=False)["input_ids"][:prefix]) for t in texts]
    gold_prefix = gold_scores(prefixes)
    hidden = generate_reviews()["test"]  # the same held-out reviews, with the generator's sentence scores
    exact = [sentence_scores(clean_text(r.text)) == list(r.scores) for r in hidden]
    results["labels"] = {
        "n": len(texts),
        "accuracy_full": sum((g > 0) == (y == 1) for g, y in zip(gold_full, labels)) / len(texts),
        "accuracy_prefix": sum((g > 0) == (y == 1) for g, y in zip(gold_prefix, labels)) / len(texts),
        "neutral_prefix_frac": sum(g == 0 for g in gold_prefix) / len(texts),
        "accuracy_prefix_decided": (sum((g > 0) == (y == 1) for g, y in zip(gold_prefix, labels) if g != 0)
                                    / max(1, sum(g != 0 for g in gold_prefix))),
        "reviews_scored_exactly": sum(exact) / len(exact),
    }

    # 2. the gold reward against the reward adapter's scores (the proxy)
    reward_model = load_reward_model(str(sft_dir), tokenizer, str(reward_dir))
    proxy_full = score_texts(reward_model, tokenizer, texts, max_length=profile.reward_max_length).tolist()
    proxy_prefix = score_texts(reward_model, tokenizer, texts, prefix_tokens=prefix).tolist()
    del reward_model

    # 3. on what the SFT policy writes from PPO prompts, scored as PPO scores it (prompt + response)
    model, tokenizer, config, _, _ = build_ppo_parts(profile, out)
    trainer = PPOTrainer(config, model=model, tokenizer=tokenizer)
    lo, hi = profile.ppo_prompt_tokens
    prompts = load_prompts(texts, tokenizer, min_tokens=lo, max_tokens=hi, n=args.samples, seed=1)
    torch.manual_seed(0)
    responses = trainer.generate(prompts, batch_size=64)
    proxy_sampled = trainer.score(prompts, responses).tolist()
    sampled = [decode_text(tokenizer, torch.cat([p.to(r.device), r])) for p, r in zip(prompts, responses)]
    gold_sampled = gold_scores(sampled)

    results["correlation"] = {"full_reviews": correlations(gold_full, proxy_full),
                              f"prefixes_{prefix}_tokens": correlations(gold_prefix, proxy_prefix),
                              "sft_samples": correlations(gold_sampled, proxy_sampled)}
    results["sft_samples"] = {"max_new_tokens": config.max_new_tokens, "gold_mean": sum(gold_sampled) / len(sampled),
                              "neutral_frac": sum(g == 0 for g in gold_sampled) / len(sampled),
                              "examples": [{"text": t, "gold": g, "proxy": round(p, 3)}
                                           for t, g, p in list(zip(sampled, gold_sampled, proxy_sampled))[:6]]}
    assert all(gold_score(t) == g for t, g in zip(sampled[:5], gold_sampled))

    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    rng = torch.Generator().manual_seed(0)
    panels = [("full held-out reviews", gold_full, proxy_full, "full_reviews"),
              (f"their first {prefix} tokens", gold_prefix, proxy_prefix, f"prefixes_{prefix}_tokens"),
              ("SFT policy: prompt + response", gold_sampled, proxy_sampled, "sft_samples")]
    for ax, (title, gold, proxy, key) in zip(axes, panels):
        jitter = (torch.rand(len(gold), generator=rng) - 0.5) * 0.4  # gold is an integer: spread the columns
        ax.scatter([g + j for g, j in zip(gold, jitter.tolist())], proxy, s=6, alpha=0.4)
        c = results["correlation"][key]
        ax.set_title(f"{title}\nPearson {c['pearson']:.2f}, Spearman {c['spearman']:.2f} (n={c['n']})", fontsize=9)
        ax.set_xlabel("gold reward (corpus grammar, sum of sentence scores)")
        ax.axvline(0, color="grey", lw=0.5)
        ax.axhline(0, color="grey", lw=0.5)
    axes[0].set_ylabel("proxy: reward adapter score")
    fig.suptitle("Gold reward vs the reward adapter (tiny profile, offline corpus, held-out split)", fontsize=10)
    fig.tight_layout()
    figures = Path(args.figures)
    _save(fig, figures / "gold_vs_proxy.png")
    (figures / "gold_validation.json").write_text(json.dumps(results, indent=2) + "\n")

    lab = results["labels"]
    print(f"gold vs labels ({lab['n']} held-out reviews): accuracy {lab['accuracy_full']:.4f} on full reviews, "
          f"{lab['accuracy_prefix']:.4f} on {prefix}-token prefixes ({lab['neutral_prefix_frac']:.1%} of prefixes "
          f"are neutral, gold 0; {lab['accuracy_prefix_decided']:.4f} on the rest); "
          f"{lab['reviews_scored_exactly']:.4f} of reviews scored sentence by sentence exactly as generated")
    for key, c in results["correlation"].items():
        print(f"gold vs proxy on {key}: Pearson {c['pearson']:.3f}, Spearman {c['spearman']:.3f} (n={c['n']})")
    print(f"wrote {figures / 'gold_vs_proxy.png'} and {figures / 'gold_validation.json'}")
    return results


if __name__ == "__main__":
    main()
