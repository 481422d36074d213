"""eval.py's numbers equal lm-evaluation-harness 0.4.13's own (`hf` backend) on one tiny model and
data written here: per-choice log-likelihoods, acc, acc_norm and acc_bytes, and bits per byte, byte
and word perplexity of rolling log-likelihood, for a tokenizer without BOS (GPT-2's convention) and
one that adds BOS (Llama-3's)."""
import json
import random

import pytest
import torch

import eval as ev
import fusellm
from conftest import byte_level_bpe, stdlib_texts
from extras import benchmarks
from extras.package_files import package_path

lm_eval = pytest.importorskip("lm_eval")
transformers = pytest.importorskip("transformers")


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """lm-eval and datasets read only the files written here: no Hub."""
    for k, v in {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
                 "TOKENIZERS_PARALLELISM": "false"}.items():
        monkeypatch.setenv(k, v)


WINDOW = 32      # lm-eval's max_length: small, so documents span several rolling windows

# Contexts ending in a space, a newline or nothing; choices in several scripts, of very different
# lengths, so that dividing by characters, by bytes, or by the delimiter's extra character picks
# differently somewhere.
CONTEXTS = ["Question: Which city is the capital of France?\nAnswer:",
            "Write it in the other script: ", "def square(x):\n    return", "日本の首都は",
            "The answer is\n", "x = [i * 2 for i in range(9)]  # ", "Complete: naïve café ",
            "Q: 2 + 2 =\nA:"]
CHOICES = ["Paris", "London", "東京", "한글", "hangul", "café", "x ** 2", "def", "class", "4",
           "four", "a much longer answer that goes on", "é", "ab", "日本語のテキスト",
           "None"]


def mc_rows(n=40, seed=0):
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        choices = rng.sample(CHOICES, rng.randint(2, 4))
        rows.append({"context": CONTEXTS[i % len(CONTEXTS)], "choices": choices,
                     "label": rng.randrange(len(choices))})
    return rows


def documents():
    texts = stdlib_texts(14)
    return [texts[12][:900], texts[13][:150] + "\n",
            "한글 café 東京 — naïve text\nsecond line  with  spaces\n\n", "short"]


