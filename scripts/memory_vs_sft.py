"""Peak memory of SFT, one-base PPO and separate-model PPO at one base size, as one table (issue 21, item 4).

    python scripts/memory_vs_sft.py --base-size mid [--output-dir OUT] [--sft-steps 3] [--ppo-steps 1]

Each measurement runs in its own process (marl_utils/bench/sft_memory.py); the json goes to
OUT/bench/memory_vs_sft.json. About 3 minutes for `mid` on 2 CPU cores.
"""

import sys

from marl_utils.bench.sft_memory import _main

if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
