"""The offline review corpus: synthetic IMDB-style movie reviews from a small seeded grammar.

The tiny profile needs IMDB without the Hub, so we generate reviews with the same columns as
`stanfordnlp/imdb` (`text`, `label`: 1 positive, 0 negative). The grammar is deliberately
template-like, so that a 2-4 layer LM can learn it in a minute on a CPU, yet it keeps the parts of
real reviews that make sentiment an interesting target:

- A review is 3-7 sentences, 40-110 words. Each sentence is neutral (plot, when and where I watched
  it) or carries a signed score: polarity (+1/-1) times strength (1 mild, 2 plain, 3 strong).
- Strength comes from intensifiers ("somewhat dull", "dull", "truly dull") or from the template.
- Negation flips polarity: "the acting was not good" scores -2, "not bad at all" scores +1.
- About a third of reviews are mixed: the label is the sign of the SUM of sentence scores (the
  majority side also wins on count), e.g. three positive sentences and one "My only complaint is
  that the pacing was slow" is positive. The contrary sentence nearly always comes after the first
  sentiment sentence, so the first one or two sentences already reveal the label.
- About two thirds of reviews open with a sentiment-neutral lead-in ("I watched this movie last
  weekend and ...", "This is a story about a retired nurse who ..."), so a short prompt cut from a
  review does not fix its sentiment and a continuation can go either way (PPO in notebook 03).
- One review in four has IMDB's `<br /><br />` markup between two sentences, as real IMDB does;
  `marl_utils.data.loading.load_imdb` removes it.

Only `random.Random(seed)` is used, so the corpus is identical on every run and machine.
Regenerate the shipped files with `python -m marl_utils.data.corpus --out data/imdb_offline`.
"""

from __future__ import annotations

import argparse
import random
import re
from dataclasses import dataclass
from pathlib import Path

from ..infra.atomic import atomic_dir


def _words(s: str) -> tuple[str, ...]:
    return tuple(s.split())


def _phrases(s: str) -> tuple[str, ...]:
    return tuple(p.strip() for p in s.split("|"))


