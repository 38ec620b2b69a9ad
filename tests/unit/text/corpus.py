"""Deterministic multilingual test corpus for tokenizer parity (shared by the tests and the bench)."""
import random

WORDS = ("the quick brown fox jumps over lazy dog model server token stream request cache page "
         "decode prefill router latency throughput however although because therefore it's don't "
         "I'm we'll they've she'd you're Hello World OpenAI DeepSeek GPU CPU HTTP/2 e.g. i.e. etc "
         "naïve café résumé coöperate façade Zürich São Paulo Ångström").split()

CODE_SNIPPETS = [
    "def f(x):\n    return x ** 2 + 1\n",
    "for (int i = 0; i < n; ++i) {\n\tsum += a[i] * b[i];\n}\n",
    "const x = await fetch(`/api/v1/items?id=${id}&q=${encodeURIComponent(q)}`);",
    "#include <vector>\nint main() { std::vector<int> v{1, 2, 3}; return v.size(); }\r\n",
    '{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}',
    "<div class=\"row\"><span id='x'>&nbsp;&amp;</span></div>",
    "SELECT a.id, COUNT(*) FROM t AS a WHERE a.x >= 10 GROUP BY a.id;",
    "x = [i for i in range(100) if i % 3 == 0]  # comment\n",
    "fn main() -> Result<(), Box<dyn Error>> { println!(\"{:?}\", v); Ok(()) }",
    "$ ls -la /usr/local/bin | grep -E '^d' && echo $?\n",
    "\\frac{a^2 + b^2}{c_{i,j}} = \\sum_{k=1}^{\\infty} x_k",
    "https://example.com/path/to/file.html?query=1#frag user@example.org",
    "    if (a != b) {\n        return -1;\n    }\n",
    "@decorator\nclass Foo(Base):\n    __slots__ = ('a', 'b')\n",
    "a += 1; b -= 2; c *= 3; d /= 4; e %= 5; f <<= 6; g >>= 7; h &&= i || j;",
]

SPECIALS = ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>",
            "<think>", "</think>", "｜DSML｜", "<｜latest_reminder｜>", "<｜action｜>", "<｜domain｜>",
            "<｜place▁holder▁no▁5｜>", "<|EOT|>", "<dsml:", "</dsml:", "<｜tr｜>", "<｜/table>｜",
            "<｜fim▁hole｜>", "<｜▁pad▁｜>"]
NEAR_SPECIALS = ["<｜User", "｜User｜>", "<think", "think>", "</thin", "<｜DSML", "DSML｜", "<｜｜>",
                 "<|User|>", "< think>", "<｜Assistant｜"]

EMOJI = ["😀", "👍🏽", "👨‍👩‍👧‍👦", "🏳️‍🌈", "🇫🇷", "🇯🇵", "1️⃣", "#️⃣", "❤️", "🧑🏿‍💻", "👩‍❤️‍💋‍👨", "🫠",
         "☺︎", "🤷‍♂️", "🐕‍🦺", "✋🏻", "🙇‍♀️", "💯", "🎉🎉🎉"]

WHITESPACE = [" ", "  ", "   ", "\t", "\n", "\r\n", "\r", "\n\n", " \n", "\t\t", "\u00a0", "\u3000",
              "\u0085", "\u2028", "\u2029", "\u180e", "\u200b", "\ufeff", "\u2003", "\u202f", "\x0b",
              "\x0c", "\u1680", "\u205f"]

DIGITS = ["0123456789", "１２３４５", "²³", "½¾", "ⅫⅣ", "٠١٢٣٤٥", "०१२३", "๑๒๓", "①②", "3.14159",
          "1,000,000", "-42", "1e10", "0x1F"]


def _rand_range(rng, lo, hi, n):
    return "".join(chr(rng.randint(lo, hi)) for _ in range(n))


def english(rng):
    words = [rng.choice(WORDS) for _ in range(rng.randint(1, 30))]
    text = " ".join(words)
    if rng.random() < 0.5:
        text = text[0].upper() + text[1:] + rng.choice([".", "!", "?", "...", ";", ":"])
    if rng.random() < 0.3:
        text = f'"{text}," he said ({rng.randint(0, 9999)}).'
    return text


