"""Distillation data: every source kind loads, tokenises and packs the same way; bad sources are one-line errors."""

import json
import re

import pytest
import torch

from linearize.config import DataConfig
from linearize.distillation.data import PackedWindows, StreamedWindows, load_data
from linearize.hf.errors import LinearizeError
from tests.tiny import tiny_tokenizer

DOCS = ["It is a truth universally acknowledged, " * 3, "that a single man in possession of a good fortune, " * 2, "must be in want of a wife. " * 4]


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def expected_stream(tokenizer, docs):
    ids = []
    for doc in docs:
        ids += tokenizer(doc, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return torch.tensor(ids)


def packed(data):
    return data.train.windows


def config(train, **overrides):
    return DataConfig(train=str(train), heldout="persuasion", seq_len=16, heldout_tokens=256, **overrides)


def write_sources(folder):
    (folder / "txt").mkdir()
    for i, doc in enumerate(DOCS):
        (folder / "txt" / f"{i}.txt").write_text(doc)
    (folder / "docs.jsonl").write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(DOCS)))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": DOCS}), folder / "docs.parquet")


@pytest.mark.core
@pytest.mark.parametrize("kind", ["txt folder", "jsonl", "parquet"])
def test_every_source_kind_packs_the_same_windows(kind, tmp_path, tokenizer):
    write_sources(tmp_path)
    source = {"txt folder": tmp_path / "txt", "jsonl": tmp_path / "docs.jsonl", "parquet": tmp_path / "docs.parquet"}[kind]
    data = load_data(config(source), tokenizer)
    stream = expected_stream(tokenizer, DOCS)
    count = stream.numel() // 16
    assert torch.equal(packed(data), stream[: count * 16].view(count, 16))
    assert data.heldout.numel() == 256  # capped at heldout_tokens
    assert torch.equal(data.heldout, expected_stream(tokenizer, [data_text("persuasion")])[:256])


def data_text(name):
    from linearize.textdata import packaged_text

    return packaged_text(name)


def test_a_single_text_file_and_a_mixed_folder(tmp_path, tokenizer):
    write_sources(tmp_path)
    single = load_data(config(tmp_path / "txt" / "0.txt"), tokenizer)
    stream = expected_stream(tokenizer, DOCS[:1])
    assert torch.equal(packed(single).flatten(), stream[: packed(single).numel()])
    # A folder with .jsonl and .parquet files reads both (grouped by type).
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (tmp_path / "docs.jsonl").rename(mixed / "a.jsonl")
    (tmp_path / "docs.parquet").rename(mixed / "b.parquet")
    data = load_data(config(mixed), tokenizer)
    assert packed(data).shape[0] == expected_stream(tokenizer, DOCS * 2).numel() // 16


def test_heldout_split_from_the_tail_when_none_is_given(tmp_path, tokenizer):
    (tmp_path / "a.txt").write_text("".join(DOCS) * 4)
    data = load_data(DataConfig(train=str(tmp_path / "a.txt"), heldout=None, seq_len=16, heldout_fraction=0.25), tokenizer)
    stream = expected_stream(tokenizer, ["".join(DOCS) * 4])
    count = stream.numel() // 16
    held = round(count * 0.25)
    assert packed(data).shape[0] == count - held
    assert torch.equal(data.heldout, stream[(count - held) * 16 : count * 16])
    assert data.heldout_windows(8).shape == (held * 2, 8)


