"""Distillation data: text from `datasets` (a Hub id, local files, or the packaged novels), tokenised and packed.

Documents are tokenised without special tokens, joined with the tokenizer's EOS token, and cut into windows of
`seq_len` tokens (the tail shorter than a window is dropped). A map-style set is packed once into a tensor and
read in a shuffled order that is a pure function of (seed, position), so a resumed run sees exactly the windows
an uninterrupted one would; a streamed set is read in stream order and a resumed run skips what it had read.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from ..config import DataConfig
from ..hf.errors import LinearizeError
from ..sources import DATA_BUILDERS, Source, classify_source
from ..textdata import PACKAGED_TEXTS, cut_windows, packaged_text, special_prefix
from .retrieval_mix import RetrievalMix, with_retrieval

__all__ = ["DataSource", "DistillData", "PackedWindows", "StreamedWindows", "check_source", "load_data"]

_READ_BATCH = 64  # rows tokenised per tokenizer call


@dataclass(frozen=True)
class DataSource:
    """A data string resolved: what it names (`source.kind` is "name", "file", "folder" or "hub") and, for files
    and folders, `files`: builder -> sorted paths."""

    source: Source
    files: dict[str, list[str]] | None = None


def check_source(spec: str) -> DataSource:
    """Resolve a data string without reading it; a missing file or an unusable folder raises LinearizeError."""
    source = classify_source(spec, names=PACKAGED_TEXTS)
    text, path = source.text, source.path
    if source.kind in ("name", "hub"):
        return DataSource(source)
    if source.kind in ("file", "gguf"):
        builder = DATA_BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise LinearizeError(f"data file {text!r} has an unknown type; use {', '.join(sorted(DATA_BUILDERS))} files")
        return DataSource(source, {builder: [str(path)]})
    if source.kind == "folder":
        files: dict[str, list[str]] = {}
        for child in sorted(path.iterdir()):
            if child.is_file() and child.suffix.lower() in DATA_BUILDERS:
                files.setdefault(DATA_BUILDERS[child.suffix.lower()], []).append(str(child))
        if not files:
            raise LinearizeError(f"data folder {text!r} has no {', '.join(sorted(DATA_BUILDERS))} files; put the text there")
        return DataSource(source, files)
    raise LinearizeError(
        f"data source {text!r} does not exist: give a packaged text ({', '.join(PACKAGED_TEXTS)}), a "
        f"{'/'.join(sorted(DATA_BUILDERS))} file or a folder of them, or a Hub dataset id"
    )


def _load_datasets(data: DataSource, config: DataConfig, split: str, streaming: bool) -> list[Any]:
    """The `datasets` objects holding the source's rows (one per file type for a mixed folder)."""
    import datasets
    from datasets.exceptions import DatasetsError

    spec = data.source.text
    if data.source.kind == "name":
        dataset = datasets.Dataset.from_dict({config.text_field: [packaged_text(spec)]})
        return [dataset.to_iterable_dataset() if streaming else dataset]
    if data.files is not None:
        loaded = []
        for builder, files in data.files.items():
            # One row per .txt file: a file is a document, not a list of unrelated lines.
            extra = {"sample_by": "document"} if builder == "text" else {}
            try:
                loaded.append(datasets.load_dataset(builder, data_files=files, split="train", streaming=streaming, **extra))
            except (ValueError, OSError, DatasetsError) as error:
                reason = str(error).strip().splitlines()[0][:160] if str(error).strip() else type(error).__name__
                raise LinearizeError(f"could not read {builder} data from {spec!r} ({reason}); check the file format") from None
        return loaded
    try:
        return [datasets.load_dataset(spec, config.name, split=split, streaming=streaming)]
    except Exception as error:  # network, auth, unknown split/config: all end the run the same way
        reason = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
        raise LinearizeError(
            f"could not load dataset {spec!r} (split {split!r}, config {config.name!r}) from the Hub, and no local "
            f"file or folder has that name: {reason}; check the id, split and data.name, or give a local file"
        ) from None


