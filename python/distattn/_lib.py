"""_lib: finds and loads libdistattn.so with ctypes and declares the C API of include/distattn.h.

The ctypes structures below mirror the C structs field for field; tests/test_python_abi.py checks
their sizes and offsets against the compiler's (tests/python_abi.c). Nothing here allocates
tensors or talks to MPI: see _arrays.py and the public modules.
"""
import ctypes
import ctypes.util
import glob
import os
import shutil
import subprocess
import sys
from ctypes import (POINTER, Structure, c_char_p, c_double, c_float, c_int, c_int64, c_size_t,
                    c_uint, c_uint64, c_void_p)

# ---- constants (include/distattn.h) --------------------------------------------------------
DA_API_VERSION = 3
# Short names of the status codes (da_status_t order), DistattnError.name.
STATUS_NAMES = ["success", "invalid_argument", "unsupported", "out_of_memory", "system", "mpi",
                "cuda", "nccl", "timeout", "mismatch", "io", "remote", "internal"]
DA_FLOAT32, DA_BFLOAT16, DA_FLOAT16 = 0, 1, 2
DA_DEVICE_CPU, DA_DEVICE_CUDA = 0, 1
DA_MASK_NONE, DA_MASK_CAUSAL, DA_MASK_WINDOW, DA_MASK_DOC = 0, 1, 2, 4
ALGOS = {"ring": 0, "contiguous": 0, "striped": 1, "zigzag": 2}  # token layouts (plans and KV caches)
PLAN_ALGOS = dict(ALGOS, ulysses=3)  # plans only: DA_ALGO_ULYSSES has no KV cache layout of its own
DECODE_ALGOS = {"tree": 0, "ring": 1}
TOPOS = {"flat": 0, "two-level": 1, "two_level": 1}
PLAN_MODES = {"run": 0, "compute-only": 1, "comm-only": 2}


# ---- structs ---------------------------------------------------------------------------------
class Tensor(Structure):
    _fields_ = [("data", c_void_p), ("dtype", c_int), ("device", c_int), ("device_id", c_int),
                ("ndim", c_int), ("shape", c_int64 * 4), ("strides", c_int64 * 4)]


class Problem(Structure):
    _fields_ = [("size", c_size_t), ("version", c_uint), ("batch", c_int64), ("seq", c_int64),
                ("heads", c_int64), ("kv_heads", c_int64), ("dim", c_int64), ("mask", c_uint),
                ("window", c_int64), ("ndocs", c_int64), ("cu_seqlens", POINTER(c_int64)),
                ("dtype", c_int), ("scale", c_float), ("block_q", c_int), ("block_k", c_int)]


class Config(Structure):
    _fields_ = [("size", c_size_t), ("version", c_uint), ("device", c_int), ("nthreads", c_int)]


class CommConfig(Structure):
    _fields_ = [("size", c_size_t), ("version", c_uint), ("timeout", c_double)]


class PlanConfig(Structure):
    _fields_ = [("size", c_size_t), ("version", c_uint), ("algo", c_int), ("block", c_int64),
                ("transport", c_char_p), ("timeout", c_double), ("mem_budget", c_int64),
                ("mem_count", c_uint)]


class PlanStats(Structure):
    _fields_ = [("size", c_size_t), ("version", c_uint), ("rank", c_int), ("nranks", c_int),
                ("nsteps", c_int), ("local_rows", c_int64), ("pairs_total", c_int64),
                ("pairs_rank", c_int64), ("fwd_s", c_double), ("bwd_s", c_double),
                ("fwd_compute_s", c_double), ("bwd_compute_s", c_double),
                ("fwd_exposed_s", c_double), ("bwd_exposed_s", c_double),
                ("fwd_bytes_sent", c_uint64), ("bwd_bytes_sent", c_uint64),
                ("mem_fwd_bytes", c_size_t), ("mem_bwd_bytes", c_size_t), ("peak_bytes", c_size_t),
                ("fwd_step_compute_s", POINTER(c_double)), ("fwd_step_wait_s", POINTER(c_double)),
                ("bwd_step_compute_s", POINTER(c_double)), ("bwd_step_wait_s", POINTER(c_double)),
                ("fwd_step_bytes", POINTER(c_uint64)), ("bwd_step_bytes", POINTER(c_uint64)),
                ("plan_fwd_bytes", c_uint64), ("plan_bwd_bytes", c_uint64),
                ("work_imbalance", c_double), ("block", c_int64)]


class KVCacheConfig(Structure):
    _fields_ = [("size", c_size_t), ("version", c_uint), ("page", c_int64), ("layout", c_int),
                ("weights", POINTER(c_double)), ("timeout", c_double), ("transport", c_char_p)]


class KVCachePage(Structure):
    _fields_ = [("k", c_void_p), ("v", c_void_p), ("ldk", c_int64), ("ldv", c_int64),
                ("start", c_int64), ("stride", c_int64), ("count", c_int64)]


