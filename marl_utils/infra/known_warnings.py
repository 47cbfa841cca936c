"""The library warnings a learner did not cause and cannot act on, filtered in this one place (all notebooks).

Each filter matches one exact message of a pinned dependency, with the reason it is safe to hide. Anything
else still shows: a new warning after an upgrade is news, not noise.
"""

from __future__ import annotations

import logging
import warnings

KNOWN = [
    # peft 0.21's PeftModel.__init__ reads `model.is_gradient_checkpointing`, which transformers 5 deprecated in
    # favour of `is_activation_checkpointing`; nothing the user calls, and peft will follow.
    (FutureWarning, r"`is_gradient_checkpointing` is deprecated and will be removed in v6"),
    # peft 0.21 warns, when an adapter targets the input embeddings of a model with tied embeddings (the tiny
    # base; the stage-2 reward adapter adapts its embeddings), that merging or converting such an adapter has no
    # tying support. marl_utils never merges the reward adapter: it runs as an adapter, its LoRA acts on the
    # embedding lookup only, and the policy's output layer stays the base's.
    (UserWarning, r"Model has `tie_word_embeddings=True` and a tied layer is part of the adapter"),
    # peft 0.21 on GPT-2's Conv1D layers: a LoraConfig without fan_in_fan_out=True is corrected by peft itself.
    (UserWarning, r"fan_in_fan_out is set to False but the target module is `Conv1D`"),
]


KNOWN_LOG_RECORDS = [
    # bitsandbytes 0.50, on CPUs with avx512_bf16, logs at import that the optional `kernels` package is missing:
    # it would only speed up the CPU 4-bit inference kernel, which marl_utils switches off so that 4-bit LoRA
    # gradients stay right (quantization.disable_cpu_inference_packing); installing it changes nothing here.
    ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward from kernels-community"),
    # LLM.int8 quantizes a matmul's activations from float16, so bitsandbytes logs that it casts float32 inputs
    # (quantization.py let it through once per message): that is how 8-bit works (notebook 04 says so), not a
    # fault of the caller, and nothing to act on.
    ("bitsandbytes.autograd._functions", "MatMul8bitLt: inputs will be cast from"),
]


class _DropKnownRecords(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def _silence_known_log_records() -> None:
    for logger_name, prefix in KNOWN_LOG_RECORDS:
        logger = logging.getLogger(logger_name)
        if not any(isinstance(f, _DropKnownRecords) and f.prefix == prefix for f in logger.filters):
            logger.addFilter(_DropKnownRecords(prefix))


def silence_known_library_warnings() -> None:
    """Install the filters (idempotent: `warnings.filterwarnings` moves a repeated filter to the front)."""
    for category, message in KNOWN:
        warnings.filterwarnings("ignore", message=message, category=category)
    _silence_known_log_records()


# bitsandbytes logs its record while it is imported, which `import marl_utils` does (through peft) before
# marl_utils/__init__.py calls silence_known_library_warnings(): the log filters go in as this module loads.
_silence_known_log_records()
