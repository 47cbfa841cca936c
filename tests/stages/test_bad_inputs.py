"""The catalogue of bad inputs: each one, through the public entry point a learner uses (the `marl` command or
a library call), gets a `MarlInputError` whose MESSAGE says what was wrong and how to fix it, raised before
any training (or weight loading) starts, with no stage folder and no temporary folder left behind.

The table in docs/troubleshooting.md ("When something is wrong") lists the same cases in the same order. Deeper
variants of several rows live next to the code they test (test_data, test_multi_adapter_model, test_quantized,
test_ppo_trainer, test_profiles).
"""

import json
import os
import re
import sys
import warnings

import pytest
import torch
from peft import LoraConfig, get_peft_model
from stand_ins import make_reward_adapter, make_tiny_llama
from transformers import AutoModelForCausalLM, AutoTokenizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from ppo_worker import build_trainer, prompts
from small_profiles import SMALL

from marl_utils.cli import main
from marl_utils.infra.errors import MarlInputError
from marl_utils.model.multi_adapter_model import AutoModelForCausalLMWithValueHead
from marl_utils.ppo.config import PPOConfig
from marl_utils.ppo.maths import build_rollout_batch
from marl_utils.infra.profiles import PROFILES

torch.set_num_threads(1)
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")
LORA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")


def cli_error(argv, capsys) -> str:
    """Run `marl ARGV`; it must end with exit code 2 and exactly one `error: ...` line, no traceback."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def assert_nothing_written(out, allowed=("run.json",)) -> None:
    """No stage folder, no hidden temporary folder: at most the run folder's run.json."""
    if out.exists():
        assert {p.name for p in out.iterdir()} <= set(allowed), sorted(p.name for p in out.iterdir())


@pytest.fixture
def small_profile(monkeypatch):
    """`--profile tiny` means the test-sized profile: if a check ever stopped working, training stays short."""
    monkeypatch.setitem(PROFILES, "tiny", SMALL)
    return SMALL


# ---------------------------------------------------------------------------------------------- profile, output
def test_unknown_profile(tmp_path, capsys, monkeypatch):
    line = cli_error(["sft", "--profile", "huge", "--output-dir", str(tmp_path / "out")], capsys)
    assert line == ("error: unknown profile 'huge'; choose one of ['gpt2-imdb', 'tiny'] (via --profile or the "
                    "MARL_PROFILE environment variable)")
    monkeypatch.setenv("MARL_PROFILE", "tiny-gpu")
    assert "unknown profile 'tiny-gpu'" in cli_error(["reward", "--output-dir", str(tmp_path / "out")], capsys)
    assert not (tmp_path / "out").exists()


def test_output_folder_of_another_profile(tmp_path, capsys, small_profile):
    out = tmp_path / "out"
    out.mkdir()
    (out / "run.json").write_text(json.dumps({"profile": "gpt2-imdb"}))
    line = cli_error(["sft", "--profile", "tiny", "--output-dir", str(out)], capsys)
    assert "holds artifacts of profile 'gpt2-imdb', not 'tiny'; use another --output-dir" in line
    assert json.loads((out / "run.json").read_text()) == {"profile": "gpt2-imdb"}
    assert_nothing_written(out)


def test_output_folder_with_stages_of_unknown_profile_or_a_file(tmp_path, capsys, small_profile):
    (tmp_path / "out" / "sft").mkdir(parents=True)
    line = cli_error(["run", "--profile", "tiny", "--output-dir", str(tmp_path / "out")], capsys)
    assert "already holds stage folders but no run.json, so their profile is unknown" in line
    assert_nothing_written(tmp_path / "out", allowed={"sft"})
    (tmp_path / "file").write_text("")
    line = cli_error(["sft", "--profile", "tiny", "--output-dir", str(tmp_path / "file")], capsys)
    assert "is a file; pass a folder path with --output-dir" in line


