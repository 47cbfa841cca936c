"""Tests are arranged like the package (tests/ppo/ tests marl_utils/ppo/, ...). Shared stand-ins and worker
scripts live in tests/support/, importable from every test folder: `from stand_ins import make_tiny_llama`."""

import sys
from pathlib import Path

SUPPORT = Path(__file__).resolve().parent / "support"
if str(SUPPORT) not in sys.path:
    sys.path.insert(0, str(SUPPORT))
