"""RULER-style retrieval tasks (multi-key needle, key-value retrieval, variable tracking): what each prompt hides
and asks, the asked line at its depth, training probes that never repeat evaluation probes, and the report."""

import random
import re

import pytest

from linearize.evaluate.longcontext import KINDS, RULER_KINDS, make_probe
from linearize.evaluate.scoring import evaluate
from linearize.report import write_report
from linearize.textdata import packaged_text
from tests.test_evaluate import char_tokenizer, tiny_student


def text_of(tokenizer, probe) -> str:
    """The prompt as text: one character per token (char_tokenizer), line breaks as <unk>."""
    return "".join(tokenizer.convert_ids_to_tokens(probe.prompt_ids))


def position(text: str, needle: str) -> float:
    return text.index(needle) / len(text)


@pytest.mark.parametrize("kind", RULER_KINDS)
def test_each_kind_hides_the_asked_line_at_its_depth_and_asks_for_it(kind):
    tokenizer = char_tokenizer()
    for depth in (0.0, 1.0):
        probe = make_probe(tokenizer, kind, 1500, depth, random.Random(7))
        text = text_of(tokenizer, probe)
        assert 1300 <= probe.length <= 1500 and re.fullmatch(r"\d{5}", probe.answer)
        question = text[text.rindex("What is") :]
        if kind == "multikey":
            needles = re.findall(r"The special magic number for (\w+) is: (\d+)\.", text)
            assert len(needles) == 4 and len({place for place, _ in needles}) == 4
            asked = next(place for place, key in needles if key == probe.answer)
            assert f"for {asked} mentioned" in question and [k for _, k in needles].count(probe.answer) == 1
            line = f"The special magic number for {asked} is: {probe.answer}."
        elif kind == "kv":
            pairs = re.findall(r"Key ([0-9a-f]{8}) has value (\d+)\.", text)
            assert len(pairs) > 20 and sum(value == probe.answer for _, value in pairs) == 1
            name = next(key for key, value in pairs if value == probe.answer)
            assert f"value of key {name}?" in question
            line = f"Key {name} has value {probe.answer}."
        else:
            first = re.search(rf"VAR ([A-Z]{{5}}) = {probe.answer}\.", text)
            chain = [first.group(1)]
            for _ in range(3):  # each copy comes after its source
                copy = re.search(rf"VAR ([A-Z]{{5}}) = VAR {chain[-1]}\.", text)
                assert copy.start() > text.index(f"VAR {chain[-1]} =")
                chain.append(copy.group(1))
            assert f"value of VAR {chain[-1]}?" in question and probe.answer not in question
            line = first.group(0)
        at = position(text, line)
        assert at < 0.3 if depth == 0.0 else at > 0.7


def test_training_probes_never_repeat_evaluation_probes():
    tokenizer = char_tokenizer()
    pride, persuasion = packaged_text("prideprejudice"), packaged_text("persuasion")
    for kind in KINDS:
        train = make_probe(tokenizer, kind, 900, 0.5, random.Random(0), pool="train")
        held = make_probe(tokenizer, kind, 900, 0.5, random.Random(0))
        assert re.fullmatch(r"\d{6}", train.answer) and re.fullmatch(r"\d{5}", held.answer)
        if kind in ("needle", "multikey", "vt"):
            body = max(text_of(tokenizer, train).split("<unk>"), key=len)  # the line breaks part intro, body, question
            sentence = max((s for s in re.split(r"(?<=[.!?]) ", body) if "magic" not in s and "VAR" not in s), key=len)
            assert sentence in " ".join(pride.split()) and sentence not in " ".join(persuasion.split())
    with pytest.raises(Exception, match="unknown retrieval kind"):
        make_probe(tokenizer, "ruler", 900, 0.5, random.Random(0))


def test_evaluate_with_ruler_records_and_reports_every_kind(tmp_path):
    results = evaluate(tiny_student(), char_tokenizer(), ruler=True, lengths=[700], depths=[0.5], trials=1, teacher=False, progress=False)
    assert {r["kind"] for r in results.records} - {"training"} == set(RULER_KINDS)
    retrieval = [r for r in results.records if r["kind"] in RULER_KINDS]
    assert len(retrieval) == 3 and all(r["trials"] == 1 and 0 <= r["value"] <= 1 and 600 <= r["tokens"] <= 700 for r in retrieval)
    text = write_report([results], tmp_path).read_text()
    for title in ("Multi-key needle (RULER)", "Key-value retrieval (RULER)", "Variable tracking (RULER)"):
        assert f"## {title}" in text
    assert {"multikey", "kv", "vt"} <= {p.stem for p in tmp_path.glob("*.png")}