# ---------------------------------------------------------------------------------------------- dataset
DATASETS = {  # case: (file name, content or None for "no such file", command, message)
    "missing": ("nope.csv", None, "sft", r"dataset '.*nope\.csv' does not exist: pass an existing file or folder"),
    "unreadable": ("reviews.parquet", b"PAR1 not a parquet file", "reward",
                   r"could not read .*reviews\.parquet as parquet \(.*\); check that the file is complete"),
    "unsupported type": ("reviews.txt", b"great film", "sft", r"unsupported file type '\.txt'; convert it to one of"),
    "wrong columns": ("reviews.csv", b"review,stars\ngreat,5\nawful,1\n", "run",
                      r"has no 'text' or 'label' column \(found \['review', 'stars'\]\); rename the review column"),
    "one label only": ("pos.csv", b"text,label\n" + b"".join(b"a fine film %d,1\n" % i for i in range(20)),
                       "reward", r"has only positive \(1\) labels; a sentiment dataset needs both"),
    "empty": ("empty.csv", b"text,label\n", "ppo", r"is empty \(0 rows\); pass a dataset with labelled reviews"),
    "empty file": ("blank.csv", b"", "sft", r"could not read .*blank\.csv as csv \(No columns to parse from file\)"),
    "labels not 0/1": ("stars.csv", b"text,label\ngreat,5\nawful,1\nok,0\n", "sft",
                       r"labels outside 0/1 \(5\); use 0/1, true/false or 'neg'/'pos'"),
}


@pytest.mark.parametrize("case", DATASETS)
def test_bad_dataset(case, tmp_path, capsys, small_profile):
    name, content, command, message = DATASETS[case]
    if content is not None:
        (tmp_path / name).write_bytes(content)
    out = tmp_path / "out"
    line = cli_error([command, "--profile", "tiny", "--dataset", str(tmp_path / name), "--output-dir", str(out)],
                     capsys)
    assert re.search(message, line), line
    assert_nothing_written(out)