def test_streaming_matches_the_packed_order_and_holds_out_its_head(tmp_path, tokenizer):
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS * 3))
    stream = expected_stream(tokenizer, DOCS * 3)
    data = load_data(DataConfig(train=str(tmp_path / "docs.jsonl"), heldout=None, seq_len=16, heldout_tokens=32, streaming=True), tokenizer)
    assert isinstance(data.train, StreamedWindows)
    assert torch.equal(data.heldout, stream[:32])
    windows = stream[: stream.numel() // 16 * 16].view(-1, 16)
    assert torch.equal(data.train.take(0, 3), windows[2:5])
    assert torch.equal(data.train.take(5, 2), windows[7:9])  # skipping forward
    assert torch.equal(data.train.take(1, 1), windows[3:4])  # going back re-reads the stream
    n = windows.shape[0] - 2
    assert torch.equal(data.train.take(n, 1), windows[2:3])  # past the end: the next pass


def test_packed_order_is_a_function_of_seed_and_position(tokenizer):
    windows = torch.arange(40).view(10, 4)
    a, b = PackedWindows(windows, seed=3), PackedWindows(windows, seed=3)
    whole = a.take(0, 25)
    assert torch.equal(torch.cat((b.take(0, 7), b.take(7, 18))), whole)
    assert sorted(whole[:10, 0].tolist()) == list(range(0, 40, 4))  # one epoch is a permutation
    assert not torch.equal(whole[:10], whole[10:20])  # the next epoch another one
    assert not torch.equal(PackedWindows(windows, seed=4).take(0, 10), whole[:10])


def test_chat_template_renders_conversations(tmp_path, tokenizer):
    rows = [{"messages": [{"role": "user", "content": "Who is Mr Darcy?"}, {"role": "assistant", "content": "A proud gentleman."}]}] * 4
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = load_data(config(tmp_path / "chat.jsonl", chat_template=True), tokenizer)
    rendered = "user: Who is Mr Darcy?\nassistant: A proud gentleman.\n"
    stream = expected_stream(tokenizer, [rendered] * 4)
    assert torch.equal(packed(data).flatten(), stream[: packed(data).numel()])
    with pytest.raises(LinearizeError, match="holds list, not text; for conversations set data.chat_template=true"):
        load_data(config(tmp_path / "chat.jsonl", text_field="messages"), tokenizer)


@pytest.mark.parametrize(
    "name, content, overrides, message",
    [
        ("missing.txt", None, {}, "does not exist"),
        ("nope/data", None, {}, "does not exist"),
        ("empty.txt", "", {}, "holds no text"),
        ("short.txt", "Too short.", {}, "fewer than 1 window(s) of data.seq_len=16"),
        ("a.jsonl", '{"body": "some text here that is long enough"}\n', {}, "has no 'text' column"),
        ("a.bin", "x", {}, "unknown type"),
        ("folder", "", {}, "has no"),
        ("a.jsonl", '{"body": "some text here that is long enough"}\n', {"chat_template": True}, "has no 'messages' or 'text' column"),
    ],
    ids=["missing file", "missing folder", "empty", "seq_len too long", "no text field", "unknown type", "empty folder", "no messages"],
)
def test_bad_data_is_a_one_line_error(name, content, overrides, message, tmp_path, tokenizer):
    source = tmp_path / name
    if name == "folder":
        source.mkdir()
    elif content is not None:
        source.write_text(content)
    with pytest.raises(LinearizeError) as error:
        load_data(config(source, **overrides), tokenizer)
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_data_config_checks():
    with pytest.raises(LinearizeError, match="seq_len must be at least 8"):
        DataConfig(seq_len=4)
    with pytest.raises(LinearizeError, match="data.train is empty"):
        DataConfig(train="")
    with pytest.raises(LinearizeError, match="data.heldout is the training data itself"):
        DataConfig(train="org/corpus", heldout="org/corpus")
    assert DataConfig(train="org/corpus", heldout="org/corpus", heldout_split="validation").heldout_split == "validation"


def test_real_austen_folder_when_present(austen_dir):
    if austen_dir is None:
        pytest.skip("no ../shared/data/austen beside this checkout")
    tokenizer = tiny_tokenizer()
    data = load_data(DataConfig(train=str(austen_dir), heldout=None, seq_len=512, heldout_tokens=4096), tokenizer, seed=1)
    assert len(data.train) > 1000
    assert data.heldout.numel() == 4096


def test_a_share_of_windows_becomes_retrieval_tasks_ending_in_their_answer(tokenizer):
    settings = dict(train="prideprejudice", heldout="persuasion", seq_len=1024, heldout_tokens=2048)
    plain = load_data(DataConfig(**settings), tokenizer, seed=1)
    mixed = load_data(DataConfig(**settings, retrieval=0.5), tokenizer, seed=1)
    batch, again, base = mixed.train.take(0, 40), mixed.train.take(0, 40), plain.train.take(0, 40)
    assert batch.shape == (40, 1024) and torch.equal(batch, again)  # a function of the index and the seed
    changed = [i for i in range(40) if not torch.equal(batch[i], base[i])]
    assert 10 <= len(changed) <= 30 and "50% of them retrieval tasks (passkey, needle, multikey, kv, vt)" in mixed.description
    texts = [tokenizer.decode(batch[i]) for i in changed]
    lengths = set()
    for text in texts:
        question, answer = text.rsplit(" is", 1)
        assert re.fullmatch(r":? ?\d{4,7}\.", answer.strip()) and answer.strip(" :.") in question  # the answer was hidden in it
        lengths.add(len(answer.strip(" :.")))
    assert lengths == {4, 6, 7}  # evaluation's answers have 5 digits: no training answer teaches that length
    assert {"pass key", "special magic number", "value of key", "value of VAR"} <= {
        marker for text in texts for marker in ("pass key", "special magic number", "value of key", "value of VAR") if marker in text
    }
    assert torch.equal(mixed.train.take(17, 5), batch[17:22])


def test_a_kind_named_twice_is_drawn_twice_as_often(tokenizer):
    """data.retrieval_kinds is the list a task's kind is drawn from, evenly: multikey named twice beside passkey makes
    about two thirds of the tasks multi-key needles."""
    settings = dict(train="prideprejudice", heldout="persuasion", seq_len=1024, heldout_tokens=2048, retrieval=0.99)
    mixed = load_data(DataConfig(**settings, retrieval_kinds=["passkey", "multikey", "multikey"]), tokenizer, seed=1)
    texts = [tokenizer.decode(window) for window in mixed.train.take(0, 60)]
    multikey = sum("special magic number" in text for text in texts)
    assert sum("pass key" in text for text in texts) + multikey >= 58 and 30 <= multikey <= 50
    assert "99% of them retrieval tasks (passkey, multikey, multikey)" in mixed.description


def test_retrieval_answers_weigh_more_in_the_losses_where_asked(tokenizer):
    """With data.retrieval_weight, each task window's positions that predict its answer carry that weight and every
    other position 1; the windows are those of the unweighted mix, and a new length keeps the weight."""
    from linearize.distillation.retrieval_mix import take_weighted

    settings = dict(train="prideprejudice", heldout="persuasion", seq_len=1024, heldout_tokens=2048, retrieval=0.5)
    plain = load_data(DataConfig(**settings), tokenizer, seed=1)
    weighted = load_data(DataConfig(**settings, retrieval_weight=50), tokenizer, seed=1)
    batch, weights = take_weighted(weighted.train, 0, 12)
    assert torch.equal(batch, plain.train.take(0, 12)) and take_weighted(plain.train, 0, 12)[1] is None
    assert "answers weighing 50x" in weighted.description
    tasks = 0
    for row in range(12):
        heavy = (weights[row] == 50).nonzero().flatten()
        assert set(weights[row].unique().tolist()) <= {1.0, 50.0}
        if heavy.numel() == 0:
            continue
        tasks += 1
        assert heavy.tolist() == list(range(1024 - 1 - heavy.numel(), 1023))  # contiguous, ending before the last
        answer = tokenizer.decode(batch[row, heavy + 1])
        assert re.fullmatch(r":? ?\d{4,7}\.", answer.strip()) and tokenizer.decode(batch[row]).endswith(answer)
    assert tasks >= 3
    longer = weighted.with_seq_len(2048)
    assert set(take_weighted(longer.train, 0, 12)[1].unique().tolist()) == {1.0, 50.0}
    with pytest.raises(LinearizeError, match="retrieval_weight must be positive"):
        DataConfig(retrieval=0.1, retrieval_weight=0)
    with pytest.raises(LinearizeError, match="data.retrieval is 0; set data.retrieval too"):
        DataConfig(retrieval_weight=10)


def test_retrieval_tasks_need_room_and_known_kinds(tokenizer):
    with pytest.raises(LinearizeError, match="data.retrieval: .*too short.*raise data.seq_len"):
        load_data(DataConfig(train="prideprejudice", heldout="persuasion", seq_len=64, retrieval=0.1), tokenizer)
    with pytest.raises(LinearizeError, match="retrieval_kinds.*'haystack'"):
        load_data(DataConfig(train="prideprejudice", heldout="persuasion", seq_len=1024, retrieval=0.1, retrieval_kinds=["haystack"]), tokenizer)
    with pytest.raises(LinearizeError, match=r"data.retrieval is a share"):
        DataConfig(retrieval=1.5)


def test_rewindowed_data_holds_the_same_text_in_other_windows(tmp_path, tokenizer):
    data = load_data(config("prideprejudice"), tokenizer, seed=2)
    longer = data.with_seq_len(48)
    assert longer.seq_len == 48 and longer.train.windows.shape[1] == 48 and torch.equal(longer.heldout, data.heldout)
    flat = packed(data).reshape(-1)
    assert torch.equal(longer.train.windows.reshape(-1), flat[: longer.train.windows.numel()])
    assert data.with_seq_len(16) is data
    streamed = load_data(DataConfig(train="prideprejudice", heldout=None, seq_len=16, heldout_tokens=256, streaming=True), tokenizer)
    again = streamed.with_seq_len(32)
    assert again.train.take(0, 2).shape == (2, 32) and again.train.skip * 32 >= streamed.train.skip * 16
    with pytest.raises(LinearizeError, match="less than one window of"):
        data.with_seq_len(10**8)


def test_a_stage_trains_at_its_own_length(tokenizer):
    import linearize
    from linearize.config import load_recipe
    from tests.tiny import tiny_data, tiny_model

    stages = "stages=[{kind: attention_transfer, tokens: 128, batch_size: 2, log_every: 1}, {kind: lora_kd, tokens: 256, batch_size: 2, seq_len: 64, log_every: 1}]"
    recipe = load_recipe("quickstart", ["convert.mixer=hedgehog", "convert.options={}", "data.seq_len=32", stages])
    run = linearize.run.Run(recipe, log=lambda m: None, progress=False)
    run.setup(tiny_model("llama", dtype=torch.float32), data=tiny_data(seq_len=32)).train()
    first, second = run.session.reports
    assert (first["steps"], first["tokens"]) == (2, 128) and (second["steps"], second["tokens"]) == (2, 256)
    with pytest.raises(LinearizeError, match=r"stages\[1\].seq_len=4096 is beyond the model's"):
        linearize.run.prepare_student(tiny_model("llama", max_position_embeddings=2048), load_recipe("quickstart", ["data.seq_len=32", stages.replace("64", "4096")]))