def write_checkpoint(folder, bos: bool, seed=0):
    """A tiny random Llama saved by transformers, with a byte-level BPE tokenizer.json: GPT-2's
    convention (no BOS; <|endoftext|> named as both, as GPT-2's config does) or Llama-3's (a
    post-processor that puts <s> first). Its embedding has spare rows past the tokenizer's last
    id."""
    from tokenizers import processors
    tok = byte_level_bpe(stdlib_texts(8) + [" ".join(CHOICES + CONTEXTS)] * 3, 600)
    if bos:
        tok.add_special_tokens(["<s>", "</s>"])
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    tok.save(str(folder / "tokenizer.json"))
    names = ({"bos_token": "<s>", "eos_token": "</s>"} if bos else
             {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>"})
    config = {**names, "tokenizer_class": "PreTrainedTokenizerFast"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    # 7 embedding rows past the tokenizer, as Qwen2.5's 151,936 for 151,665 tokens: lm-eval
    # normalises over them
    config = transformers.LlamaConfig(vocab_size=tok.get_vocab_size() + 7, hidden_size=32,
                                      intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=256, tie_word_embeddings=False,
                                      bos_token_id=tok.token_to_id(names["bos_token"]),
                                      eos_token_id=tok.token_to_id(names["eos_token"]))
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape)
            p.copy_(1 + 0.1 * noise if "norm" in name else 0.15 * noise)
    model.save_pretrained(folder)


def lm_eval_results(folder, data, add_bos):
    """lm-eval's own numbers: two tasks written as YAML over the local files, through
    simple_evaluate."""
    from lm_eval.tasks import TaskManager
    tasks = data / "tasks"
    tasks.mkdir(exist_ok=True)
    mc_task = benchmarks.lm_eval_task_yaml("nf_mc", "mc", data / "mc.jsonl")
    (tasks / "nf_mc.yaml").write_text(mc_task)
    (tasks / "nf_text.yaml").write_text(benchmarks.lm_eval_task_yaml("nf_text", "lm",
                                                                     data / "docs.jsonl"))
    bos_arg = "" if add_bos is None else f",add_bos_token={add_bos}"
    args = f"pretrained={folder},dtype=float32,max_length={WINDOW}{bos_arg}"
    manager = TaskManager(include_path=str(tasks), include_defaults=False)
    out = lm_eval.simple_evaluate(model="hf", model_args=args, tasks=["nf_mc", "nf_text"],
                                  log_samples=True, batch_size=1, device="cpu",
                                  task_manager=manager)
    samples = sorted(out["samples"]["nf_mc"], key=lambda s: s["doc_id"])
    return out["results"], [[r[0][0] for r in s["resps"]] for s in samples]


@pytest.mark.slow
@pytest.mark.parametrize("bos,add_bos", [(False, None), (True, None), (True, False)],
                         ids=["gpt2-style", "llama3-style", "llama3-style-bos-off"])
def test_eval_equals_lm_eval(tmp_path, bos, add_bos):
    """The same checkpoint scored by lm-eval 0.4.13 (add_bos_token unset, or False) and by nanofuse
    (--bos auto / no): every per-choice log-likelihood to 1e-5, the same acc, acc_norm, acc_bytes,
    and the same bits per byte, byte and word perplexity. Breakages this catches (each tried):
    acc_norm over " " + choice, the context's trailing space kept as context, BOS always or never
    added, overlapping rolling windows, words counted with str.split, log-softmax over the
    tokenizer's ids only (not the model's spare rows)."""
    folder, data = tmp_path / "model", tmp_path / "data"
    folder.mkdir()
    data.mkdir()
    write_checkpoint(folder, bos)
    rows = mc_rows()
    (data / "mc.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    (data / "docs.jsonl").write_text("".join(json.dumps({"text": d}, ensure_ascii=False) + "\n"
                                             for d in documents()))

    results, lls = lm_eval_results(folder, data, add_bos)

    model, tok = fusellm.load(folder)
    assert tok.add_bos is bos
    scorer = ev.Scorer(model.eval(), tok, window=WINDOW, bos=add_bos)
    mc = ev.eval_mc(scorer, data / "mc.jsonl", None)
    assert mc["loglikelihoods"] == [pytest.approx(row, rel=1e-5, abs=1e-4) for row in lls]
    for metric in ("acc", "acc_norm", "acc_bytes"):
        assert mc[metric] == pytest.approx(results["nf_mc"][f"{metric},none"], abs=1e-12), metric
    assert len({mc["acc"], mc["acc_norm"], mc["acc_bytes"]}) > 1    # the data tells the three apart
    lm = ev.eval_lm(scorer, data / "docs.jsonl", None, None)
    for metric in ("bits_per_byte", "byte_perplexity", "word_perplexity"):
        assert lm[metric] == pytest.approx(results["nf_text"][f"{metric},none"], rel=1e-5), metric


# --- BIG-Bench Hard: the prompt lm-eval builds, the generation, the answer it extracts ------------

BBH_QUESTIONS = [{"input": "Today is 3/5/1973. What is the date a month ago in MM/DD/YYYY?\n"
                           "Options:\n(A) 02/05/1973\n(B) 03/08/1983", "target": "(A)"},
                 {"input": "  leading spaces, 한글, and a trailing newline\n", "target": "No"}]


def bbh_data(root, subtasks):
    """BBH-format task files for the subtasks, and YAML that points lm-eval's own subtask config at
    them."""
    folder = benchmarks.bbh_prompts_folder()
    (root / "tasks").mkdir(parents=True)
    for name in subtasks:
        (root / f"{name}.jsonl").write_text("".join(json.dumps(q, ensure_ascii=False) + "\n"
                                                    for q in BBH_QUESTIONS))
        (root / "tasks" / f"{name}.yaml").write_text(
            f"include: {folder / (name + '.yaml')}\ntask: nf_bbh_{name}\ndataset_path: json\n"
            f"dataset_name: null\n"
            f"dataset_kwargs:\n  data_files:\n    test: {root / (name + '.jsonl')}\n")
    from lm_eval.tasks import TaskManager
    return TaskManager(include_path=str(root / "tasks"), include_defaults=False)


def test_bbh_prompts_equal_lm_evals_for_all_27_subtasks(tmp_path):
    """For every subtask of lm-eval's bbh_cot_fewshot group, the context nanofuse builds from
    lm-eval's YAML (description, three chain-of-thought examples, the question in "Q: ...\\nA: Let's
    think step by step.\\n") is the string lm-eval builds, character for character, and the stop
    strings are the same. Catches a lost delimiter, a wrong number of shots, or a template read
    wrong."""
    folder = benchmarks.bbh_prompts_folder()
    subtasks = sorted(f.stem for f in folder.glob("*.yaml") if not f.stem.startswith("_"))
    assert len(subtasks) == 27
    tm = bbh_data(tmp_path, subtasks)
    loaded = tm.load([f"nf_bbh_{n}" for n in subtasks])["tasks"]
    for name in subtasks:
        task = loaded[f"nf_bbh_{name}"]
        task.build_all_requests(limit=None, rank=0, world_size=1)
        ours = benchmarks.bbh_task(name, folder)
        assert len(task.instances) == 2
        for inst in task.instances:
            context, kwargs = inst.args
            question = BBH_QUESTIONS[inst.doc_id]["input"]
            assert benchmarks.bbh_context(ours, question) == context, name
            assert ours["generation_kwargs"]["until"] == kwargs["until"]


def test_bbh_answer_is_lm_evals_regex_then_exact_match():
    """Hand-worked answers: what follows 'the answer is ' less its last character (the full stop),
    the first such place; none: '[invalid]'."""
    task = benchmarks.bbh_task("date_understanding", benchmarks.bbh_prompts_folder())
    answer = benchmarks.bbh_answer(task, "Ten days before is 12/14/1937. So the answer is (D).")
    assert answer == "(D)"
    answer = benchmarks.bbh_answer(task, "So the answer is (B). Or the answer is (C).")
    assert answer == "(B). Or the answer is (C)"
    assert benchmarks.bbh_answer(task, "the answer is  Yes.") == "Yes"
    assert benchmarks.bbh_answer(task, "I think it is (A)") == "[invalid]"


@pytest.mark.slow
def test_bbh_generations_equal_lm_evals(tmp_path):
    """One subtask end to end on a tiny Llama that adds BOS: the greedy generations after lm-eval's
    prompt, cut at its stop strings, equal those of lm-eval 0.4.13 (max_gen_toks 24). Exact match
    agrees too, but trivially: a random model never writes "the answer is" (the extraction is
    checked by hand above)."""
    (tmp_path / "model").mkdir()
    write_checkpoint(tmp_path / "model", bos=True, seed=1)
    tm = bbh_data(tmp_path / "bbh", ["date_understanding"])
    args = f"pretrained={tmp_path / 'model'},dtype=float32,max_length=2048"
    out = lm_eval.simple_evaluate(model="hf", model_args=args,
                                  tasks=["nf_bbh_date_understanding"], task_manager=tm,
                                  log_samples=True, batch_size=1, device="cpu",
                                  gen_kwargs="max_gen_toks=24")
    samples = sorted(out["samples"]["nf_bbh_date_understanding"], key=lambda s: s["doc_id"])
    model, tok = fusellm.load(tmp_path / "model")
    scorer = ev.Scorer(model.eval(), tok, window=2048)
    task = benchmarks.bbh_task("date_understanding", benchmarks.bbh_prompts_folder())
    until = task["generation_kwargs"]["until"]
    ours = [scorer.generate(benchmarks.bbh_context(task, q["input"]), 24, until)
            for q in BBH_QUESTIONS]
    assert ours == [s["resps"][0][0] for s in samples]
    assert any(len(g) > 10 for g in ours), "generations cut at once would compare little"
    em = benchmarks.eval_bbh(scorer, [tmp_path / "bbh" / "date_understanding.jsonl"],
                             max_new_tokens=24)
    theirs = out["results"]["nf_bbh_date_understanding"]["exact_match,get-answer"]
    assert em["exact_match"] == theirs


# --- the paper's commonsense tasks, from their datasets' own rows ------------------------------

# lm-eval task file -> rows in the Hugging Face dataset's fields (made up here, not the data)
COMMONSENSE = {
    "arc/arc_easy.yaml": [
        {"id": "1", "question": "Which gas do plants take in?", "answerKey": "B",
         "choices": {"text": ["oxygen", "carbon dioxide", "helium"], "label": ["A", "B", "C"]}},
        {"id": "2", "question": "How many legs has a spider? ", "answerKey": "2",
         "choices": {"text": ["six", "eight"], "label": ["1", "2"]}}],
    "openbookqa/openbookqa.yaml": [
        {"id": "1", "question_stem": "The sun is responsible for", "answerKey": " D",
         "choices": {"text": ["puppies", "water", "rain", "plants sprouting"],
                     "label": ["A", "B", "C", "D"]}}],
    "super_glue/boolq/default.yaml": [
        {"question": "is the sky blue", "passage": "The sky is blue by day.", "idx": 0,
         "label": 1}],
    "hellaswag/hellaswag.yaml": [
        {"ind": 4, "activity_label": "Removing ice from car",
         "ctx_a": "Then, the man writes over the snow [title] covering the window.",
         "ctx_b": "the man",
         "endings": [" [header] stops.", "sprays  water  [step] on it.", "drives away", "waves"],
         "label": "3", "split": "val", "split_type": "indomain", "source_id": "x",
         "ctx": "unused"}],
    "piqa/piqa.yaml": [
        {"goal": "How do I keep tea hot?", "sol1": "Use a thermos.", "sol2": "Use a sieve.",
         "label": 0}],
}


def test_commonsense_rows_become_lm_evals_requests(tmp_path):
    """ARC, OpenBookQA, BoolQ, HellaSwag and PIQA rows in their datasets' own fields: every
    (context, continuation) pair nanofuse scores is the one lm-eval's task of that name asks its
    model for (its own YAML, HellaSwag's clean-up included), and the gold index is the same. Catches
    a changed template, a lost "?" or capitalisation, HellaSwag's [title] handled otherwise, or the
    answer key's stray space."""
    from lm_eval.tasks import TaskManager
    tasks_dir = package_path("lm_eval", "tasks")
    (tmp_path / "tasks").mkdir()
    for i, (yaml_file, rows) in enumerate(COMMONSENSE.items()):
        (tmp_path / f"{i}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (tmp_path / "tasks" / f"{i}.yaml").write_text(
            f"include: {tasks_dir / yaml_file}\ntask: nf_cs_{i}\ndataset_path: json\n"
            f"dataset_name: null\ndataset_kwargs:\n  data_files:\n"
            f"    test: {tmp_path / f'{i}.jsonl'}\ntest_split: test\n"
            "training_split: null\nvalidation_split: null\n")
    tm = TaskManager(include_path=str(tmp_path / "tasks"), include_defaults=False)
    loaded = tm.load([f"nf_cs_{i}" for i in range(len(COMMONSENSE))])["tasks"]
    for i, yaml_file in enumerate(COMMONSENSE):
        task = loaded[f"nf_cs_{i}"]
        task.build_all_requests(limit=None, rank=0, world_size=1)
        theirs = {}
        for inst in task.instances:
            theirs.setdefault(inst.doc_id, []).append(inst.args)
        ours = benchmarks.read_mc(tmp_path / f"{i}.jsonl")
        for doc_id, row in enumerate(ours):
            assert theirs[doc_id] == [(row["context"], " " + c) for c in row["choices"]], yaml_file
            assert task.doc_to_target(task.dataset["test"][doc_id]) == row["label"], yaml_file