def _row_texts(config: DataConfig, tokenizer, where: str) -> Callable[[dict[str, list]], list[str]]:
    """A function from a batch of rows to their texts: with `chat_template`, conversations in `messages_field`
    are rendered by the tokenizer's template; rows without that column (plain held-out prose, say) use
    `text_field`."""
    if config.chat_template and not getattr(tokenizer, "chat_template", None):
        raise LinearizeError(
            "data.chat_template is set but the tokenizer has no chat template; use a chat model's tokenizer or set data.chat_template=false"
        )

    def texts(batch):
        if config.chat_template and config.messages_field in batch:
            return [tokenizer.apply_chat_template(messages, tokenize=False) for messages in batch[config.messages_field]]
        if config.text_field not in batch:
            wanted = f"{config.messages_field!r} or {config.text_field!r}" if config.chat_template else repr(config.text_field)
            raise LinearizeError(f"{where} has no {wanted} column (columns: {', '.join(batch)}); set data.text_field or data.messages_field")
        values = batch[config.text_field]
        if values and not isinstance(values[0], str):
            raise LinearizeError(
                f"{where}: column {config.text_field!r} holds {type(values[0]).__name__}, not text; for conversations set data.chat_template=true"
            )
        return values

    return texts


def _documents(parts: list[Any], texts: Callable, tokenizer) -> Iterator[torch.Tensor]:
    """Token ids of each non-empty document, each followed by EOS (so packed documents stay apart)."""
    eos = tokenizer.eos_token_id
    for dataset in parts:
        for batch in dataset.iter(batch_size=_READ_BATCH):
            batch_texts = [t for t in texts(batch) if t and t.strip()]
            if not batch_texts:
                continue
            # verbose=False: whole books exceed model_max_length on purpose; they are cut into windows next.
            encoded = tokenizer(batch_texts, add_special_tokens=False, verbose=False)["input_ids"]
            for ids in encoded:
                if eos is not None:
                    ids = ids + [eos]
                yield torch.tensor(ids, dtype=torch.long)


def _windows(documents: Iterable[torch.Tensor], seq_len: int) -> Iterator[torch.Tensor]:
    buffer = torch.empty(0, dtype=torch.long)
    for ids in documents:
        buffer = torch.cat((buffer, ids))
        count = buffer.numel() // seq_len
        for i in range(count):
            yield buffer[i * seq_len : (i + 1) * seq_len]
        buffer = buffer[count * seq_len :]


def _read_tokens(documents: Iterable[torch.Tensor], limit: int | None = None) -> torch.Tensor:
    pieces, total = [], 0
    for ids in documents:
        pieces.append(ids)
        total += ids.numel()
        if limit is not None and total >= limit:
            break
    flat = torch.cat(pieces) if pieces else torch.empty(0, dtype=torch.long)
    return flat if limit is None else flat[:limit]


