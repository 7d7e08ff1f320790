"""Readers for dlib's portable binary serialization (dlib/serialize.h, dlib 20.0).

dlib writes an integer as a control byte (low nibble: how many little-endian bytes follow;
bit 0x80: negative) and then those bytes; a float as two such integers, mantissa and exponent
(value = mantissa * 2**exponent, exponents 32000/32001/32002 mean inf/-inf/nan); a string as its
length then its bytes; a bool as the character '0' or '1'; a std::vector as its length then the
items; a dlib::matrix as -rows, -cols (negated in the current format) then the items row-major.
Every reader takes a binary file object and consumes exactly one item.
"""

import numpy as np

_SPECIAL_EXPONENTS = {32000: np.inf, 32001: -np.inf, 32002: np.nan}


def _read_exactly(f, count):
    data = f.read(count)
    if len(data) != count:
        raise ValueError(f"dlib stream ended early: wanted {count} bytes, got {len(data)}")
    return data


def read_int(f) -> int:
    """One integer of any width (signed or unsigned: both share this layout)."""
    control = _read_exactly(f, 1)[0]
    size = control & 0x0F
    if size == 0 or size > 8 or control & 0x70:
        raise ValueError(f"not a dlib integer: control byte {control:#04x}")
    value = int.from_bytes(_read_exactly(f, size), "little")
    return -value if control & 0x80 else value


def read_float(f) -> float:
    """One float or double in dlib's portable encoding (mantissa, exponent)."""
    mantissa, exponent = read_int(f), read_int(f)
    if exponent in _SPECIAL_EXPONENTS:
        return float(_SPECIAL_EXPONENTS[exponent])
    return float(np.ldexp(float(mantissa), exponent))


def read_str(f) -> str:
    """A std::string: its length, then its bytes."""
    return _read_exactly(f, read_int(f)).decode("latin-1")


def read_bool(f) -> bool:
    """A bool, stored as the character '0' or '1'."""
    char = _read_exactly(f, 1)
    if char not in (b"0", b"1"):
        raise ValueError(f"not a dlib bool: {char!r}")
    return char == b"1"


def read_float_matrix(f) -> np.ndarray:
    """A dlib::matrix of floats or doubles as a float64 (rows, cols) array."""
    rows, cols = abs(read_int(f)), abs(read_int(f))
    return np.array([read_float(f) for _ in range(rows * cols)], np.float64).reshape(rows, cols)


def read_vector(f, read_item) -> list:
    """A std::vector: its length, then that many items read by ``read_item(f)``."""
    return [read_item(f) for _ in range(read_int(f))]
