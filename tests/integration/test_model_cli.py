"""`tandem-model` from outside: the README's commands work, bad input gets a clear one-line error and
a non-zero exit, never a crash. Uses the tiny fixture model ($TANDEM_TEST_MODELS/tiny)."""
import json
import os
import shutil
import subprocess

import pytest

BIN = os.path.join(os.environ.get("TANDEM_BIN", "build/bin"), "tandem-model")
TINY = os.path.join(os.environ.get("TANDEM_TEST_MODELS", "build/test-models"), "tiny")


def run(*args, timeout=300):
    return subprocess.run([BIN, "--log-level", "warn", *args], capture_output=True, text=True, timeout=timeout)


def test_inspect_prints_schedule_and_counts():
    out = run("inspect", TINY)
    assert out.returncode == 0, out.stderr
    assert "ratio   4  C4 + indexer  hash-routed MoE" in out.stdout
    assert "mtp" in out.stdout and "active per token" in out.stdout


def test_run_generates_the_same_ids_whatever_the_split():
    prompt = "0,19923,3787,1030,260,5223,16,1391,8421"
    base = run("run", TINY, "--prompt-ids", prompt, "--max-new-tokens", "8", "--deterministic")
    assert base.returncode == 0, base.stderr
    ids = base.stdout.split()
    assert len(ids) == 8 and all(0 <= int(i) < 129280 for i in ids)
    for extra in (["--pp-size", "2"], ["--chunk-size", "4"], ["--expert-dtype", "fp8"]):
        other = run("run", TINY, "--prompt-ids", prompt, "--max-new-tokens", "8", "--deterministic", *extra)
        assert other.returncode == 0, other.stderr
        assert other.stdout.split() == ids, extra


def test_the_checkpoint_is_in_the_real_format():
    with open(os.path.join(TINY, "model.safetensors.index.json")) as f:
        index = json.load(f)
    names = index["weight_map"]
    for name in ("embed.weight", "head.weight", "hc_head_fn", "layers.0.ffn.gate.tid2eid",
                 "layers.1.attn.indexer.compressor.ape", "layers.2.attn.compressor.wgate.weight",
                 "layers.3.ffn.gate.bias", "layers.3.ffn.experts.7.w2.scale", "layers.3.attn.wq_b.scale",
                 "mtp.0.e_proj.weight", "mtp.0.hc_head_base"):
        assert name in names, name
    assert len(set(names.values())) > 1, "expected a sharded checkpoint"
    assert os.path.exists(os.path.join(TINY, "tokenizer.json"))


@pytest.mark.parametrize("args,message", [
    (["run", "/nonexistent/model", "--prompt-ids", "1"], "config.json missing"),
    (["run", TINY, "--prompt-ids", "1,abc"], "\"abc\" is not a token id"),
    (["run", TINY, "--prompt-ids", "1,129280"], "token id 129280 outside the vocabulary"),
    (["run", TINY, "--prompt-ids", "1", "--pp-size", "9"], "--pp-size 9 exceeds"),
    (["generate", "--preset", "huge", "--out", "/tmp/x"], "huge"),
])
def test_bad_input_is_a_clear_error(args, message):
    out = run(*args)
    assert out.returncode != 0
    assert out.returncode < 128, "crashed"
    assert message in out.stderr, out.stderr


def test_broken_checkpoint_names_file_and_tensor(tmp_path):
    broken = tmp_path / "tiny"
    shutil.copytree(TINY, broken)
    shard = sorted(p for p in os.listdir(broken) if p.endswith(".safetensors"))[-1]
    path = broken / shard
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(size - 100)
    out = run("run", str(broken), "--prompt-ids", "0,1")
    assert out.returncode != 0 and out.returncode < 128
    assert shard in out.stderr, out.stderr
