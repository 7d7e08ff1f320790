"""A reader of dlib's binary serialization (dlib/serialize.h), as much as its model files use.

The encoding, learnt from dlib's C++ source:
- integer: a control byte (bit 7 set: negative; low 4 bits: how many magnitude bytes follow,
  1 to 8, little-endian); bits 4-6 are always 0.
- float: two integers, a signed mantissa then an exponent: mantissa * 2**exponent. Exponents
  32000, 32001 and 32002 stand for +inf, -inf and NaN.
- bool: the ASCII byte '1' or '0'. string: its length (integer), then its bytes.
- std::vector: its length (integer), then its items.
- matrix: rows and columns (both negated in the current format), then the values row by row.

``f`` is a seekable binary file object. Files made of nothing but integers and floats (the shape
predictor, ~33 million integers) are read in seconds with :func:`read_ints`, which decodes a
whole run of integers with numpy.
"""

import numpy as np

from safetriage_jax.errors import SafeTriageError

SIGN_BIT, SIZE_BITS, UNUSED_BITS = 0x80, 0x0F, 0x70
EXPONENT_INF, EXPONENT_NINF, EXPONENT_NAN = 32000, 32001, 32002
BLOCK_BYTES = 4096  # read_ints walks the bytes in blocks of this size, all blocks at once


def _corrupt(f, what):
    return SafeTriageError(f"Not a valid dlib file: {what} near byte {f.tell()}; the file is "
                           "truncated or corrupt (download it again).")


def read_int(f):
    """One signed or unsigned integer."""
    head = f.read(1)
    if not head:
        raise _corrupt(f, "it ends inside an integer")
    control = head[0]
    size = control & SIZE_BITS
    if control & UNUSED_BITS or not 1 <= size <= 8:
        raise _corrupt(f, f"bad integer control byte {control:#04x}")
    body = f.read(size)
    if len(body) != size:
        raise _corrupt(f, "it ends inside an integer")
    value = int.from_bytes(body, "little")
    return -value if control & SIGN_BIT else value


def floats_from_ints(mantissa_N, exponent_N):
    """Floats (float64) from their (mantissa, exponent) integer pairs, specials included."""
    mantissa_N, exponent_N = np.asarray(mantissa_N, np.int64), np.asarray(exponent_N, np.int64)
    finite = exponent_N < EXPONENT_INF
    values_N = np.ldexp(mantissa_N.astype(np.float64), np.where(finite, exponent_N, 0))
    values_N = np.where(exponent_N == EXPONENT_INF, np.inf, values_N)
    values_N = np.where(exponent_N == EXPONENT_NINF, -np.inf, values_N)
    return np.where(exponent_N >= EXPONENT_NAN, np.nan, values_N)


def read_float(f):
    """One float or double (dlib's portable encoding), as a Python float."""
    mantissa, exponent = read_int(f), read_int(f)
    return float(floats_from_ints([mantissa], [exponent])[0])


def read_str(f):
    """A std::string (UTF-8)."""
    size = read_int(f)
    data = f.read(size) if size >= 0 else b""
    if len(data) != size:
        raise _corrupt(f, "it ends inside a string")
    return data.decode("utf-8")


def read_bool(f):
    """A bool ('1' or '0')."""
    byte = f.read(1)
    if byte not in (b"0", b"1"):
        raise _corrupt(f, f"bad bool {byte!r}")
    return byte == b"1"


def read_vector(f, read_item):
    """A std::vector: its length, then that many ``read_item(f)``."""
    return [read_item(f) for _ in range(read_int(f))]


def read_float_matrix(f):
    """A dlib matrix of floats or doubles as a (rows, columns) float32 array."""
    rows, columns = abs(read_int(f)), abs(read_int(f))
    pairs_N2 = read_ints(f, 2 * rows * columns).reshape(-1, 2)
    values_N = floats_from_ints(pairs_N2[:, 0], pairs_N2[:, 1]).astype(np.float32)
    return values_N.reshape(rows, columns)


def read_ints(f, count=None):
    """The next ``count`` integers (all of them to the end of the file if None): int32, or
    int64 when any takes more than 3 bytes.

    Vectorised: an integer's length is in its first byte, so the bytes are cut into blocks and
    one walker per block hops from integer to integer, all blocks at once. A walker starts at
    its block's first byte, which may lie inside an integer; paths from different starts merge
    within a few hops, so the true path (which enters the block where the previous block's
    left off) is followed in Python only until it meets its walker's. Unsigned values of 2**63
    and more do not fit (dlib's model files hold none).
    """
    start = f.tell()
    data_N = np.frombuffer(f.read() if count is None else f.read(9 * count), np.uint8)
    starts_K = _int_starts(data_N)
    if count is not None:
        if len(starts_K) < count:
            raise _corrupt(f, "it ends inside a run of integers")
        starts_K = starts_K[:count]
    control_K = data_N[starts_K]
    sizes_K = control_K & SIZE_BITS
    bad_K = (control_K & UNUSED_BITS != 0) | (sizes_K - np.uint8(1) > 7)  # sizes 1..8 only
    end = int(starts_K[-1]) + 1 + int(sizes_K[-1]) if len(starts_K) else 0
    if bad_K.any() or end > len(data_N) or (count is None and end != len(data_N)):
        f.seek(start + (int(starts_K[np.argmax(bad_K)]) if bad_K.any() else len(data_N)))
        raise _corrupt(f, "a bad integer")
    longest = int(sizes_K.max(initial=1))
    values_K = np.zeros(len(starts_K), np.int32 if longest <= 3 else np.int64)
    padded_N = np.concatenate([data_N, np.zeros(8, np.uint8)])
    for byte in range(longest):  # little-endian magnitude bytes
        digit_K = padded_N[starts_K + (1 + byte)]
        digit_K *= sizes_K > byte
        values_K |= digit_K.astype(values_K.dtype) << (8 * byte)
    np.negative(values_K, out=values_K, where=control_K >= SIGN_BIT)
    f.seek(start + end)
    return values_K


def _int_starts(data_N):
    """Offsets at which the integers of a run that starts at offset 0 begin (see read_ints)."""
    size = len(data_N)
    hop_N = 1 + (data_N & SIZE_BITS)  # from an integer's start to the next one's (uint8)
    block_starts_B = np.arange(0, size, BLOCK_BYTES)
    block_ends_B = np.minimum(block_starts_B + BLOCK_BYTES, size)
    visited_N = np.zeros(size, bool)
    position_B = block_starts_B.copy()
    walking = np.arange(len(block_starts_B))
    while walking.size:  # all walkers at once, one hop per round
        position = position_B[walking]
        visited_N[position] = True
        position = position + hop_N[position]
        position_B[walking] = position
        walking = walking[position < block_ends_B[walking]]
    position = 0  # the true path: where the previous block's integers leave off
    for block, (begin, end) in enumerate(zip(block_starts_B, block_ends_B)):
        own = []
        while position < end and not visited_N[position]:
            own.append(position)
            position += int(hop_N[position])
        if position < end:  # met the walker: drop its steps before the meeting point
            visited_N[begin:position] = False
            position = int(position_B[block])
        else:
            visited_N[begin:end] = False
        visited_N[own] = True
    return np.flatnonzero(visited_N).astype(np.int32 if size < 2 ** 31 else np.int64)
