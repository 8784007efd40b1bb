"""Text to measure perplexity on: a packaged novel, a .txt file or folder, a local data file, or a Hub dataset."""

from __future__ import annotations

import os

from linearize.hf.errors import LinearizeError
from linearize.sources import DATA_BUILDERS, classify_source
from linearize.textdata import PACKAGED_TEXTS, packaged_text, read_text_source

from .hubdata import download_hint, hub_reachable, offline_datasets


def load_text(source: str | os.PathLike[str], split: str = "test", name: str | None = None, text_field: str = "text") -> str:
    """The text of `source`, rows of a dataset joined by blank lines.

    `source` is a packaged text (persuasion, prideprejudice), a .txt file, a folder of .txt files, a local
    .jsonl/.json/.csv/.parquet file (column `text_field`), or a Hub dataset id such as `Salesforce/wikitext`
    (config `name`, split `split`), which needs network or the local datasets cache.
    """
    found = classify_source(source, names=PACKAGED_TEXTS)
    if found.kind == "name":
        return packaged_text(found.text)
    if found.kind == "hub":
        return _hub_text(found.text, name, split, text_field)
    builder = DATA_BUILDERS.get(found.path.suffix.lower(), "text")
    if found.kind == "file" and builder != "text":
        return _rows_text(builder, {"data_files": str(found.path)}, "train", text_field, found.text)
    # Plain text, a folder of .txt files, or a missing path (read_text_source says it does not exist).
    return read_text_source(found.path)


def _hub_text(dataset: str, name: str | None, split: str, text_field: str) -> str:
    online = hub_reachable()
    try:
        with offline_datasets(not online):
            return _rows_text(dataset, {"name": name}, split, text_field, dataset)
    except LinearizeError:
        raise
    except Exception as error:
        if online:
            raise LinearizeError(f"could not load dataset {dataset!r} from the Hub ({type(error).__name__}: {str(error).splitlines()[0][:160]})") from None
        raise LinearizeError(
            f"text {dataset!r} is not a local file or packaged text ({', '.join(PACKAGED_TEXTS)}), and as a Hub dataset it is "
            f"not in the local datasets cache while the Hub is unreachable: {download_hint(dataset, name, split)}"
        ) from None


def _rows_text(path: str, kwargs: dict, split: str, text_field: str, shown: str) -> str:
    import datasets

    try:
        rows = datasets.load_dataset(path, split=split, **{k: v for k, v in kwargs.items() if v is not None})
    except ValueError as error:
        if "split" in str(error).lower():
            raise LinearizeError(f"dataset {shown!r} has no split {split!r} ({str(error).splitlines()[0][:120]}); pass --split") from None
        raise
    if text_field not in rows.column_names:
        raise LinearizeError(f"dataset {shown!r} has no column {text_field!r}; its columns are {', '.join(rows.column_names)}: pass --text-field")
    joined = "\n\n".join(t.strip() for t in rows[text_field] if isinstance(t, str) and t.strip())
    if not joined:
        raise LinearizeError(f"column {text_field!r} of {shown!r} holds no text")
    return joined
