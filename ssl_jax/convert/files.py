"""Reading and writing weight files without running code from them.

- ``.safetensors`` (read with the ``safetensors`` package, bfloat16 through ``ml_dtypes``): a
  flat ``{name: array}`` plus string metadata. Nothing in the format can execute.
- ``.pth`` / ``.pt`` / ``.bin`` (PyTorch pickles) are read only with
  ``torch.load(weights_only=True)`` where torch is installed (``pip install 'ssl_jax[torch]'``):
  PyTorch's restricted unpickler builds tensors and plain containers and nothing else. Before
  torch sees the file, its pickle is scanned (``pickletools``: the opcodes are listed, never
  run) for the globals it names. A pickle that names anything beyond tensors and containers
  is refused, naming the global; with ``allow_classes=True`` the few harmless classes that
  training checkpoints carry beside their weights (:data:`HARMLESS_CLASSES`, e.g. DINO's and
  MAE's ``argparse.Namespace`` of arguments) are let through, still under
  ``weights_only=True``. A global that could run code (``os.system``, ``builtins.eval``, any
  other function or class) is refused whatever the flag.

Every problem with a file (missing, truncated, not a weights file, a refused pickle) is a
:class:`WeightsError` naming the file and what to do: exit code 2 from the command lines.
"""

from __future__ import annotations

import io
import json
import os
import pickletools
import struct
import tempfile
import zipfile
from typing import Any

import numpy as np

SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".pkl")

# Globals that PyTorch's weights-only unpickler builds tensors and containers from (the rest of
# its own allowlist is dtypes and layouts, which it checks itself).
_TENSOR_GLOBALS = ("torch._utils.", "torch.", "collections.OrderedDict", "builtins.set",
                   "builtins.frozenset", "builtins.bytearray", "builtins.slice", "_codecs.encode")
# Harmless classes beside the weights of training checkpoints: accepted with allow_classes.
HARMLESS_CLASSES = ("argparse.Namespace",)
_CODE_GLOBAL_HINT = ("it names a function or class that unpickling would call, which could run "
                     "any code")


class WeightsError(ValueError):
    """A weights file that cannot be read as asked (missing, truncated, of another kind,
    refused)."""


# --- Reading ------------------------------------------------------------------------------------


def read_weights(path: str, allow_classes: bool = False) -> dict[str, Any]:
    """The tensors of ``path`` as numpy arrays: a flat ``{name: array}`` for safetensors, the
    pickled structure (nested dicts of arrays and plain values) for PyTorch files.

    Raises:
      WeightsError: the file is missing, unreadable, truncated, not a weights file, or a
        pickle naming globals that are refused (see the module docstring).
    """
    if not os.path.exists(path):
        raise WeightsError(f"weights file {path} not found: pass the path of a local .safetensors"
                           " or .pth file (nothing is downloaded)")
    if os.path.isdir(path):
        raise WeightsError(f"{path} is a directory, not a weights file (a run directory goes to "
                           "--config.init_from, not to --weights)")
    kind = file_kind(path)
    if kind == "safetensors":
        return read_safetensors(path)[0]
    if kind in ("torch_zip", "pickle"):
        return _read_pickle(path, allow_classes)
    raise WeightsError(
        f"{path} is not a weights file this reader knows (neither safetensors nor a PyTorch "
        "pickle: its first bytes are " + repr(_head(path, 8)) + "); pass a .safetensors or .pth "
        "file")


def _head(path: str, n: int) -> bytes:
    with open(path, "rb") as f:
        return f.read(n)


def file_kind(path: str) -> str:
    """'safetensors', 'torch_zip' (PyTorch >= 1.6), 'pickle' (older PyTorch) or 'unknown', from
    the first bytes (the suffix is not trusted)."""
    head = _head(path, 9)
    if head.startswith(b"PK\x03\x04"):
        return "torch_zip"
    if head[:1] == b"\x80" and len(head) > 1 and head[1] <= 5:
        return "pickle"
    if len(head) == 9 and head[8:9] == b"{":
        return "safetensors"
    return "unknown"


