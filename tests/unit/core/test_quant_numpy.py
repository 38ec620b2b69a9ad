"""The NumPy codecs of tools/reference/quant.py against known values and against the C++ ones.

The C++ side comes from `$TANDEM_BIN/tandem-model quant-vectors --out FILE.safetensors`; those tests are
skipped when TANDEM_BIN is not set (the known-value tests always run).
"""
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
sys.path.insert(0, os.path.join(ROOT, "tools", "reference"))
import quant  # noqa: E402
from dsv4_ref import Checkpoint  # noqa: E402


# ---------------------------------------------------------------- known values

def test_ue8m0_known_values():
    assert quant.ue8m0_decode(127) == 1.0
    assert quant.ue8m0_decode(120) == 2.0 ** -7
    assert quant.ue8m0_decode(128) == 2.0
    assert np.isnan(quant.ue8m0_decode(255))
    assert quant.ue8m0_ceil(np.float32(1.0)) == 127
    assert quant.ue8m0_ceil(np.float32(1.0000001)) == 128
    assert quant.ue8m0_ceil(np.float32(0.75)) == 127
    assert quant.ue8m0_ceil(np.float32(2.0 ** -7)) == 120


def test_fp4_known_values():
    packed = np.array([[0x2F] + [0] * 15], dtype=np.uint8)
    values = quant.mxfp4_dequant(packed, np.array([[127]], dtype=np.uint8))
    assert values[0, :2].tolist() == [-6.0, 1.0]
    assert quant.e2m1_decode(np.arange(8)).tolist() == [0, .5, 1, 1.5, 2, 3, 4, 6]
    # Ties go to the even code: 0.25 -> 0, 0.75 -> 1.0, 1.25 -> 1.0, 2.5 -> 2, 5 -> 4; saturation at 6.
    got = quant.e2m1_decode(quant.e2m1_encode(np.array([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 9.0, -0.26])))
    assert got.tolist() == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0, -0.5]


def test_fp8_known_values():
    table = quant.FP8_VALUES
    assert table[0x38] == 1.0 and table[0x7E] == 448.0 and table[0xFE] == -448.0
    assert table[0x01] == 2.0 ** -9 and table[0x08] == 2.0 ** -6
    assert np.isnan(table[0x7F]) and np.isnan(table[0xFF])
    assert np.isfinite(np.delete(table, [0x7F, 0xFF])).all()
    x = np.array([1.0625, 1.1875, 1000.0, -1000.0, 464.0, 2.0 ** -10, 3 * 2.0 ** -10, np.nan, -0.0], np.float32)
    assert quant.fp8_encode(x).tolist() == [0x38, 0x3A, 0x7E, 0xFE, 0x7E, 0x00, 0x02, 0x7F, 0x80]
    # Every finite code survives a round trip, from float32 and from float64.
    finite = np.delete(np.arange(256), [0x7F, 0xFF])
    for dtype in (np.float32, np.float64):
        assert (quant.fp8_encode(table[finite].astype(dtype)) == finite).all()


def test_bf16_rounding():
    x = np.array([1.0 + 2.0 ** -8, 1.0 + 3 * 2.0 ** -8, 1.0 + 2.0 ** -8 + 2.0 ** -20, -2.5], np.float32)
    expect = [1.0, 1.0 + 2.0 ** -6, 1.0 + 2.0 ** -7, -2.5]
    assert quant.round_bf16(x).tolist() == expect
    assert quant.round_bf16(x.astype(np.float64)).tolist() == expect
    assert quant.bf16_bits(np.float32(1.0)) == 0x3F80


