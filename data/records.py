"""Versioned msgpack codec for one data record (an example: named arrays plus a few scalars).

Layout of a record: a msgpack map {"v": FORMAT_VERSION, <name>: value, ...} where each value is either a scalar
(int, float, str, bool) or an array stored as {"dtype": str, "shape": [int, ...], "data": raw little-endian bytes}.
Decoding never executes code (no pickle, no msgpack extension types) and turns every kind of malformed input into
`RecordError`, so a corrupt or foreign file can only ever produce a one-line error.
"""

import math

import ml_dtypes
import msgpack
import numpy as np

from training.errors import UserError

FORMAT_VERSION = 1

# Numeric dtypes only, all little-endian: object/void/string dtypes could smuggle in structure we do not want.
ALLOWED_DTYPES = {n: np.dtype(n).newbyteorder("<") for n in (
    "bool", "uint8", "int8", "uint16", "int16", "uint32", "int32", "uint64", "int64", "float16", "float32", "float64")}
ALLOWED_DTYPES["bfloat16"] = np.dtype(ml_dtypes.bfloat16)

# Limits of a record, enforced by both encode_record (so a bad caption fails at preparation, not mid-training) and
# decode_record (through msgpack's limits, so that a hostile header cannot make it allocate huge containers).
_MAX_NDIM = 8
_MAX_BYTES = 1 << 30          # one record larger than 1 GiB is certainly garbage
_MAX_STR_BYTES = 1 << 16      # UTF-8 bytes of one string (a caption or a field name)
_MAX_FIELDS = 255             # named fields per record (the version field 'v' makes 256 map entries)
_INT_RANGE = (-(1 << 63), (1 << 64) - 1)   # what msgpack can store: int64 and uint64
_ARRAY_KEYS = {"dtype", "shape", "data"}
_UNPACK_LIMITS = dict(max_str_len=_MAX_STR_BYTES, max_bin_len=_MAX_BYTES, max_array_len=_MAX_NDIM,
                      max_map_len=_MAX_FIELDS + 1, max_ext_len=0)


class RecordError(UserError):
    """A record could not be decoded (corrupt, foreign or written by a newer version of this project), or a value
    does not fit a record (encode_record)."""


def check_str(s: str, what: str) -> None:
    """A string a record can hold; also called on captions as their files are read, so that a bad one is named
    by its line before any work, not met by the text encoder or the writer hours into a preparation."""
    try:
        n = len(s.encode("utf-8"))
    except UnicodeEncodeError:
        raise RecordError(f"{what} is not valid text (it holds a lone surrogate): fix it") from None
    if n > _MAX_STR_BYTES:
        raise RecordError(f"{what} is {n} bytes of UTF-8 ({s[:40]!r}...); a record holds strings of at most "
                          f"{_MAX_STR_BYTES} bytes: shorten it")


