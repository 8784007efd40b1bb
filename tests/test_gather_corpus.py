"""benchmarks/gather_corpus.py on small synthetic inputs: markup stripping, held-out splitting, manifest writing."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
import sys
import zlib

import pytest

from tests.conftest import REPO_ROOT

_SPEC = importlib.util.spec_from_file_location("gather_corpus", REPO_ROOT / "benchmarks" / "gather_corpus.py")
gc = sys.modules["gather_corpus"] = importlib.util.module_from_spec(_SPEC)  # dataclasses look their module up there
_SPEC.loader.exec_module(gc)


@pytest.mark.parametrize(
    ("rst", "text"),
    [
        ("See :func:`os.path.join` and :class:`~collections.abc.Mapping`.", "See os.path.join and Mapping."),
        (":ref:`the tutorial <tut-intro>` and :pep:`8`, :rfc:`2822#section-3`", "the tutorial and PEP 8, RFC 2822"),
        ("``*args`` and ``x ** 2`` stay as written", "*args and x ** 2 stay as written"),
        ("The ``3`` in ``3.4.1a2``.", "The 3 in 3.4.1a2."),
        ("`JSON <https://json.org>`_ and `ECMA-404`_ and `<https://x.org>`__", "JSON and ECMA-404 and https://x.org"),
        ("*emphasis*, **strong**, and f(*args, **kwargs)", "emphasis, strong, and f(*args, **kwargs)"),
        ("a footnote [#f1]_ and an escaped \\*star\\* and back\\ slash", "a footnote and an escaped *star* and backslash"),
        (":abbr:`LIFO (last-in, first-out)` across\na line break: :func:`some\nfunction`", "LIFO (last-in, first-out) across\na line break: some\nfunction"),
    ],
)
def test_rst_inline_shows_the_words_sphinx_shows(rst, text):
    assert gc.rst_inline(rst) == text


RST_PAGE = """\
:mod:`json` --- JSON encoder
============================

.. module:: json
   :synopsis: Encode and decode the JSON format.

.. index:: single: JSON

.. _json-intro:

.. This comment is for the editors.
   It runs on.

:orphan:

Intro paragraph with
two lines.

.. note::
   Mind the *gap*.

.. function:: dump(obj, fp, *, \\
              indent=None)

   Write *obj*.

   .. versionadded:: 3.2

* Use the built-in function :func:`getattr`::

     getattr(foo, 'bar')()

  Note that it works on any object.

Decoding::

    >>> json.loads('[1, 2]')
    [1, 2]

>>> 1 + 1
2

+------+--------+
| Key  | Value  |
+======+========+
| a    | ``1``  |
+------+--------+

.. code-block:: python

   x = {"a": 1}

