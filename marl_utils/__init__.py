"""marl_utils: Multi-Adapter RL, one base model as policy, reference and reward model.

The seed document's API, with `marl_utils` in place of `trl`:

    from marl_utils import AutoModelForCausalLMWithValueHead, PPOConfig, PPOTrainer
"""

from .errors import MarlInputError
from .known_warnings import silence_known_library_warnings
from .modeling import AutoModelForCausalLMWithValueHead, ValueHead
from .ppo import PPOTrainer
from .ppo_config import PPOConfig
from .progress import text_bars_in_notebooks

silence_known_library_warnings()
text_bars_in_notebooks()  # a saved notebook must not hold widget bars (progress.py says why)

__version__ = "0.1.0"

__all__ = ["AutoModelForCausalLMWithValueHead", "ValueHead", "PPOConfig", "PPOTrainer", "MarlInputError"]
