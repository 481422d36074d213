"""Evaluation is fair across tokenizers (bits per byte) and scores tasks the way
lm-evaluation-harness defines them; each metric is checked on a model whose answer is known by
construction. The benchmarks' own files are tests/parity/test_benchmark_readers.py's, bad task files
tests/robustness/test_eval_bad_input.py's, the sandbox tests/robustness/test_sandbox.py's."""
import json
import math

import pytest
import torch

import eval as ev
import fusellm
from conftest import byte_level_bpe, llama, sentencepiece_model, stdlib_texts
from extras import benchmarks
from extras.tokenizer_json import bytes_to_unicode
from tokenizer import load_tokenizer

tokenizers = pytest.importorskip("tokenizers")


def byte_tokenizer(folder):
    """A byte-level tokenizer with no merges whose ids are the byte values: token 66 is 'B'."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    vocab = {c: b for b, c in bytes_to_unicode().items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    return load_tokenizer(folder)


def uniform_model(vocab):
    """Output weights zero: every next token has probability 1 / vocab."""
    args = fusellm.ModelArgs(vocab_size=vocab, dim=8, n_layers=1, n_heads=1, n_kv_heads=1,
                             head_dim=8, hidden_dim=8, sliding_layers=(False,))
    m = fusellm.Transformer(args).eval()
    with torch.no_grad():
        m.output.weight.zero_()
    return m


@pytest.fixture(scope="module")
def llama_with_bos(tmp_path_factory):
    """A tiny random Llama with a sentencepiece BPE tokenizer that adds BOS, as Llama's does (the
    same as the shared world's target, built here)."""
    folder = tmp_path_factory.mktemp("llama_with_bos")
    fusellm.save_model(llama(400, 0), folder)
    (folder / "tokenizer.model").write_bytes(sentencepiece_model(stdlib_texts(20), 400))
    return folder


class Rigged(torch.nn.Module):
    """Logits that do not depend on the input: a fixed preference vector at every position."""

    def __init__(self, prefs: dict[int, float], vocab=256):
        super().__init__()
        self.bias = torch.zeros(vocab)
        for i, v in prefs.items():
            self.bias[i] = v

    def forward(self, x):
        return self.bias.expand(*x.shape, -1).clone()


class NextByte(torch.nn.Module):
    """Always predicts the byte after the current one: 'a' -> 'b' -> 'c' ..."""

    def forward(self, x):
        return F_one_hot((x + 1) % 256) * 20.0


def F_one_hot(x):
    return torch.nn.functional.one_hot(x, 256).float()


# --- bits per byte -------------------------------------------------------------------------------

def test_uniform_model_over_bytes_scores_exactly_8_bits_per_byte(tmp_path):
    """256 equally likely byte tokens: each byte costs log2(256) = 8 bits. No BOS or EOS here, so
    the first byte cannot be predicted and is left out of both counts."""
    tok = byte_tokenizer(tmp_path / "t")
    s = ev.Scorer(uniform_model(256), tok)
    nats, tokens, n_bytes = s.document_nats("héllo, wörld", stride=4)
    assert tokens == len("héllo, wörld".encode()) - 1 == n_bytes
    assert nats / math.log(2) / n_bytes == pytest.approx(8.0)