class DecodeConfig(Structure):
    _fields_ = [("size", c_size_t), ("version", c_uint), ("algo", c_int), ("topo", c_int),
                ("root", c_int), ("node_size", c_int), ("transport", c_char_p),
                ("timeout", c_double)]


class DecodeStats(Structure):
    _fields_ = [("size", c_size_t), ("version", c_uint), ("rank", c_int), ("nranks", c_int),
                ("levels", c_int), ("nodes", c_int), ("step_s", c_double), ("compute_s", c_double),
                ("reduce_s", c_double), ("bytes_sent", c_uint64), ("kv_bytes", c_uint64),
                ("partial_bytes", c_size_t), ("peak_bytes", c_size_t)]


STRUCTS = {"da_tensor_t": Tensor, "da_problem_t": Problem, "da_config_t": Config,
           "da_comm_config_t": CommConfig, "da_plan_config_t": PlanConfig, "da_plan_stats_t": PlanStats,
           "da_kvcache_config_t": KVCacheConfig, "da_kvcache_page_t": KVCachePage,
           "da_decode_config_t": DecodeConfig, "da_decode_stats_t": DecodeStats}


# Structs are passed in zeroed buffers this much larger than the fields mirrored here: a field a
# newer library appends (the header adds fields only at the end, DA_API_VERSION) then reads as 0,
# its default, and an output struct has room for it.
_PAD = 256


def init_struct(cls, output=False, **fields):
    """A struct with size/version set, like the C *_INITIALIZER macros, then the given fields.
    Input structs declare the size of the fields known here; output structs (stats) the whole
    buffer, since the library requires room for all of its own fields."""
    buf = (ctypes.c_char * (ctypes.sizeof(cls) + _PAD))()
    s = cls.from_buffer(buf)  # keeps buf alive
    if "size" in dict(cls._fields_):
        s.size = len(buf) if output else ctypes.sizeof(cls)
        s.version = DA_API_VERSION
    for k, v in fields.items():
        setattr(s, k, v)
    return s


# ---- finding the library ---------------------------------------------------------------------
_NAMES = ("libdistattn.so", "libdistattn.so.0", "libdistattn.dylib")


def _candidates():
    """Where libdistattn is looked for, in order (docs/library.md):
    1. $DISTATTN_LIBRARY (a file; nothing else is tried when it is set),
    2. next to this package (a library copied or installed beside it),
    3. the install prefix: `pkg-config --variable=libdir distattn` (PKG_CONFIG_PATH points at
       <prefix>/lib/pkgconfig after `make install PREFIX=<prefix>`), then sys.prefix/lib and
       /usr/local/lib,
    4. a build folder of the source tree this package was imported from (build*/lib),
    5. the system loader (LD_LIBRARY_PATH, ldconfig)."""
    here = os.path.dirname(os.path.abspath(__file__))
    for n in _NAMES:
        yield os.path.join(here, n)
    if shutil.which("pkg-config"):
        try:
            libdir = subprocess.run(["pkg-config", "--variable=libdir", "distattn"], check=True,
                                    capture_output=True, text=True, timeout=10).stdout.strip()
            if libdir:
                for n in _NAMES:
                    yield os.path.join(libdir, n)
        except (subprocess.SubprocessError, OSError):
            pass
    for prefix in (sys.prefix, "/usr/local"):
        for n in _NAMES:
            yield os.path.join(prefix, "lib", n)
    repo = os.path.dirname(os.path.dirname(here))
    if os.path.exists(os.path.join(repo, "include", "distattn.h")):
        found = glob.glob(os.path.join(repo, "build*", "lib", "libdistattn.so"))
        for f in sorted(found, key=os.path.getmtime, reverse=True):
            yield f
    found = ctypes.util.find_library("distattn")
    if found:
        yield found
    yield "libdistattn.so.0"


def _load():
    # RTLD_GLOBAL: libdistattn pulls in libmpi; Open MPI's plugins resolve symbols of libmpi
    # globally (mpi4py loads libmpi the same way).
    mode = getattr(os, "RTLD_GLOBAL", 0) | getattr(os, "RTLD_NOW", 0)
    env = os.environ.get("DISTATTN_LIBRARY")
    if env:
        try:
            return ctypes.CDLL(env, mode=mode), env
        except OSError as e:
            raise ImportError(f"distattn: DISTATTN_LIBRARY={env} could not be loaded: {e}") from e
    tried = []
    for path in _candidates():
        if os.path.isabs(path) and not os.path.exists(path):
            continue
        try:
            return ctypes.CDLL(path, mode=mode), path
        except OSError as e:
            tried.append(f"{path}: {e}")
    raise ImportError("distattn: libdistattn.so not found; build it (make build) and set "
                      "DISTATTN_LIBRARY=<build>/lib/libdistattn.so, or install it (make install "
                      "PREFIX=...) and add <prefix>/lib/pkgconfig to PKG_CONFIG_PATH.\n  tried: " +
                      "\n  tried: ".join(tried))


