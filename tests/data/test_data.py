"""The offline corpus (marl_utils.data.corpus) and the dataset loader (marl_utils.data.loading)."""

import json
import re
from collections import Counter

import pandas as pd
import pytest

import marl_utils.data.loading as data_mod
from marl_utils.data.corpus import NEGATION, NEGATIVE, POSITIVE, generate_corpus, generate_reviews, write_corpus
from marl_utils.data.loading import OFFLINE_DIR, clean_text, load_imdb
from marl_utils.infra.errors import MarlInputError


@pytest.fixture(scope="module")
def reviews():
    return generate_reviews()


@pytest.fixture(scope="module")
def corpus():
    return generate_corpus()


def _words(text):
    return re.findall(r"[a-z']+", clean_text(text).lower())


def _frame(n_per_label=10, pos="pos", neg="neg"):
    rows = []
    for i in range(n_per_label):
        rows.append({"text": f"A fine film number {i}.<br /><br />I loved it.", "label": pos, "id": i})
        rows.append({"text": f"A dull film number {i}.<br/>I hated it.", "label": neg, "id": 100 + i})
    return pd.DataFrame(rows)


# ---- corpus ---------------------------------------------------------------------------------------

def test_shipped_files_equal_generator_output(corpus):
    for split in ("train", "test"):
        shipped = pd.read_parquet(OFFLINE_DIR / f"{split}.parquet")
        assert list(shipped.columns) == ["text", "label"]
        assert shipped.to_dict("records") == corpus[split], f"regenerate with python -m marl_utils.data.corpus"


def test_corpus_is_deterministic_and_seeded(corpus):
    small = generate_corpus(seed=0, n_train=200, n_test=40)
    assert small == generate_corpus(seed=0, n_train=200, n_test=40)
    assert small != generate_corpus(seed=1, n_train=200, n_test=40)


