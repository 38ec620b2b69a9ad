"""`tandem-model tokenize DIR` / `detokenize DIR` from outside, on the tiny fixture model (which
carries the real V4 tokenizer.json): ids equal HF `tokenizers`, every line format round-trips, and
bad input is a one-line error with a non-zero exit, never a crash."""
import json
import os
import subprocess

import pytest

BIN = os.path.join(os.environ.get("TANDEM_BIN", "build/bin"), "tandem-model")
TINY = os.path.join(os.environ.get("TANDEM_TEST_MODELS", "build/test-models"), "tiny")

PACKAGE_EXAMPLE = "Hello! 毕老师！1 + 1 = 2 ĠÑĤÐ²ÑĬÑĢ"
PACKAGE_IDS = [19923, 3, 223, 5464, 5008, 1175, 19, 940, 223, 19, 438, 223, 20, 6113, 257, 76589,
               131, 100, 76032, 1628, 76589, 131, 108, 76589, 131, 98]

# Lines a user might pipe in: prose, code, CJK, specials, emoji, digits, odd whitespace.
LINES = [
    PACKAGE_EXAMPLE,
    "The quick brown fox jumps over the lazy dog.",
    "def f(x):    return x ** 2  # tabs\tand  spaces",
    "日本語のテキストと中文混合 한국어 텍스트",
    "<｜begin▁of▁sentence｜><｜User｜>Hello<｜Assistant｜></think>",
    "<think>reasoning</think> then ｜DSML｜ markup",
    "👨‍👩‍👧‍👦 🏳️‍🌈 1️⃣ digits 1234567890 ١٢٣",
    "   leading and trailing   ",
    "",
]


def run(command, *args, stdin=b""):
    result = subprocess.run([BIN, "--log-level", "warn", command, *args], input=stdin,
                            capture_output=True, timeout=120)
    assert result.returncode < 128, f"crashed: {result.stderr!r}"
    return result


def ids_of(stdout: bytes):
    lines = stdout.decode().split("\n")
    assert lines[-1] == "", "output must end with a newline"
    return [[int(x) for x in line.split()] for line in lines[:-1]]


@pytest.fixture(scope="module")
def hf():
    tokenizers = pytest.importorskip("tokenizers")
    return tokenizers.Tokenizer.from_file(os.path.join(TINY, "tokenizer.json"))


def test_package_example_on_stdin():
    out = run("tokenize", TINY, stdin=(PACKAGE_EXAMPLE + "\n").encode())
    assert out.returncode == 0, out.stderr
    assert ids_of(out.stdout) == [PACKAGE_IDS]


def test_one_id_line_per_text_line_equal_to_hf(hf):
    out = run("tokenize", TINY, stdin="".join(line + "\n" for line in LINES).encode())
    assert out.returncode == 0, out.stderr
    assert ids_of(out.stdout) == [e.ids for e in hf.encode_batch(LINES)]


def test_last_line_without_newline_is_still_read():
    out = run("tokenize", TINY, stdin=b"Hello!\nHello!")
    assert out.returncode == 0, out.stderr
    assert out.stdout == b"19923 3\n19923 3\n"


def test_json_lines_carry_newlines_and_objects(hf):
    texts = ["line one\nline two", "tab\tand\r\nCRLF", "\n\n", "trailing \\ backslash \"quoted\""]
    stdin = "".join(json.dumps(t) + "\n" for t in texts) + json.dumps({"text": "Hello!"}) + "\n"
    out = run("tokenize", TINY, "--json", stdin=stdin.encode())
    assert out.returncode == 0, out.stderr
    assert ids_of(out.stdout) == [e.ids for e in hf.encode_batch(texts)] + [[19923, 3]]


def test_detokenize_gives_back_the_text(hf):
    id_lines = [e.ids for e in hf.encode_batch(LINES)]
    stdin = "".join(" ".join(map(str, ids)) + "\n" for ids in id_lines).encode()
    out = run("detokenize", TINY, stdin=stdin)
    assert out.returncode == 0, out.stderr
    assert out.stdout.decode().split("\n")[:-1] == LINES


def test_json_round_trip_through_both_commands():
    texts = ["multi\nline\n", "中文 and emoji 😀", "<｜User｜>x", "", "  "]
    stdin = "".join(json.dumps(t) + "\n" for t in texts).encode()
    ids = run("tokenize", TINY, "--json", stdin=stdin)
    assert ids.returncode == 0, ids.stderr
    back = run("detokenize", TINY, "--json", stdin=ids.stdout)
    assert back.returncode == 0, back.stderr
    assert [json.loads(line) for line in back.stdout.decode().split("\n")[:-1]] == texts


def test_detokenize_accepts_json_arrays_and_skips_specials(hf):
    ids = hf.encode("<｜begin▁of▁sentence｜>Hi there<｜end▁of▁sentence｜>").ids
    stdin = (json.dumps(ids) + "\n" + " ".join(map(str, ids)) + "\n").encode()
    out = run("detokenize", TINY, "--skip-special-tokens", stdin=stdin)
    assert out.returncode == 0, out.stderr
    assert out.stdout == b"Hi there\nHi there\n"


def test_split_character_decodes_lossily_like_hf(hf):
    ids = hf.encode("😀").ids
    assert len(ids) > 1, "expected the emoji to need several byte tokens"
    out = run("detokenize", TINY, "--json", stdin=(str(ids[0]) + "\n").encode())
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == hf.decode([ids[0]])


def test_help_lists_both_commands():
    out = subprocess.run([BIN, "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0
    assert "tokenize" in out.stdout and "detokenize" in out.stdout
    for command in ("tokenize", "detokenize"):
        sub = subprocess.run([BIN, command, "--help"], capture_output=True, text=True, timeout=60)
        assert sub.returncode == 0
        assert "--json" in sub.stdout and "DIR" in sub.stdout, sub.stdout


@pytest.mark.parametrize("command,args,stdin,message", [
    ("tokenize", ["/nonexistent/model"], b"x\n", "/nonexistent/model"),
    ("tokenize", [], b"x\n", "missing model DIR"),
    ("tokenize", [TINY, "--bogus"], b"x\n", "unknown flag --bogus"),
    ("tokenize", [TINY, "--json"], b"\"ok\"\n{not json\n", "line 2"),
    ("tokenize", [TINY, "--json"], b"[1, 2]\n", "expected a JSON string"),
    ("detokenize", [TINY], b"19923 abc\n", "\"abc\""),
    ("detokenize", [TINY], b"-5\n", "unknown token id -5"),
    ("detokenize", [TINY], b"99999999\n", "unknown token id 99999999"),
    ("detokenize", [TINY], b"[1, \"x\"]\n", "token ids must be integers"),
])
def test_bad_input_is_a_one_line_error(command, args, stdin, message):
    out = run(command, *args, stdin=stdin)
    assert out.returncode != 0
    err = out.stderr.decode()
    assert message in err, err
    assert err.startswith(f"tandem-model {command}: "), err


def test_directory_without_tokenizer_names_the_file(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    out = run("tokenize", str(tmp_path), stdin=b"x\n")
    assert out.returncode != 0
    assert "tokenizer.json" in out.stderr.decode()
