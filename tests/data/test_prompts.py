"""PPO prompts: seeded review prefixes of bounded length."""

import pytest
from transformers import AutoTokenizer

from marl_utils.infra.errors import MarlInputError
from marl_utils.data.prompts import load_prompts
from marl_utils.data.tiny_base import train_tokenizer

TEXTS = [f"this film number {i} was a story about a family and the acting was fine" for i in range(50)]


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(TEXTS, vocab_size=300)


def test_prompts_are_review_prefixes_within_bounds(tokenizer):
    prompts = load_prompts(TEXTS, tokenizer, min_tokens=2, max_tokens=5, n=20, seed=3)
    assert len(prompts) == 20
    assert {len(p) for p in prompts} <= {2, 3, 4, 5} and len({len(p) for p in prompts}) > 1
    full = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in TEXTS]
    for p in prompts:
        assert any(ids[: len(p)] == p.tolist() for ids in full)


def test_prompts_are_seeded(tokenizer):
    a = load_prompts(TEXTS, tokenizer, n=10, seed=1)
    b = load_prompts(TEXTS, tokenizer, n=10, seed=1)
    c = load_prompts(TEXTS, tokenizer, n=10, seed=2)
    assert [x.tolist() for x in a] == [x.tolist() for x in b] != [x.tolist() for x in c]


def test_prompts_longer_than_context_are_refused(tokenizer):
    with pytest.raises(MarlInputError, match="do not fit the model's context of 8 tokens"):
        load_prompts(TEXTS, tokenizer, min_tokens=2, max_tokens=8, max_context=8)
    with pytest.raises(MarlInputError, match="invalid"):
        load_prompts(TEXTS, tokenizer, min_tokens=5, max_tokens=2)