def test_two_tokenisations_are_normalised_by_the_same_bytes(tmp_path):
    """The same text under a byte tokenizer (256 tokens) and a trained BPE (more tokens per piece,
    fewer pieces): uniform models cost n_tokens * log2(V) bits, and both are divided by the text's
    bytes, so a coarser tokenizer is not rewarded merely for using fewer tokens."""
    text = stdlib_texts(1)[0][:3000]
    byte_tok = byte_tokenizer(tmp_path / "bytes")
    bpe = byte_level_bpe(stdlib_texts(8), 600)
    (tmp_path / "bpe").mkdir()
    bpe.save(str(tmp_path / "bpe" / "tokenizer.json"))
    bpe_tok = load_tokenizer(tmp_path / "bpe")
    results = {}
    for name, tok in (("bytes", byte_tok), ("bpe", bpe_tok)):
        scorer = ev.Scorer(uniform_model(tok.vocab_size), tok, window=256)
        nats, tokens, n_bytes = scorer.document_nats(text, 128)
        first = tok.encode(text)[0]
        start = tok.bos_id if tok.bos_id is not None else tok.eos_id
        expected_bytes = len(text.encode()) - (len(tok.token_bytes(first)) if start is None else 0)
        assert n_bytes == expected_bytes
        assert nats == pytest.approx(tokens * math.log(tok.vocab_size), rel=1e-5)
        results[name] = nats / math.log(2) / n_bytes
    assert results["bytes"] == pytest.approx(8.0)
    n_bpe = len(bpe_tok.encode(text))
    expected = n_bpe * math.log2(bpe_tok.vocab_size) / len(text.encode())
    assert results["bpe"] == pytest.approx(expected, rel=1e-3)


@pytest.mark.parametrize("kind", ["bytes", "bpe"])
def test_eval_lm_reports_bits_per_byte_and_perplexity_of_a_uniform_model_exactly(tmp_path, kind):
    """Through the public eval_lm on a two-document file: a uniform model over V tokens costs
    log2(V) bits a token, so bits per byte is tokens x log2(V) / bytes (8.0 for bytes) and
    perplexity per token is V. With BPE, tokens and bytes differ: dividing by tokens instead of
    bytes, or summing one document only, fails."""
    docs = [stdlib_texts(2)[0][:1500],
            "ünïcödé text, then code: x = [i * 2 for i in range(9)]\n"]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    if kind == "bytes":
        tok = byte_tokenizer(tmp_path / "t")
    else:
        byte_level_bpe(stdlib_texts(8), 600).save(str(tmp_path / "tokenizer.json"))
        tok = load_tokenizer(tmp_path)
    scorer = ev.Scorer(uniform_model(tok.vocab_size), tok, window=256)
    r = ev.eval_lm(scorer, tmp_path / "docs.jsonl", 100, None)
    # what each document is predicted from; without it, each document's first token is unscored
    start = tok.bos_id if tok.bos_id is not None else tok.eos_id
    firsts = 0 if start is not None else sum(len(tok.token_bytes(tok.encode(d)[0])) for d in docs)
    assert r["bytes"] == sum(len(d.encode()) for d in docs) - firsts
    assert r["tokens"] == sum(len(tok.encode(d)) - (start is None) for d in docs)
    assert r["bits_per_byte"] == pytest.approx(r["tokens"] * math.log2(tok.vocab_size) / r["bytes"],
                                               rel=1e-6)
    assert r["ppl_per_token"] == pytest.approx(tok.vocab_size, rel=1e-5)
    if kind == "bytes":
        assert r["bits_per_byte"] == pytest.approx(8.0) and r["ppl_per_token"] == pytest.approx(256)
    else:
        assert r["tokens"] < 0.6 * r["bytes"]                          # the two divisions differ


