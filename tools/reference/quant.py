"""NumPy codecs for the DSV4 element formats and cache layouts (see common/model/NUMERICS.md).

Encoders keep the dtype of their input for the arithmetic that decides a scale, so float32 input
reproduces the C++ (fp32) quantizers bit for bit while float64 input is used by the reference forward.
"""
import numpy as np

FP8_MAX = 448.0
FP8_BLOCK = 128
MXFP4_BLOCK = 32
KV_NOPE = 448          # FP8 part of an attention KV entry
KV_TILE = 64           # FP8 tile that shares one ue8m0 scale
KV_ENTRY_BYTES = 584   # 448 fp8 + 128 bytes bf16 rope + 7 scale bytes + 1 pad


# ---------------------------------------------------------------- bf16

def bf16_bits(x):
    """Round to bf16 (nearest even) and return the uint16 bit patterns."""
    x = np.asarray(x)
    if x.dtype == np.float64:
        x = _round_f64_to_bf16(x).astype(np.float32)  # exact: already bf16-representable
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    nan = np.isnan(x)
    rounded = (bits + np.uint32(0x7FFF) + ((bits >> 16) & 1)) >> 16
    quiet = (bits >> 16) | np.uint32(0x40)
    return np.where(nan, quiet, rounded).astype(np.uint16)


def bf16_to_float(bits):
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def _round_f64_to_bf16(x):
    # One rounding straight from float64 (no detour through float32): keep 8 significant bits.
    bits = np.ascontiguousarray(x, dtype=np.float64).view(np.uint64)
    drop = np.uint64(45)
    half = np.uint64((1 << 44) - 1)
    out = ((bits + half + ((bits >> drop) & np.uint64(1))) >> drop) << drop
    out = out.view(np.float64)
    return np.where(np.isfinite(x), out, x)


def round_bf16(x):
    """Value of x after a round trip through bf16 (dtype preserved)."""
    x = np.asarray(x)
    if x.dtype == np.float64:
        return _round_f64_to_bf16(x)
    return bf16_to_float(bf16_bits(x)).astype(x.dtype)


# ---------------------------------------------------------------- FP8 e4m3fn

def _fp8_table():
    codes = np.arange(256)
    exponent = (codes >> 3) & 0xF
    mantissa = (codes & 7).astype(np.float64)
    value = np.where(exponent == 0, mantissa / 8.0 * 2.0 ** -6,
                     (1.0 + mantissa / 8.0) * np.exp2(exponent - 7.0))
    value[(exponent == 0xF) & ((codes & 7) == 7)] = np.nan
    return np.where(codes & 0x80, -value, value)


FP8_VALUES = _fp8_table()                      # float64 [256]
_FP8_POS = FP8_VALUES[:0x7F]                   # codes 0..0x7e, increasing, last = 448
_FP8_MID = (_FP8_POS[:-1] + _FP8_POS[1:]) / 2  # exact midpoints between neighbouring codes


def fp8_decode(codes):
    return FP8_VALUES[np.asarray(codes, dtype=np.uint8)]


def fp8_encode(x):
    """e4m3fn codes: round to nearest, ties to the even code, saturate at +-448; NaN -> 0x7f."""
    x = np.asarray(x)
    magnitude = np.minimum(np.abs(x.astype(np.float64)), FP8_MAX)
    nan = np.isnan(magnitude)
    magnitude = np.where(nan, 0.0, magnitude)
    low = np.searchsorted(_FP8_POS, magnitude, side="right") - 1  # largest code with value <= magnitude
    low = np.minimum(low, 0x7E)
    mid = _FP8_MID[np.minimum(low, 0x7D)]
    up = (low < 0x7E) & ((magnitude > mid) | ((magnitude == mid) & (low & 1 == 1)))
    code = (low + up).astype(np.uint8)
    code |= np.where(np.signbit(x), 0x80, 0).astype(np.uint8)
    return np.where(nan, np.uint8(0x7F), code).astype(np.uint8)


# ---------------------------------------------------------------- ue8m0 and e2m1

def ue8m0_decode(bits):
    bits = np.asarray(bits, dtype=np.uint8)
    value = np.exp2(bits.astype(np.float64) - 127.0)
    return np.where(bits == 255, np.nan, value)


def ue8m0_ceil(value):
    """Byte of the smallest power of two >= value (value > 0; else 0), clamped to 2^[-127, 127]."""
    value = np.asarray(value)
    mantissa, exponent = np.frexp(value)  # value = mantissa * 2^exponent, mantissa in [0.5, 1)
    power = np.where(mantissa == 0.5, exponent - 1, exponent)
    power = np.clip(power, -127, 127)
    return np.where(value > 0, power + 127, 0).astype(np.uint8)


E2M1_VALUES = np.array([0, .5, 1, 1.5, 2, 3, 4, 6, -0.0, -.5, -1, -1.5, -2, -3, -4, -6])
_E2M1_MID = np.array([.25, .75, 1.25, 1.75, 2.5, 3.5, 5.0])


def e2m1_decode(codes):
    return E2M1_VALUES[np.asarray(codes, dtype=np.uint8) & 0xF]


def e2m1_encode(x):
    """Nearest e2m1 code, ties to the even code, saturating at +-6."""
    x = np.asarray(x)
    magnitude = np.abs(x.astype(np.float64))
    low = np.searchsorted(_E2M1_MID, magnitude, side="left")  # codes whose upper midpoint < magnitude
    tie = (low < 7) & (magnitude == _E2M1_MID[np.minimum(low, 6)])
    code = np.where(np.isnan(magnitude), 0, low + (tie & (low % 2 == 1)))
    return (code | np.where(np.signbit(x), 8, 0)).astype(np.uint8)