class PackedWindows:
    """Windows (n, seq_len) held in memory, read as an endless sequence: epoch e is permutation e of them."""

    streaming = False

    def __init__(self, windows: torch.Tensor, seed: int):
        self.windows = windows
        self.seed = seed
        self._order: tuple[int, torch.Tensor] | None = None

    def __len__(self) -> int:
        return self.windows.shape[0]

    def _permutation(self, epoch: int) -> torch.Tensor:
        if self._order is None or self._order[0] != epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._order = (epoch, torch.randperm(len(self), generator=generator))
        return self._order[1]

    def rewindowed(self, seq_len: int) -> "PackedWindows":
        """The same text (the windows hold it in order) packed into windows of `seq_len` tokens."""
        flat = self.windows.reshape(-1)
        count = flat.numel() // seq_len
        if count < 1:
            raise LinearizeError(f"the training data has {flat.numel():,} tokens, less than one window of {seq_len}; give more text or a shorter seq_len")
        return PackedWindows(flat[: count * seq_len].view(count, seq_len), self.seed)

    def take(self, start: int, count: int) -> torch.Tensor:
        """Windows start .. start + count - 1 of the endless sequence, as a (count, seq_len) tensor."""
        n = len(self)
        rows = [self._permutation(i // n)[i % n] for i in range(start, start + count)]
        return self.windows[torch.stack(rows)]


class StreamedWindows:
    """Windows read lazily from streamed documents; reading from an earlier position re-reads the stream, and
    reading past its end starts another pass. Under several processes each reads the stream and keeps its share."""

    streaming = True

    def __init__(self, documents: Callable[[], Iterator[torch.Tensor]], seq_len: int, skip: int = 0):
        self.documents = documents
        self.seq_len = seq_len
        self.skip = skip  # leading windows that were held out
        self._iterator: Iterator[torch.Tensor] | None = None
        self._position = 0

    def rewindowed(self, seq_len: int) -> "StreamedWindows":
        """The same stream in windows of `seq_len` tokens, still skipping (at least) the held-out head."""
        return StreamedWindows(self.documents, seq_len, skip=-(-self.skip * self.seq_len // seq_len))

    def _restart(self) -> None:
        self._iterator = _windows(self.documents(), self.seq_len)
        for _ in range(self.skip):
            if next(self._iterator, None) is None:
                raise LinearizeError("the training stream has no windows left after the held-out ones; give more data or set data.heldout")
        self._position = 0

    def _next(self) -> torch.Tensor:
        window = next(self._iterator, None)
        if window is None:  # end of the stream: start another pass
            self._restart()
            window = next(self._iterator, None)
            if window is None:
                raise LinearizeError("the training stream holds no full window; give more data or lower data.seq_len")
        self._position += 1
        return window

    def take(self, start: int, count: int) -> torch.Tensor:
        if self._iterator is None or start < self._position:
            # A resumed run (or an earlier position) re-reads the stream from its start up to `start`.
            self._restart()
        while self._position < start:
            self._next()
        return torch.stack([self._next() for _ in range(count)])


@dataclass
class DistillData:
    """Training windows (`train`: PackedWindows or StreamedWindows, None when only scoring) and held-out tokens.

    Example:
        >>> data = load_data(DataConfig(train="notes/", heldout="persuasion", seq_len=256), tokenizer)
        >>> data.heldout_windows(512, max_tokens=8192).shape
    """

    train: PackedWindows | StreamedWindows | RetrievalMix | None
    heldout: torch.Tensor
    seq_len: int
    description: str = ""
    prefix: list[int] = field(default_factory=list)  # the tokenizer's special prefix (`textdata.special_prefix`)

    def with_seq_len(self, seq_len: int) -> "DistillData":
        """The same data with the training text in windows of `seq_len` tokens (a stage's own length; the held-out
        tokens are unchanged)."""
        if seq_len == self.seq_len:
            return self
        train = None if self.train is None else self.train.rewindowed(seq_len)
        return dataclasses.replace(self, train=train, seq_len=seq_len, description=f"{self.description}; in windows of {seq_len} tokens")

    def heldout_windows(self, seq_len: int | None = None, max_tokens: int | None = None) -> torch.Tensor:
        """The held-out tokens (at most `max_tokens` of them) cut into (n, seq_len) windows for scoring, each
        opening with the tokenizer's special prefix as the model's tokenizer presents text."""
        seq_len = seq_len or self.seq_len
        tokens = self.heldout if max_tokens is None else self.heldout[:max_tokens]
        if tokens.numel() < seq_len - len(self.prefix):
            raise LinearizeError(
                f"the held-out text has {tokens.numel()} tokens, fewer than one window of {seq_len}; "
                "give more held-out text (data.heldout) or a shorter seq_len"
            )
        return cut_windows(tokens, seq_len, prefix=self.prefix)


def _heldout_tokens(config: DataConfig, tokenizer) -> torch.Tensor:
    """The first `config.heldout_tokens` tokens of the separate held-out source `config.heldout`, read as a stream."""
    parts = _load_datasets(check_source(config.heldout), config, config.heldout_split or config.split, streaming=True)
    documents = _documents(parts, _row_texts(config, tokenizer, f"held-out data {config.heldout!r}"), tokenizer)
    heldout = _read_tokens(documents, config.heldout_tokens)
    if heldout.numel() == 0:
        raise LinearizeError(f"held-out data {config.heldout!r} holds no text; give a source with some text")
    return heldout


def load_data(config: DataConfig, tokenizer, train: bool = True, seed: int = 0, dataset: Any = None) -> DistillData:
    """Load, tokenise and pack the data a recipe names; `train=False` reads only what the held-out set needs.
    `dataset` (a `datasets` Dataset or IterableDataset) replaces `config.train` as the training rows.

    Example:
        >>> data = load_data(recipe.data, tokenizer, seed=recipe.seed)
        >>> data.train.take(0, 4).shape
        torch.Size([4, 512])
    """
    seq_len = config.seq_len
    heldout = _heldout_tokens(config, tokenizer) if config.heldout else None
    if not train and heldout is not None:
        return DistillData(None, heldout, seq_len, f"held out: {config.heldout}, {heldout.numel():,} tokens", special_prefix(tokenizer))

    name = config.train if dataset is None else f"the given {type(dataset).__name__}"
    if dataset is None:
        parts = _load_datasets(check_source(config.train), config, config.split, config.streaming)
        streaming = config.streaming
    else:
        parts = [dataset]
        streaming = not hasattr(dataset, "__len__")
    texts = _row_texts(config, tokenizer, f"data {name!r}")
    documents = lambda: _documents(parts, texts, tokenizer)  # noqa: E731  (a fresh pass over the rows each call)
    if streaming:
        skip = 0
        if heldout is None:
            # Held-out windows come first in the stream; training skips them.
            skip = max(1, config.heldout_tokens // seq_len)
            held = list(_take(_windows(documents(), seq_len), skip + 1))
            if len(held) <= skip:
                raise LinearizeError(
                    f"data {name!r} holds fewer than {skip + 1} windows of {seq_len} tokens; give more data, "
                    "a shorter data.seq_len, a smaller data.heldout_tokens, or a separate data.heldout"
                )
            heldout = torch.cat(held[:skip])
        windows = StreamedWindows(documents, seq_len, skip=skip)
        description = f"{name} (streamed in {seq_len}-token windows)"
    else:
        flat = _read_tokens(documents())
        if flat.numel() == 0:
            column = config.messages_field if config.chat_template else config.text_field
            raise LinearizeError(f"data {name!r} holds no text (column {column!r} is empty); give a source with some text")
        count = flat.numel() // seq_len
        needed = 1 if heldout is not None else 2
        if count < needed:
            raise LinearizeError(
                f"data {name!r} has {flat.numel():,} tokens, fewer than {needed} window(s) of data.seq_len={seq_len}; "
                "give more text or lower data.seq_len"
            )
        packed = flat[: count * seq_len].view(count, seq_len)
        if heldout is None:
            # The tail is held out: contiguous text, so no held-out window overlaps a training one.
            held = min(max(1, round(count * config.heldout_fraction)), max(1, config.heldout_tokens // seq_len), count - 1)
            heldout = packed[count - held :].reshape(-1)
            packed = packed[: count - held]
        windows = PackedWindows(packed, seed)
        description = f"{name}: {len(windows):,} windows of {seq_len} tokens"
    windows, mixed = with_retrieval(windows, config, tokenizer, seed)
    source = config.heldout or ("the first windows of the stream" if streaming else "the last windows of the training data")
    return DistillData(windows, heldout, seq_len, f"{description}{mixed}; held out: {source}, {heldout.numel():,} tokens", special_prefix(tokenizer))


def _take(iterator: Iterator, count: int) -> Iterator:
    for _ in range(count):
        item = next(iterator, None)
        if item is None:
            return
        yield item
