"""The gold reward (marl_utils.gold_reward): the corpus grammar's own sentiment, and evaluate()'s gold_mean."""

import os

import pytest
import torch
from peft import LoraConfig
from stand_ins import LORA_TARGETS, make_reward_adapter, make_tiny_llama, make_tokenizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from marl_utils.corpus import generate_reviews
from marl_utils.gold_reward import gold_metrics, gold_score, gold_scorer_for, gold_scores, sentence_scores
from marl_utils.modeling import AutoModelForCausalLMWithValueHead
from marl_utils.ppo import PPOTrainer
from marl_utils.ppo_config import PPOConfig

torch.set_num_threads(1)


def test_reads_every_corpus_sentence_as_the_grammar_scored_it():
    # the generator keeps each sentence's hidden score: the gold reward must recover all of them, so that on
    # the corpus it IS the grammar's sentiment (labels follow: the label is the sign of the sum)
    reviews = generate_reviews(seed=3, n_train=300, n_test=100)
    for review in reviews["train"] + reviews["test"]:
        assert sentence_scores(review.text) == list(review.scores), review.text
        assert (gold_score(review.text) > 0) == (review.label == 1)


@pytest.mark.parametrize("text, expected", [
    ("The acting was not good.", -2),
    ("The acting was not good at all.", -3),            # the grammar's strong negated form
    ("This drama is not clever at all.", -2),           # ... but its predicate form is plain
    ("The plot was not bad at all.", 1),                # a negated negative is mild praise
    ("It was not as dull as I had feared.", 1),
    ("I was not bored for a single second.", 2),
    ("I did not enjoy it at all.", -2),
    ("I would not recommend it to my worst enemy.", -3),  # "worst enemy" is a neutral audience
    ("I would highly recommend it to anyone who likes a good drama.", 3),
    ("I give it seven out of ten.", 2),
    ("I give it five out of ten.", 0),                  # not a grammar rating: judges nothing
    ("The only good thing was the score, which was truly lovely.", 3),   # the contrary frame is neutral
    ("The one weak spot was the pacing, which was a bit slow.", -1),
    ("There is also a subplot about a lost dog.", 0),
    ("The best friend is played by a newcomer.", 0),
    ("The acting is truly great, and the score is good as well.", 3),   # one judgement per sentence
    ("great but awful", 0),                             # both signs in one sentence: they cancel
    ("It was superb superb terrible", 2),               # summed (2 + 2 - 2), clipped to [-3, 3]
    ("xyzzy flibber wug.", 0),                          # unknown words judge nothing
    ("", 0),
])
def test_sentence_rules(text, expected):
    assert gold_score(text) == expected


def test_partial_text_counts_what_it_already_says():
    assert gold_score("I watched this movie last weekend and the acting was truly") == 0
    assert gold_score("I watched this movie last weekend and the acting was truly superb") == 3
    assert gold_score("It was great. The plot was not") == 2           # the dangling "not" negates nothing yet
    assert gold_score("It was great. The plot was not good") == 0      # +2 then -2: the balance
    assert gold_score("It was dull.<br /><br />I loved every minute of it") == 1


def test_mixed_review_is_the_balance_of_its_sentences():
    text = ("It was truly wonderful. The cast is great. My only complaint is that the pacing was slow. "
            "I will watch it again.")
    assert sentence_scores(text) == [3, 2, -2, 2] and gold_score(text) == 5


def test_scorer_only_for_the_offline_corpus():
    assert gold_scorer_for("offline") is gold_scores and gold_scorer_for(None) is gold_scores
    assert gold_scorer_for("stanfordnlp/imdb") is None and gold_scorer_for("data/short_reviews.csv") is None
    metrics = gold_metrics({"reward_mean": 0.0}, {"reward_mean": 1.0}, "stanfordnlp/imdb")
    assert metrics["eval_gold_after"] is None and "unavailable" in metrics["gold_note"]


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
    root = tmp_path_factory.mktemp("gold_eval")
    base = make_tiny_llama(root / "base")
    adapter = make_reward_adapter(base, root / "rm")
    torch.manual_seed(0)
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=LORA_TARGETS["llama"], task_type="CAUSAL_LM")
    model = AutoModelForCausalLMWithValueHead.from_pretrained(str(base), peft_config=lora, reward_adapter=str(adapter))
    config = PPOConfig(batch_size=4, mini_batch_size=2, max_new_tokens=6, min_response_tokens=0)
    return PPOTrainer(config, model=model, tokenizer=make_tokenizer(padding_side="left"))


def test_evaluate_reports_gold_of_prompt_plus_response(trainer):
    tok = trainer.tokenizer
    prompts = [torch.tensor(tok(t, add_special_tokens=False)["input_ids"])
               for t in ["the movie was", "i loved this", "the plot was boring", "a wonderful film"]]
    seen = []

    def gold(texts):
        seen.extend(texts)
        return gold_scores(texts)

    plain = trainer.evaluate(prompts, seed=5)
    result = trainer.evaluate(prompts, seed=5, gold_reward=gold)
    assert "gold_mean" not in plain                        # no gold reward given: none reported, none faked
    assert result["reward_mean"] == plain["reward_mean"]   # same samples: gold is read beside, not instead
    assert len(seen) == len(prompts)
    for text, sample in zip(seen, result["samples"]):
        assert text.startswith(sample["prompt"]) and text.endswith(sample["response"])
        assert sample["gold"] == gold_score(text)
    assert result["gold_mean"] == pytest.approx(sum(gold_scores(seen)) / len(seen))