# ---------------------------------------------------------------- weight formats

def fp8_block_dequant(codes, scales, block=FP8_BLOCK):
    """e4m3 weight [N, K] times ue8m0 block scale [ceil(N/b), ceil(K/b)] -> float64."""
    codes = np.asarray(codes).view(np.uint8)
    rows, cols = codes.shape
    scale = ue8m0_decode(scales)
    scale = np.repeat(np.repeat(scale, block, axis=0)[:rows], block, axis=1)[:, :cols]
    return FP8_VALUES[codes] * scale


def _block_amax(values, block):
    rows, cols = values.shape
    pad_rows, pad_cols = -rows % block, -cols % block
    padded = np.pad(np.abs(values), ((0, pad_rows), (0, pad_cols)))
    return padded.reshape((rows + pad_rows) // block, block, (cols + pad_cols) // block, block).max(axis=(1, 3))


def fp8_block_quantize(values, block=FP8_BLOCK):
    """Block FP8 weights: scale = 2^ceil(log2(amax/448)) per block. Returns (codes uint8, scales uint8)."""
    values = np.asarray(values)
    dtype = values.dtype.type
    amax = _block_amax(values, block)
    scales = ue8m0_ceil(np.maximum(amax / dtype(FP8_MAX), dtype(1e-30)))
    scale = np.repeat(np.repeat(ue8m0_decode(scales), block, 0), block, 1)[:values.shape[0], :values.shape[1]]
    return fp8_encode(values / scale.astype(dtype)), scales


def mxfp4_dequant(packed, scales):
    """Packed e2m1 [rows, cols/2] (low nibble = even column) with ue8m0 [rows, cols/32] -> float64."""
    packed = np.asarray(packed).view(np.uint8)
    rows = packed.shape[0]
    codes = np.stack([packed & 0xF, packed >> 4], axis=-1).reshape(rows, -1)
    values = E2M1_VALUES[codes].reshape(rows, -1, MXFP4_BLOCK)
    return (values * ue8m0_decode(scales)[:, :, None]).reshape(rows, -1)


def mxfp4_quantize(values):
    """MXFP4 rows: scale per 32 inputs = 2^ceil(log2(amax/6)). Returns (packed uint8, scales uint8)."""
    values = np.asarray(values)
    dtype = values.dtype.type
    rows, cols = values.shape
    groups = values.reshape(rows, cols // MXFP4_BLOCK, MXFP4_BLOCK)
    amax = np.abs(groups).max(axis=-1)
    scales = ue8m0_ceil(np.maximum(amax / dtype(6.0), dtype(1e-30)))
    codes = e2m1_encode(groups / ue8m0_decode(scales)[:, :, None].astype(dtype)).reshape(rows, cols)
    return (codes[:, 0::2] | (codes[:, 1::2] << 4)).astype(np.uint8), scales


# ---------------------------------------------------------------- cache formats

def kv_entry_encode(x):
    """Attention KV vectors [..., 512] -> (fp8 codes [..., 448], bf16 bits [..., 64], scale bytes [..., 7])."""
    x = np.asarray(x)
    dtype = x.dtype.type
    nope, rope = x[..., :KV_NOPE], x[..., KV_NOPE:]
    tiles = nope.reshape(*nope.shape[:-1], KV_NOPE // KV_TILE, KV_TILE)
    amax = np.abs(tiles).max(axis=-1)
    scale_bits = ue8m0_ceil(np.maximum(amax / dtype(FP8_MAX), dtype(1e-4)))
    codes = fp8_encode(tiles / ue8m0_decode(scale_bits)[..., None].astype(dtype))
    return codes.reshape(nope.shape), bf16_bits(rope), scale_bits


def kv_entry_decode(codes, rope_bits, scale_bits):
    tiles = fp8_decode(codes).reshape(*codes.shape[:-1], KV_NOPE // KV_TILE, KV_TILE)
    nope = (tiles * ue8m0_decode(scale_bits)[..., None]).reshape(codes.shape)
    return np.concatenate([nope, bf16_to_float(rope_bits).astype(np.float64)], axis=-1)


def kv_entry_bytes(x):
    """The 584-byte cache entries of KV vectors [n, 512]: [448 fp8 | 64 bf16 LE | 7 ue8m0 | 1 pad 0]."""
    codes, rope_bits, scale_bits = kv_entry_encode(x)
    rope_bytes = rope_bits.astype("<u2").view(np.uint8).reshape(*rope_bits.shape[:-1], -1)
    pad = np.zeros((*codes.shape[:-1], 1), np.uint8)
    return np.concatenate([codes, rope_bytes, scale_bits, pad], axis=-1)


def kv_entry_from_bytes(entries):
    entries = np.asarray(entries, dtype=np.uint8)
    rope_bits = np.ascontiguousarray(entries[..., KV_NOPE:KV_NOPE + 128]).view("<u2")
    return kv_entry_decode(entries[..., :KV_NOPE], rope_bits, entries[..., KV_NOPE + 128:KV_NOPE + 135])


def kv_cache_roundtrip(x):
    """What a read of attention KV vectors sees after they were stored in the 584-byte cache format."""
    return kv_entry_decode(*kv_entry_encode(x))


def indexer_key_roundtrip(x):
    """Indexer key cache: per-vector fp32 scale = max(amax, 1e-4)/448, e4m3 codes; read as code * scale."""
    x = np.asarray(x)
    amax = np.abs(x).max(axis=-1, keepdims=True).astype(np.float32)
    scale = np.maximum(amax, np.float32(1e-4)) / np.float32(FP8_MAX)
    return fp8_decode(fp8_encode(x / scale)) * scale.astype(np.float64)
