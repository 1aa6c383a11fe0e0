"""Read a Hugging Face safetensors checkpoint tensor by tensor, by the names on disk.

A server reads only what it holds: `CheckpointReader` opens each file lazily with
`safetensors.safe_open` and counts the tensors and bytes it has read, so tests can prove that a
stage never touches expert weights and an expert server only its experts. Pickle formats
(`*.bin`, `*.pt`) are refused.
"""

import json
import pathlib

import torch
from safetensors import safe_open


class CheckpointReader:
    def __init__(self, model_dir: str | pathlib.Path, device: str = "cpu"):
        self.model_dir = pathlib.Path(model_dir)
        self.device = device
        self.tensors_read: list[str] = []
        self.bytes_read = 0
        self.slices_read: list[tuple[str, int, int, int]] = []  # (key, dim, start, end) of get_slice
        self._key_to_file = self._index()
        self._handles = {}

    def _index(self) -> dict[str, pathlib.Path]:
        index_path = self.model_dir / "model.safetensors.index.json"
        if index_path.is_file():
            weight_map = json.loads(index_path.read_text())["weight_map"]
            pickled = sorted({name for name in weight_map.values() if not name.endswith(".safetensors")})
            if pickled:
                raise ValueError(f"{index_path} names {pickled[:3]}: only *.safetensors are read "
                                 "(pickle formats are refused)")
            return {key: self.model_dir / name for key, name in weight_map.items()}
        files = sorted(self.model_dir.glob("*.safetensors"))
        if not files:
            pickled = [p.name for p in self.model_dir.glob("*") if p.suffix in {".bin", ".pt", ".pth", ".ckpt"}]
            hint = f" (found {pickled}: pickle formats are refused)" if pickled else ""
            raise FileNotFoundError(f"no *.safetensors in {self.model_dir}{hint}")
        key_to_file = {}
        for path in files:
            with safe_open(path, framework="pt") as handle:
                for key in handle.keys():
                    key_to_file[key] = path
        return key_to_file

    def __contains__(self, key: str) -> bool:
        return key in self._key_to_file

    def keys(self) -> list[str]:
        return list(self._key_to_file)

    def _handle(self, path: pathlib.Path):
        if path not in self._handles:
            # Straight to this reader's device: safetensors places each tensor there as it reads it.
            self._handles[path] = safe_open(path, framework="pt", device=str(self.device))
        return self._handles[path]

    def get(self, key: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The whole tensor `key`, read onto this reader's device and cast there to `dtype`."""
        if key not in self._key_to_file:
            raise KeyError(f"{key} is not in the checkpoint at {self.model_dir}")
        tensor = self._handle(self._key_to_file[key]).get_tensor(key)
        self.tensors_read.append(key)
        self.bytes_read += tensor.numel() * tensor.element_size()
        if dtype is not None:
            tensor = tensor.to(dtype)
        return tensor

    def get_slice_shape(self, key: str) -> list[int]:
        """The shape of tensor `key` on disk (reads only the header)."""
        if key not in self._key_to_file:
            raise KeyError(f"{key} is not in the checkpoint at {self.model_dir}")
        return list(self._handle(self._key_to_file[key]).get_slice(key).get_shape())

    def get_slice(self, key: str, dim: int, start: int, end: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Rows (dim 0) or columns (dim 1) [start, end) of the 2-D tensor `key`, reading only that part
        from disk (`safe_open(...).get_slice`); counts only the slice's bytes. Cast to `dtype` if given."""
        if key not in self._key_to_file:
            raise KeyError(f"{key} is not in the checkpoint at {self.model_dir}")
        part = self._handle(self._key_to_file[key]).get_slice(key)
        shape = part.get_shape()
        if len(shape) != 2 or dim not in (0, 1) or not 0 <= start < end <= shape[dim]:
            raise ValueError(f"{key} {shape}: cannot take [{start}, {end}) of dim {dim}")
        tensor = part[start:end] if dim == 0 else part[:, start:end]
        self.tensors_read.append(key)
        self.slices_read.append((key, dim, start, end))
        self.bytes_read += tensor.numel() * tensor.element_size()
        if dtype is not None:
            tensor = tensor.to(dtype)
        return tensor

    def close(self) -> None:
        self._handles.clear()
