"""The PPO trainer (marl_utils.ppo.trainer, marl_utils.ppo.checkpoint) on tiny local stand-ins: the (T) items of
shared/docs/ppo_checklist.md, bad input, and checkpoints."""

import json
import os
import types
from pathlib import Path

import pytest
import torch
from peft import LoraConfig
from stand_ins import LORA_TARGETS, MAKE_BASE, make_reward_adapter, make_tokenizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from marl_utils.ppo import checkpoint as checkpoint_module
from marl_utils.ppo.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from marl_utils.infra.errors import MarlInputError
from marl_utils.model.multi_adapter_model import AutoModelForCausalLMWithValueHead
from marl_utils.ppo.trainer import PPOTrainer
from marl_utils.ppo.config import PPOConfig
from marl_utils.ppo.maths import (build_rollout_batch, cut_after_eos, distinct_n, entropy_from_logits,
                                 logprobs_from_logits)
from marl_utils.ppo.rollout import policy_forward, reference_forward

torch.set_num_threads(1)
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore:.*min_new_tokens.*")
WORDS = "the movie was great and acting wonderful film bad plot boring i loved this a lot it fun".split()


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory):
    """A tiny base (with dropout 0.1, so the dropout trap is live) and its reward adapter, per architecture."""
    root = tmp_path_factory.mktemp("ppo_stand_ins")
    made = {}
    for kind, extra in [("llama", {"attention_dropout": 0.1}), ("gpt2", {})]:  # gpt2 has dropout 0.1 already
        base = MAKE_BASE[kind](root / kind, **extra)
        made[kind] = types.SimpleNamespace(kind=kind, base=str(base),
                                           adapter=str(make_reward_adapter(base, root / f"{kind}_rm")))
    return made


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def make_model(s, seed=0):
    """Policy LoRA with dropout on top of the base; LoRA B randomised so the policy differs from the reference."""
    torch.manual_seed(seed)
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=LORA_TARGETS[s.kind], task_type="CAUSAL_LM")
    model = AutoModelForCausalLMWithValueHead.from_pretrained(s.base, peft_config=lora, reward_adapter=s.adapter,
                                                              value_head_dropout=0.1)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.policy_parameters():
            if p.abs().sum() == 0:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model


def config(**kw):
    kw = {**dict(batch_size=4, mini_batch_size=2, ppo_epochs=2, learning_rate=1e-2, max_new_tokens=6, steps=2,
                 min_response_tokens=0), **kw}
    return PPOConfig(**kw)


def ids(tok, text):
    return torch.tensor(tok(text, add_special_tokens=False)["input_ids"])


def prompts(tok):
    return [ids(tok, t) for t in ["the movie", "i loved this movie a", "bad", "a wonderful film with",
                                  "the plot was", "it was"]]


def rollouts(tok):
    """Fixed queries and responses of different lengths (one ends with EOS), for deterministic steps."""
    queries = [ids(tok, t) for t in ["the movie", "i loved this", "bad", "a wonderful film with great"]]
    responses = [ids(tok, t) for t in ["was great", "movie a lot it was fun", "plot", "music"]]
    responses[2] = torch.cat([responses[2], torch.tensor([tok.eos_token_id])])
    return queries, responses, torch.tensor([1.0, -0.5, 2.0, 0.3])


def params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def no_time(stats):
    return {k: v for k, v in stats.items() if not k.startswith("time/")}