class Recorder(torch.nn.Module):
    """Uniform logits, and a record of every input it is given."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, x):
        self.seen.append(x[0].tolist())
        return torch.zeros(*x.shape, 256)


@pytest.mark.parametrize("stride,windows", [
    (None, [["P", 0, 1, 2], [3, 4, 5, 6], [5, 6, 7, 8]]),              # lm-eval's docstring example
    (2, [["P", 0], ["P", 0, 1, 2], [1, 2, 3, 4], [3, 4, 5, 6], [5, 6, 7, 8]]),
])
def test_rolling_windows_are_lm_evals_and_score_each_token_once(tmp_path, stride, windows):
    """Ten tokens, window 4, prefix P (here EOS): lm-eval's loglikelihood_rolling feeds [P 0 1 2]
    predicting 0-3, then [3 4 5 6] predicting 4-7, then [5 6 7 8] predicting only 8-9 (a full window
    of context). With stride 2, each window predicts 2 tokens from up to 4 before the second. Each
    token is scored once either way: 10 x ln 256 nats. An off-by-one in where a window starts, or a
    token scored twice, fails this."""
    tok = byte_tokenizer(tmp_path / "t")
    tok.eos_id = ord("P")
    text = "".join(chr(ord("0") + i) for i in range(10))
    rec = Recorder()
    nats, tokens, n_bytes = ev.Scorer(rec, tok, window=4).document_nats(text, stride)
    assert rec.seen == [[ord(str(t)) for t in w] for w in windows]
    assert (tokens, n_bytes) == (10, 10) and nats == pytest.approx(10 * math.log(256))


def test_one_window_equals_a_direct_computation_and_bos_is_scored_as_lm_eval_does(llama_with_bos):
    """A window as long as the document is one pass: the total equals log-softmax over [BOS] +
    encode(text) computed here. This tokenizer adds BOS (sentencepiece, as Llama's), so the tokens
    scored begin with that BOS, predicted from the BOS prefix, exactly as lm-eval 0.4.13 scores them
    (the parity test checks it there)."""
    model, tok = fusellm.load(llama_with_bos)
    assert tok.add_bos
    text = stdlib_texts(3)[2][:600]
    s = ev.Scorer(model, tok, window=10_000)
    ids = s.encode(text)
    assert ids == [tok.bos_id] + tok.encode(text)
    nats, tokens, _ = s.document_nats(text)
    with torch.no_grad():
        logp = model(torch.tensor([[tok.bos_id] + ids]))[0, :, :tok.vocab_size].log_softmax(-1)
    direct = -float(logp[:-1].gather(1, torch.tensor(ids)[:, None]).sum())
    assert tokens == len(ids) and nats == pytest.approx(direct, rel=1e-5)
    short, tokens2, _ = ev.Scorer(model, tok, window=32).document_nats(text)
    # less context, every token still once
    assert tokens2 == len(ids) and short != pytest.approx(direct, rel=1e-9)
    no_bos, tokens3, _ = ev.Scorer(model, tok, window=10_000, bos=False).document_nats(text)
    assert tokens3 == len(ids) - 1


# --- multiple choice -----------------------------------------------------------------------------

def test_rigged_model_picks_the_continuation_it_prefers(tmp_path):
    """A model that always prefers 'B' picks the choice 'B', by every one of the three measures."""
    tok = byte_tokenizer(tmp_path / "t")
    s = ev.Scorer(Rigged({ord("B"): 8.0}), tok)
    task = tmp_path / "mc.jsonl"
    rows = [{"context": "Pick one:", "choices": ["A", "B", "C"], "label": 1},
            {"context": "Again:", "choices": ["B", "D"], "label": 0}]
    task.write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = ev.eval_mc(s, task, None)
    assert (r["acc"], r["acc_norm"], r["acc_bytes"], r["n"]) == (1.0, 1.0, 1.0, 2)


def test_acc_norm_differs_from_acc_when_lengths_differ(tmp_path):
    """'B' is likely and ' ' unlikely. ' B' has the higher total log-likelihood (two tokens), but
    ' BBBBBB' has the higher log-likelihood per character of the choice (the delimiter's cost spread
    over 6 characters; dividing by the 7 characters of ' BBBBBB', as nanofuse once did, would change
    the margin, not this pick: the parity test against lm-eval catches that)."""
    tok = byte_tokenizer(tmp_path / "t")
    s = ev.Scorer(Rigged({ord("B"): 12.0, ord(" "): 3.0}), tok)
    short, long = s.continuation_logprob("x:", " B"), s.continuation_logprob("x:", " BBBBBB")
    assert short > long and short / 2 < long / 7
    task = tmp_path / "mc.jsonl"
    task.write_text(json.dumps({"context": "x:", "choices": ["B", "BBBBBB"], "label": 1}) + "\n")
    r = ev.eval_mc(s, task, None)
    assert (r["acc"], r["acc_norm"], r["loglikelihoods"]) == (0.0, 1.0, [[short, long]])


def test_acc_bytes_divides_by_utf8_bytes_and_acc_norm_by_characters(tmp_path):
    """'é' is one character and two bytes (two byte tokens), 'ab' two of each. Here ll('é') ≈
    -9.1 and ll('ab') ≈ -13.1: acc picks 'é', per character 'ab' wins (-6.5 against -9.1), per
    byte 'é' wins again (-4.5 against -6.5). Swapping the two divisions fails it."""
    tok = byte_tokenizer(tmp_path / "t")
    s = ev.Scorer(Rigged({0xC3: 2.0, 0xA9: 2.0, ord(" "): 5.0}), tok)
    task = tmp_path / "mc.jsonl"
    row = {"context": "x:", "choices": ["é", "ab"], "label": 0}
    task.write_text(json.dumps(row, ensure_ascii=False) + "\n")
    r = ev.eval_mc(s, task, None)
    e, ab = r["loglikelihoods"][0]
    assert ab < e < ab / 2
    assert (r["acc"], r["acc_norm"], r["acc_bytes"]) == (1.0, 0.0, 1.0)


def test_whitespace_ending_the_context_moves_into_the_continuation(tmp_path):
    """lm-eval's _encode_pair: "x: " + "한" is scored as "x:" + " 한", so the space's byte is the
    continuation's (nanofuse once counted it as context: -60.0 against lm-eval's -70.9 nats on
    GPT-2's tokenizer). An empty context is the prefix token alone."""
    tok = byte_tokenizer(tmp_path / "t")
    s = ev.Scorer(NextByte(), tok)
    assert s.split("x: ", "한") == s.split("x:", " 한") == (list(b"x:"), list(" 한".encode()))
    assert s.split("x:\n\n", "a") == (list(b"x:"), list(b"\n\na"))
    tok.eos_id = 0
    assert ev.Scorer(NextByte(), tok).split("", "ab") == ([0], list(b"ab"))


def test_where_lm_eval_refuses_eval_says_so(tmp_path, capsys):
    """A continuation longer than the window is one error naming --window (lm-eval asserts; scoring
    its tail alone would skew acc_norm); new tokens that fill the window slide the context, with a
    warning, once."""
    tok = byte_tokenizer(tmp_path / "t")
    s = ev.Scorer(NextByte(), tok, window=4)
    with pytest.raises(ev.EvalError, match="7 tokens, more than the window of 4; raise --window"):
        s.continuation_logprob("x:", " abcdef")
    assert s.generate("a", 6, []) == s.generate("a", 6, []) == "bcdefg"
    assert capsys.readouterr().err.count("6 new tokens fill the window of 4") == 1


def test_continuation_is_what_follows_the_contexts_own_encoding(llama_with_bos):
    """Context and continuation are encoded whole and the continuation is the tokens after
    len(encode(context)), also under a sentencepiece tokenizer that adds BOS and a dummy prefix."""
    model, tok = fusellm.load(llama_with_bos)
    s = ev.Scorer(model, tok)
    ctx, cont = s.split("def f(x):", " return x")
    whole = s.encode("def f(x): return x")
    assert ctx == s.encode("def f(x):") and ctx[0] == tok.bos_id and ctx + cont == whole


# --- generation ----------------------------------------------------------------------------------

def test_greedy_generation_stops_at_a_stop_string(tmp_path):
    """The text is cut where a stop string begins, or ends after max_new_tokens."""
    tok = byte_tokenizer(tmp_path / "t")
    s = ev.Scorer(NextByte(), tok)
    assert s.generate("a", 10, ["e"]) == "bcd"
    assert s.generate("a", 3, ["z"]) == "bcd"


def test_generation_cuts_at_the_earliest_of_two_stop_strings(tmp_path):
    """Stops 'bc' and 'c' appear at the same step: after 'a' the model writes 'b', then 'c', and
    'bc' begins at 0, 'c' at 1. The text is cut where the first stop string begins: ''. Catches a
    cut at the last of them ('b')."""
    tok = byte_tokenizer(tmp_path / "t")
    assert ev.Scorer(NextByte(), tok).generate("a", 10, ["c", "bc"]) == ""


class SpareRow(torch.nn.Module):
    """Logits over 258 rows for a 256-token vocabulary (a checkpoint's spare rows): after 'a' it
    picks row 257, which is no token; after anything else it picks 'z'."""

    def forward(self, x):
        out = torch.zeros(*x.shape, 258)
        out[..., ord("z")] = 1.0
        out[..., 257] = 10.0 * (x == ord("a"))
        return out


def test_a_generated_spare_row_is_left_out_of_the_text(tmp_path):
    """'a' -> row 257 (past the tokenizer's 256 ids) -> 'z' -> 'z': the text is 'zz', the spare
    row standing for no text. Catches the vocabulary check dropped (decoding id 257 fails)."""
    tok = byte_tokenizer(tmp_path / "t")
    assert tok.vocab_size == 256
    assert ev.Scorer(SpareRow(), tok).generate("a", 3, []) == "zz"


def test_generation_keeps_the_prompts_last_window_minus_new_tokens(tmp_path):
    """lm-eval's generate_until keeps the prompt's last window - max_new_tokens tokens, so prompt
    and answer fit the window together: window 8, 3 new tokens, a prompt of 20 bytes: the first
    forward pass sees its last 5 bytes, the next ones those 5 and the new tokens (uniform logits
    pick byte 0). Catches the prompt kept to the whole window (8 bytes)."""
    tok = byte_tokenizer(tmp_path / "t")
    rec = Recorder()
    prompt = "abcdefghijklmnopqrst"
    ev.Scorer(rec, tok, window=8).generate(prompt, 3, [])
    assert rec.seen == [list(b"pqrst"), list(b"pqrst") + [0], list(b"pqrst") + [0, 0]]


def test_generation_ends_at_the_checkpoints_end_ids_and_leaves_special_tokens_out(tmp_path):
    """Instruct checkpoints list several end ids in generation_config.json (Llama-3: <|end_of_text|>
    and <|eot_id|>); generation stops at any of them, and special tokens generated on the way are
    not part of the text, as Hugging Face's generate and decode(skip_special_tokens=True) give
    lm-eval. Here 'd' ends it and 'c' counts as special."""
    tok = byte_tokenizer(tmp_path / "t")
    (tmp_path / "m").mkdir()
    config = {"eos_token_id": [ord("d"), ord("q")]}
    (tmp_path / "m" / "generation_config.json").write_text(json.dumps(config))
    assert benchmarks.generation_end_ids(tmp_path / "m") == [ord("d"), ord("q")]
    assert benchmarks.generation_end_ids(tmp_path) == []
    stop_ids = benchmarks.generation_end_ids(tmp_path / "m")
    assert ev.Scorer(NextByte(), tok, stop_ids=stop_ids).generate("a", 10, []) == "bc"
    tok.special = {tok.pieces[ord("c")]}
    assert ev.Scorer(NextByte(), tok).generate("a", 4, []) == "bde"


@pytest.mark.parametrize("window", [40, 12])
def test_the_kv_cache_steps_pick_the_tokens_the_whole_context_picks(llama_with_bos, window):
    """Scorer.next_token, the readable step, runs the whole context again for each new token;
    extras/cached_generation.py, the step Scorer.generate takes for a nanofuse Transformer, runs
    the prompt once and then each new token alone against its KV cache. From a random prompt of 8
    ids, 20 greedy steps of each give the same tokens: with window 40 all from the cache, with
    window 12 the context slides past the window after 4 steps, and the whole context takes over.
    (Real checkpoints of every family: tests/parity/test_generation.py.)"""
    from extras.cached_generation import CachedSteps
    model, tok = fusellm.load(llama_with_bos)
    scorer = ev.Scorer(model, tok, window=window)
    prompt = torch.randint(3, 400, (8,), generator=torch.Generator().manual_seed(0)).tolist()
    cached = CachedSteps(model, window, 20, "cpu")
    plain, fast = list(prompt), list(prompt)
    for _ in range(20):
        plain.append(scorer.next_token(plain))
        fast.append(cached(fast))
    assert len(set(plain[8:])) >= 3, "a model that repeats one token would compare little"
    assert fast == plain

def test_exact_match_uses_few_shot_prompt(tmp_path):
    """The first example becomes the prompt's shot and is not scored. The prompt ends in 'A:' (':'
    is byte 58), so the next-byte model answers ';<=>?' (bytes 59..63): right for q1, wrong for
    q2."""
    tok = byte_tokenizer(tmp_path / "t")
    task = tmp_path / "gen.jsonl"
    task.write_text("".join(json.dumps(r) + "\n" for r in [{"input": "shot", "target": "x"},
                                                            {"input": "q1", "target": ";<=>?"},
                                                            {"input": "q2", "target": "nope"}]))
    r = benchmarks.eval_gen(ev.Scorer(NextByte(), tok), task, shots=1, max_new_tokens=5, limit=None)
    assert r == {"exact_match": 0.5, "n": 2}


def test_acc_norm_divides_by_the_choices_characters_not_the_delimiters(tmp_path):
    """' ' is likelier than 'B': logits 5 and 3, the other 254 bytes 0, so Z = e^5 + e^3 + 254,
    log p(' ') = a = 5 - ln Z ≈ -1.046 and log p('B') = b = 3 - ln Z ≈ -3.046. The choices 'B' and
    'BB' are scored as ' B' (a + b ≈ -4.09) and ' BB' (a + 2b ≈ -7.14): acc picks 'B'. Per
    character of the choice, 'BB' wins: -4.09 / 1 against -7.14 / 2 ≈ -3.57. Per character of
    delimiter + choice, 'B' would: -4.09 / 2 ≈ -2.05 against -7.14 / 3 ≈ -2.38 (the delimiter is
    the likelier character, and it weighs more in the shorter choice). Catches acc_norm dividing by
    len(' ' + choice), which the parity test against lm-eval catches too, but no lesson did."""
    tok = byte_tokenizer(tmp_path / "t")
    s = ev.Scorer(Rigged({ord(" "): 5.0, ord("B"): 3.0}), tok)
    log_z = math.log(math.exp(5) + math.exp(3) + 254)
    a, b = 5 - log_z, 3 - log_z
    assert (a + b) / 1 < (a + 2 * b) / 2 and (a + b) / 2 > (a + 2 * b) / 3   # the two rules differ
    task = tmp_path / "mc.jsonl"
    task.write_text(json.dumps({"context": "x:", "choices": ["B", "BB"], "label": 1}) + "\n")
    r = ev.eval_mc(s, task, None)
    assert r["loglikelihoods"] == [[pytest.approx(a + b), pytest.approx(a + 2 * b)]]
    assert (r["acc"], r["acc_norm"], r["acc_bytes"]) == (0.0, 1.0, 1.0)


def test_tied_choices_go_to_the_first_as_numpy_argmax_does(tmp_path):
    """A uniform model gives every byte ln(1/256): equally long choices tie under all three
    measures ('A' and 'B': 2 bytes with the delimiter; 'CD' and 'EF': 3), and lm-eval's argmax takes
    the first. Both rows answer 0: acc, acc_norm and acc_bytes are 1. Catches ties sent to the last
    choice (0 on all three)."""
    tok = byte_tokenizer(tmp_path / "t")
    task = tmp_path / "mc.jsonl"
    rows = [{"context": "x:", "choices": ["A", "B"], "label": 0},
            {"context": "y:", "choices": ["CD", "EF"], "label": 0}]
    task.write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = ev.eval_mc(ev.Scorer(Rigged({}), tok), task, None)
    assert r["loglikelihoods"] == [[pytest.approx(2 * math.log(1 / 256))] * 2,
                                   [pytest.approx(3 * math.log(1 / 256))] * 2]
    assert (r["acc"], r["acc_norm"], r["acc_bytes"]) == (1.0, 1.0, 1.0)
