"""SMS spam data: load (local TSV/CSV or hub), split and subsample, always stratified.

Malformed rows are counted and a few are kept as examples; they never stop a load, because
real-world copies of this data set (re-exported CSVs, hand-edited TSVs) often carry a few bad lines.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from pathlib import Path

from ternlm.data.text import looks_like_hub_id, read_text_file
from ternlm.errors import TernlmError

DEFAULT_SOURCE = "ucirvine/sms_spam"
LABEL_NAMES = ("ham", "spam")
_LABELS = {"ham": 0, "0": 0, "spam": 1, "1": 1}
# Candidate column names in order of preference; v1/v2 are the Kaggle "spam.csv" headers (v1 = label).
_TEXT_COLUMNS = ("text", "sms", "message", "messages", "msg", "body", "content", "email", "v2")
_LABEL_COLUMNS = ("label", "labels", "class", "category", "target", "is_spam", "spam", "v1")
_MAX_EXAMPLES = 5
_EXPECTED = "expected 'label<TAB>text' or CSV with text/label columns"


@dataclass
class SpamDataset:
    texts: list[str]
    labels: list[int]  # 0 = ham, 1 = spam
    n_malformed: int = 0
    malformed_examples: list[str] = field(default_factory=list)
    source: str = ""

    def __post_init__(self):
        if len(self.texts) != len(self.labels):
            raise ValueError(f"{len(self.texts)} texts but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def n_spam(self) -> int:
        return sum(self.labels)

    def select(self, indices) -> "SpamDataset":
        """A subset; malformed-row bookkeeping stays with the source it describes."""
        return SpamDataset([self.texts[i] for i in indices], [self.labels[i] for i in indices],
                           self.n_malformed, list(self.malformed_examples), self.source)


class _Rows:
    """Collects valid rows and malformed-row reports while parsing."""

    def __init__(self):
        self.texts: list[str] = []
        self.labels: list[int] = []
        self.n_malformed = 0
        self.examples: list[str] = []

    def bad(self, where: str, why: str) -> None:
        self.n_malformed += 1
        if len(self.examples) < _MAX_EXAMPLES:
            self.examples.append(f"{where}: {why}")

    def add(self, where: str, label, text) -> None:
        key = str(label).strip().lower() if label is not None else ""
        if key not in _LABELS:
            self.bad(where, f"unknown label {str(label)[:20]!r}")
        elif text is None or not str(text).strip():
            self.bad(where, "empty text")
        else:
            self.texts.append(str(text).strip())
            self.labels.append(_LABELS[key])

    def finish(self, source: str) -> SpamDataset:
        if not self.texts:
            raise TernlmError(f"no valid rows in {source} ({self.n_malformed} malformed; {_EXPECTED})")
        if len(set(self.labels)) < 2:
            only = LABEL_NAMES[self.labels[0]]
            raise TernlmError(f"only one class in {source} (all {len(self.labels)} rows are {only}): "
                              f"need both ham and spam")
        return SpamDataset(self.texts, self.labels, self.n_malformed, self.examples, source)


def _parse_tsv(text: str, delimiter: str) -> _Rows:
    rows = _Rows()
    sep_name = "tab" if delimiter == "\t" else f"delimiter {delimiter!r}"
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue  # blank lines (a trailing newline, spacing) carry no row
        if delimiter not in line:
            rows.bad(f"line {lineno}", f"missing {sep_name}")
            continue
        label, msg = line.split(delimiter, 1)
        key = label.strip().lower()
        if lineno == 1 and key in _LABEL_COLUMNS and key not in _LABELS:
            continue  # a header row
        rows.add(f"line {lineno}", label, msg)
    return rows


def _find_column(header: list[str], wanted: str | None, candidates: tuple[str, ...], kind: str,
                 path: Path) -> int | None:
    names = [h.strip().lower() for h in header]
    if wanted is not None:
        if wanted.strip().lower() not in names:
            raise TernlmError(f"no {kind} column {wanted!r} in {path} (columns: {', '.join(header)})")
        return names.index(wanted.strip().lower())
    for c in candidates:
        if c in names:
            return names.index(c)
    return None


def _parse_csv(text: str, delimiter: str | None, path: Path, text_column: str | None,
               label_column: str | None) -> _Rows:
    if delimiter is None:
        try:
            delimiter = csv.Sniffer().sniff(text[:8192], delimiters=",;\t|").delimiter
        except csv.Error:
            delimiter = ","
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    rows = _Rows()
    try:
        header = next(reader, None)
        if header is None:
            return rows
        ti = _find_column(header, text_column, _TEXT_COLUMNS, "text", path)
        li = _find_column(header, label_column, _LABEL_COLUMNS, "label", path)
        if ti is None or li is None or ti == li:
            first = header[0].strip().lower() if header else ""
            if first in _LABELS and len(header) >= 2 and text_column is None and label_column is None:
                # Headerless "label,text" rows: the first row is data.
                li, ti = 0, 1
                rows.add(f"line {reader.line_num}", header[0], header[1])
            else:
                raise TernlmError(f"cannot find text and label columns in {path} (columns: "
                                  f"{', '.join(header)[:200]}): pass text_column= and label_column=")
        for record in reader:
            where = f"line {reader.line_num}"
            if not any(cell.strip() for cell in record):
                continue
            if len(record) <= max(ti, li):
                rows.bad(where, f"only {len(record)} field(s)")
                continue
            rows.add(where, record[li], record[ti])
    except csv.Error as e:
        rows.bad(f"line {reader.line_num}", f"unreadable CSV ({e}); rest of file skipped")
    return rows


def _guess_format(path: Path, text: str) -> str:
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return "csv"
    if suffix == ".tsv":
        return "tsv"
    first = next((line for line in text.splitlines() if line.strip()), "")
    if "\t" in first and first.split("\t", 1)[0].strip().lower() in set(_LABELS) | set(_LABEL_COLUMNS):
        return "tsv"
    if "," in first or ";" in first:
        return "csv"
    return "tsv"


def _resolve_file(path: Path) -> Path:
    if path.is_file():
        return path
    named = path / "SMSSpamCollection"
    if named.is_file():
        return named
    found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in (".tsv", ".csv", ".txt"))
    if len(found) == 1:
        return found[0]
    if not found:
        raise TernlmError(f"no SMS data file in {path} (expected SMSSpamCollection, *.tsv or *.csv)")
    raise TernlmError(f"several candidate files in {path} ({', '.join(p.name for p in found)}): pass one")


def _load_local(path: Path, fmt, text_column, label_column, delimiter) -> SpamDataset:
    path = _resolve_file(path)
    text = read_text_file(path, legacy_encodings=True)
    fmt = fmt or _guess_format(path, text)
    if fmt == "tsv":
        rows = _parse_tsv(text, delimiter or "\t")
    else:
        rows = _parse_csv(text, delimiter, path, text_column, label_column)
    return rows.finish(str(path))


def _load_hub(source: str, text_column: str | None, label_column: str | None) -> SpamDataset:
    from ternlm.hub import dataset_kwargs, hub_error

    import datasets

    try:
        ds = datasets.load_dataset(source, split="train", **dataset_kwargs())
    except Exception as e:  # network, auth, missing repo: all fixed the same way
        raise hub_error(source, "dataset", e, example="a SMSSpamCollection file") from None
    cols = ds.column_names
    tcol = text_column or next((c for c in ("sms", *_TEXT_COLUMNS) if c in cols), None)
    lcol = label_column or next((c for c in _LABEL_COLUMNS if c in cols), None)
    if tcol not in cols or lcol not in cols:
        raise TernlmError(f"cannot find text and label columns in {source!r} (columns: {', '.join(cols)}): "
                          f"pass text_column= and label_column=")
    # ClassLabel columns hold ints; map them through their names so a hub set with a different
    # label order (e.g. names ["spam", "ham"]) still gives 0 = ham, 1 = spam.
    names = getattr(ds.features[lcol], "names", None)
    rows = _Rows()
    for i, (t, y) in enumerate(zip(ds[tcol], ds[lcol])):
        if names is not None and isinstance(y, int) and 0 <= y < len(names):
            y = names[y]
        rows.add(f"row {i}", y, t)
    return rows.finish(source)


def load_sms_spam(source: str | Path = DEFAULT_SOURCE, *, fmt: str | None = None,
                  text_column: str | None = None, label_column: str | None = None,
                  delimiter: str | None = None) -> SpamDataset:
    """Load SMS spam data from a local file/directory or a Hugging Face Hub dataset id.

    Local files are ``label<TAB>text`` (the original SMSSpamCollection) or CSV with a header;
    ``fmt`` ("tsv"/"csv") overrides the guess from extension and content. Labels are ham/spam in any
    case, or 0/1. An existing local path always wins over a hub id of the same name.
    """
    if fmt is not None and fmt not in ("tsv", "csv"):
        raise TernlmError(f"unknown format {fmt!r}: use 'tsv' or 'csv'")
    path = Path(source).expanduser()
    if path.exists():
        return _load_local(path, fmt, text_column, label_column, delimiter)
    if not looks_like_hub_id(str(source)):
        raise TernlmError(f"no such file or directory: {source}")
    return _load_hub(str(source), text_column, label_column)


def dedupe(ds: SpamDataset) -> tuple[SpamDataset, int]:
    """The data set with every exact duplicate message dropped (the first copy kept), and how many
    were dropped. Split after this, so that no message is in both the training and the test split
    (the SMS collection holds ~400 repeated messages; split as they are, ~2% of a test split is
    training data). Messages that differ only in surrounding whitespace count as the same."""
    seen: set[str] = set()
    keep = []
    for i, t in enumerate(ds.texts):
        key = t.strip()
        if key not in seen:
            seen.add(key)
            keep.append(i)
    return ds.select(keep), len(ds) - len(keep)


def split_dataset(ds: SpamDataset, *, val_fraction: float = 0.1, test_fraction: float = 0.15,
                  seed: int = 0) -> tuple[SpamDataset, SpamDataset, SpamDataset]:
    """Stratified train/val/test split; the same seed always gives the same split."""
    from sklearn.model_selection import train_test_split

    if not (0 <= val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1):
        raise TernlmError(f"bad split fractions val={val_fraction} test={test_fraction}: "
                          f"need 0 <= val, 0 < test and val + test < 1")
    idx = list(range(len(ds)))
    try:
        rest, test = train_test_split(idx, test_size=test_fraction, random_state=seed, stratify=ds.labels)
        if val_fraction > 0:
            # val_fraction is of the whole set, so rescale it to the part left after the test split.
            train, val = train_test_split(rest, test_size=val_fraction / (1 - test_fraction),
                                          random_state=seed, stratify=[ds.labels[i] for i in rest])
        else:
            train, val = rest, []
    except ValueError as e:  # too few rows of a class to stratify
        raise TernlmError(f"cannot split {len(ds)} rows ({ds.n_spam} spam) stratified: {e}") from None
    return ds.select(train), ds.select(val), ds.select(test)


def subsample(ds: SpamDataset, n: int, seed: int = 0) -> SpamDataset:
    """A stratified random subset of ``n`` rows (the whole set, unchanged, when n >= len(ds))."""
    if n <= 0:
        raise TernlmError(f"subsample size must be positive, got {n}")
    if n >= len(ds):
        return ds
    from sklearn.model_selection import train_test_split

    try:
        keep, _ = train_test_split(list(range(len(ds))), train_size=n, random_state=seed, stratify=ds.labels)
    except ValueError as e:  # n smaller than the number of classes
        raise TernlmError(f"cannot take a stratified subsample of {n} rows: {e}") from None
    return ds.select(sorted(keep))