# Word lists: the project's own. Neutral slots are shared by both polarities.
NEUTRAL = {
    "movie": _words("movie film movie film picture"),
    "genre": _phrases("drama | comedy | thriller | western | horror film | romance | war film | musical"
                      " | mystery | documentary | crime drama | science fiction film | family film"
                      " | period piece | action film | fantasy | biopic | spy film | sports drama"
                      " | ghost story | animated film | courtroom drama | road movie | disaster movie"),
    "aspect": _phrases("acting | score | pacing | cinematography | dialogue | script | plot | ending"
                       " | soundtrack | direction | editing | lighting | set design | costume design"
                       " | camera work | screenplay | story | writing | humor | casting | photography"
                       " | music | opening scene | final act | lead performance | supporting cast"
                       " | villain | climax | premise | production design | sound design | makeup"
                       " | choreography | chemistry between the leads | second half | first hour"),
    "role": _phrases("lead | hero | villain | sidekick | mother | father | young girl | old captain"
                     " | detective | love interest | best friend | narrator | king | stranger"),
    "actor": _phrases("a newcomer | a veteran actor | a famous comedian | a former singer"
                      " | a young actress | a stage actor | a child actor | a television star"
                      " | an actor I had never heard of | a familiar face"),
    "char": ("{char_adj} {profession}",),
    "char_adj": _words("young old retired lonely ambitious stubborn shy restless widowed wealthy"
                       " penniless famous nervous reckless quiet aging former struggling"),
    "profession": _words("detective nurse teacher soldier pilot chef lawyer farmer boxer singer"
                         " painter doctor journalist sailor miner priest thief writer dancer banker"
                         " mechanic scientist sheriff musician photographer waitress student"
                         " librarian gambler astronaut fisherman architect"),
    "plot": _phrases("returns to a small hometown | loses everything in one night"
                     " | discovers a family secret | tries to win back an old love"
                     " | must solve a murder | plans one last robbery | searches for a missing brother"
                     " | inherits a strange old house | joins a traveling circus | falls for a stranger"
                     " | is hunted by a powerful enemy | has to save a failing school"
                     " | crosses the country on foot | starts a band with old friends"
                     " | fights to clear a stolen name | finds a map to a hidden treasure"
                     " | moves to a new city | takes care of a sick parent | trains for one big fight"
                     " | wakes up with no memory | opens a small restaurant | escapes from prison"),
    "place": _phrases("a quiet village | a big city | a remote island | the desert | a coastal town"
                      " | the mountains | a busy hospital | an old hotel | a prison | a farm"
                      " | a space station | a boarding school | a fishing village | the suburbs"
                      " | a haunted house | a lighthouse | the jungle | a crowded train | a mining town"
                      " | a small theater"),
    "era": _phrases("the fifties | the war | the great depression | the cold war | the early sixties"
                    " | a harsh winter | one long summer | the gold rush | the seventies"
                    " | the near future | the last century | a heat wave"),
    "when": _phrases("last night | last weekend | on a long flight | on a rainy sunday"
                     " | over the holidays | a few years ago | on a slow evening | last friday"
                     " | after a long day | on my day off"),
    "venue": _phrases("the local cinema | a film festival | a drive in | a friend's house"
                      " | an old theater | a late screening | a sold out show | home on cable"),
    "companion": _words("wife husband brother sister father mother roommate friend kids neighbor"
                        " cousin girlfriend boyfriend coworkers parents grandmother"),
    "title": _phrases("The Silent River | Night Train | Summer Rain | The Last Harbor | Broken Glass"
                      " | A Winter Tale | Paper Moon Street | The Long Road Home | Red Lantern"
                      " | Stone Garden | The Quiet Hour | Falling Stars | Blue Valley | Iron Bridge"),
    "maker": _phrases("a first time director | a veteran director | a small studio"
                      " | the writer of {title} | a famous producer | two young brothers"),
    "topic": _phrases("{char} | a family in crisis | two rival chefs | an unlikely friendship"
                      " | a small town election | life at sea | a failing marriage | growing up"
                      " | a doomed expedition | a stolen painting | first love | old age"),
    "source": _phrases("novel | true story | short story | stage play | comic book | fairy tale"
                       " | newspaper article | radio drama | famous poem"),
    "subplot": _phrases("a family feud | a lost dog | an old debt | a school reunion | a secret letter"
                        " | a rival gang | a wedding | a stolen car | a small bakery | a local election"
                        " | a missing key | a broken promise"),
    "duration": _phrases("ninety minutes | two hours | an hour and a half | two and a half hours"
                         " | a hundred minutes | three hours"),
    "audience": _phrases("anyone | my friends | fans of the genre | families | my parents"
                         " | film students | anyone who likes a good {genre} | people who love movies"
                         " | my worst enemy | teenagers | older viewers | a date night crowd"),
    "period": _phrases("this year | in years | in a long time | in ages | this decade | all summer"),
}

POSITIVE = {
    "adj": _words("good great superb brilliant wonderful excellent fantastic beautiful moving gripping"
                  " charming delightful clever stunning memorable outstanding powerful touching"
                  " impressive engaging fresh solid lovely sharp thoughtful elegant inventive"
                  " compelling masterful vivid riveting terrific marvelous graceful confident"),
    "strong": _words("truly extremely really incredibly remarkably absolutely genuinely very"
                     " exceptionally thoroughly"),
    "mild": _phrases("fairly | quite | mostly | reasonably | pretty | rather"),
    "feel": _words("loved enjoyed savored adored relished"),
    "emotion": _words("happy inspired uplifted moved thrilled grateful delighted hopeful satisfied"
                      " amazed refreshed"),
    "reaction": _phrases("impressed | moved | entertained | charmed | won over | hooked"),
    "adv": _words("beautifully brilliantly wonderfully perfectly convincingly gracefully"),
    "lift": _phrases("lifts | carries | elevates | enriches | brightens | anchors"),
    "score": _words("seven eight nine ten"),
}