def code(rng):
    parts = [rng.choice(CODE_SNIPPETS) for _ in range(rng.randint(1, 4))]
    sep = rng.choice(["", "\n", "\r\n", "\n\n", "    "])
    return sep.join(parts)


def cjk(rng):
    out = []
    for _ in range(rng.randint(1, 8)):
        kind = rng.random()
        if kind < 0.6:
            out.append(_rand_range(rng, 0x4E00, 0x9FA5, rng.randint(1, 12)))
        elif kind < 0.7:
            out.append(_rand_range(rng, 0x9FA6, 0x9FFF, rng.randint(1, 3)))  # just past the split range
        elif kind < 0.8:
            out.append(_rand_range(rng, 0x3400, 0x4DBF, rng.randint(1, 3)))  # extension A
        else:
            out.append(rng.choice(["。", "，", "「", "」", "！", "？", "：", "、", " ", "abc", "123", "（", "）"]))
    return "".join(out)


def japanese(rng):
    out = []
    for _ in range(rng.randint(1, 10)):
        kind = rng.random()
        if kind < 0.35:
            out.append(_rand_range(rng, 0x3041, 0x3096, rng.randint(1, 6)))  # hiragana
        elif kind < 0.65:
            out.append(_rand_range(rng, 0x30A1, 0x30FC, rng.randint(1, 6)))  # katakana incl. ー
        elif kind < 0.8:
            out.append(_rand_range(rng, 0x4E00, 0x9FA5, rng.randint(1, 3)))
        elif kind < 0.9:
            out.append(_rand_range(rng, 0xFF66, 0xFF9F, rng.randint(1, 4)))  # halfwidth katakana
        else:
            out.append(rng.choice(["。", "、", "〜", "・", "！", "Tokyo", "２０２４年"]))
    return "".join(out)


def korean(rng):
    words = [_rand_range(rng, 0xAC00, 0xD7A3, rng.randint(1, 5)) for _ in range(rng.randint(1, 8))]
    if rng.random() < 0.2:
        words.append(_rand_range(rng, 0x1100, 0x11FF, 3))  # conjoining jamo
    return " ".join(words) + rng.choice(["", ".", "?", "요."])


def arabic(rng):
    out = []
    for _ in range(rng.randint(1, 8)):
        word = _rand_range(rng, 0x0621, 0x064A, rng.randint(2, 7))
        if rng.random() < 0.5:
            word = "".join(c + (chr(rng.randint(0x064B, 0x0652)) if rng.random() < 0.4 else "") for c in word)
        out.append(word)
    if rng.random() < 0.3:
        out.append("٣٤٥")
    return " ".join(out) + rng.choice(["", "؟", "،", "."])


INDIC_BLOCKS = [(0x0905, 0x0939, 0x093E, 0x094D), (0x0985, 0x09B9, 0x09BE, 0x09CD),
                (0x0B85, 0x0BB9, 0x0BBE, 0x0BCD), (0x0C05, 0x0C39, 0x0C3E, 0x0C4D)]


def indic_thai(rng):
    out = []
    for _ in range(rng.randint(1, 8)):
        if rng.random() < 0.6:
            base_lo, base_hi, mark_lo, mark_hi = rng.choice(INDIC_BLOCKS)
            word = ""
            for _ in range(rng.randint(1, 5)):
                word += chr(rng.randint(base_lo, base_hi))
                if rng.random() < 0.6:
                    word += chr(rng.randint(mark_lo, mark_hi))
            out.append(word)
        else:
            word = ""
            for _ in range(rng.randint(1, 8)):
                word += chr(rng.randint(0x0E01, 0x0E2E))
                if rng.random() < 0.4:
                    word += chr(rng.choice([0x0E31, 0x0E34, 0x0E35, 0x0E36, 0x0E37, 0x0E38, 0x0E48, 0x0E49, 0x0E4C]))
            out.append(word)
    return rng.choice([" ", "", "।"]).join(out)


def emoji(rng):
    out = []
    for _ in range(rng.randint(1, 8)):
        out.append(rng.choice(EMOJI))
        if rng.random() < 0.3:
            out.append(rng.choice([" ", "ok", "!", "\u200d", "\ufe0f"]))
    return "".join(out)


