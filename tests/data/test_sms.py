from collections import Counter

import pytest

from ternlm.data.sms import SpamDataset, load_sms_spam, split_dataset, subsample
from ternlm.errors import TernlmError


def _write(tmp_path, name, content, mode="w"):
    p = tmp_path / name
    if mode == "wb":
        p.write_bytes(content)
    else:
        p.write_text(content, encoding="utf-8")
    return p


def _toy(n_ham=40, n_spam=10):
    return SpamDataset([f"ham {i}" for i in range(n_ham)] + [f"spam {i}" for i in range(n_spam)],
                       [0] * n_ham + [1] * n_spam, source="toy")


# --- the real SMS Spam Collection -------------------------------------------------------------

def test_real_file_counts(sms_path):
    ds = load_sms_spam(str(sms_path))
    assert len(ds) == 5574
    assert ds.n_spam == 747 and ds.labels.count(0) == 4827
    assert ds.n_malformed == 0 and ds.malformed_examples == []
    assert ds.source == str(sms_path)
    assert all(t and t == t.strip() for t in ds.texts)


def test_directory_picks_the_collection(sms_path):
    ds = load_sms_spam(sms_path.parent)
    assert len(ds) == 5574 and ds.source == str(sms_path)


def test_real_split_stratified_and_deterministic(sms_path):
    ds = load_sms_spam(sms_path)
    train, val, test = split_dataset(ds, val_fraction=0.1, test_fraction=0.15, seed=0)
    assert len(train) + len(val) + len(test) == len(ds)
    assert abs(len(test) - 0.15 * len(ds)) <= 1 and abs(len(val) - 0.10 * len(ds)) <= 1
    # Messages repeat in this data set, so compare multisets rather than sets.
    assert Counter(train.texts) + Counter(val.texts) + Counter(test.texts) == Counter(ds.texts)
    rate = ds.n_spam / len(ds)
    for part in (train, val, test):
        assert abs(part.n_spam - rate * len(part)) <= 1
    again = split_dataset(ds, seed=0)
    assert [p.texts for p in again] == [train.texts, val.texts, test.texts]
    assert [p.labels for p in again] == [train.labels, val.labels, test.labels]
    assert split_dataset(ds, seed=1)[2].texts != test.texts


# --- split / subsample on small data ----------------------------------------------------------

def test_split_without_validation():
    train, val, test = split_dataset(_toy(), val_fraction=0.0, test_fraction=0.2)
    assert len(val) == 0 and len(test) == 10 and test.n_spam == 2 and len(train) == 40


@pytest.mark.parametrize("val,test", [(0.5, 0.5), (-0.1, 0.2), (0.1, 0.0), (0.1, 1.0)])
def test_split_rejects_bad_fractions(val, test):
    with pytest.raises(TernlmError, match="fractions"):
        split_dataset(_toy(), val_fraction=val, test_fraction=test)


def test_split_too_few_of_a_class():
    with pytest.raises(TernlmError, match="stratified"):
        split_dataset(_toy(n_ham=20, n_spam=1))


def test_subsample_stratified_and_deterministic():
    ds = _toy(n_ham=80, n_spam=20)
    sub = subsample(ds, 20, seed=3)
    assert len(sub) == 20 and sub.n_spam == 4
    assert subsample(ds, 20, seed=3).texts == sub.texts
    assert subsample(ds, 1000) is ds
    with pytest.raises(TernlmError):
        subsample(ds, 0)


# --- local TSV parsing -------------------------------------------------------------------------

def test_malformed_rows_counted_not_fatal(tmp_path):
    p = _write(tmp_path, "msgs.tsv", "ham\thello there\n"
                                     "no tab on this line\n"
                                     "spam\t\n"
                                     "maybe\twho knows\n"
                                     "\n"
                                     "SPAM\tWIN a prize now\n"
                                     "0\tnumeric ham\n"
                                     "1\tnumeric spam\r\n")
    ds = load_sms_spam(p)
    assert ds.texts == ["hello there", "WIN a prize now", "numeric ham", "numeric spam"]
    assert ds.labels == [0, 1, 0, 1]
    assert ds.n_malformed == 3
    assert ds.malformed_examples == ["line 2: missing tab", "line 3: empty text",
                                     "line 4: unknown label 'maybe'"]


def test_malformed_examples_are_capped(tmp_path):
    p = _write(tmp_path, "msgs.tsv", "ham\tok\nspam\tok too\n" + "garbage\n" * 50)
    ds = load_sms_spam(p)
    assert ds.n_malformed == 50 and len(ds.malformed_examples) == 5


def test_tsv_header_row_and_tabs_in_text(tmp_path):
    p = _write(tmp_path, "msgs.tsv", "label\ttext\nham\ta\tb\nspam\tc\n")
    ds = load_sms_spam(p)
    assert ds.texts == ["a\tb", "c"] and ds.n_malformed == 0


def test_first_row_spam_is_data_not_header(tmp_path):
    p = _write(tmp_path, "msgs", "spam\tfree prize\nham\tsee you\n")
    assert load_sms_spam(p).labels == [1, 0]


def test_latin1_file_is_accepted(tmp_path):
    p = _write(tmp_path, "msgs.tsv", "ham\tcaf\xe9 at 5\nspam\twin \xa3100\n".encode("latin-1"), mode="wb")
    assert load_sms_spam(p).texts == ["caf\u00e9 at 5", "win \u00a3100"]


# --- local CSV parsing -------------------------------------------------------------------------

