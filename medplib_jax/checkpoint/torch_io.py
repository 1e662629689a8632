"""Safe reading of PyTorch-side weights, and a key ledger that reports what was (not) mapped.

No pickled code is ever run: safetensors files are parsed directly, and `.bin` / `.pth` / `.pt`
files go through `torch.load(weights_only=True)`, which refuses any pickle that needs code.
"""

import json
import os
import struct
from collections.abc import Iterable, Mapping

import ml_dtypes
import numpy as np

_SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}
_PICKLE_SUFFIXES = (".bin", ".pth", ".pt", ".ckpt")


class CheckpointError(ValueError):
  """A checkpoint that cannot be read or does not fit the model; the message names the file/key."""


def read_safetensors(path: str) -> dict[str, np.ndarray]:
  """Reads a .safetensors file into numpy arrays (bf16 kept as ml_dtypes.bfloat16)."""
  try:
    with open(path, "rb") as f:
      (header_len,) = struct.unpack("<Q", f.read(8))
      if header_len > 100 * 2**20:
        raise CheckpointError(f"{path}: safetensors header of {header_len} bytes is implausible")
      header = json.loads(f.read(header_len))
      data = f.read()
  except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError) as e:
    raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from e
  if not isinstance(header, dict):
    raise CheckpointError(f"{path}: safetensors header is not a JSON object")
  out = {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    dtype = _SAFETENSORS_DTYPES.get(info.get("dtype") if isinstance(info, dict) else None)
    if dtype is None:
      raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype "
                            f"{info.get('dtype') if isinstance(info, dict) else info!r}")
    try:
      start, end = (int(x) for x in info["data_offsets"])
      if end > len(data) or not 0 <= start <= end:
        raise CheckpointError(f"{path}: tensor {name!r} points outside the file (truncated?)")
      out[name] = np.frombuffer(data[start:end], dtype=dtype).reshape(info["shape"]).copy()
    except (KeyError, TypeError, ValueError) as e:
      if isinstance(e, CheckpointError):
        raise
      raise CheckpointError(f"{path}: tensor {name!r} has a malformed header entry "
                            f"(shape/offsets do not fit: {e})") from e
  return out


def read_torch_pickle(path: str) -> dict[str, np.ndarray]:
  """Reads a torch-pickled state dict with `weights_only=True` (no code runs).

  Accepts a plain state dict or the common wrappers {"model": sd} / {"state_dict": sd}.
  """
  try:
    import torch  # only needed for pickled checkpoints: pip install 'medplib-jax[convert]'
  except ImportError as e:
    raise CheckpointError(f"{path}: reading a PyTorch pickle needs torch "
                          "(pip install 'medplib-jax[convert]'), or convert it to safetensors") from e
  try:
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # pickle errors come in many types; none may execute code
    raise CheckpointError(
        f"{path}: refused to load: the file is not a plain tensor checkpoint "
        f"(weights-only unpickling failed: {type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]})") from e
  for wrapper in ("model", "state_dict", "module"):
    if isinstance(obj, Mapping) and wrapper in obj and isinstance(obj[wrapper], Mapping):
      obj = obj[wrapper]
  if not isinstance(obj, Mapping):
    raise CheckpointError(f"{path}: expected a state dict, found {type(obj).__name__}")
  out = {}
  for name, t in obj.items():
    if not hasattr(t, "detach"):
      continue  # non-tensor entries (e.g. an epoch counter)
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
      out[name] = t.float().numpy().astype(ml_dtypes.bfloat16)
    else:
      out[name] = t.numpy().copy()
  return out


def read_weights_file(path: str) -> dict[str, np.ndarray]:
  if path.endswith(".safetensors"):
    return read_safetensors(path)
  if path.endswith(_PICKLE_SUFFIXES):
    return read_torch_pickle(path)
  raise CheckpointError(f"{path}: unknown weights format (expected .safetensors, .bin, .pth or .pt)")


def read_state_dict(path: str) -> dict[str, np.ndarray]:
  """Reads a weights file, or a Hugging Face model directory (single or sharded with an index)."""
  if not os.path.exists(path):
    raise CheckpointError(f"{path}: no such file or directory")
  if os.path.isfile(path):
    return read_weights_file(path)
  for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
    index_path = os.path.join(path, index_name)
    if os.path.exists(index_path):
      with open(index_path) as f:
        shards = sorted(set(json.load(f)["weight_map"].values()))
      out = {}
      for shard in shards:
        out.update(read_weights_file(os.path.join(path, shard)))
      return out
  for single in ("model.safetensors", "pytorch_model.bin"):
    if os.path.exists(os.path.join(path, single)):
      return read_weights_file(os.path.join(path, single))
  raise CheckpointError(f"{path}: no model.safetensors, pytorch_model.bin or shard index found")


class KeyLedger:
  """Hands out source tensors by key and remembers which ones were used.

  `take` checks shapes and names the key on any mismatch; `report()` lists what was left over,
  so every source key is either mapped or reported.
  """

  def __init__(self, state_dict: Mapping[str, np.ndarray], source: str = "checkpoint"):
    self.state_dict = dict(state_dict)
    self.source = source
    self.used: set[str] = set()
    self.missing: list[str] = []

  def __contains__(self, key: str) -> bool:
    return key in self.state_dict

  def take(self, key: str, shape: Iterable[int] | None = None, dtype=np.float32) -> np.ndarray:
    if key not in self.state_dict:
      self.missing.append(key)
      raise CheckpointError(f"{self.source}: missing key {key!r}")
    value = self.state_dict[key]
    if shape is not None and tuple(value.shape) != tuple(shape):
      raise CheckpointError(
          f"{self.source}: key {key!r} has shape {tuple(value.shape)}, expected {tuple(shape)}")
    self.used.add(key)
    return np.asarray(value, dtype=dtype) if dtype is not None else value

  def unused(self, prefix: str = "") -> list[str]:
    return sorted(k for k in self.state_dict if k.startswith(prefix) and k not in self.used)

  def report(self, prefix: str = "") -> dict:
    return {"source": self.source, "mapped": len([k for k in self.used if k.startswith(prefix)]),
            "unmapped": self.unused(prefix), "missing": list(self.missing)}