NEGATIVE = {
    "adj": _words("bad awful terrible boring dull weak clumsy lazy flat tedious predictable messy"
                  " wooden forgettable painful poor bland silly shallow lifeless confusing sloppy"
                  " cheap dreadful horrible stale pointless annoying uneven hollow stiff tiresome"
                  " lame awkward mediocre"),
    "strong": _words("truly extremely really incredibly remarkably absolutely painfully very"
                     " utterly thoroughly"),
    "mild": _phrases("somewhat | a bit | a little | slightly | rather | fairly"),
    "feel": _words("hated regretted resented endured loathed"),
    "emotion": _words("bored annoyed cheated tired disappointed frustrated angry empty sleepy"
                      " irritated insulted"),
    "reaction": _phrases("disappointed | bored | let down | unimpressed | annoyed | lost"),
    "adv": _words("badly poorly stiffly awkwardly lazily clumsily"),
    "lift": _phrases("drags down | ruins | spoils | sinks | undermines | weighs down"),
    "score": _words("one two three four"),
}

# For negated sentences: "not {pos_adj}" is negative, "not {neg_mild} at all" is mildly positive.
NEGATION = {
    "pos_adj": _words("good great funny clever moving engaging interesting exciting original"
                      " memorable convincing"),
    "neg_mild": _words("bad boring dull terrible awful slow silly predictable confusing weak"),
    "neg_emotion": _words("bored disappointed annoyed"),
}

# Templates are "STRENGTH|text"; STRENGTH "i" means it comes from the {int} slot (1 mild, 2 none,
# 3 strong). Clauses are lowercase so they can follow a lead-in or a contrast marker, and are also
# used on their own as sentences; each reveals its sentiment within ~6 words. "Aspect" templates judge
# one part of the film, the only kind a contrary sentence in a mixed review may use ("the score was
# lovely" fits a negative review; "I loved every minute of it" does not).
ASPECT_CLAUSES = {
    1: ("i|the {aspect} was {int} {adj}", "i|I have to say the {aspect} was {int} {adj}",
        "1|the {aspect} was not {neg_mild} at all"),
    -1: ("i|the {aspect} was {int} {adj}", "i|I have to say the {aspect} was {int} {adj}",
         "2|the {aspect} was not {pos_adj}", "3|the {aspect} was not {pos_adj} at all"),
}
FILM_CLAUSES = {
    1: ("i|it was {int} {adj}", "i|it turned out to be {int} {adj}", "3|I {feel} every minute of it",
        "i|I was {int} {reaction}", "1|it was not as {neg_mild} as I had feared",
        "2|I was not {neg_emotion} for a single second"),
    -1: ("i|it was {int} {adj}", "i|it turned out to be {int} {adj}", "3|I {feel} every minute of it",
         "i|I was {int} {reaction}", "2|it is not a {pos_adj} {movie} by any measure",
         "2|I did not enjoy it at all"),
}
ASPECT_SENTENCES = (
    "i|I thought the {aspect} was {int} {adj}.", "i|I found the {aspect} {int} {adj}.",
    "i|The {aspect} is {int} {adj}, and the {aspect2} is {adj2} as well.",
    "i|The {role} gives a {int} {adj} performance.", "2|The {role} is played {adv} by {actor}.",
    "2|The {aspect} {lift} the whole {movie}.", "i|What stood out most was the {aspect}, which was {int} {adj}.",
)
FILM_SENTENCES = ("i|Overall, it is a {int} {adj} {genre}.", "i|It is {int} {adj} from start to finish.",
                  "2|I left the theater feeling {emotion}.", "2|What a {adj} {movie}.")
CLOSINGS = {
    1: ("3|I would {rec} recommend it to {audience}.", "2|I give it {score} out of ten.",
        "3|It was worth every {unit}.", "3|It is easily the best {genre} I have seen {period}.",
        "2|I will watch it again."),
    -1: ("3|I would not recommend it to {audience}.", "2|I give it {score} out of ten.",
         "3|It was a complete waste of {waste}.", "3|It is easily the worst {genre} I have seen {period}.",
         "2|I will not watch it again."),
}
CLOSING_SLOTS = {"rec": _words("highly strongly happily gladly certainly"),
                 "unit": _words("minute penny second cent"),
                 "waste": _phrases("time | money | talent | two hours | an evening")}
