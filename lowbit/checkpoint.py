"""Weights on disk, a tensor at a time: read a model folder's safetensors shards lazily, and
write sharded safetensors (the Hugging Face layout) as tensors arrive, resumably.

    ckpt = Checkpoint("model_dir")              # checks the index, the shards and their sizes
    w = ckpt.get("model.layers.0.mlp.up_proj.weight")  # in its stored dtype

    out = ShardWriter("out_dir", max_shard_size=5e9)
    out.add(name, tensor)                       # its bytes go to the open shard's spool file
    state = out.commit()                        # durable: ShardWriter.resume(folder, state)
    out.close()                                 # model-00001-of-0000N.safetensors + index

A safetensors file starts with a header listing every tensor it holds, so a shard cannot be
written before its last tensor is known: tensors go to a spool file, and a full shard is written
from it (header, then the tensors in safetensors' own order). Memory stays one tensor.
"""
from __future__ import annotations

import json
import os

import torch

from lowbit.errors import LowbitError

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
MAX_HEADER = 100 << 20


def read_header(path: str) -> dict[str, dict]:
    """{tensor name: {"dtype", "shape", "data_offsets", "start"}} of a safetensors file, checked
    against its size (a truncated file is refused here, not halfway through a run)."""
    name = os.path.basename(path)
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if not 0 < n <= min(MAX_HEADER, size - 8):
                raise LowbitError(f"{name} is not a safetensors file (or is truncated): {size} bytes")
            header = json.loads(f.read(n))
    except OSError as e:
        raise LowbitError(f"cannot read {path}: {e.strerror}") from None
    except ValueError:
        raise LowbitError(f"{name} has a corrupt safetensors header") from None
    header.pop("__metadata__", None)
    end = max((v["data_offsets"][1] for v in header.values()), default=0)
    if 8 + n + end > size:
        raise LowbitError(f"{name} is truncated: {size} bytes, its header describes {8 + n + end}")
    for v in header.values():
        v["start"] = 8 + n + v["data_offsets"][0]  # where its bytes start in the file
    return header


