"""marl_utils: Multi-Adapter RL, one base model as policy, reference and reward model.

The seed document's API, with `marl_utils` in place of `trl`:

    from marl_utils import AutoModelForCausalLMWithValueHead, PPOConfig, PPOTrainer

The subpackages, one chapter each, in layers (lowest first; a module imports its own subpackage and lower
layers only, and tests/infra/test_layout.py fails on an upward import or a cycle):

    infra    errors, atomic writes, profiles, run folders, warning filters, process memory and run cost
    data     the offline corpus, dataset loading, PPO prompts, the tiny base          (notebook 01)
    model    one base, four roles: value head, reward adapter, critic adapter, loading (notebooks 03-06)
    ppo      PPOConfig, the maths of a step, rollout, PPOTrainer, checkpoints          (notebook 03)
    grpo     TRL's GRPO/RLOO trainers scored by the reward adapter                     (notebook 07)
    display  plots, live curves, diagrams, reports for the notebooks
    stages   SFT (1), reward adapter (2), PPO/GRPO (3), the pipeline (`marl run`)
    bench    `marl bench`: time against a compute floor, memory (of PPO layouts and of SFT), separate models
    studies  does one base converge like separate models (parity over seeds); over-optimisation (notebook 08)
    cli.py and this file sit on top.
"""

from .infra.errors import MarlInputError
from .infra.known_warnings import silence_known_library_warnings
from .model.multi_adapter_model import AutoModelForCausalLMWithValueHead, ValueHead
from .ppo.trainer import PPOTrainer
from .ppo.config import PPOConfig
from .infra.progress import text_bars_in_notebooks

silence_known_library_warnings()
text_bars_in_notebooks()  # a saved notebook must not hold widget bars (progress.py says why)

__version__ = "0.1.0"

__all__ = ["AutoModelForCausalLMWithValueHead", "ValueHead", "PPOConfig", "PPOTrainer", "MarlInputError"]
