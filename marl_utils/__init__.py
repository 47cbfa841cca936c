"""marl_utils: Multi-Adapter RL, one base model as policy, reference and reward model.

The seed document's API, with `marl_utils` in place of `trl`:

    from marl_utils import AutoModelForCausalLMWithValueHead, PPOConfig, PPOTrainer
"""

from .infra.errors import MarlInputError
from .infra.known_warnings import silence_known_library_warnings
from .model.multi_adapter_model import AutoModelForCausalLMWithValueHead, ValueHead
from .ppo.trainer import PPOTrainer
from .ppo.config import PPOConfig

silence_known_library_warnings()

__version__ = "0.1.0"

__all__ = ["AutoModelForCausalLMWithValueHead", "ValueHead", "PPOConfig", "PPOTrainer", "MarlInputError"]