def test_csv_custom_columns(tmp_path):
    p = _write(tmp_path, "data.csv", 'id,body_text,is_it_spam\n'
                                     '1,"Hello, how are you?",ham\n'
                                     '2,"WIN ""big"" now",spam\n'
                                     '3,,ham\n'
                                     '4\n')
    ds = load_sms_spam(p, text_column="body_text", label_column="is_it_spam")
    assert ds.texts == ["Hello, how are you?", 'WIN "big" now'] and ds.labels == [0, 1]
    assert ds.n_malformed == 2
    assert ds.malformed_examples == ["line 4: empty text", "line 5: only 1 field(s)"]


def test_csv_kaggle_v1_v2_guessed(tmp_path):
    # The widely shared Kaggle spam.csv: v1 = label, v2 = text, trailing empty columns, Windows-1252.
    content = "v1,v2,,,\nham,Go until jurong point,,,\nspam,Free entry \u20ac2 wkly comp,,,\n"
    p = _write(tmp_path, "spam.csv", content.encode("cp1252"), mode="wb")
    ds = load_sms_spam(p)
    assert ds.labels == [0, 1] and ds.texts == ["Go until jurong point", "Free entry \u20ac2 wkly comp"]


def test_csv_text_label_guess_and_semicolons(tmp_path):
    p = _write(tmp_path, "data.csv", "Message;Class\nhi there;0\nbuy now;1\n")
    ds = load_sms_spam(p)
    assert ds.texts == ["hi there", "buy now"] and ds.labels == [0, 1]


def test_fmt_overrides_extension(tmp_path):
    p = _write(tmp_path, "data.txt", "sms|label\nhello|ham\nwin|spam\n")
    ds = load_sms_spam(p, fmt="csv", delimiter="|")
    assert ds.labels == [0, 1]


def test_headerless_csv(tmp_path):
    p = _write(tmp_path, "data.csv", "ham,see you at 5\nspam,\"win, win\"\n")
    ds = load_sms_spam(p)
    assert ds.texts == ["see you at 5", "win, win"]


def test_csv_unknown_columns(tmp_path):
    p = _write(tmp_path, "data.csv", "a,b\nx,y\n")
    with pytest.raises(TernlmError, match="text_column"):
        load_sms_spam(p)
    with pytest.raises(TernlmError, match="no text column 'body'"):
        load_sms_spam(p, text_column="body", label_column="a")


# --- errors ------------------------------------------------------------------------------------

def test_missing_file(tmp_path):
    with pytest.raises(TernlmError, match="no such file"):
        load_sms_spam(tmp_path / "nope.tsv")


def test_empty_file(tmp_path):
    with pytest.raises(TernlmError, match=r"no valid rows in .*\(0 malformed"):
        load_sms_spam(_write(tmp_path, "empty.tsv", ""))


def test_wrong_format(tmp_path):
    p = _write(tmp_path, "data.json", '{"messages": [\n  {"x": 1}\n]}\n')
    with pytest.raises(TernlmError, match=r"no valid rows .*\(3 malformed; expected 'label<TAB>text'"):
        load_sms_spam(p)


def test_only_one_class(tmp_path):
    with pytest.raises(TernlmError, match="only one class .*all 2 rows are ham"):
        load_sms_spam(_write(tmp_path, "ham.tsv", "ham\ta\nham\tb\n"))


def test_binary_file(tmp_path):
    p = _write(tmp_path, "data.tsv", b"\x1f\x8b\x08\x00" + bytes(range(256)) * 4, mode="wb")
    with pytest.raises(TernlmError, match="binary"):
        load_sms_spam(p)


def test_undecodable_file(tmp_path):
    p = _write(tmp_path, "data.tsv", bytes(range(1, 256)) * 40, mode="wb")
    with pytest.raises(TernlmError, match="not UTF-8"):
        load_sms_spam(p)


def test_directory_without_data(tmp_path):
    (tmp_path / "notes.md").write_text("x")
    with pytest.raises(TernlmError, match="no SMS data file"):
        load_sms_spam(tmp_path)


def test_unknown_fmt(tmp_path):
    with pytest.raises(TernlmError, match="unknown format"):
        load_sms_spam(_write(tmp_path, "a.tsv", "ham\tx\n"), fmt="xlsx")


def test_errors_are_one_line(tmp_path):
    with pytest.raises(TernlmError) as e:
        load_sms_spam(_write(tmp_path, "x.tsv", "junk\n" * 3))
    assert "\n" not in str(e.value)


# --- hub (no network: load_dataset is replaced) ------------------------------------------------

def test_hub_columns_and_class_label(monkeypatch):
    import datasets

    calls = []

    def fake(source, split=None, **kw):
        calls.append((source, split))
        features = datasets.Features({"sms": datasets.Value("string"),
                                      "label": datasets.ClassLabel(names=["ham", "spam"])})
        rows = {"sms": ["hi\n", "WIN", " "], "label": [0, 1, 0]}
        return datasets.Dataset.from_dict(rows, features=features)

    monkeypatch.setattr(datasets, "load_dataset", fake)
    ds = load_sms_spam()
    assert calls == [("ucirvine/sms_spam", "train")]
    assert ds.texts == ["hi", "WIN"] and ds.labels == [0, 1]
    assert ds.n_malformed == 1 and ds.malformed_examples == ["row 2: empty text"]


def test_hub_failure_suggests_local_file(monkeypatch):
    import datasets

    def offline(*a, **kw):
        raise ConnectionError("Couldn't reach 'ucirvine/sms_spam' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(TernlmError, match=r"could not load dataset 'ucirvine/sms_spam' .*pass a local path \(e.g. a SMSSpamCollection file\)"):
        load_sms_spam("ucirvine/sms_spam")