.. [#f1] A footnote with :mod:`os`.
"""

RST_TEXT = """\
json --- JSON encoder

Intro paragraph with
two lines.

Note: Mind the gap.

dump(obj, fp, *,
indent=None)

Write obj.

New in version 3.2.

* Use the built-in function getattr:

getattr(foo, 'bar')()

Note that it works on any object.

Decoding:

>>> json.loads('[1, 2]')
[1, 2]

>>> 1 + 1
2

Key  Value

a  1

x = {"a": 1}

A footnote with os."""


def test_rst_to_text_keeps_the_prose_and_the_code_and_drops_the_bookkeeping():
    assert gc.rst_to_text(RST_PAGE) == RST_TEXT


def test_rst_to_text_leaves_literal_blocks_as_written():
    text = gc.rst_to_text("Example::\n\n    a = b ** 2 * c  # ``not`` :func:`markup`\n\nAfter.")
    assert text == "Example:\n\na = b ** 2 * c  # ``not`` :func:`markup`\n\nAfter."
    assert gc.rst_to_text("Plain text ::\n\n  code\n") == "Plain text\n\ncode"


def test_html_to_text_skips_chrome_and_keeps_paragraphs_and_pre():
    html = (
        "<html><head><title>6.2. APT</title><style>p {}</style></head><body>"
        '<div id="banner"><a href="x">Download the ebook</a></div>'
        '<ul class="docnav top"><li><a href="p.html"><strong>Prev</strong></a><img src="i.png" /></li></ul>'
        '<div class="section"><h2 class="title">6.2. <code>apt-get</code> Commands</h2>'
        '<div class="para">\n\t\t\tAPT is a <em>vast</em> project &amp; more.\n\t\t</div>'
        '<pre class="screen"><code>$ apt update\n  done</code></pre>'
        "<p>One<br/>two</p><script>var x = 1;</script></div></body></html>"
    )
    text = gc.html_to_text(html, frozenset({"#banner", ".docnav"}))
    assert text == "6.2. apt-get Commands\n\nAPT is a vast project & more.\n\n$ apt update\n  done\n\nOne\ntwo"


def _dictd_digits(value: int) -> str:
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    digits = ""
    while True:
        digits = alphabet[value % 64] + digits
        value //= 64
        if not value:
            return digits


def test_dictd_entries_reads_each_entry_once_in_file_order():
    header = "00-database-info\nThe header.\n\n"
    first = "lazy evaluation\nlaziness\n\n   <programming> An {evaluation strategy} of <stdio.h> fame.\n\n   (1994-10-28)\n\n"
    second = "LEO\n\n   {Low Earth Orbit}\n\n"
    data = (header + first + second).encode()
    spans = {"h": (0, len(header)), "f": (len(header), len(first)), "s": (len(header) + len(first), len(second))}

    def line(word, key):
        start, length = spans[key]
        return f"{word}\t{_dictd_digits(start)}\t{_dictd_digits(length)}"

    index = "\n".join([line("00-database-info", "h"), line("LEO", "s"), line("laziness", "f"), line("lazy evaluation", "f")])
    entries = gc.dictd_entries(data, index)
    assert entries == [first, second]
    assert gc.foldoc_to_text(entries[0]) == "lazy evaluation\n\nAn evaluation strategy of <stdio.h> fame."
    assert gc.foldoc_to_text(entries[1]) == "LEO\n\nLow Earth Orbit"
    assert gc.foldoc_to_text("loop\n\n   Repeat:\n\n      FOR x IN xs:\n         say x\n") == (
        "loop\n\nRepeat:\n\n   FOR x IN xs:\n      say x")
    assert gc._dictd_number("BA") == 64 and gc._dictd_number("/") == 63


def test_split_held_out_holds_out_every_20th_whole_document():
    documents = [f"document {i}\n\nwith two paragraphs" for i in range(45)]
    documents[7] = "  \n"
    train, heldout = gc.split_held_out(documents)
    assert heldout == [documents[0], documents[20], documents[40]]
    assert len(train) == 45 - 3 - 1 and documents[7] not in train
    assert not set(train) & set(heldout) and train[0] == documents[1]


def test_dialogue_text_alternates_speakers_and_drops_repeats():
    conversations = [["Hello", "Hi  there\n", 42], ["My PC is slow.", "Restart it."], ["Hello", "Hi there", 42]]
    assert gc.dialogue_text(conversations) == "A: Hello\nB: Hi there\nA: 42\n\nA: My PC is slow.\nB: Restart it."


def test_readers_keep_reading_order_and_filters(tmp_path):
    data = tmp_path / "moby/package/data"
    data.mkdir(parents=True)
    for name in ("etymology", "extracts", "chapter_10", "chapter_2", "chapter_1", "epilogue"):
        (data / f"{name}.txt").write_text(f"{name} text  \n\n\n\nend\n")
    assert [d.split()[0] for d in gc.moby_dick(tmp_path / "moby")] == [
        "etymology", "extracts", "chapter_1", "chapter_2", "chapter_10", "epilogue"]
    assert gc.moby_dick(tmp_path / "moby")[0] == "etymology text\n\nend"

    sotu = tmp_path / "sotu/package/data"
    sotu.mkdir(parents=True)
    (sotu / f"{gc.SOTU_SINCE - 1}_old_president_n.txt").write_text("Old.")
    (sotu / f"{gc.SOTU_SINCE}_new_president_n.txt").write_text("Thank you. [Applause] We are here. [laughter] Good night.")
    assert gc.state_of_the_union(tmp_path / "sotu") == ["Thank you. We are here. Good night."]

    factbook = tmp_path / "factbook/package"
    (factbook / "meta").mkdir(parents=True)
    (factbook / "europe").mkdir()
    (factbook / "meta/categories.json").write_text(json.dumps({"Introduction": {"count": 1}}))
    (factbook / "europe/fr.json").write_text(json.dumps({
        "Introduction": {"Background": {"text": "France is old. "}},
        "Government": {"Country name": {"conventional short form": {"text": "France"}}},
        "Economy": {"Economy - overview": {"text": "It trades."}, "GDP": {"text": "$2 trillion"}}}))
    assert gc.world_factbook(tmp_path / "factbook") == ["France\n\nFrance is old.\n\nIt trades."]


def test_austen_holds_out_persuasion_and_needs_it(tmp_path):
    folder, out = tmp_path / "austen", tmp_path / "out"
    folder.mkdir()
    (out / "train").mkdir(parents=True)
    (out / "heldout").mkdir()
    for name in ("emma.txt", "persuasion.txt", "prideprejudice.txt"):
        (folder / name).write_text(f"{name} as it is \n")
    record = gc.austen(folder, out)
    assert (out / "train/austen.txt").read_text() == "emma.txt as it is \n\n\nprideprejudice.txt as it is \n"
    assert (out / "heldout/persuasion.txt").read_text() == "persuasion.txt as it is \n"
    assert record["novels"] == {"train": ["emma.txt", "prideprejudice.txt"], "heldout": ["persuasion.txt"]}
    (folder / "persuasion.txt").unlink()
    with pytest.raises(SystemExit, match="has no persuasion.txt; pass --austen FOLDER"):
        gc.austen(folder, out)


def test_write_texts_and_manifest_record_sizes_hashes_and_the_out_of_genre_part(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "heldout").mkdir()
    novel = gc.write_texts(tmp_path, {"train/novel.txt": ["One two.", "Three."], "heldout/novel.txt": ["Four five six."]})
    talk = gc.write_texts(tmp_path, {"train/talk.txt": [], "heldout/talk.txt": ["A: Hi\nB: Hello"]})
    assert (tmp_path / "train/novel.txt").read_text() == "One two.\n\nThree."
    assert not (tmp_path / "train/talk.txt").exists()
    records = {"novel": {"name": "novel", "genre": "fiction", "files": novel},
               "talk": {"name": "talk", "genre": "dialogue", "files": talk}}
    manifest = gc.write_manifest(tmp_path, records)
    assert json.loads((tmp_path / "manifest.json").read_text()) == manifest
    assert manifest["out_of_genre"] == ["dialogue"]
    assert manifest["genres"]["fiction"] == {"sources": ["novel"], "train_bytes": 16, "train_words": 3, "heldout_bytes": 14,
                                             "heldout_words": 3, "held_out_entirely": False}
    assert manifest["genres"]["dialogue"]["held_out_entirely"] is True
    assert manifest["totals"] == {"train_bytes": 16, "train_words": 3, "heldout_bytes": 28, "heldout_words": 7}
    for name, info in manifest["files"].items():
        data = (tmp_path / name).read_bytes()
        assert info == {"bytes": len(data), "words": len(data.split()), "sha256": hashlib.sha256(data).hexdigest()}
    assert sorted(manifest["files"]) == ["heldout/novel.txt", "heldout/talk.txt", "train/novel.txt"]


def test_sources_are_registered_once_and_the_expected_files_match_quality_py():
    names = [s.name for s in gc.SOURCES]
    assert len(names) == len(set(names)) and "austen" not in names
    assert {s.registry for s in gc.SOURCES} <= set(gc._TOOLS) == set(gc._FETCHERS)
    expected = gc.expected_files()
    assert {"heldout/persuasion.txt", "heldout/python-docs.txt", "train/austen.txt"} <= expected
    assert all(f"train/{s.name}.txt" not in expected for s in gc.SOURCES if s.held_out_whole)
    assert any(s.held_out_whole for s in gc.SOURCES)


def test_a_missing_tool_or_a_failed_download_ends_in_one_line_naming_the_fix(monkeypatch, tmp_path):
    monkeypatch.setattr(shutil, "which", lambda tool: None if tool == "npm" else f"/usr/bin/{tool}")
    with pytest.raises(SystemExit) as missing:
        gc.check_tools(gc.SOURCES)
    assert str(missing.value) == "npm not found, and the corpus downloads packages with it: install it (apt-get install npm)"
    with pytest.raises(SystemExit) as failed:
        gc._run([sys.executable, "-c", "import sys; sys.exit('E: Unable to locate package nothing')"], tmp_path,
                "run `apt-get update` first")
    message = str(failed.value)
    assert "\n" not in message and message.endswith("(E: Unable to locate package nothing): run `apt-get update` first")


def test_main_refuses_a_folder_with_text_it_would_not_write(monkeypatch, tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "train/old.txt").write_text("stale")
    monkeypatch.setattr(sys, "argv", ["gather_corpus.py", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match=r"holds text this script does not write \(train/old.txt\): pass a new --out"):
        gc.main()


def test_foldoc_reader_skips_short_entries(tmp_path):
    base = tmp_path / "usr/share/dictd"
    base.mkdir(parents=True)
    long_entry = "monad\n\n   " + " ".join(["word"] * gc.MIN_ENTRY_WORDS) + "\n\n"
    short_entry = "LEO\n\n   {Low Earth Orbit}\n\n"
    data = (long_entry + short_entry).encode()
    compressor = zlib.compressobj(wbits=31)  # gzip framing, as dictzip's .dz is
    (base / "foldoc.dict.dz").write_bytes(compressor.compress(data) + compressor.flush())
    (base / "foldoc.index").write_text(
        f"monad\tA\t{_dictd_digits(len(long_entry))}\nLEO\t{_dictd_digits(len(long_entry))}\t{_dictd_digits(len(short_entry))}\n")
    assert [d.split()[0] for d in gc.foldoc(tmp_path)] == ["monad"]