# ---------------------------------------------------------------------------------------------- stage settings
def test_base_model_that_cannot_be_loaded(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(PROFILES, "tiny", SMALL.replace(base_model=str(tmp_path / "no_base")))
    line = cli_error(["sft", "--profile", "tiny", "--output-dir", str(tmp_path / "out")], capsys)
    assert f"cannot load the base model '{tmp_path / 'no_base'}'" in line and "pass a local model folder" in line
    assert_nothing_written(tmp_path / "out")


def test_base_model_flag_that_is_no_model_or_another_runs_base(tmp_path, capsys, small_profile):
    out = tmp_path / "out"
    line = cli_error(["run", "--profile", "tiny", "--base-model", str(tmp_path / "nope"), "--output-dir", str(out)],
                     capsys)
    assert f"--base-model {tmp_path / 'nope'}: no such model folder; pass a folder written by save_pretrained" in line
    (tmp_path / "notes").mkdir()
    line = cli_error(["sft", "--profile", "tiny", "--base-model", str(tmp_path / "notes"), "--output-dir", str(out)],
                     capsys)
    assert "the folder has no config.json, so it is not a saved model" in line
    assert not out.exists()
    out.mkdir()
    (out / "run.json").write_text(json.dumps({"profile": "tiny", "base_model": "tiny"}))
    base = make_tiny_llama(tmp_path / "base")
    line = cli_error(["reward", "--profile", "tiny", "--base-model", str(base), "--output-dir", str(out)], capsys)
    assert "holds stages trained from base model 'tiny', not" in line and "use another --output-dir" in line
    assert_nothing_written(out)


def test_sft_folder_that_holds_no_model(tmp_path, capsys, small_profile):
    out = tmp_path / "out"
    (out / "sft").mkdir(parents=True)
    (out / "run.json").write_text(json.dumps({"profile": "tiny"}))
    (out / "sft" / "notes.txt").write_text("not a model")
    line = cli_error(["reward", "--profile", "tiny", "--output-dir", str(out)], capsys)
    assert "is not a saved model (config.json and weights expected); point to the stage-1 output folder" in line
    assert_nothing_written(out, allowed={"run.json", "sft"})


@pytest.mark.parametrize("command, changes, argv, message", [
    ("ppo", dict(ppo_batch_size=6, ppo_mini_batch_size=4), [],
     r"profile 'tiny': PPOConfig.batch_size=6 is not a multiple of mini_batch_size \* gradient_accumulation_steps = "
     r"4 \* 1 = 4; .* Use batch_size=4 or 8"),
    ("run", dict(ppo_prompt_tokens=(2, 120)), [],
     r"prompts of up to 120 tokens plus 20 new tokens do not fit the model's context of 128 tokens; lower the "
     r"profile's ppo_prompt_tokens or ppo_max_new_tokens"),
    ("ppo", {}, ["--steps", "-1"], r"PPOConfig.steps=-1 must be an integer >= 0"),
], ids=["batch not a multiple of the minibatch", "prompts longer than the context", "negative steps"])
def test_impossible_ppo_settings_fail_before_stage_1(command, changes, argv, message, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(PROFILES, "tiny", SMALL.replace(**changes))
    line = cli_error([command, "--profile", "tiny", "--output-dir", str(tmp_path / "out"), *argv], capsys)
    assert re.search(message, line), line
    assert_nothing_written(tmp_path / "out")  # not even the tiny base was built


# ---------------------------------------------------------------------------------------------- the model
@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_inputs")
    base = make_tiny_llama(root / "base")
    return base, make_reward_adapter(base, root / "reward_adapter")


def forbid_weight_loading(monkeypatch) -> None:
    """Checks on paths and adapters must come before the (long) weight loading."""
    def refuse(*args, **kwargs):
        raise AssertionError("weights were loaded before the input was checked")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", refuse)


@pytest.fixture
def no_weights(monkeypatch):
    forbid_weight_loading(monkeypatch)


def load(base, **kwargs):
    return AutoModelForCausalLMWithValueHead.from_pretrained(str(base), **kwargs)


def test_reward_adapter_missing_or_not_an_adapter(stand_ins, tmp_path, no_weights):
    base, _ = stand_ins
    with pytest.raises(MarlInputError, match=r"reward adapter folder .*nope does not exist; pass the folder written "
                                             r"by stage 2 \(`marl reward`, `OUT/reward_adapter/`\)"):
        load(base, peft_config=LoraConfig(**LORA), reward_adapter=str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(MarlInputError, match=r"is not a peft adapter folder: adapter_config.json is missing"):
        load(base, peft_config=LoraConfig(**LORA), reward_adapter=str(tmp_path / "empty"))
    with pytest.raises(MarlInputError, match=r"is a full model folder: adapter_config.json is missing"):
        load(base, peft_config=LoraConfig(**LORA), reward_adapter=str(base))


def test_reward_adapter_without_score_head(stand_ins, tmp_path, monkeypatch):
    base, _ = stand_ins
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        causal_lora = get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(**LORA))
    causal_lora.save_pretrained(tmp_path / "causal_lm_adapter")
    forbid_weight_loading(monkeypatch)
    with pytest.raises(MarlInputError, match=r"has no score head: its weights hold LoRA matrices only. Train it as "
                                             r"stage 2 does"):
        load(base, peft_config=LoraConfig(**LORA), reward_adapter=str(tmp_path / "causal_lm_adapter"))


def test_reward_adapter_of_another_base(stand_ins, tmp_path, monkeypatch):
    base, _ = stand_ins
    wider = make_reward_adapter(make_tiny_llama(tmp_path / "wider", hidden=48), tmp_path / "wider_rm")
    twin = make_reward_adapter(make_tiny_llama(tmp_path / "twin", seed=1), tmp_path / "twin_rm")
    forbid_weight_loading(monkeypatch)
    with pytest.raises(MarlInputError, match=r"trained on a base with hidden size 48, but this base has hidden size "
                                             r"32: stage 2 and PPO must use the same base model"):
        load(base, peft_config=LoraConfig(**LORA), reward_adapter=str(wider))
    monkeypatch.undo()
    with pytest.warns(UserWarning, match=r"records base_model_name_or_path=.*twin.*scores are only meaningful if both "
                                         r"are the same model"):
        load(base, peft_config=LoraConfig(**LORA), reward_adapter=str(twin))  # same shapes: loads, but warns


def test_reward_adapter_without_peft_config(stand_ins, no_weights):
    base, adapter = stand_ins
    with pytest.raises(MarlInputError, match=r"peft_config is required: the PPO policy is a LoRA adapter on the base "
                                             r"and reward_adapter is given; pass peft_config=LoraConfig"):
        load(base, reward_adapter=str(adapter))


def test_both_8bit_and_4bit_and_bitsandbytes_missing(stand_ins, monkeypatch, no_weights):
    base, adapter = stand_ins
    with pytest.raises(MarlInputError, match="load_in_8bit=True and load_in_4bit=True were both given; pick one"):
        load(base, peft_config=LoraConfig(**LORA), reward_adapter=str(adapter), load_in_8bit=True, load_in_4bit=True)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` now fails
    with pytest.raises(MarlInputError, match=r"load_in_4bit=True needs the bitsandbytes package, which is not "
                                             r"installed: `pip install bitsandbytes`"):
        load(base, peft_config=LoraConfig(**LORA), reward_adapter=str(adapter), load_in_4bit=True)


def test_unknown_ppo_adapter_name(stand_ins):
    base, adapter = stand_ins
    model = load(base, peft_config=LoraConfig(**LORA), reward_adapter=str(adapter))
    ids = torch.tensor([[5, 6, 7]])
    with pytest.raises(MarlInputError, match=r"no policy adapter named 'policy_9'; policy adapters: \['default'\]. "
                                             r"Add one with model.add_policy_adapter"):
        model.compute_reward_score(ids, ppo_adapter_name="policy_9")
    with pytest.raises(MarlInputError, match=r"no policy adapter named 'reward_adapter' \(that is the frozen reward "
                                             r"adapter\)"):
        model.compute_reward_score(ids, ppo_adapter_name="reward_adapter")
    assert model.active_adapter == "default"


# ---------------------------------------------------------------------------------------------- the trainer
def rollouts(tokenizer, eos_id):
    """Queries and responses of different lengths (so there is padding); one response ends with EOS."""
    def ids(text):
        return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])

    queries = [ids(t) for t in ["the movie", "i loved this", "bad", "a wonderful film with great"]]
    responses = [ids(t) for t in ["was great", "movie a lot it was fun", "plot", "music"]]
    responses[2] = torch.cat([responses[2], torch.tensor([eos_id])])
    return queries, responses, [1.0, -0.5, 2.0, 0.3]


def test_tokenizer_without_pad_token(stand_ins):
    tokenizer = AutoTokenizer.from_pretrained(stand_ins[0])
    tokenizer.pad_token = None
    with pytest.raises(MarlInputError, match=r"the tokenizer has no pad token: set one before building the trainer, "
                                             r"e.g. tokenizer.pad_token = tokenizer.eos_token"):
        build_trainer(*stand_ins, tokenizer=tokenizer)


def test_pad_equal_to_eos_works(stand_ins):
    """pad == eos is allowed: masks come from lengths, so the EOS that ends a response still counts."""
    pad_is_eos = AutoTokenizer.from_pretrained(stand_ins[0])
    pad_is_eos.pad_token = pad_is_eos.eos_token
    eos = pad_is_eos.eos_token_id
    results = []
    for tokenizer in (AutoTokenizer.from_pretrained(stand_ins[0]), pad_is_eos):
        trainer = build_trainer(*stand_ins, tokenizer=tokenizer)
        queries, responses, scores = rollouts(tokenizer, eos)
        reward = trainer.score(queries, responses)  # read at the EOS that ends response 2, not before it
        stats = trainer.step(queries, responses, scores)
        results.append((reward, {k: v for k, v in stats.items() if not k.startswith("time/")},
                        [p.detach().clone() for p in trainer.model.trainable_parameters()]))
    assert trainer.pad_token_id == eos
    batch = build_rollout_batch(queries, responses, eos)
    assert batch["response_mask"][2].sum() == len(responses[2])  # EOS included, padding excluded
    (reward_a, stats_a, params_a), (reward_b, stats_b, params_b) = results
    torch.testing.assert_close(reward_b, reward_a, atol=1e-6, rtol=0)
    assert stats_b == pytest.approx(stats_a, abs=1e-6)
    for a, b in zip(params_a, params_b):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=0)


def test_batch_not_a_multiple_of_the_minibatch():
    with pytest.raises(MarlInputError, match=r"PPOConfig.batch_size=6 is not a multiple of mini_batch_size \* "
                                             r"gradient_accumulation_steps = 4 \* 1 = 4; every optimizer step must "
                                             r"see whole minibatches. Use batch_size=4 or 8"):
        PPOConfig(batch_size=6, mini_batch_size=4)
    with pytest.raises(MarlInputError, match=r"= 2 \* 2 = 4; .* Use batch_size=8 or 12"):
        PPOConfig(batch_size=10, mini_batch_size=2, gradient_accumulation_steps=2)


def test_deepspeed_launch_is_refused_before_any_rollout(stand_ins, monkeypatch):
    from accelerate import Accelerator
    from accelerate.utils import DistributedType

    # what `accelerate launch` with a DeepSpeed config gives (deepspeed itself is not needed to see the check)
    monkeypatch.setattr(Accelerator, "distributed_type", property(lambda self: DistributedType.DEEPSPEED))
    with pytest.raises(MarlInputError, match=r"PPOTrainer runs data-parallel \(DDP\), not under DeepSpeed: launch "
                                             r"it without a DeepSpeed config"):
        build_trainer(*stand_ins)


@pytest.fixture
def trainer(stand_ins):
    return build_trainer(*stand_ins)


def unchanged(trainer, before) -> bool:
    return all(torch.equal(before[n], p) for n, p in trainer.model.named_parameters())


def test_mismatched_queries_responses_scores(trainer):
    queries, responses, scores = rollouts(trainer.tokenizer, trainer.eos_token_id)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    with pytest.raises(MarlInputError, match=r"step\(\) got 3 queries, 4 responses and 4 scores; each must be a list "
                                             r"of PPOConfig.batch_size=4"):
        trainer.step(queries[:3], responses, scores)
    with pytest.raises(MarlInputError, match=r"step\(\) got 4 queries, 4 responses and 5 scores"):
        trainer.step(queries, responses, scores + [0.0])
    assert unchanged(trainer, before) and trainer.step_count == 0


def test_scores_of_the_wrong_shape(trainer):
    queries, responses, scores = rollouts(trainer.tokenizer, trainer.eos_token_id)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    with pytest.raises(MarlInputError, match=r"scores has shape \(4, 1\): pass one scalar score per response, as a "
                                             r"list or a 1-D tensor of length 4"):
        trainer.step(queries, responses, torch.tensor(scores).unsqueeze(1))
    with pytest.raises(MarlInputError, match=r"scores\[2\] has shape \(2,\): each score must be one scalar"):
        trainer.step(queries, responses, [torch.tensor(0.0), torch.tensor(1.0), torch.tensor([1.0, 2.0]),
                                          torch.tensor(0.5)])
    assert unchanged(trainer, before) and trainer.step_count == 0


def test_non_finite_rewards(trainer):
    queries, responses, _ = rollouts(trainer.tokenizer, trainer.eos_token_id)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    with pytest.raises(MarlInputError, match=r"scores \[1, 3\] are not finite \(\[nan, inf\]\); no update was made. "
                                             r"Check the reward model \(or clip its output with PPOConfig.score_clip"):
        trainer.step(queries, responses, [0.0, float("nan"), 1.0, float("inf")])
    assert unchanged(trainer, before) and trainer.step_count == 0


def test_prompt_past_the_models_context(trainer):
    long_prompt = torch.full((125,), 5)  # + max_new_tokens=6 > the stand-in's 128 positions
    with pytest.raises(MarlInputError, match=r"a prompt plus max_new_tokens is 131 tokens, longer than the model's "
                                             r"context of 128 tokens; use shorter prompts"):
        trainer.generate([torch.tensor([5, 6]), long_prompt])
    with pytest.raises(MarlInputError, match=r"a query plus its response is 130 tokens, longer than"):
        trainer.step([long_prompt] * 4, [torch.tensor([5] * 5)] * 4, [0.0] * 4)


def test_training_without_prompts_or_resume_without_folder(trainer):
    with pytest.raises(MarlInputError, match=r"train\(\) needs prompts: pass a list of 1-D token tensors"):
        trainer.train(progress=False)
    with pytest.raises(MarlInputError, match=r"train\(resume=True\) needs the output_dir of the run to resume"):
        trainer.train(prompts(trainer.tokenizer), resume=True, progress=False)


# ---------------------------------------------------------------------------------------------- resuming
@pytest.fixture
def saved_run(stand_ins, tmp_path):
    """A run folder with one checkpoint (step 1), and a fresh trainer to resume into it."""
    first = build_trainer(*stand_ins, steps=1)
    first.train(prompts(first.tokenizer), output_dir=tmp_path, progress=False)
    return tmp_path, tmp_path / "checkpoints" / "step-000001"


def assert_resume_refused(trainer, out, message):
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    with pytest.raises(MarlInputError, match=message):
        trainer.train(prompts(trainer.tokenizer), output_dir=out, resume=True, progress=False)
    assert unchanged(trainer, before) and trainer.step_count == 0 and trainer.history == []


def test_corrupt_checkpoint_on_resume(stand_ins, saved_run):
    out, checkpoint = saved_run
    state = checkpoint / "trainer_state.pt"
    state.write_bytes(state.read_bytes()[:200])  # a truncated file, as a full disk leaves it
    assert_resume_refused(build_trainer(*stand_ins), out,
                          r"checkpoint .*step-000001 is corrupt or incomplete \(.*\); delete it and resume from an "
                          r"earlier one")
    (checkpoint / "checkpoint.json").write_text("{not json")
    assert_resume_refused(build_trainer(*stand_ins), out,
                          r"checkpoint.json cannot be read .* this checkpoint is damaged: delete")


def test_foreign_checkpoint_on_resume(stand_ins, saved_run):
    out, checkpoint = saved_run
    assert_resume_refused(build_trainer(*stand_ins, lora_r=8), out,
                          r"checkpoint .*step-000001 does not fit this model \(default: model.layers.0.self_attn."
                          r"q_proj.lora_A.weight is \[4, 32\] there, \[8, 32\] here; .*\); resume with the same base "
                          r"model and LoRA config")
    other = build_trainer(*stand_ins)
    other.model.add_policy_adapter("policy_1", LoraConfig(**LORA))
    other.model.set_policy_adapter("policy_1")
    other = type(other)(other.config, model=other.model, tokenizer=other.tokenizer)
    assert_resume_refused(other, out, r"trained the policy adapter 'default', this trainer trains 'policy_1'")
    (checkpoint / "checkpoint.json").write_text(json.dumps({"format": "someone-elses-trainer"}))
    assert_resume_refused(build_trainer(*stand_ins), out,
                          r"is not a marl_utils PPO checkpoint \(format 'someone-elses-trainer'\); pass a folder "
                          r"written by PPOTrainer.save_checkpoint")