def read_safetensors(path: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """``({name: array}, metadata)`` of a safetensors file; bfloat16 tensors come back as
    ``ml_dtypes.bfloat16`` arrays."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="numpy") as f:
            metadata = dict(f.metadata() or {})
            names = list(f.keys())
            tensors = {}
            for name in names:
                try:
                    tensors[name] = f.get_tensor(name)
                except TypeError:  # a dtype numpy does not know (bfloat16)
                    tensors[name] = _raw_tensor(path, name)
    except (SafetensorError, OSError, ValueError) as e:
        raise WeightsError(f"{path} is not a readable safetensors file ({e}); is it truncated? "
                           "Copy or convert it again") from None
    return tensors, metadata


def _raw_tensor(path: str, name: str) -> np.ndarray:
    """One tensor read from the safetensors layout itself (8-byte little-endian header length,
    JSON header, data), for dtypes numpy lacks."""
    import ml_dtypes

    dtypes = {"BF16": ml_dtypes.bfloat16, "F8_E4M3": ml_dtypes.float8_e4m3fn,
              "F8_E5M2": ml_dtypes.float8_e5m2}
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        entry = json.loads(f.read(size))[name]
        if entry["dtype"] not in dtypes:
            raise WeightsError(f"{path}: tensor {name} has dtype {entry['dtype']}, which this "
                               "reader does not convert")
        start, end = entry["data_offsets"]
        f.seek(8 + size + start)
        data = f.read(end - start)
    return np.frombuffer(data, dtypes[entry["dtype"]]).reshape(entry["shape"]).copy()


def pickle_globals(path: str) -> list[str]:
    """The ``module.name`` globals a PyTorch file's pickle names, found by listing its opcodes
    (``pickletools.genops``; nothing is unpickled)."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                pickles = [n for n in archive.namelist() if n.endswith(".pkl")]
                if not pickles:
                    raise WeightsError(f"{path} is a zip archive without a pickle: not a PyTorch "
                                       "checkpoint")
                return sorted({g for n in pickles for g in _globals_of(archive.read(n))})
        with open(path, "rb") as f:
            return sorted(_globals_of(f.read()))
    except (zipfile.BadZipFile, EOFError, ValueError, struct.error) as e:
        if isinstance(e, WeightsError):
            raise
        raise WeightsError(f"{path} is not a readable PyTorch file ({type(e).__name__}: {e}); is"
                           " it truncated? Copy or save it again") from None


_STRING_OPS = ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE", "BINUNICODE8", "STRING",
               "BINSTRING", "SHORT_BINSTRING")


def _globals_of(data: bytes) -> set[str]:
    """The globals named by the pickle(s) in ``data``. ``GLOBAL`` carries its name; protocol 4's
    ``STACK_GLOBAL`` takes module and name from the stack, which is followed here only as far as
    strings pushed directly or fetched from the memo (anything else reads as unknown, and is
    refused)."""
    found: set[str] = set()
    stream = io.BytesIO(data)
    # A legacy torch file holds five pickles back to back (magic number, protocol, system info,
    # the object, the storage keys), then raw storage bytes; a zip member holds one.
    for _ in range(5):
        memo: dict[int, str | None] = {}
        below = top = None  # the two topmost stack items, when they are strings
        for opcode, arg, _ in pickletools.genops(stream):
            name = opcode.name
            if name in _STRING_OPS:
                below, top = top, str(arg)
            elif name in ("BINGET", "LONG_BINGET", "GET"):
                below, top = top, memo.get(int(arg))
            elif name == "MEMOIZE":
                memo[len(memo)] = top
            elif name in ("BINPUT", "LONG_BINPUT", "PUT"):
                memo[int(arg)] = top
            elif name == "GLOBAL":
                found.add(str(arg).replace(" ", "."))
                below, top = top, None
            elif name == "STACK_GLOBAL":
                found.add(f"{below}.{top}" if below and top else "<a computed global>")
                below = top = None
            elif name in ("INST", "OBJ"):
                found.add(str(arg).replace(" ", ".") if arg else "<a computed class>")
                below = top = None
            else:
                below = top = None
        if data[stream.tell():stream.tell() + 1] != b"\x80":
            break
    return found