def test_quantizers_round_trip_within_format_error():
    rng = np.random.default_rng(3)
    w = (rng.standard_normal((200, 300)) * np.exp(rng.standard_normal((200, 1)))).astype(np.float32)
    codes, scales = quant.fp8_block_quantize(w)
    assert codes.shape == (200, 300) and scales.shape == (2, 3)
    back = quant.fp8_block_dequant(codes, scales)
    block_max = np.repeat(np.repeat(quant.ue8m0_decode(scales), 128, 0), 128, 1)[:200, :300] * 448
    assert (np.abs(back - w) <= block_max * 2.0 ** -4).all()
    packed, scales = quant.mxfp4_quantize(w[:, :288])
    back = quant.mxfp4_dequant(packed, scales)
    assert np.abs(back - w[:, :288]).max() <= np.abs(w).max() / 2
    kv = rng.standard_normal((5, 512))
    entries = quant.kv_entry_bytes(kv)
    assert entries.shape == (5, 584) and (entries[:, -1] == 0).all()
    np.testing.assert_array_equal(quant.kv_entry_from_bytes(entries), quant.kv_cache_roundtrip(kv))
    assert np.abs(quant.kv_cache_roundtrip(kv) - kv).max() <= np.abs(kv).max() * 2.0 ** -4


# ---------------------------------------------------------------- against the C++ codecs

@pytest.fixture(scope="module")
def vectors(tmp_path_factory):
    bin_dir = os.environ.get("TANDEM_BIN")
    if not bin_dir:
        pytest.skip("TANDEM_BIN not set")
    out = tmp_path_factory.mktemp("quant") / "vectors.safetensors"
    subprocess.run([os.path.join(bin_dir, "tandem-model"), "quant-vectors", "--out", str(out)], check=True)
    file = Checkpoint(str(out))
    return {name: np.array(file.raw(name)) for name in file.entries}


def _mismatch(a, b):
    bad = np.argwhere(a != b)
    return f"{len(bad)} differ; first at {bad[:5].tolist()}"


def test_fp8_decode_matches(vectors):
    codes = vectors["fp8.all_codes"]
    assert codes.tolist() == list(range(256))
    ours = quant.fp8_decode(codes)
    theirs = vectors["fp8.all_values"].astype(np.float64)
    np.testing.assert_array_equal(np.isnan(ours), np.isnan(theirs))
    np.testing.assert_array_equal(ours[~np.isnan(ours)], theirs[~np.isnan(theirs)])


def test_fp8_blocks_match(vectors):
    x = vectors["input"]
    assert x.dtype == np.float32 and x.shape == (256, 384)
    codes, scales = quant.fp8_block_quantize(x)
    assert (scales == vectors["fp8.scale"]).all(), _mismatch(scales, vectors["fp8.scale"])
    assert (codes == vectors["fp8.weight"]).all(), _mismatch(codes, vectors["fp8.weight"])
    ours = quant.fp8_block_dequant(vectors["fp8.weight"], vectors["fp8.scale"])
    np.testing.assert_array_equal(ours, vectors["fp8.dequant"].astype(np.float64))


def test_mxfp4_matches(vectors):
    packed, scales = quant.mxfp4_quantize(vectors["input"])
    theirs = vectors["mxfp4.weight"].view(np.uint8)
    assert (scales == vectors["mxfp4.scale"]).all(), _mismatch(scales, vectors["mxfp4.scale"])
    assert (packed == theirs).all(), _mismatch(packed, theirs)
    ours = quant.mxfp4_dequant(theirs, vectors["mxfp4.scale"])
    np.testing.assert_array_equal(ours, vectors["mxfp4.dequant"].astype(np.float64))


def test_kv_entries_match(vectors):
    x = vectors["kv.input"]
    assert x.dtype == np.float32 and x.shape == (64, 512)
    ours = quant.kv_entry_bytes(x)
    theirs = vectors["kv.entries"]
    assert ours.shape == theirs.shape
    for part, cols in (("fp8", slice(0, 448)), ("rope", slice(448, 576)), ("scales", slice(576, 583)),
                       ("pad", slice(583, 584))):
        assert (ours[:, cols] == theirs[:, cols]).all(), f"{part}: " + _mismatch(ours[:, cols], theirs[:, cols])
    np.testing.assert_array_equal(quant.kv_entry_from_bytes(theirs), vectors["kv.dequant"].astype(np.float64))
    np.testing.assert_array_equal(quant.kv_cache_roundtrip(x), vectors["kv.dequant"].astype(np.float64))