# Contrast markers that introduce the contrary sentence of a mixed review, by that sentence's polarity.
MARKERS = {1: ("To be fair,", "On the other hand,", "That said,", "In fairness,"),
           -1: ("My only complaint is that", "On the other hand,", "That said,", "Sadly,")}
CONTRARY = {1: "i|The only good thing was the {aspect}, which was {int} {adj}.",
            -1: "i|The one weak spot was the {aspect}, which was {int} {adj}."}

# Openings: a lead-in takes a clause, a subject takes a predicate, a neutral sentence stands alone.
LEADINS = _phrases(
    "I watched this {movie} last weekend and | I saw this {movie} {when} and"
    " | I rented this {movie} on a whim and | My {companion} told me to watch this {movie}, and"
    " | I went into this {movie} knowing nothing about it, and"
    " | I finally got around to watching this {movie}, and | We watched this {movie} as a family and"
    " | I caught this {genre} on television {when} and | I had no idea what to expect from this {genre}, and"
    " | I saw this {movie} at {venue} and | Having read the book first, I can tell you that"
    " | After all the talk about this {movie}, I can say that | I watched this {genre} with my {companion}, and")
SUBJECTS = _phrases("The new {movie} by the director of {title} | This {genre} about {topic}"
                    " | The latest {genre} from {maker} | This {movie} based on a {source}")
PREDICATES = {1: ("i|is {int} {adj}", "i|turned out to be {int} {adj}", "1|is not {neg_mild} at all"),
              -1: ("i|is {int} {adj}", "i|turned out to be {int} {adj}", "2|is not {pos_adj} at all")}
NEUTRAL_OPENINGS = ("This is a story about a {char} who {plot}.", "The {movie} follows a {char} who {plot}.",
                    "It is a {genre} set in {place} during {era}.", "The plot centers on a {char} in {place}.",
                    "This {genre} tells the story of a {char} who {plot}.")
NEUTRAL_SENTENCES = (
    "I watched it {when} with my {companion}.", "The story takes place in {place} during {era}.",
    "The main character is a {char} who {plot}.", "It runs about {duration}.",
    "It is based on a {source}.", "I went in without reading any reviews.",
    "There is also a subplot about {subplot}.", "The {role} is played by {actor}.",
    "Most of it was filmed in {place}.", "I saw it at {venue} with my {companion}.",
)
OPENING_KINDS = {"leadin": 40, "subject": 10, "neutral": 17, "direct": 33}
"""Weights of the opening kinds; all but "direct" leave the first ~6 tokens without sentiment."""

_AN = re.compile(r"\b([Aa]) (?=[aeiou])")  # "a old nurse" -> "an old nurse" (no list word needs "a" + vowel)


@dataclass(frozen=True)
class Review:
    """One generated review with its hidden structure (for tests and statistics; never written out)."""

    text: str
    label: int
    scores: tuple[int, ...]
    """Signed strength per sentence: 0 neutral, +-1 mild, +-2 plain, +-3 strong."""
    opening: str
    """Kind of opening, one of OPENING_KINDS."""

    @property
    def mixed(self) -> bool:
        """True when the review has sentences of both polarities (its label is their balance)."""
        return any(s > 0 for s in self.scores) and any(s < 0 for s in self.scores)


class _Slots(dict):
    """A format_map mapping that samples each slot on first use; values may nest other slots."""

    def __init__(self, rng: random.Random, table: dict):
        super().__init__()
        self.rng, self.table = rng, table

    def __missing__(self, key: str) -> str:
        value = self.rng.choice(self.table[key.rstrip("0123456789")])  # "aspect2" draws from "aspect"
        if "{" in value:
            value = value.format_map(_Slots(self.rng, self.table))
        self[key] = value
        return value


