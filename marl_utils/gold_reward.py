"""The gold reward: the true sentiment of a text under the offline corpus's own grammar (issue 21, notebook 08).

Every reward figure PPO reports is the reward adapter's score, the very quantity it optimised. The corpus
grammar (corpus.py) knows the sentiment of every sentence it can write, so it can be the judge instead: a
reward that PPO never saw and cannot have bent. `gold_score(text)` reads a text the way the grammar scores
it and returns the sum of its sentence scores, the number whose sign is a review's label.

How a text is read:
- Sentences end at . ! ? (and IMDB's <br /> markup). A text cut mid-sentence (a prompt, a response that
  hit max_new_tokens) keeps its last, unfinished sentence: what it already says counts, nothing more.
- In a sentence, a *judgement* is a word or phrase of the grammar's POSITIVE / NEGATIVE lexicons in a role
  that judges: an adjective, emotion or reaction ("dull", "moved", "let down"; strength 2, 3 after an
  intensifier such as "truly", 1 after a mild one such as "a bit"), a verb of feeling ("loved", "hated": 3),
  an adverb or verb of effect ("beautifully", "ruins": 2), and the grammar's fixed closings ("recommend",
  "worth every", "waste of", "best"/"worst": 3; "watch it again", "<number> out of ten": 2).
- Negation: "not" or "never" up to four words before a judgement flips it. A negated positive judges -2
  ("was not good"; -3 with "at all" after "was not", the grammar's strong form); a negated negative
  adjective is mild praise (+1: "not bad at all", "not as dull as I had feared"); a negated verb of feeling
  judges 2 ("did not enjoy" -2); a negated emotion, reaction or closing keeps its strength with the sign
  flipped ("not bored for a single second" +2, "would not recommend" -3).
- One judgement per sentence, as the grammar writes them: when several judgements of one sign share a
  sentence ("the acting is truly great, and the score is good as well") the first one's score counts.
  Judgements of both signs in one sentence (never in the grammar; a policy can write them) are summed and
  clipped to [-3, 3], so "great but awful" is about neutral.
- Contrary clauses of mixed reviews ("My only complaint is that the pacing was slow") are ordinary
  sentences with their own sign; the text's score is the balance, as the corpus labels it. The frames that
  introduce them ("The only good thing was ...", "The one weak spot was ...") and neutral phrases that
  contain a lexicon word ("a lost dog", "best friend", "a powerful enemy", "anyone who likes a good drama")
  judge nothing.
- Words the grammar does not know carry no sentiment: they are skipped, so an ungrammatical or off-topic
  text scores only what it says in the grammar's words (0 when it says nothing the grammar knows).

The gold reward only knows this corpus: it says nothing true about real IMDB text or a user's own data, and
`gold_scorer_for(dataset)` returns None for any dataset but the offline corpus.
"""

from __future__ import annotations

import re

from .corpus import CLOSING_SLOTS, CONTRARY, NEGATION, NEGATIVE, NEUTRAL, POSITIVE

NEGATORS = ("not", "never")
NEGATION_REACH = 4
"""Words between a negator and the judgement it flips: "would not recommend" 1, "not as dull" 2,
"is not a good movie" 3; further away, the "not" belongs to something else."""

_SENTENCE_END = re.compile(r"[.!?]+|<br\s*/?>", re.IGNORECASE)
_WORD = re.compile(r"[a-z]+(?:'[a-z]+)?")


def _tokens(phrase: str) -> tuple[str, ...]:
    return tuple(_WORD.findall(phrase.lower()))


def _build_lexicon() -> dict[tuple[str, ...], tuple[int, int, str]]:
    """phrase (as words) -> (polarity, base strength, kind); kind decides intensifiers and negation."""
    lexicon: dict[tuple[str, ...], tuple[int, int, str]] = {}
    for polarity, table in ((1, POSITIVE), (-1, NEGATIVE)):
        for kind, strength in (("adj", 2), ("emotion", 2), ("reaction", 2), ("feel", 3), ("adv", 2), ("lift", 2)):
            for phrase in table[kind]:
                lexicon.setdefault(_tokens(phrase), (polarity, strength, kind))
    for phrase in NEGATION["pos_adj"]:
        lexicon.setdefault(_tokens(phrase), (1, 2, "adj"))
    for phrase in NEGATION["neg_mild"]:
        lexicon.setdefault(_tokens(phrase), (-1, 2, "adj"))
    lexicon[("enjoy",)] = (1, 3, "feel")  # "I did not enjoy it at all": the grammar's one infinitive
    for words, polarity, strength in ((("recommend",), 1, 3), (("worth", "every"), 1, 3), (("waste", "of"), -1, 3),
                                      (("best",), 1, 3), (("worst",), -1, 3), (("watch", "it", "again"), 1, 2)):
        lexicon[words] = (polarity, strength, "closing")
    return lexicon


