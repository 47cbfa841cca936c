"""The base as a 1-output sequence classifier, for every decoder-only family (stage 2, notebook 02).

transformers makes the `*ForSequenceClassification` class of most decoder-only families from one generic
class, `GenericForSequenceClassification`: the decoder body, a bias-free `score` Linear on its last hidden
state, read at the last token that is not pad. Some families have none (in transformers 5: Granite, Cohere,
Cohere2, LFM2), so `AutoModelForSequenceClassification` refuses them and stage 2 could not train their reward
adapter. `sequence_classifier_class` makes one the same way. The adapter it trains has the layout
`reward_adapter=` expects (LoRA + `score`), and PPO's `compute_reward_score` computes what it computes
(tests/test_architectures.py checks both for every family of the architecture matrix).
"""

from __future__ import annotations

from ..infra.errors import MarlInputError

_MADE: dict = {}  # config class -> the classifier class made for it (one class per family per process)


def sequence_classifier_class(config):
    """`AutoModelForSequenceClassification`, or a classifier made like transformers' own for this family."""
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification, PreTrainedModel
    from transformers.modeling_layers import GenericForSequenceClassification

    kind = type(config)
    if kind in AutoModelForSequenceClassification._model_mapping:
        return AutoModelForSequenceClassification
    if kind in _MADE:
        return _MADE[kind]
    model_type = getattr(config, "model_type", kind.__name__)
    if kind not in AutoModelForCausalLM._model_mapping or kind not in AutoModel._model_mapping:
        raise MarlInputError(f"{model_type!r} models have no sequence classifier in transformers and no causal LM to "
                             "make one from; the reward adapter needs a decoder-only causal LM as its base")
    causal_lm = AutoModelForCausalLM._model_mapping[kind]
    pretrained = next(base for base in causal_lm.__mro__[1:]
                      if issubclass(base, PreTrainedModel) and base is not PreTrainedModel)
    # the generic class keeps the body under `model`: the causal LM's checkpoint must name it so too
    if pretrained.base_model_prefix != GenericForSequenceClassification.base_model_prefix:
        raise MarlInputError(f"{model_type!r} has no sequence classifier in transformers, and its body is stored as "
                             f"{pretrained.base_model_prefix!r}, not 'model', so one cannot be made from its causal "
                             "LM's weights; stage 2 cannot train a reward adapter for this family")
    name = causal_lm.__name__.replace("ForCausalLM", "") + "ForSequenceClassification"
    _MADE[kind] = type(name, (GenericForSequenceClassification, pretrained), {"__module__": __name__})
    return _MADE[kind]