class Checkpoint:
    """The tensors of a model folder's model.safetensors, or of the shards its
    model.safetensors.index.json names (another stem: {stem}.safetensors ...); read on demand in
    their stored dtype."""

    def __init__(self, folder: str, stem: str = "model"):
        self.folder = folder
        index_name = f"{stem}.safetensors.index.json"
        index = os.path.join(folder, index_name)
        weight_map = None
        if os.path.isfile(index):
            try:
                with open(index) as f:
                    weight_map = json.load(f)["weight_map"]
            except (OSError, ValueError, KeyError):
                raise LowbitError(f"corrupt {index_name} in {folder}") from None
            files = sorted(set(weight_map.values()))
            missing = [f for f in files if not os.path.isfile(os.path.join(folder, f))]
            if missing:
                raise LowbitError(f"{folder} lacks shard {missing[0]} that {index_name} names"
                                  + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
        elif os.path.isfile(os.path.join(folder, f"{stem}.safetensors")):
            files = [f"{stem}.safetensors"]
        else:
            raise LowbitError(f"{folder} has no safetensors weights ({stem}.safetensors or {index_name})")
        self.file: dict[str, str] = {}
        self.info: dict[str, dict] = {}
        for f in files:
            for name, v in read_header(os.path.join(folder, f)).items():
                if v["dtype"] not in DTYPES:
                    raise LowbitError(f"{f}: tensor {name} has dtype {v['dtype']}, which lowbit does not read")
                self.file[name], self.info[name] = f, v
        if weight_map is not None:
            for name, f in weight_map.items():
                if self.file.get(name) != f:
                    raise LowbitError(f"shard {f} does not hold tensor {name}, which {index_name} places there")
            extra = sorted(set(self.file) - set(weight_map))
            if extra:
                raise LowbitError(f"shard {self.file[extra[0]]} holds tensor {extra[0]}, which {index_name} does not list")

    def __contains__(self, name: str) -> bool:
        return name in self.file

    @property
    def names(self) -> list[str]:
        return list(self.file)

    def dtype(self, name: str) -> torch.dtype:
        return DTYPES[self.info[name]["dtype"]]

    def float_dtype(self) -> torch.dtype:
        """The dtype most of the floating-point weights are stored in (by count of values)."""
        counts: dict[torch.dtype, int] = {}
        for name, v in self.info.items():
            dt = DTYPES[v["dtype"]]
            if dt.is_floating_point:
                counts[dt] = counts.get(dt, 0) + int(torch.Size(v["shape"]).numel())
        return max(counts, key=counts.get) if counts else torch.float32

    def get(self, name: str) -> torch.Tensor:
        """The tensor, read into memory of its own. Plain reads, not a memory map: a map of the
        shards would keep every page read so far in this process's resident memory."""
        f = self.file.get(name)
        if f is None:
            raise LowbitError(f"{self.folder} holds no tensor {name}")
        v = self.info[name]
        dtype, n = DTYPES[v["dtype"]], v["data_offsets"][1] - v["data_offsets"][0]
        buf = bytearray(n)
        with open(os.path.join(self.folder, f), "rb") as fh:
            fh.seek(v["start"])
            if fh.readinto(buf) != n:
                raise LowbitError(f"{f} is truncated (reading {name})")
        if not n:
            return torch.empty(v["shape"], dtype=dtype)
        return torch.frombuffer(buf, dtype=dtype).reshape(v["shape"])


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _fsync(f) -> None:
    f.flush()
    os.fsync(f.fileno())


def write_json_atomic(path: str, obj) -> None:
    """Write, fsync and rename: a reader sees the old file or the new one, never half of one."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        _fsync(f)
    os.replace(tmp, path)


class ShardWriter:
    """Safetensors shards of at most max_shard_size bytes (a bigger tensor gets a shard of its
    own), filled in the order tensors are added. `close` names them {stem}.safetensors (one) or
    {stem}-0000i-of-0000n.safetensors plus {stem}.safetensors.index.json (several)."""

    def __init__(self, folder: str, stem: str = "model", max_shard_size: int = 5_000_000_000,
                 metadata: dict | None = None):
        self.folder, self.stem, self.max_shard_size = folder, stem, int(max_shard_size)
        self.metadata = metadata if metadata is not None else {"format": "pt"}
        self.shards: list[list[str]] = []  # the tensor names of each finished shard
        self.open: list[dict] = []  # the open shard's tensors: name, dtype, shape, start, end
        self.total = 0  # bytes of all tensors added
        self._spool = None

    def _path(self, kind: str, k: int) -> str:
        return os.path.join(self.folder, f"{self.stem}.{kind}{k + 1:05d}")

    def add(self, name: str, t: torch.Tensor) -> None:
        t = t.detach().contiguous().cpu()
        n = _nbytes(t)
        used = self.open[-1]["end"] if self.open else 0
        if self.open and used + n > self.max_shard_size:
            self._finish_shard()
            used = 0
        if self._spool is None:
            self._spool = open(self._path("spool", len(self.shards)), "ab")
        if n:
            self._spool.write(t.reshape(-1).view(torch.uint8).numpy().data)
        self.open.append({"name": name, "dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape),
                          "start": used, "end": used + n})
        self.total += n

    def _finish_shard(self) -> None:
        """Write the open shard from its spool: header first, tensors in safetensors' order
        (larger element sizes first, then by name, which keeps every tensor aligned)."""
        k = len(self.shards)
        _fsync(self._spool)
        self._spool.close()
        self._spool = None
        order = sorted(self.open, key=lambda e: (-DTYPES[e["dtype"]].itemsize, e["name"]))
        header, offset = {"__metadata__": self.metadata}, 0
        for e in order:
            size = e["end"] - e["start"]
            header[e["name"]] = {"dtype": e["dtype"], "shape": e["shape"], "data_offsets": [offset, offset + size]}
            offset += size
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)
        tmp = self._path("shard", k) + ".tmp"
        with open(self._path("spool", k), "rb") as src, open(tmp, "wb") as dst:
            dst.write(len(text).to_bytes(8, "little") + text)
            for e in order:
                src.seek(e["start"])
                left = e["end"] - e["start"]
                while left:
                    chunk = src.read(min(left, 64 << 20))
                    dst.write(chunk)
                    left -= len(chunk)
            _fsync(dst)
        os.replace(tmp, self._path("shard", k))
        self.shards.append([e["name"] for e in self.open])
        self.open = []

    def commit(self) -> dict:
        """Make everything added so far durable; the returned state resumes the writer. Spools of
        finished shards are deleted only now, so a crash before this commit can go back to the
        previous one."""
        if self._spool is not None:
            _fsync(self._spool)
        k = len(self.shards)
        for j in range(k):
            if os.path.exists(self._path("spool", j)):
                os.remove(self._path("spool", j))
        return {"stem": self.stem, "max_shard_size": self.max_shard_size, "metadata": self.metadata,
                "shards": self.shards, "open": self.open, "total": self.total}

    @classmethod
    def resume(cls, folder: str, state: dict) -> "ShardWriter":
        """The writer as it was at the commit that returned `state`: files written after it are
        dropped, the open shard's spool is cut back to the committed length."""
        w = cls(folder, state["stem"], state["max_shard_size"], state["metadata"])
        w.shards, w.open, w.total = state["shards"], state["open"], state["total"]
        k = len(w.shards)
        keep = {os.path.basename(w._path("shard", j)) for j in range(k)} | {os.path.basename(w._path("spool", k))}
        for f in os.listdir(folder):
            if f.startswith(w.stem + ".") and (".shard" in f or ".spool" in f) and f not in keep:
                os.remove(os.path.join(folder, f))
        missing = [f for f in keep if ".shard" in f and not os.path.isfile(os.path.join(folder, f))]
        spool = w._path("spool", k)
        length = w.open[-1]["end"] if w.open else 0
        if missing or (w.open and (not os.path.isfile(spool) or os.path.getsize(spool) < length)):
            raise LowbitError(f"the partial output in {folder} lacks files its state names; remove it to start over")
        if os.path.exists(spool):
            os.truncate(spool, length)
        return w

    def close(self) -> list[str]:
        """Write the last shard, give the shards their final names (and the index when there are
        several); returns the file names."""
        if self.open or not self.shards:
            if self._spool is None:
                self._spool = open(self._path("spool", len(self.shards)), "ab")
            self._finish_shard()
        n = len(self.shards)
        names = ([f"{self.stem}.safetensors"] if n == 1 else
                 [f"{self.stem}-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)])
        for k, name in enumerate(names):
            os.replace(self._path("shard", k), os.path.join(self.folder, name))
            if os.path.exists(self._path("spool", k)):
                os.remove(self._path("spool", k))
        if n > 1:
            index = {"metadata": {"total_size": self.total},
                     "weight_map": {t: names[k] for k, shard in enumerate(self.shards) for t in shard}}
            with open(os.path.join(self.folder, f"{self.stem}.safetensors.index.json"), "w") as f:
                json.dump(index, f, indent=2)
        return names