lib, path = _load()

# ---- prototypes ------------------------------------------------------------------------------
_T = POINTER(Tensor)
_P = POINTER(Problem)


def _proto(name, restype, *argtypes):
    f = getattr(lib, name, None)
    if f is None:
        return None
    f.restype = restype
    f.argtypes = list(argtypes)
    return f


_proto("da_status_string", c_char_p, c_int)
_proto("da_version_string", c_char_p)
_proto("da_last_error", c_char_p, c_void_p)
_proto("da_tensor_make", c_int, _T, c_void_p, c_int, c_int, POINTER(c_int64))
_proto("da_context_create", c_int, POINTER(Config), POINTER(c_void_p))
_proto("da_context_free", None, c_void_p)
_proto("da_attention_fwd", c_int, c_void_p, _P, _T, _T, _T, _T, _T, c_void_p)
_proto("da_attention_bwd", c_int, c_void_p, _P, _T, _T, _T, _T, _T, _T, _T, _T, _T, c_void_p)
_proto("da_attention_decode", c_int, c_void_p, _P, _T, _T, _T, _T, _T, c_void_p)

# The distributed part exists when the library was built with MPI. da_comm_create's MPI_Comm
# argument is typed when the first communicator is made (its size depends on the MPI).
HAVE_MPI = hasattr(lib, "da_comm_create")
if HAVE_MPI:
    _proto("da_comm_free", None, c_void_p)
    _proto("da_comm_rank", c_int, c_void_p)
    _proto("da_comm_size", c_int, c_void_p)
    _proto("da_plan_create", c_int, c_void_p, _P, POINTER(PlanConfig), POINTER(c_void_p))
    _proto("da_plan_free", None, c_void_p)
    _proto("da_plan_local_rows", c_int64, c_void_p)
    _proto("da_plan_local_positions", c_int, c_void_p, POINTER(c_int64), c_int64)
    _proto("da_plan_fwd", c_int, c_void_p, _T, _T, _T, _T, _T, c_void_p)
    _proto("da_plan_bwd", c_int, c_void_p, _T, _T, _T, _T, _T, _T, _T, _T, _T, c_void_p)
    _proto("da_plan_set_mode", c_int, c_void_p, c_int)
    _proto("da_plan_stats", c_int, c_void_p, POINTER(PlanStats))
    _proto("da_kvcache_create", c_int, c_void_p, _P, POINTER(KVCacheConfig), POINTER(c_void_p))
    _proto("da_kvcache_free", None, c_void_p)
    _proto("da_kvcache_prefill", c_int, c_void_p, c_int64, c_int64, _T, _T)
    _proto("da_kvcache_append", c_int, c_void_p, POINTER(c_int64), _T, _T)
    _proto("da_kvcache_length", c_int64, c_void_p, c_int64)
    _proto("da_kvcache_local_rows", c_int64, c_void_p, c_int64)
    _proto("da_kvcache_local_positions", c_int, c_void_p, c_int64, POINTER(c_int64), c_int64)
    _proto("da_kvcache_num_pages", c_int64, c_void_p, c_int64)
    _proto("da_kvcache_get_page", c_int, c_void_p, c_int64, c_int64, POINTER(KVCachePage))
    _proto("da_kvcache_bytes", c_size_t, c_void_p, POINTER(c_size_t))
    _proto("da_decode_plan_create", c_int, c_void_p, _P, POINTER(DecodeConfig), POINTER(c_void_p))
    _proto("da_decode_plan_free", None, c_void_p)
    _proto("da_decode_step", c_int, c_void_p, c_void_p, _T, _T, _T, c_void_p)
    _proto("da_decode_plan_stats", c_int, c_void_p, POINTER(DecodeStats))


def version():
    return lib.da_version_string().decode()


class DistattnError(RuntimeError):
    """A call into libdistattn failed. .status is the da_status_t code, .name its short name
    ("invalid_argument", "mismatch", "remote", "timeout", ...: DA_ERR_<NAME> in lower case),
    .status_name the library's string (da_status_string), .call the C function; the message is
    the library's detailed one (da_last_error). A collective call that fails on one rank fails on
    every rank: the failing rank gets its own status, the others "remote" naming it."""

    def __init__(self, status, message, call=""):
        self.status = int(status)
        self.name = STATUS_NAMES[self.status] if 0 <= self.status < len(STATUS_NAMES) else str(status)
        self.status_name = lib.da_status_string(self.status).decode()
        self.call = call
        super().__init__(f"{call + ': ' if call else ''}{self.status_name}: {message}")


def check(status, ctx=None, call=""):
    """Raise DistattnError for a non-zero status, with the context's (or the thread's) message."""
    if status == 0:
        return
    msg = lib.da_last_error(ctx)
    if not msg and ctx is not None:
        msg = lib.da_last_error(None)
    raise DistattnError(status, (msg or b"").decode(errors="replace"), call)
