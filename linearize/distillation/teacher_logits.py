"""Cached teacher logits for `lora_kd` (`teacher_top_k: K`): each training window's teacher distributions are
computed once, kept on disk as their top K tokens and the mass of all the others, and read back whenever the window
comes again, instead of running the teacher.

Per position of a window the cache keeps the log-probabilities (at the stage's temperature) of the teacher's K most
likely tokens in float16, their ids in uint16 (int32 for a vocabulary over 65,536), and the log of the probability of
every other token together in float32: K x 4 + 4 bytes a token (260 at K = 64), against the vocabulary x 4 bytes of
float32 logits. The loss (`kd.TeacherTopK`) takes the other tokens as one outcome, so its KL is exact for the
distribution kept; every step, a window's first included, trains on the kept form, so a window gives the same loss
whether its teacher ran at that step or was read back.

A window is keyed by a hash of its tokens, not by its position in the data: packed data is read in a new shuffled
order each epoch, a stream is read again from its start, a retrieval task is built per position, and processes
share the windows out by position, so the same text turns up at other positions; a resumed run keys it as before.

On disk (the stage's checkpoint folder, `stage<i>-lora_kd/teacher_logits/`): shards
`<process>-<serial>.safetensors` holding `keys` (n,) int64, `log_probs` and `indices` (n, sequence, K) and `log_rest`
(n, sequence), with the settings in the header. A process writes a shard at the first call after the windows it
holds in memory reach `SHARD_BYTES` (on a GPU they are held there too until then) and when the stage ends or stops on
an error, under a temporary name renamed into place, so a shard is whole or absent (a killed process loses only what
it held). A window missing from the cache is first looked for
in the shards other processes wrote since; one they still hold is computed again. A resumed stage reads every
shard there; the folder goes with the checkpoints once the run is saved.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F

from ..hf.errors import LinearizeError
from .kd import LOGIT_CHUNK, KDHead, TeacherTopK
from .triton_kl import top_k_problem, top_k_rows

FORMAT = "linearize-teacher-logits"
VERSION = "1"
SHARD_BYTES = 64 * 2**20  # windows a process holds in memory before writing them out as one shard
_FIELDS = ("log_probs", "indices", "log_rest")


@torch.no_grad()
def top_k(teacher: torch.Tensor, k: int, temperature: float, head: KDHead | None = None) -> TeacherTopK:
    """The teacher's distributions at `temperature` as their `k` most likely tokens and the rest's mass, from its
    logits (batch, sequence, vocabulary) or, with `head`, the hidden states the head reads; computed `head.chunk`
    (else `LOGIT_CHUNK`) positions at a time, in float32 at least, so no float32 batch x sequence x vocabulary is held;
    on CUDA through `triton_kl.top_k_rows` (one pass over the logits after torch's top-k).

    Example:
        >>> top = top_k(model(ids).logits, 64, temperature=1.0)
        >>> top.log_probs.shape, top.log_rest.shape
        (torch.Size([2, 512, 64]), torch.Size([2, 512]))
    """
    batch, length = teacher.shape[:2]
    flat = teacher.reshape(batch * length, -1)
    chunk = head.chunk if head is not None else LOGIT_CHUNK
    parts = []
    for start in range(0, flat.shape[0], chunk):
        logits = flat[start : start + chunk] if head is None else F.linear(flat[start : start + chunk], head.weight, head.bias)
        if top_k_problem(logits, k) is None:
            parts.append(top_k_rows(logits, k, temperature))
        else:
            log_p = F.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature, dim=-1)
            values, indices = log_p.topk(k, dim=-1)
            parts.append((values, indices, log_p.scatter(1, indices, -torch.inf).logsumexp(-1)))
    values, indices, log_rest = (torch.cat(column) for column in zip(*parts))
    return TeacherTopK(values.view(batch, length, k), indices.view(batch, length, k), log_rest.view(batch, length))


def window_key(window: torch.Tensor) -> int:
    """The cache key of a window: 64 bits of a hash of its token ids."""
    digest = hashlib.blake2b(window.to(device="cpu", dtype=torch.int64).contiguous().numpy().tobytes(), digest_size=8)
    return int.from_bytes(digest.digest(), "little", signed=True)


class KeyedWindows:
    """Training windows (PackedWindows, StreamedWindows or RetrievalMix) that key each batch they give on the host as
    they give it (`keys`), so that the cache can look up the batch the training loop then moves to the GPU without
    copying it back, which would wait for every kernel queued before it. The loop takes a micro-batch and computes its
    loss before it takes the next, so `keys` are those of the batch being trained on."""

    def __init__(self, windows):
        self.windows, self.keys = windows, None

    def __len__(self) -> int:
        return len(self.windows)

    def __getattr__(self, name: str):
        if name == "windows":  # not set yet (a copy being built)
            raise AttributeError(name)
        return getattr(self.windows, name)

    def take(self, start: int, count: int) -> torch.Tensor:
        return self.take_weighted(start, count)[0]

    def take_weighted(self, start: int, count: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        from .retrieval_mix import take_weighted

        batch, weights = take_weighted(self.windows, start, count)
        self.keys = [window_key(window) for window in batch]
        return batch, weights


class TeacherLogitCache:
    """The top-k teacher distributions of training windows in `folder`, by window (see the module docstring).

    Example:
        >>> cache = TeacherLogitCache(Path("ckpt/stage1-lora_kd/teacher_logits"), top_k=64, temperature=1.0, vocab=49152)
        >>> teacher, cached = cache.get(batch, lambda windows: top_k(teacher_logits_of(windows), 64, 1.0))
        >>> cache.flush()
    """

    def __init__(self, folder: Path, top_k: int, temperature: float, vocab: int, process: int = 0):
        self.folder, self.process = Path(folder), process
        self.folder.mkdir(parents=True, exist_ok=True)
        self.settings = {"format": FORMAT, "version": VERSION, "top_k": str(top_k), "temperature": repr(float(temperature)), "vocab": str(vocab)}
        self.dtypes = (torch.float16, torch.uint16 if vocab <= 2**16 else torch.int32, torch.float32)
        self.located: dict[int, tuple[str, int]] = {}  # key -> (shard, row)
        self.shards: dict[str, object] = {}
        # computed, not yet written: each window's fields on the host and where they were computed (the same on a CPU)
        self.held: dict[int, tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]] = {}
        self.held_bytes = 0
        self.copied: torch.cuda.Event | None = None  # recorded after the last copy of computed windows to the host
        self.refresh()
        own = [int(name.split("-")[1].split(".")[0]) for name in self.shards if name.startswith(f"{process:03d}-")]
        self.serial = max(own, default=-1) + 1

    def __len__(self) -> int:
        return len(self.located) + len(self.held)

    def __contains__(self, key: int) -> bool:
        return key in self.held or key in self.located

    def refresh(self) -> None:
        """Index the shards in the folder not indexed yet (a resumed stage's, or other processes')."""
        from safetensors import safe_open

        for path in sorted(self.folder.glob("*.safetensors")):
            if path.name in self.shards:
                continue
            shard = safe_open(str(path), "pt")
            found = shard.metadata() or {}
            if found != self.settings:
                difference = ", ".join(f"{k} {found.get(k)} there, {v} here" for k, v in self.settings.items() if found.get(k) != v)
                raise LinearizeError(f"{path} holds teacher logits of other settings ({difference}); delete {self.folder} or start again with --overwrite")
            self.shards[path.name] = shard
            for row, key in enumerate(shard.get_tensor("keys").tolist()):
                self.located.setdefault(key, (path.name, row))

    def get(self, windows: torch.Tensor, compute: Callable[[torch.Tensor], TeacherTopK], keys: list[int] | None = None) -> tuple[TeacherTopK, int]:
        """The teacher's distributions of `windows` (batch, sequence) on their device, and how many of the windows
        were read from the cache; the others are `compute(those windows)`, which the cache keeps. `keys` are the
        windows' `window_key`s where the caller has them on the host (`KeyedWindows`): on a GPU, keying `windows`
        here would copy them back and wait for the kernels queued before.

        On CUDA the host waits for no kernel of this call: computed windows go to pinned host memory behind an event
        and stay on the GPU too until they are written, so a window asked for again before then is read there; the
        host awaits the event before it writes a shard, at the call after the shard fills. Cached windows go up from
        pinned memory."""
        keys = [window_key(window) for window in windows.cpu()] if keys is None else keys
        if len(keys) != windows.shape[0]:
            raise ValueError(f"{len(keys)} keys for {windows.shape[0]} windows")
        if self.held_bytes >= SHARD_BYTES:  # the last call's windows: their copy has had a step to finish
            self.flush()
        if any(key not in self for key in keys):
            self.refresh()
        count, device = len(keys), windows.device
        missing = [i for i, key in enumerate(keys) if key not in self]
        resident = [i for i, key in enumerate(keys) if key in self.held]
        from_host = [i for i, key in enumerate(keys) if key in self.located and key not in self.held]
        rows: dict[int, tuple[torch.Tensor, ...]] = {i: self.held[keys[i]][1] for i in resident}  # batch row -> its fields on `device`
        if from_host:
            stacked = [self._on(device, torch.stack(column)) for column in zip(*(self._row(keys[i]) for i in from_host))]
            if len(from_host) == count:
                return TeacherTopK(*stacked), count
            rows.update({i: tuple(field[j] for field in stacked) for j, i in enumerate(from_host)})
        if missing:
            fresh = compute(windows if len(missing) == count else windows[self._on(device, missing)])
            # The kept form, so that a window gives the same loss whether its teacher ran at this step or was read
            # back: log-probabilities in float16; int64 ids here, which their storage type holds exactly.
            kept = (fresh.log_probs.to(self.dtypes[0]), fresh.indices, fresh.log_rest.to(self.dtypes[2]))
            stored = [field.to(dtype) for field, dtype in zip(kept, self.dtypes)]
            on_host = [field.to("cpu", non_blocking=True) for field in stored]
            if windows.is_cuda:
                self.copied = torch.cuda.Event()
                self.copied.record()
            for j, i in enumerate(missing):
                if keys[i] not in self.held:
                    row = tuple(field[j] for field in on_host)
                    self.held[keys[i]] = (row, tuple(field[j] for field in stored))
                    self.held_bytes += sum(t.numel() * t.element_size() for t in row)
            if len(missing) == count:
                return TeacherTopK(*kept), 0
            rows.update({i: tuple(field[j] for field in kept) for j, i in enumerate(missing)})
        # Windows from more than one place: one tensor a field in the batch's order, the ids in one type.
        fields = zip(*(rows[i] for i in range(count)))
        joined = (torch.stack(column if column[0].is_floating_point() else [ids.long() for ids in column]) for column in fields)
        return TeacherTopK(*joined), count - len(missing)

    @staticmethod
    def _on(device: torch.device, values: list[int] | torch.Tensor) -> torch.Tensor:
        """Host values (a list of ints: an index) on `device`, from pinned memory on CUDA, without waiting."""
        tensor = torch.tensor(values) if isinstance(values, list) else values
        return tensor.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else tensor.to(device)

    def _row(self, key: int) -> tuple[torch.Tensor, ...]:
        """A written window's fields, read from its shard."""
        name, row = self.located[key]
        return tuple(self.shards[name].get_slice(field)[row] for field in _FIELDS)

    def flush(self) -> None:
        """Write the windows held in memory as one shard (nothing when none are held)."""
        from safetensors.torch import save_file

        if not self.held:
            return
        if self.copied is not None:  # the computed windows' copy to the host
            self.copied.synchronize()
            self.copied = None
        columns = [torch.stack(column) for column in zip(*(host for host, _ in self.held.values()))]
        tensors = {"keys": torch.tensor(list(self.held), dtype=torch.int64), **dict(zip(_FIELDS, columns))}
        name = f"{self.process:03d}-{self.serial:05d}.safetensors"
        partial = self.folder / f".{name}.partial"
        save_file(tensors, str(partial), metadata=self.settings)
        os.replace(partial, self.folder / name)
        self.serial += 1
        self.held, self.held_bytes = {}, 0
        self.refresh()

    def disk_bytes(self) -> int:
        """Bytes of the shards in the folder (every process's)."""
        return sum(path.stat().st_size for path in self.folder.glob("*.safetensors"))


@contextmanager
def cached_teacher_logits(stage_dir: Path | None, top_k: int, temperature: float, vocab: int, process: int = 0) -> Iterator[TeacherLogitCache]:
    """A stage's cache in `stage_dir/teacher_logits`, whose windows held in memory are written when the block ends,
    on an error too; without a stage folder (no checkpoints), in a temporary folder removed when the block ends."""
    folder = Path(tempfile.mkdtemp(prefix="linearize-teacher-logits-")) if stage_dir is None else Path(stage_dir)
    cache = TeacherLogitCache(folder / "teacher_logits", top_k, temperature, vocab, process)
    try:
        yield cache
    finally:
        if stage_dir is None:
            shutil.rmtree(folder, ignore_errors=True)
        else:
            cache.flush()