def digits(rng):
    kind = rng.random()
    if kind < 0.4:
        return "".join(rng.choice("0123456789") for _ in range(rng.randint(1, 60)))
    if kind < 0.7:
        return " ".join(rng.choice(DIGITS) for _ in range(rng.randint(1, 6)))
    return f"{rng.randint(0, 10**12)}.{rng.randint(0, 999)} x{rng.randint(0, 99)} abc{rng.randint(0, 9999)}def"


def whitespace(rng):
    out = []
    for _ in range(rng.randint(1, 12)):
        if rng.random() < 0.5:
            out.append(rng.choice(WHITESPACE) * rng.randint(1, 6))
        else:
            out.append(rng.choice(WORDS + ["中文", "(", "!!", "42", "é"]))
    return "".join(out)


def specials(rng):
    out = []
    for _ in range(rng.randint(1, 8)):
        kind = rng.random()
        if kind < 0.4:
            out.append(rng.choice(SPECIALS))
        elif kind < 0.6:
            out.append(rng.choice(NEAR_SPECIALS))
        else:
            out.append(rng.choice([english(rng), " ", "\n", "中文", "x"]))
    return "".join(out)


def random_unicode(rng):
    out = []
    for _ in range(rng.randint(1, 20)):
        plane = rng.random()
        if plane < 0.6:
            cp = rng.randint(0x20, 0xFFFF)
        elif plane < 0.9:
            cp = rng.randint(0x80, 0x3000)
        else:
            cp = rng.randint(0x10000, 0x10FFFF)
        if 0xD800 <= cp <= 0xDFFF:
            cp = 0x41
        out.append(chr(cp))
    return "".join(out)


def punctuation(rng):
    chars = "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~“”‘’«»—–…¿¡·•§¶†‡€£¥©®™°±×÷"
    return "".join(rng.choice(chars + "abcXYZ \n") for _ in range(rng.randint(1, 40)))


def mixed(rng):
    makers = [english, code, cjk, japanese, korean, arabic, indic_thai, emoji, digits, whitespace, specials]
    return rng.choice(["", " ", "\n"]).join(rng.choice(makers)(rng) for _ in range(rng.randint(2, 5)))


CATEGORIES = {
    "english": english, "code": code, "cjk": cjk, "japanese": japanese, "korean": korean,
    "arabic": arabic, "indic_thai": indic_thai, "emoji": emoji, "digits": digits,
    "whitespace": whitespace, "specials": specials, "random_unicode": random_unicode,
    "punctuation": punctuation, "mixed": mixed,
}


def long_strings(rng):
    return [
        "a" * 5000,
        " " * 3000 + "x",
        "\n" * 500 + "end",
        "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(4000)),
        "9" * 3001,
        "中" * 2000,
        ("hello world " * 800).strip(),
        "\t " * 700,
        "ab" * 1500,
        "!" * 1000,
        "😀" * 600,
    ]


def build_corpus(seed=20240901, per_category=180):
    """Returns a list of (category, text) pairs; identical on every run."""
    rng = random.Random(seed)
    corpus = [("fixed", "Hello! 毕老师！1 + 1 = 2 ĠÑĤÐ²ÑĬÑĢ"), ("fixed", ""), ("fixed", " "),
              ("fixed", "\n"), ("fixed", "<｜User｜>Hello<｜Assistant｜></think>")]
    for name, make in CATEGORIES.items():
        for _ in range(per_category):
            corpus.append((name, make(rng)))
    corpus.extend(("long", s) for s in long_strings(rng))
    return corpus


def invalid_utf8_lines(seed=7, count=200):
    """Byte strings (no newline) that are not valid UTF-8."""
    rng = random.Random(seed)
    pieces = [b"\xff", b"\xfe", b"\xc0\xaf", b"\xe0\x80\x80", b"\xed\xa0\x80", b"\xf0\x9f\x98", b"\xe2\x82",
              b"\x80", b"\xbf\xbf", b"\xf4\x90\x80\x80", b"\xc3", b"\xf8\x88\x80\x80\x80"]
    lines = []
    for _ in range(count):
        parts = []
        for _ in range(rng.randint(1, 6)):
            if rng.random() < 0.5:
                parts.append(rng.choice(pieces))
            else:
                parts.append(rng.choice(["abc", "中文", " ", "😀", "x y", "Ä"]).encode())
        lines.append(b"".join(parts))
    return lines