def test_corpus_sizes_balance_and_no_leaks(corpus):
    assert len(corpus["train"]) >= 5000 and len(corpus["test"]) >= 1000
    for rows in corpus.values():
        assert Counter(r["label"] for r in rows) == {0: len(rows) // 2, 1: len(rows) // 2}
        assert all(set(r) == {"text", "label"} and isinstance(r["text"], str) for r in rows)
    train_texts = {r["text"] for r in corpus["train"]}
    assert len(train_texts) == len(corpus["train"])
    assert not train_texts & {r["text"] for r in corpus["test"]}


def test_corpus_vocabulary_and_lengths(corpus):
    rows = corpus["train"] + corpus["test"]
    assert len({w for r in rows for w in _words(r["text"])}) >= 600
    n_words = [len(clean_text(r["text"]).split()) for r in rows]
    assert min(n_words) >= 40 and max(n_words) <= 110
    assert 0.1 < sum("<br /><br />" in r["text"] for r in rows) / len(rows) < 0.5


def test_corpus_has_negation_and_intensifiers(corpus):
    rows = corpus["train"]
    not_pos = re.compile(r"was not (%s)\b" % "|".join(NEGATION["pos_adj"]))
    not_neg = re.compile(r"was not (%s) at all" % "|".join(NEGATION["neg_mild"]))
    # "was not good" appears in negative reviews, "was not bad at all" in positive ones.
    assert sum(1 for r in rows if r["label"] == 0 and not_pos.search(r["text"])) > 100
    assert sum(1 for r in rows if r["label"] == 1 and not_neg.search(r["text"])) > 100
    text = " ".join(r["text"] for r in rows)
    for word in ("truly", "extremely", "somewhat"):
        assert f" {word} " in text


def test_labels_follow_the_balance_of_sentences(reviews):
    rows = reviews["train"] + reviews["test"]
    for r in rows:
        assert (sum(r.scores) > 0) == (r.label == 1)
        assert 3 <= len(r.scores) <= 7
    mixed = [r for r in rows if r.mixed]
    assert 0.2 < len(mixed) / len(rows) < 0.5
    # Mixed reviews of both labels, and some with a strong contrary sentence outweighed by the rest.
    assert {r.label for r in mixed} == {0, 1}
    assert any(max(r.scores) == 3 and r.label == 0 for r in mixed)


def test_sentiment_is_early_and_openings_are_often_neutral(reviews):
    rows = reviews["train"]
    first_polar = [next(s for s in r.scores if s) for r in rows]
    agrees = sum((s > 0) == (r.label == 1) for s, r in zip(first_polar, rows)) / len(rows)
    assert agrees > 0.95
    assert sum(r.opening != "direct" for r in rows) / len(rows) > 0.6


def test_write_corpus_roundtrip(tmp_path):
    out = write_corpus(tmp_path / "c", seed=3, n_train=20, n_test=10)
    expected = generate_corpus(seed=3, n_train=20, n_test=10)
    assert pd.read_parquet(out / "test.parquet").to_dict("records") == expected["test"]
    with pytest.raises(ValueError, match="even"):
        generate_corpus(n_train=7)


# ---- loader ---------------------------------------------------------------------------------------

def test_load_offline_cleans_markup(corpus):
    ds = load_imdb()
    assert set(ds) == {"train", "test"} and ds["train"].column_names == ["text", "label"]
    assert len(ds["train"]) == 5000 and len(ds["test"]) == 1000
    assert not any("<br" in t or "  " in t for t in ds["train"]["text"])
    assert sorted(ds["test"]["text"]) == sorted(clean_text(r["text"]) for r in corpus["test"])
    assert ds["test"]["text"] != [clean_text(r["text"]) for r in corpus["test"]], "the offline corpus is shuffled too"
    assert clean_text("Good.<br /><br />Bad.<BR>Ugly.<br/>  End") == "Good. Bad. Ugly. End"


def test_load_offline_without_data_folder_regenerates(monkeypatch, tmp_path):
    monkeypatch.setattr(data_mod, "OFFLINE_DIR", tmp_path / "missing")
    ds = load_imdb("offline")
    assert ds["train"][:5] == load_imdb()["train"][:5]


@pytest.mark.parametrize("ext", [".parquet", ".csv", ".tsv", ".jsonl", ".json"])
def test_load_local_file_formats(tmp_path, ext):
    df = _frame(pos="positive", neg="negative")
    path = tmp_path / f"reviews{ext}"
    if ext == ".parquet":
        df.to_parquet(path)
    elif ext in (".csv", ".tsv"):
        df.to_csv(path, sep="\t" if ext == ".tsv" else ",", index=False)
    elif ext == ".jsonl":
        df.to_json(path, orient="records", lines=True)
    else:
        path.write_text(json.dumps(df.to_dict("records")))
    ds = load_imdb(path, test_fraction=0.2)
    assert ds["train"].column_names == ["text", "label"]
    assert len(ds["train"]) == 16 and len(ds["test"]) == 4
    assert Counter(ds["test"]["label"]) == {0: 2, 1: 2}
    fine = [t for t, l in zip(ds["train"]["text"], ds["train"]["label"]) if l == 1]
    assert fine and all(t.startswith("A fine film") and "<br" not in t for t in fine)


@pytest.mark.parametrize("pos,neg", [(1, 0), (True, False), ("pos", "neg"), ("1", "0")])
def test_label_encodings(tmp_path, pos, neg):
    path = tmp_path / "r.parquet"
    df = _frame(pos=pos, neg=neg)
    df.to_parquet(path)
    ds = load_imdb(path)
    for split in ds.values():
        assert all((l == 1) == t.startswith("A fine") for t, l in zip(split["text"], split["label"]))


def test_stratified_split_is_seeded(tmp_path):
    path = tmp_path / "r.csv"
    _frame(n_per_label=50, pos=1, neg=0).to_csv(path, index=False)
    a, b, c = load_imdb(path, seed=0), load_imdb(path, seed=0), load_imdb(path, seed=1)
    assert a["test"]["text"] == b["test"]["text"]
    assert a["test"]["text"] != c["test"]["text"]
    assert Counter(a["test"]["label"]) == {0: 10, 1: 10}
    assert not set(a["train"]["text"]) & set(a["test"]["text"])
    assert Counter(load_imdb(path, test_fraction=0.5)["test"]["label"]) == {0: 25, 1: 25}


def test_load_folder_with_train_and_test(tmp_path):
    _frame(5).to_csv(tmp_path / "train.csv", index=False)
    _frame(2, pos=1, neg=0).to_json(tmp_path / "test.jsonl", orient="records", lines=True)
    ds = load_imdb(tmp_path)
    assert len(ds["train"]) == 10 and len(ds["test"]) == 4


def test_load_folder_in_hub_layout_and_single_file(tmp_path):
    (tmp_path / "hub" / "plain_text").mkdir(parents=True)
    _frame(3, pos=1, neg=0).to_parquet(tmp_path / "hub" / "plain_text" / "train-00000-of-00001.parquet")
    _frame(2, pos=1, neg=0).to_parquet(tmp_path / "hub" / "plain_text" / "test-00000-of-00001.parquet")
    ds = load_imdb(tmp_path / "hub")
    assert len(ds["train"]) == 6 and len(ds["test"]) == 4
    (tmp_path / "one").mkdir()
    _frame(10).to_parquet(tmp_path / "one" / "all.parquet")
    assert len(load_imdb(tmp_path / "one")["test"]) == 4


def test_hub_id_uses_load_dataset_and_drops_other_splits(monkeypatch):
    import datasets

    def split(labels):
        return datasets.Dataset.from_dict({"text": [f"Review {i}.<br /><br />Done." for i in range(len(labels))],
                                           "label": labels})

    calls = []

    def fake_load_dataset(name, *args, **kwargs):
        calls.append(name)
        return datasets.DatasetDict({"train": split([0, 1, 0, 1]), "test": split([1, 0]),
                                     "unsupervised": split([-1, -1, -1])})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    ds = load_imdb("stanfordnlp/imdb")
    assert calls == ["stanfordnlp/imdb"]
    assert set(ds) == {"train", "test"}
    assert sorted(ds["train"]["label"]) == [0, 0, 1, 1]
    assert sorted(ds["test"]["text"]) == ["Review 0. Done.", "Review 1. Done."]


# ---- order: stanfordnlp/imdb is sorted by label, every split must come back shuffled ------------------

@pytest.fixture(scope="module")
def hub_layout(tmp_path_factory):
    from stand_ins import make_imdb_hub_folder

    return make_imdb_hub_folder(tmp_path_factory.mktemp("hub") / "imdb", n_train=200, n_test=1000)


def _both_labels_early(split, n, low=0.3):
    labels = split["label"][:n]
    return low < sum(labels) / len(labels) < 1 - low


def test_hub_layout_stand_in_is_sorted_like_the_real_one(hub_layout):
    import datasets

    raw = datasets.load_dataset(str(hub_layout))
    assert set(raw) == {"train", "test", "unsupervised"}
    assert raw["test"]["label"] == sorted(raw["test"]["label"]) and set(raw["test"]["label"][:400]) == {0}
    assert set(raw["unsupervised"]["label"]) == {-1}


def test_hub_layout_folder_comes_back_shuffled(hub_layout):
    ds = load_imdb(hub_layout)
    assert len(ds["train"]) == 200 and len(ds["test"]) == 1000, "the unsupervised split is dropped"
    assert _both_labels_early(ds["test"], 400) and _both_labels_early(ds["train"], 50)
    assert Counter(ds["test"]["label"]) == {0: 500, 1: 500}
    assert load_imdb(hub_layout, seed=0)["test"]["text"] == ds["test"]["text"]
    assert load_imdb(hub_layout, seed=1)["test"]["text"] != ds["test"]["text"]


def test_hub_id_path_on_the_hub_layout_comes_back_shuffled(hub_layout, monkeypatch):
    """`load_imdb("stanfordnlp/imdb")` takes the Hub branch; `load_dataset` reads the stand-in as it reads the Hub."""
    import datasets

    real_load_dataset = datasets.load_dataset
    asked = []

    def from_stand_in(name, *args, **kwargs):
        asked.append(name)
        return real_load_dataset(str(hub_layout), *args, **kwargs)

    monkeypatch.setattr(datasets, "load_dataset", from_stand_in)
    ds = load_imdb("stanfordnlp/imdb")
    assert asked == ["stanfordnlp/imdb"]
    assert set(ds) == {"train", "test"} and -1 not in set(ds["train"]["label"]) | set(ds["test"]["label"])
    assert _both_labels_early(ds["test"], 400) and _both_labels_early(ds["train"], 50)
    assert not any("<br" in t for t in ds["test"]["text"][:400])


def test_a_file_sorted_by_label_comes_back_shuffled(tmp_path):
    df = _frame(n_per_label=50, pos=1, neg=0).sort_values("label", kind="stable")
    path = _write(tmp_path / "sorted.csv", df)
    ds = load_imdb(path)
    assert _both_labels_early(ds["train"], 20, low=0.15) and _both_labels_early(ds["test"], 10, low=0.15)


def test_hub_failure_is_an_input_error(monkeypatch):
    import datasets

    def offline(name, *args, **kwargs):
        raise ConnectionError("Couldn't reach the Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(MarlInputError, match="could not load Hub dataset 'someone/reviews'.*local file"):
        load_imdb("someone/reviews")


# ---- bad input ------------------------------------------------------------------------------------

def _write(path, df):
    df.to_csv(path, index=False) if path.suffix == ".csv" else df.to_parquet(path)
    return path


def test_missing_path(tmp_path):
    with pytest.raises(MarlInputError, match="does not exist.*stanfordnlp/imdb"):
        load_imdb(tmp_path / "nope.csv")
    with pytest.raises(MarlInputError, match="does not exist"):
        load_imdb("data/missing_reviews.parquet")  # looks like owner/name but is a path


def test_unsupported_extension(tmp_path):
    (tmp_path / "r.txt").write_text("text,label\nok,1\n")
    with pytest.raises(MarlInputError, match=r"unsupported file type '\.txt'.*\.parquet, \.csv"):
        load_imdb(tmp_path / "r.txt")


def test_corrupt_file(tmp_path):
    (tmp_path / "r.parquet").write_bytes(b"not a parquet file at all")
    with pytest.raises(MarlInputError, match="could not read .*r.parquet as parquet"):
        load_imdb(tmp_path / "r.parquet")


def test_missing_columns(tmp_path):
    path = _write(tmp_path / "r.csv", pd.DataFrame({"review": ["a", "b"], "label": [0, 1]}))
    with pytest.raises(MarlInputError, match=r"no 'text' column \(found \['review', 'label'\]\)"):
        load_imdb(path)
    path = _write(tmp_path / "s.parquet", pd.DataFrame({"text": ["a", "b"], "sentiment": [0, 1]}))
    with pytest.raises(MarlInputError, match="no 'label' column.*'sentiment'"):
        load_imdb(path)


def test_empty_dataset(tmp_path):
    path = _write(tmp_path / "r.parquet", pd.DataFrame({"text": pd.Series([], dtype=str),
                                                        "label": pd.Series([], dtype="int64")}))
    with pytest.raises(MarlInputError, match="is empty"):
        load_imdb(path)


def test_single_label(tmp_path):
    path = _write(tmp_path / "r.csv", pd.DataFrame({"text": ["a", "b", "c"], "label": [1, 1, 1]}))
    with pytest.raises(MarlInputError, match=r"only positive \(1\) labels"):
        load_imdb(path)
    path = _write(tmp_path / "n.csv", pd.DataFrame({"text": ["a", "b"], "label": ["neg", "negative"]}))
    with pytest.raises(MarlInputError, match=r"only negative \(0\) labels"):
        load_imdb(path)


def test_labels_outside_zero_one(tmp_path):
    path = _write(tmp_path / "r.csv", pd.DataFrame({"text": ["a", "b", "c"], "label": [0, 1, 2]}))
    with pytest.raises(MarlInputError, match=r"labels outside 0/1 \(2\)"):
        load_imdb(path)
    path = _write(tmp_path / "s.csv", pd.DataFrame({"text": ["a", "b"], "label": ["pos", "meh"]}))
    with pytest.raises(MarlInputError, match="labels outside 0/1 \\('meh'\\)"):
        load_imdb(path)


def test_bad_folders(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("hello")
    with pytest.raises(MarlInputError, match="has no data files"):
        load_imdb(tmp_path / "empty")
    (tmp_path / "two").mkdir()
    _frame(3).to_csv(tmp_path / "two" / "a.csv", index=False)
    _frame(3).to_csv(tmp_path / "two" / "b.csv", index=False)
    with pytest.raises(MarlInputError, match="2 data files.*train.<ext> and test.<ext>"):
        load_imdb(tmp_path / "two")


def test_bad_test_fraction():
    with pytest.raises(MarlInputError, match="test_fraction=1.5"):
        load_imdb(test_fraction=1.5)