# ---------------------------------------------------------------------------------------------- rollout
def test_pad_equal_to_eos_mask_from_lengths(stand_ins, tok):
    """With pad == eos a real EOS inside a prompt stays attended: the mask comes from lengths."""
    eos = tok.eos_token_id
    queries = [torch.tensor([eos, 5, 6]), torch.tensor([7])]
    batch = build_rollout_batch(queries, [torch.tensor([8, eos]), torch.tensor([9])], pad_token_id=eos)
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [0, 0, 0, 1, 1]]
    assert batch["position_ids"][1].tolist() == [0, 0, 0, 0, 1]
    assert batch["response_mask"].tolist() == [[0, 0, 1, 1], [0, 0, 0, 1]]

    pad_is_eos = make_tokenizer()
    pad_is_eos.pad_token = pad_is_eos.eos_token
    trainer = PPOTrainer(config(), make_model(stand_ins["gpt2"]), pad_is_eos)
    prompt = torch.cat([torch.tensor([eos]), ids(tok, "the movie")])  # EOS as a document start, like GPT-2
    with torch.no_grad():  # the truth: the prompt alone, every token attended
        full = trainer.model.eval().generate(input_ids=prompt[None], attention_mask=torch.ones(1, len(prompt)),
                                             do_sample=False, max_new_tokens=6, pad_token_id=eos, eos_token_id=eos)
    expected = cut_after_eos(full[0, len(prompt):], eos)
    alone = trainer.generate([prompt], do_sample=False)[0]
    batched = trainer.generate([ids(tok, "i loved this movie a lot"), prompt], batch_size=2, do_sample=False)[1]
    assert torch.equal(alone, expected) and torch.equal(batched, expected)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_padded_row_gives_same_logprobs_and_values(stand_ins, tok, kind):
    trainer = PPOTrainer(config(), make_model(stand_ins[kind]), tok)
    query, response = ids(tok, "the movie"), ids(tok, "was great and fun")
    long_query, long_response = ids(tok, "i loved this movie a lot it was"), ids(tok, "fun")
    alone = build_rollout_batch([query], [response], tok.pad_token_id)
    padded = build_rollout_batch([long_query, query], [long_response, response], tok.pad_token_id)
    assert padded["attention_mask"][1].sum() < padded["attention_mask"].shape[1]  # row 1 really is padded
    model, t = trainer.model.eval(), trainer.config.temperature
    with torch.no_grad():
        lp_alone, v_alone, _ = policy_forward(model, alone, torch.tensor([0]), t)
        lp_padded, v_padded, _ = policy_forward(model, padded, torch.tensor([1]), t)
        ref_alone = reference_forward(model, alone, torch.tensor([0]), t)
        ref_padded = reference_forward(model, padded, torch.tensor([1]), t)
    n = len(response)
    torch.testing.assert_close(lp_padded[0, -n:], lp_alone[0, -n:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(v_padded[0, -n:], v_alone[0, -n:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ref_padded[0, -n:], ref_alone[0, -n:], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_batched_greedy_generation_equals_one_by_one(stand_ins, tok, kind):
    trainer = PPOTrainer(config(), make_model(stand_ins[kind]), tok)
    batch = prompts(tok)
    together = trainer.generate(batch, batch_size=len(batch), do_sample=False)
    alone = [trainer.generate([p], do_sample=False)[0] for p in batch]
    assert all(torch.equal(a, b) for a, b in zip(together, alone))
    with_prompt = trainer.generate(batch[:2], return_prompt=True, do_sample=False)
    assert torch.equal(with_prompt[1], torch.cat([batch[1], alone[1]]))


def test_generate_cuts_after_first_eos_and_warns_on_biased_sampling(stand_ins, tok, monkeypatch):
    trainer = PPOTrainer(config(), make_model(stand_ins["llama"]), tok)
    eos, pad = tok.eos_token_id, tok.pad_token_id
    tails = torch.tensor([[5, eos, 7, 8], [5, 6, 7, 8], [eos, pad, pad, pad]])
    seen = {}

    def fake_generate(input_ids, attention_mask, **kwargs):
        seen.update(kwargs)
        return torch.cat([input_ids, tails[: len(input_ids)]], dim=1)

    monkeypatch.setattr(trainer.model, "generate", fake_generate)
    out = trainer.generate([ids(tok, "the movie"), ids(tok, "bad"), ids(tok, "i loved this")], batch_size=3)
    assert [o.tolist() for o in out] == [[5, eos], [5, 6, 7, 8], [eos]]
    assert (seen["do_sample"], seen["top_k"], seen["top_p"]) == (True, 0, 1.0)  # plain sampling by default
    with pytest.warns(UserWarning, match="top_k.*biased"):
        trainer.generate([ids(tok, "bad")], top_k=50)
    with pytest.raises(MarlInputError, match="PPOConfig.temperature"):
        trainer.generate([ids(tok, "bad")], temperature=0.7)


def test_step_masks_everything_after_eos(stand_ins, tok):
    """A response with junk after EOS trains and reports exactly like the same response cut at EOS."""
    queries, responses, scores = rollouts(tok)
    junk = [r.clone() for r in responses]
    junk[2] = torch.cat([responses[2], ids(tok, "great great music")])
    results = []
    for batch_responses in (responses, junk):
        trainer = PPOTrainer(config(), make_model(stand_ins["llama"]), tok)
        stats = trainer.step(queries, batch_responses, scores)
        results.append((no_time(stats), params(trainer.model)))
    assert results[0][0] == results[1][0]
    assert all(torch.equal(results[0][1][n], results[1][1][n]) for n in results[0][1])


def test_score_reads_reward_at_last_real_token(stand_ins, tok):
    trainer = PPOTrainer(config(), make_model(stand_ins["llama"]), tok)
    queries, responses, _ = rollouts(tok)
    scores = trainer.score(queries, responses)
    for i, (q, r) in enumerate(zip(queries, responses)):
        alone = trainer.model.compute_reward_score(torch.cat([q, r])[None])
        torch.testing.assert_close(scores[i], alone[0], atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------- the step
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_first_minibatch_starts_at_ratio_one_with_dropout_in_the_model(stand_ins, tok, kind):
    model = make_model(stand_ins[kind]).train()  # dropout 0.1 in base, LoRA and value head, train mode
    trainer = PPOTrainer(config(), model, tok)
    stats = trainer.step(*rollouts(tok))
    assert stats["ppo/policy/approxkl_first"] < 1e-6
    assert stats["ppo/policy/approxkl"] > 1e-6  # later minibatches do move the policy
    assert model.training and all(m.training for m in model.modules())  # mode restored


def test_temperature_in_every_logprob_and_masked_statistics(stand_ins, tok):
    temperature = 2.0
    trainer = PPOTrainer(config(temperature=temperature, init_kl_coef=0.05), make_model(stand_ins["llama"]), tok)
    queries, responses, scores = rollouts(tok)
    batch = build_rollout_batch(queries, responses, tok.pad_token_id)
    mask = batch["response_mask"]
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids")}
    with torch.no_grad():
        logits = trainer.model.eval()(**inputs)[0][:, :-1] / temperature
        ref_logits = trainer.model.reference_logits(**inputs)[:, :-1] / temperature
    labels = batch["input_ids"][:, 1:]
    kl = ((logprobs_from_logits(logits, labels) - logprobs_from_logits(ref_logits, labels)) * mask).sum(-1)
    entropy = (entropy_from_logits(logits) * mask).sum() / mask.sum()
    stats = trainer.step(queries, responses, scores)
    assert stats["objective/kl"] == pytest.approx(kl.mean().item(), abs=1e-5)
    assert stats["objective/entropy"] == pytest.approx(entropy.item(), abs=1e-5)
    assert stats["ppo/policy/approxkl_first"] < 1e-6  # the training forward divides by T as well
    assert stats["ppo/response_tokens_mean"] == pytest.approx(sum(map(len, responses)) / 4)
    assert stats["ppo/distinct_2"] == pytest.approx(distinct_n(responses))
    assert stats["objective/kl_coef"] == 0.05 and trainer.kl_ctl.value != 0.05  # adaptive controller moved


def test_disabled_adapters_are_the_reference_and_ref_model_replaces_them(stand_ins, tok):
    """KL against the plain base loaded on its own (ref_model=) equals KL against the adapter-disabled base."""
    from transformers import AutoModelForCausalLM

    s = stand_ins["gpt2"]
    shared = PPOTrainer(config(), make_model(s), tok).step(*rollouts(tok))
    separate = PPOTrainer(config(), make_model(s), tok, ref_model=AutoModelForCausalLM.from_pretrained(s.base).train())
    stats = separate.step(*rollouts(tok))
    assert shared["objective/kl"] > 0.01
    assert stats["objective/kl"] == pytest.approx(shared["objective/kl"], abs=1e-4)


def test_gradient_accumulation_equals_the_larger_minibatch(stand_ins, tok):
    """mini 2 x accumulation 2 gives the same SGD update as one minibatch of 4 (token-weighted losses)."""
    queries, responses, scores = rollouts(tok)  # responses of 2, 6, 2 and 1 tokens
    after = []
    for mini, accum in [(4, 1), (2, 2)]:
        model = make_model(stand_ins["llama"])
        before = params(model)
        sgd = torch.optim.SGD(model.trainable_parameters(), lr=0.5)
        trainer = PPOTrainer(config(mini_batch_size=mini, gradient_accumulation_steps=accum, ppo_epochs=1), model,
                             tok, optimizer=sgd)
        trainer.step(queries, responses, scores)
        after.append(params(model))
    changed = [n for n in before if not torch.equal(before[n], after[0][n])]
    assert changed
    for name in changed:
        torch.testing.assert_close(after[1][name], after[0][name], atol=1e-6, rtol=1e-5)


def test_gradient_clipping_and_early_stopping(stand_ins, tok):
    model = make_model(stand_ins["llama"])
    before = [p.detach().clone() for p in model.trainable_parameters()]
    sgd = torch.optim.SGD(model.trainable_parameters(), lr=1.0)
    cfg = config(mini_batch_size=4, ppo_epochs=1, max_grad_norm=1e-3)
    PPOTrainer(cfg, model, tok, optimizer=sgd).step(*rollouts(tok))
    moved = torch.sqrt(sum(((p - b) ** 2).sum() for p, b in zip(model.trainable_parameters(), before)))
    assert 0 < moved <= 1e-3 * (1 + 1e-4)  # one SGD step of lr 1 with the gradient norm clipped to 1e-3

    stops = PPOTrainer(config(ppo_epochs=4, early_stopping=True, target_kl_early_stop=1e-12),
                       make_model(stand_ins["llama"]), tok).step(*rollouts(tok))
    assert stops["ppo/epochs"] == 1.0
    runs = PPOTrainer(config(ppo_epochs=4, early_stopping=True, target_kl_early_stop=10.0),
                      make_model(stand_ins["llama"]), tok).step(*rollouts(tok))
    assert runs["ppo/epochs"] == 4.0


def test_anti_collapse_penalty_and_score_shaping(stand_ins, tok):
    cfg = config(max_new_tokens=8, min_response_tokens=6, missing_eos_penalty=-1.0, score_clip=2.5)
    trainer = PPOTrainer(cfg, make_model(stand_ins["llama"]), tok)
    eos = tok.eos_token_id
    responses = [torch.tensor([5, eos]), torch.tensor([5] * 8), torch.tensor([5] * 5 + [eos]), torch.tensor([5] * 8)]
    shaped, info = trainer.shape_scores(responses, torch.tensor([1.0, 1.0, 1.0, 5.0]))
    # 6 is the minimum length: 2 tokens pays -2, 8 tokens without EOS pays -1, 5.0 - 1 is clipped
    assert shaped.tolist() == [-1.0, 0.0, 1.0, 2.5]
    assert info == {"env/short_response_frac": 0.25, "env/eos_frac": 0.5}

    trainer = PPOTrainer(config(normalize_scores=True), make_model(stand_ins["llama"]), tok)
    long_responses = [torch.tensor([5] * 6)] * 4
    trainer.shape_scores(long_responses, torch.tensor([1.0, 2.0, 3.0, 4.0]))
    shaped, _ = trainer.shape_scores(long_responses, torch.tensor([5.0, 6.0, 7.0, 8.0]))
    seen = torch.arange(1.0, 9.0)  # normalised by the running moments of all 8 scores
    torch.testing.assert_close(shaped, (seen[4:] - seen.mean()) / seen.std(unbiased=False))


# ---------------------------------------------------------------------------------------------- training
@pytest.fixture(scope="module")
def trained(stand_ins, tok):
    """Two PPO steps through train(); parameters, reward scores and reference logits before and after."""
    model = make_model(stand_ins["llama"])
    model.add_policy_adapter("policy_1", LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS["llama"],
                                                    task_type="CAUSAL_LM"))
    fixed = build_rollout_batch(*rollouts(tok)[:2], tok.pad_token_id)
    inputs = {k: fixed[k] for k in ("input_ids", "attention_mask")}
    probe = lambda: (model.compute_reward_score(**inputs), model.reference_logits(**inputs))  # noqa: E731
    before = (params(model), *probe())
    trainable = {n for n, p in model.named_parameters() if any(p is q for q in model.trainable_parameters())}
    trainer = PPOTrainer(config(), model, tok)
    history = trainer.train(prompts(tok), eval_prompts=prompts(tok)[:3], progress=False)
    return types.SimpleNamespace(model=model, trainer=trainer, history=history, before=before,
                                 after=(params(model), *probe()), trainable=trainable)


def test_reward_adapter_scores_and_reference_bit_identical_after_training(trained):
    assert torch.equal(trained.before[1], trained.after[1])
    assert torch.equal(trained.before[2], trained.after[2])


def test_only_policy_lora_and_value_head_change(trained):
    before, after = trained.before[0], trained.after[0]
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed == trained.trainable
    assert any("v_heads.default" in n for n in changed) and any("lora_" in n and ".default." in n for n in changed)
    assert not any("policy_1" in n or "reward_adapter" in n for n in changed)


def test_train_history_and_evaluation(trained, tok):
    assert [h["step"] for h in trained.history] == [1, 2] and trained.trainer.step_count == 2
    for key in ["objective/kl", "objective/kl_coef", "objective/entropy", "ppo/loss/policy", "ppo/loss/value",
                "ppo/policy/approxkl", "ppo/policy/clipfrac", "ppo/val/clipfrac", "ppo/val/explained_variance",
                "ppo/returns/mean", "env/reward_mean", "env/reward_std", "env/score_mean",
                "ppo/response_tokens_mean", "ppo/distinct_2", "time/ppo/total"]:
        assert all(isinstance(h[key], float) and h[key] == h[key] for h in trained.history), key
    rng = torch.get_rng_state()
    first, second = trained.trainer.evaluate(prompts(tok)[:3]), trained.trainer.evaluate(prompts(tok)[:3])
    assert torch.equal(rng, torch.get_rng_state())  # evaluation leaves the training RNG alone
    assert first == second and first["kl_mean"] != 0 and len(first["samples"]) == 3
    assert set(first) >= {"reward_mean", "kl_mean", "response_tokens_mean", "distinct_2", "samples"}


def test_dataset_gives_dataloader_and_default_prompts(stand_ins, tok):
    rows = [{"input_ids": p, "query": tok.decode(p)} for p in prompts(tok)]
    trainer = PPOTrainer(config(steps=1), make_model(stand_ins["llama"]), tok, dataset=rows)
    batch = next(iter(trainer.dataloader))
    assert len(batch["input_ids"]) == 4 and all(q.dim() == 1 for q in batch["input_ids"])
    responses = trainer.generate(batch["input_ids"])
    stats = trainer.step(batch["input_ids"], responses, trainer.score(batch["input_ids"], responses))
    entry = trainer.log_stats(stats, {"query": batch["query"], "response": tok.batch_decode(responses)})
    assert entry["step"] == 1 and entry["sample/query"] == batch["query"][0] and trainer.history == [entry]
    trainer.train(steps=2, progress=False)  # prompts default to the dataset's input_ids
    assert trainer.step_count == 2 and len(trainer.history) == 2


# ---------------------------------------------------------------------------------------------- bad input
def test_bad_step_inputs_have_clear_errors(stand_ins, tok):
    trainer = PPOTrainer(config(), make_model(stand_ins["llama"]), tok)
    before = params(trainer.model)
    queries, responses, scores = rollouts(tok)
    with pytest.raises(MarlInputError, match="3 queries, 4 responses and 4 scores.*batch_size=4"):
        trainer.step(queries[:3], responses, scores)
    # scores of the wrong shape: tests/stages/test_bad_inputs.py::test_scores_of_the_wrong_shape
    for bad in (float("nan"), float("inf")):
        with pytest.raises(MarlInputError, match=r"scores \[2\] are not finite.*no update"):
            trainer.step(queries, responses, [1.0, 0.0, bad, 0.0])
    with pytest.raises(MarlInputError, match=r"responses\[0\] is empty"):
        trainer.step(queries, [torch.tensor([], dtype=torch.long)] + responses[1:], scores)
    with pytest.raises(MarlInputError, match=r"queries\[0\] must be a 1-D tensor"):
        trainer.step([queries[0][None]] + queries[1:], responses, scores)
    assert all(torch.equal(before[n], p) for n, p in trainer.model.named_parameters())


def test_bad_config_and_tokenizer(stand_ins, tok):
    with pytest.raises(MarlInputError, match=r"batch_size=6 is not a multiple.*4 \* 1 = 4"):
        PPOConfig(batch_size=6, mini_batch_size=4)
    no_pad = make_tokenizer()
    no_pad.pad_token = None
    with pytest.raises(MarlInputError, match="no pad token.*tokenizer.pad_token = tokenizer.eos_token"):
        PPOTrainer(config(), make_model(stand_ins["llama"]), no_pad)
    with pytest.raises(MarlInputError, match="AutoModelForCausalLMWithValueHead"):
        PPOTrainer(config(), torch.nn.Linear(2, 2), tok)


# ---------------------------------------------------------------------------------------------- checkpoints
def test_resumed_run_equals_uninterrupted_run(stand_ins, tok, tmp_path):
    cfg = config(steps=3, save_every=1)
    straight = PPOTrainer(cfg, make_model(stand_ins["llama"]), tok)
    straight.train(prompts(tok), progress=False)

    def interrupt(trainer, entry):
        if trainer.step_count == 2:
            raise KeyboardInterrupt

    first = PPOTrainer(cfg, make_model(stand_ins["llama"]), tok)
    with pytest.raises(KeyboardInterrupt):
        first.train(prompts(tok), output_dir=tmp_path, callback=interrupt, progress=False)
    assert latest_checkpoint(tmp_path).name == "step-000002"

    resumed = PPOTrainer(cfg, make_model(stand_ins["llama"], seed=1), tok)  # other init: weights come from disk
    resumed.train(prompts(tok), output_dir=tmp_path, resume=True, progress=False)
    assert resumed.step_count == 3 and len(resumed.history) == 3
    assert [no_time(h) for h in resumed.history] == [no_time(h) for h in straight.history]
    for name, value in params(straight.model).items():
        assert torch.equal(value, dict(resumed.model.named_parameters())[name]), name
    assert latest_checkpoint(tmp_path).name == "step-000003"
    reloaded = AutoModelForCausalLMWithValueHead.from_pretrained(str(tmp_path / "checkpoints/step-000003/model"))
    assert torch.equal(reloaded.v_head.linear.weight, resumed.model.v_head.linear.weight)


def test_interrupted_save_keeps_previous_checkpoint(stand_ins, tok, tmp_path, monkeypatch):
    trainer = PPOTrainer(config(), make_model(stand_ins["llama"]), tok)
    trainer.step(*rollouts(tok))
    save_checkpoint(trainer, tmp_path)
    kl_value = trainer.kl_ctl.value
    trainer.step(*rollouts(tok))

    def interrupted_save(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint_module.torch, "save", interrupted_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(trainer, tmp_path)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-000001"]  # no half-written folder
    load_checkpoint(trainer, tmp_path)
    assert trainer.step_count == 1 and trainer.kl_ctl.value == kl_value and len(trainer.history) == 0


def test_foreign_or_corrupt_checkpoint_is_a_clear_error(stand_ins, tok, tmp_path):
    trainer = PPOTrainer(config(), make_model(stand_ins["llama"]), tok)
    with pytest.raises(MarlInputError, match="no PPO checkpoint under"):
        trainer.resume(tmp_path)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "checkpoint.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(MarlInputError, match="not a marl_utils PPO checkpoint"):
        trainer.resume(foreign)
    folder = trainer.save_checkpoint(tmp_path / "run")
    state = folder / "trainer_state.pt"
    state.write_bytes(state.read_bytes()[:100])
    before = params(trainer.model)
    with pytest.raises(MarlInputError, match="corrupt or incomplete.*delete it"):
        trainer.resume(tmp_path / "run")
    assert all(torch.equal(before[n], p) for n, p in trainer.model.named_parameters())


# ---------------------------------------------------------------------------------------------- data parallel
DDP_SCRIPT = """
import json, os, sys, torch
sys.path[:0] = sys.argv[1].split(os.pathsep)  # this test's folder and tests/support
torch.set_num_threads(1)
from stand_ins import make_tokenizer
from test_ppo_trainer import config, make_model, prompts
from types import SimpleNamespace
from marl_utils.ppo.trainer import PPOTrainer

tok = make_tokenizer()
model = make_model(SimpleNamespace(kind="llama", base=sys.argv[2], adapter=sys.argv[3]))
init = [p.detach().clone() for p in model.trainable_parameters()]
trainer = PPOTrainer(config(steps=2), model, tok)
sampled = [r.tolist() for r in trainer.generate(prompts(tok))]
trainer.train(prompts(tok), progress=False)
after = [p.detach() for p in model.trainable_parameters()]
json.dump({"processes": trainer.accelerator.num_processes, "policy": type(trainer.policy).__name__,
           "sampled": sampled, "params": [p.flatten().tolist() for p in after],
           "changed": any(not torch.equal(a, b) for a, b in zip(init, after)),
           "stats": [{k: v for k, v in h.items() if not k.startswith("time/")} for h in trainer.history]},
          open(f"{sys.argv[4]}/rank{trainer.accelerator.process_index}.json", "w"))
"""


def test_two_process_gloo_run_keeps_replicas_in_sync(stand_ins, tmp_path):
    """torchrun with 2 CPU processes: different rollouts per process, identical weights after each update."""
    import subprocess
    import sys

    script = tmp_path / "ddp_run.py"
    script.write_text(DDP_SCRIPT)
    s = stand_ins["llama"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
           os.pathsep.join([str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1] / "support")]), s.base, s.adapter, str(tmp_path)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rank0, rank1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert rank0["processes"] == 2 and rank0["policy"] == "DistributedDataParallel"
    assert rank0["sampled"] != rank1["sampled"]  # each process generates its own rollouts
    assert rank0["changed"] and rank0["params"] == rank1["params"]  # gradients were averaged across processes
    assert rank0["stats"] == rank1["stats"]  # statistics are reduced over processes
