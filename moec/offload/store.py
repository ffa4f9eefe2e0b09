"""Where offloaded experts live: a safetensors file per block read with plain reads (disk), or host memory."""

from __future__ import annotations

import json
import os

import torch
from safetensors.torch import save_file


DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I8": torch.int8, "U8": torch.uint8}


def _read_at(path: str, offset: int, buf) -> int:
    """Bytes of `path` from `offset` read into the writable buffer `buf` (unbuffered reads straight into it, as many
    as the OS needs: one read returns at most 2 GiB on Linux, less on some network filesystems)."""
    mv, got = memoryview(buf).cast("B"), 0
    with open(path, "rb", buffering=0) as f:
        f.seek(offset)
        while got < len(mv):
            n = f.readinto(mv[got:])
            if not n:
                break
            got += n
    return got


class DiskStore:
    """Each block's experts in one safetensors file (`<block>.safetensors`, tensors `<role>.<e>`), written once
    at compile time and read one expert at a time with plain reads at the offsets its header gives (no mmap:
    a file changed or truncated underneath gives an error, not a crash; a file whose size or modification time
    changed since it was written is refused)."""

    def __init__(self, folder: str):
        self.folder = os.path.abspath(folder)  # the process may change its directory later
        os.makedirs(folder, exist_ok=True)
        self._index: dict[str, tuple] = {}  # block -> ((size, mtime), {name: (dtype, shape, offset, nbytes)})
        self._written: dict[str, str] = {}  # block -> the token this store wrote into its file's metadata
        self._sig: dict[str, tuple] = {}  # block -> (size, mtime) of its file as written

    def _file(self, block: str) -> str:
        return os.path.join(self.folder, (block or "model").replace("/", "_") + ".safetensors")

    def write(self, block: str, tensors: dict[str, torch.Tensor]) -> None:
        """tensors: role -> [E, ...]; stored per expert."""
        self._written[block] = os.urandom(8).hex()
        save_file({f"{r}.{e}": t[e].detach().cpu().contiguous() for r, t in tensors.items() for e in range(len(t))},
                  self._file(block), metadata={"moec_store": self._written[block]})
        st = os.stat(self._file(block))
        self._sig[block] = (st.st_size, st.st_mtime_ns)
        self._index.pop(block, None)

    def _entries(self, block: str, path: str) -> dict:
        st = os.stat(path)
        sig = (st.st_size, st.st_mtime_ns)
        if block not in self._index or self._index[block][0] != sig:
            with open(path, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(n))
            token = header.get("__metadata__", {}).get("moec_store")
            if block in self._written and token != self._written[block]:
                raise ValueError("another compile rewrote this file (Offload(path=...) shared by two models)")
            if block in self._sig and sig != self._sig[block]:  # (the values are not checksummed: bit rot that
                raise ValueError("the file changed after compile (its size or modification time)")  # keeps both)
            self._index[block] = (sig, {k: (DTYPES[v["dtype"]], v["shape"], 8 + n + v["data_offsets"][0],
                                            v["data_offsets"][1] - v["data_offsets"][0])
                                        for k, v in header.items() if k != "__metadata__"})
        return self._index[block][1]

    def read(self, block: str, role: str, e: int) -> torch.Tensor:
        out, _ = self.read_into(block, role, e, None)
        return out

    def read_into(self, block: str, role: str, e: int, out: torch.Tensor | None) -> tuple[torch.Tensor, int]:
        """The tensor (written into `out`, a CPU tensor of its shape and dtype, else a new one) and its bytes: one
        positioned read, no copy."""
        path = self._file(block)
        try:
            dtype, shape, offset, nbytes = self._entries(block, path)[f"{role}.{e}"]
            if out is None or out.dtype != dtype or list(out.shape) != shape or not out.is_contiguous() or \
                    out.device.type != "cpu":
                out = torch.empty(shape, dtype=dtype)
            got = _read_at(path, offset, out.view(-1).view(torch.uint8).numpy())
            if got != nbytes:
                raise EOFError(f"{got} of {nbytes} bytes")
            return out, nbytes
        except Exception as err:  # noqa: BLE001  missing, truncated or overwritten file
            self._index.pop(block, None)
            raise RuntimeError(f"moec offload: cannot read expert {e} of block {block!r} from {path} "
                               f"({type(err).__name__}: {err}); the store was removed or damaged: compile the model "
                               f"again to rewrite it") from None


class HostStore:
    """Each expert's tensors in host memory (pinned when the model runs on a GPU: asynchronous copies)."""

    def __init__(self, pin: bool):
        self.pin = pin
        self._t: dict[tuple[str, str, int], torch.Tensor] = {}

    def write(self, block: str, tensors: dict[str, torch.Tensor]) -> None:
        for r, t in tensors.items():
            for e in range(len(t)):
                c = t[e].detach().to("cpu", copy=True).contiguous()
                self._t[block, r, e] = c.pin_memory() if self.pin else c

    def read(self, block: str, role: str, e: int) -> torch.Tensor:
        return self._t[block, role, e]

    def read_into(self, block: str, role: str, e: int, out: torch.Tensor | None) -> tuple[torch.Tensor, int]:
        src = self._t[block, role, e]
        return src, src.numel() * src.element_size()