LEXICON = _build_lexicon()
INTENSIFIERS = {**{_tokens(p): 3 for p in POSITIVE["strong"] + NEGATIVE["strong"]},
                **{_tokens(p): 1 for p in POSITIVE["mild"] + NEGATIVE["mild"]}}
RATINGS = {**{w: 1 for w in POSITIVE["score"]}, **{w: -1 for w in NEGATIVE["score"]}}
"""Number words of "I give it <n> out of ten"; others ("five") judge nothing."""


def _neutral_frames() -> list[re.Pattern]:
    """Phrases that contain a lexicon word but judge nothing: neutral slot values, and the contrary frames."""
    frames = [CONTRARY[1], CONTRARY[-1]]
    for values in NEUTRAL.values():
        frames += list(values)
    patterns = []
    for frame in frames:
        for part in re.split(r"\{\w+\}|\|", frame.lower()):  # the literal words between slots
            words = _tokens(part)
            if any(w in key for key in LEXICON for w in words):
                patterns.append(re.compile(r"\b" + r"\s+".join(map(re.escape, words)) + r"\b"))
    return patterns


NEUTRAL_FRAMES = _neutral_frames()


def _longest_match(words: list[str], i: int, table: dict) -> tuple[tuple[str, ...], object] | None:
    for length in (3, 2, 1):
        key = tuple(words[i:i + length])
        if len(key) == length and key in table:
            return key, table[key]
    return None


def _judgements(words: list[str]) -> list[int]:
    """Signed scores of the judgements in one sentence's words, in order."""
    found = []
    i = 0
    while i < len(words):
        if words[i] in RATINGS and words[i + 1:i + 4] == ["out", "of", "ten"]:
            found.append(2 * RATINGS[words[i]])
            i += 4
            continue
        match = _longest_match(words, i, LEXICON)
        if match is None:
            i += 1
            continue
        key, (polarity, strength, kind) = match
        before = words[max(0, i - NEGATION_REACH - 1):i]
        negated = any(w in NEGATORS for w in before)
        if negated:
            if kind == "adj" and polarity > 0:
                at_all = words[i + 1:i + 3] == ["at", "all"]
                is_predicate = words[max(0, i - 2):i] == ["is", "not"]
                score = -3 if at_all and not is_predicate else -2
            elif kind == "adj":
                score = 1
            elif kind == "feel":
                score = -2 * polarity  # "did not enjoy it": a refusal, weaker than "hated"
            else:
                score = -polarity * strength
        else:
            level = strength
            if kind in ("adj", "emotion", "reaction"):
                for length in (2, 1):
                    if i >= length and tuple(words[i - length:i]) in INTENSIFIERS:
                        level = INTENSIFIERS[tuple(words[i - length:i])]
                        break
            score = polarity * level
        found.append(score)
        i += len(key)
    return found


def sentence_score(sentence: str) -> int:
    """Signed score of one sentence: 0 neutral, +-1 mild, +-2 plain, +-3 strong (see the module docstring)."""
    text = sentence.lower()
    for frame in NEUTRAL_FRAMES:
        text = frame.sub(" ", text)
    found = _judgements(_WORD.findall(text))
    if not found:
        return 0
    if all(s > 0 for s in found) or all(s < 0 for s in found):
        return found[0]
    return max(-3, min(3, sum(found)))


def sentence_scores(text: str) -> list[int]:
    """Score of each sentence of `text` (an unfinished last sentence included; empty pieces dropped)."""
    return [sentence_score(s) for s in _SENTENCE_END.split(text) if _WORD.search(s.lower())]


def gold_score(text: str) -> float:
    """The gold reward of a text: the sum of its sentence scores (> 0 positive, < 0 negative, 0 neutral)."""
    return float(sum(sentence_scores(text)))


def gold_scores(texts) -> list[float]:
    """`gold_score` of each text."""
    return [gold_score(t) for t in texts]


def gold_scorer_for(dataset) -> object | None:
    """`gold_scores` when `dataset` (a profile's or the user's `load_imdb` source) is the offline corpus, else None.

    On any other data the grammar's lexicon is not the truth, so there is no gold reward to report.
    """
    return gold_scores if dataset is None or str(dataset) == "offline" else None


def gold_unavailable_note(dataset) -> str:
    """Why a run on `dataset` reports no gold reward (for metrics and printed summaries)."""
    return (f"gold reward unavailable: it is the offline corpus's own grammar, and the data here is {dataset!r}; "
            "only reward_mean (the reward adapter's score) is reported")


def gold_metrics(before: dict, after: dict, dataset) -> dict:
    """`eval_gold_before` / `eval_gold_after` of a run's two evaluations (None, with `gold_note`, if unavailable)."""
    metrics = {"eval_gold_before": before.get("gold_mean"), "eval_gold_after": after.get("gold_mean")}
    if metrics["eval_gold_after"] is None:
        metrics["gold_note"] = gold_unavailable_note(dataset)
    return metrics