def _fill(rng: random.Random, template: str, polarity: int = 0) -> tuple[str, int]:
    """Fill a "STRENGTH|text" template (or a plain neutral one); returns (text, signed score)."""
    strength, _, text = template.rpartition("|")
    table = dict(NEUTRAL)
    if polarity:
        table.update(POSITIVE if polarity > 0 else NEGATIVE, **NEGATION, **CLOSING_SLOTS)
    slots = _Slots(rng, table)
    if strength == "i":
        level = rng.choices((1, 2, 3), weights=(1, 1.2, 1.6))[0]
        slots["int"] = rng.choice({1: table["mild"], 2: ("",), 3: table["strong"]}[level])
    else:
        level = int(strength) if strength else 0
    text = " ".join(text.format_map(slots).split())  # an empty {int} leaves a double space
    return text, polarity * level


def _clause_sentence(rng: random.Random, clauses: tuple[str, ...], polarity: int) -> tuple[str, int]:
    clause, score = _fill(rng, rng.choice(clauses), polarity)
    return clause[0].upper() + clause[1:] + ".", score


def _sentence(rng: random.Random, polarity: int, *, early=False, closing=False, contrary=False):
    """One sentiment sentence of the given polarity: (text, score)."""
    if contrary:  # judges one aspect only, often behind a contrast marker
        r = rng.random()
        if r < 0.4:
            clause, score = _fill(rng, rng.choice(ASPECT_CLAUSES[polarity]), polarity)
            return f"{rng.choice(MARKERS[polarity])} {clause}.", score
        if r < 0.6:
            return _fill(rng, CONTRARY[polarity], polarity)
        if r < 0.8:
            return _clause_sentence(rng, ASPECT_CLAUSES[polarity], polarity)
        return _fill(rng, rng.choice(ASPECT_SENTENCES), polarity)
    if closing:
        return _fill(rng, rng.choice(CLOSINGS[polarity]), polarity)
    if early or rng.random() < 0.45:
        return _clause_sentence(rng, ASPECT_CLAUSES[polarity] + FILM_CLAUSES[polarity], polarity)
    return _fill(rng, rng.choice(ASPECT_SENTENCES + FILM_SENTENCES), polarity)


def _opening(rng: random.Random, polarity: int, contrary: bool) -> tuple[str, list[tuple[str, int]]]:
    """The first sentence(s) and the opening kind; the first sentiment sentence has `polarity`."""
    kind = rng.choices(list(OPENING_KINDS), weights=list(OPENING_KINDS.values()))[0]
    clauses = ASPECT_CLAUSES[polarity] + (() if contrary else FILM_CLAUSES[polarity])
    if kind == "leadin":
        lead, _ = _fill(rng, rng.choice(LEADINS))
        clause, score = _fill(rng, rng.choice(clauses), polarity)
        return kind, [(f"{lead} {clause}.", score)]
    if kind == "subject" and not contrary:
        subject, _ = _fill(rng, rng.choice(SUBJECTS))
        pred, score = _fill(rng, rng.choice(PREDICATES[polarity]), polarity)
        return kind, [(f"{subject} {pred}.", score)]
    kind = "neutral" if kind == "neutral" else "direct"
    first = [_fill(rng, rng.choice(NEUTRAL_OPENINGS))] if kind == "neutral" else []
    return kind, first + [_clause_sentence(rng, clauses, polarity)]


def _plan(rng: random.Random, label: int) -> list[int]:
    """Polarity of each sentiment sentence in order: the majority side first, contrary ones later."""
    major = 1 if label == 1 else -1
    if rng.random() < 0.7:  # pure review
        return [major] * rng.choice((3, 3, 4, 4, 5))
    n_major = rng.choice((2, 3, 3, 4))
    n_minor = 2 if n_major >= 3 and rng.random() < 0.25 else 1
    rest = [major] * (n_major - 1) + [-major] * n_minor
    rng.shuffle(rest)
    plan = [major] + rest
    # Usually the first sentiment sentence is on the majority side, so a 24-token prefix shows the
    # label; in a few reviews the contrary one comes first ("... and the score was lovely. But ...").
    if rng.random() < 0.06:
        i = plan.index(-major)
        plan[0], plan[i] = plan[i], plan[0]
    return plan