def encode_record(arrays: dict[str, np.ndarray], **scalars) -> bytes:
    """Serialise named arrays plus scalar fields (int, float, str, bool) into one record. Anything decode_record
    would reject (too many fields, too many dims, too long a string, an int msgpack cannot hold) is a RecordError."""
    if "v" in arrays or "v" in scalars or set(arrays) & set(scalars):
        raise RecordError("record field names must be unique and must not be 'v'")
    if len(arrays) + len(scalars) > _MAX_FIELDS:
        raise RecordError(f"a record holds at most {_MAX_FIELDS} fields, got {len(arrays) + len(scalars)}")
    for name in [*arrays, *scalars]:
        if not isinstance(name, str):
            raise RecordError(f"record field names must be strings, got {name!r}")
        check_str(name, "a record field name")
    rec = {"v": FORMAT_VERSION}
    for name, a in arrays.items():
        a = np.asarray(a)
        if a.dtype.name not in ALLOWED_DTYPES:
            raise RecordError(f"array {name!r} has dtype {a.dtype}; records hold only {sorted(ALLOWED_DTYPES)}")
        if a.ndim > _MAX_NDIM or a.nbytes > _MAX_BYTES or any(d > _MAX_BYTES for d in a.shape):
            raise RecordError(f"array {name!r} of shape {a.shape} ({a.nbytes} bytes) does not fit a record "
                              f"(at most {_MAX_NDIM} dims and {_MAX_BYTES} bytes)")
        a = a.astype(ALLOWED_DTYPES[a.dtype.name], copy=False)   # little-endian; tobytes() writes C order
        rec[name] = {"dtype": a.dtype.name, "shape": list(a.shape), "data": a.tobytes()}
    for name, s in scalars.items():
        if isinstance(s, (np.bool_, np.integer, np.floating)):
            s = s.item()      # numpy scalars -> the Python scalar msgpack knows
        if not isinstance(s, (bool, int, float, str)):
            raise RecordError(f"scalar {name!r} must be an int, float, str or bool, got {type(s).__name__}")
        if isinstance(s, int) and not _INT_RANGE[0] <= s <= _INT_RANGE[1]:
            raise RecordError(f"scalar {name!r} = {s} does not fit a record's 64-bit integer")
        if isinstance(s, str):
            check_str(s, f"scalar {name!r}")
        rec[name] = s
    return msgpack.packb(rec, use_bin_type=True)


def _decode_array(name: str, spec: dict) -> np.ndarray:
    if set(spec) != _ARRAY_KEYS:
        raise RecordError(f"array field {name!r} must have exactly the keys {sorted(_ARRAY_KEYS)}, got {list(spec)!r}")
    dtype, shape, data = spec["dtype"], spec["shape"], spec["data"]
    if not isinstance(dtype, str) or dtype not in ALLOWED_DTYPES:
        raise RecordError(f"array field {name!r} has unsupported dtype {dtype!r}")
    if (not isinstance(shape, list) or len(shape) > _MAX_NDIM
            or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= _MAX_BYTES for d in shape)):
        raise RecordError(f"array field {name!r} has an invalid shape {shape!r}")
    if not isinstance(data, bytes):
        raise RecordError(f"array field {name!r} has no raw byte data")
    expected = math.prod(shape) * ALLOWED_DTYPES[dtype].itemsize   # exact Python ints: no overflow on absurd shapes
    if expected != len(data):
        raise RecordError(f"array field {name!r}: {len(data)} bytes of data for shape {shape} {dtype} "
                          f"(expected {expected})")
    return np.frombuffer(data, dtype=ALLOWED_DTYPES[dtype]).reshape(shape)


def decode_record(b: bytes) -> dict:
    """Parse one record into {name: np.ndarray (read-only) or scalar}; raises only RecordError on bad input."""
    if not isinstance(b, (bytes, bytearray, memoryview)):
        raise RecordError(f"a record must be bytes, got {type(b).__name__}")
    try:
        rec = msgpack.unpackb(b, raw=False, strict_map_key=True, use_list=True, **_UNPACK_LIMITS)
    except Exception as e:  # msgpack raises several types (ExtraData, FormatError, ValueError, ...): all mean garbage
        raise RecordError(f"not a data record (msgpack: {type(e).__name__})") from None
    if not isinstance(rec, dict) or "v" not in rec:
        raise RecordError("not a data record (no version field 'v')")
    v = rec.pop("v")
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise RecordError(f"not a data record (invalid version {v!r})")
    if v > FORMAT_VERSION:
        raise RecordError(f"record format version {v} is newer than this project supports ({FORMAT_VERSION}): "
                          "upgrade the project, or re-prepare the data set with this version")
    out = {}
    for name, value in rec.items():
        if not isinstance(name, str):
            raise RecordError("record field names must be strings")
        if isinstance(value, dict):
            out[name] = _decode_array(name, value)
        elif isinstance(value, (bool, int, float, str)):
            out[name] = value
        else:
            raise RecordError(f"record field {name!r} has unsupported type {type(value).__name__}")
    return out