def refused_globals(names: list[str], allow_classes: bool) -> list[str]:
    """The globals among ``names`` that are not tensors and containers (nor, with
    ``allow_classes``, :data:`HARMLESS_CLASSES`)."""
    ok = lambda n: n.startswith(_TENSOR_GLOBALS) or (allow_classes and n in HARMLESS_CLASSES)
    return [n for n in names if not ok(n)]


def _read_pickle(path: str, allow_classes: bool) -> dict[str, Any]:
    refused = refused_globals(pickle_globals(path), allow_classes)
    if refused:
        harmless = [n for n in refused if n in HARMLESS_CLASSES]
        if len(harmless) == len(refused):
            raise WeightsError(
                f"{path} holds {', '.join(harmless)} beside its tensors (a training checkpoint's "
                "arguments); pass --allow_pickle_classes to python -m ssl_jax.convert import to "
                "accept these harmless classes (the file is still read with torch.load("
                "weights_only=True); init_from then takes the imported run), or save the "
                "weights alone as safetensors")
        raise WeightsError(
            f"{path} is refused: its pickle names {', '.join(refused)}; {_CODE_GLOBAL_HINT}. "
            "Only tensors, containers and " + ", ".join(HARMLESS_CLASSES) + " are read; save the "
            "weights as safetensors from a trusted environment")
    try:
        import torch
    except ImportError:
        raise WeightsError(
            f"{path} is a PyTorch pickle and reading it needs torch (pip install "
            "'ssl_jax[torch]', only torch.load(weights_only=True) is used), or convert it to "
            "safetensors where torch is installed: python -c \"import torch, safetensors.torch "
            "as s; s.save_file(torch.load('IN.pth', weights_only=True), 'OUT.safetensors')\"") \
            from None
    import argparse

    safe = [argparse.Namespace] if allow_classes else []
    try:
        with torch.serialization.safe_globals(safe):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure of the restricted reader is the file's
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise WeightsError(f"{path} does not load with torch.load(weights_only=True) "
                           f"({type(e).__name__}: {first[:300]}); is it truncated?") from None
    return _to_numpy(obj)


def _to_numpy(obj: Any) -> Any:
    """Tensors -> numpy arrays (bfloat16 -> float32), containers walked, other values kept."""
    import torch

    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu()
        if t.dtype == torch.bfloat16:
            t = t.float()
        return t.numpy().copy()
    if isinstance(obj, dict):
        return {k: _to_numpy(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_to_numpy(v) for v in obj)
    return obj


# --- Writing ------------------------------------------------------------------------------------


def refuse_existing(paths: list[str], overwrite: bool) -> None:
    """A WeightsError if one of ``paths`` exists and ``overwrite`` is False."""
    if overwrite:
        return
    for path in paths:
        if os.path.exists(path):
            raise WeightsError(f"{path} exists: choose another --output, or pass --overwrite to "
                               "replace it")


def write_safetensors(path: str, tensors: dict[str, np.ndarray], metadata: dict[str, str]
                      ) -> None:
    """Writes ``tensors`` (contiguous, their own dtypes) with string ``metadata`` atomically: to
    a temporary file beside ``path``, then renamed over it."""
    from safetensors.numpy import save_file

    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".export-", suffix=".safetensors", dir=directory)
    os.close(fd)
    try:
        save_file({k: np.asarray(v, order="C") for k, v in tensors.items()}, tmp,
                  metadata=metadata)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path: str, value: Any) -> None:
    """``value`` as indented JSON at ``path``, written atomically."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(value, f, indent=2, sort_keys=True, default=str)
        f.write("\n")
    os.replace(tmp, path)