def sample_review(rng: random.Random, label: int) -> Review:
    """Draw one review with the given label (1 positive, 0 negative) from `rng`."""
    major = 1 if label == 1 else -1
    while True:  # rejection: keep reviews whose sum of scores agrees with the label, 40-110 words
        plan = _plan(rng, label)
        contrary = [p != major for p in plan]
        opening, sentences = _opening(rng, plan[0], contrary[0])
        closing_last = not contrary[-1] and rng.random() < 0.5
        for i, polarity in enumerate(plan[1:], start=1):
            sentences.append(_sentence(rng, polarity, contrary=contrary[i],
                                       closing=closing_last and i == len(plan) - 1))
        # Neutral sentences go after the first sentiment sentence, never before it.
        first_polar = next(i for i, (_, s) in enumerate(sentences) if s != 0)
        for _ in range(rng.choice((0, 1, 1, 2))):
            pos = rng.randint(first_polar + 1, len(sentences) - (1 if closing_last else 0))
            sentences.insert(pos, _fill(rng, rng.choice(NEUTRAL_SENTENCES)))
        scores = tuple(s for _, s in sentences)
        n_words = sum(len(t.split()) for t, _ in sentences)
        if (sum(scores) > 0) != (label == 1) or sum(scores) == 0 or not 3 <= len(sentences) <= 7:
            continue
        if not 40 <= n_words <= 110:
            continue
        texts = [_AN.sub(r"\1n ", t) for t, _ in sentences]
        text = " ".join(texts)
        if rng.random() < 0.25:  # IMDB's markup at one sentence boundary
            cut = rng.randint(1, len(texts) - 1)
            text = " ".join(texts[:cut]) + "<br /><br />" + " ".join(texts[cut:])
        return Review(text=text, label=label, scores=scores, opening=opening)


def generate_reviews(seed: int = 0, n_train: int = 5000, n_test: int = 1000) -> dict[str, list[Review]]:
    """Reviews with their hidden structure; `generate_corpus` is the same without the structure."""
    for name, n in (("n_train", n_train), ("n_test", n_test)):
        if n < 2 or n % 2:
            raise ValueError(f"{name}={n}: use an even number >= 2 so that each split is exactly half positive")
    rng = random.Random(seed)
    seen: set[str] = set()  # no duplicate text within or across splits (test must be held out)
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        labels = [1] * (n // 2) + [0] * (n // 2)
        rng.shuffle(labels)
        reviews = []
        for label in labels:
            review = sample_review(rng, label)
            while review.text in seen:
                review = sample_review(rng, label)
            seen.add(review.text)
            reviews.append(review)
        out[split] = reviews
    return out


def generate_corpus(seed: int = 0, n_train: int = 5000, n_test: int = 1000) -> dict[str, list[dict]]:
    """The corpus as {"train": [{"text", "label"}, ...], "test": [...]}, each split exactly balanced."""
    reviews = generate_reviews(seed, n_train, n_test)
    return {split: [{"text": r.text, "label": r.label} for r in rows] for split, rows in reviews.items()}


def write_corpus(out_dir: str | Path = "data/imdb_offline", seed: int = 0, n_train: int = 5000,
                 n_test: int = 1000) -> Path:
    """Write train.parquet and test.parquet into `out_dir` (atomically); returns the folder."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    corpus = generate_corpus(seed, n_train, n_test)
    schema = pa.schema([("text", pa.string()), ("label", pa.int64())])
    with atomic_dir(out_dir) as tmp:
        tmp.chmod(0o755)  # mkdtemp makes it private; the shipped folder is ordinary data
        for split, rows in corpus.items():
            table = pa.Table.from_pylist(rows, schema=schema)
            pq.write_table(table, tmp / f"{split}.parquet")
    return Path(out_dir)


def main(argv: list[str] | None = None) -> None:
    """Command line: regenerate the shipped corpus."""
    parser = argparse.ArgumentParser(description="Regenerate the offline IMDB-style review corpus.")
    parser.add_argument("--out", default="data/imdb_offline", help="output folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-train", type=int, default=5000)
    parser.add_argument("--n-test", type=int, default=1000)
    args = parser.parse_args(argv)
    out = write_corpus(args.out, args.seed, args.n_train, args.n_test)
    print(f"wrote {args.n_train} train and {args.n_test} test reviews to {out}")


if __name__ == "__main__":
    main()
