"""Inputs users bring: data files (encoding, ``size``, the held-out part), model folders, and the
example data in data/ that ``data=jsonl`` runs on out of the box."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from prerl.data import ConcatSource, FileSource, PackagedSource
from prerl.models import HFModelSpec, NotAModelFolderError

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "data" / "examples" / "arithmetic.jsonl"


def compose_cfg(config_name: str, overrides: list[str], output_dir: Path):
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=overrides)
    with open_dict(cfg):
        cfg.paths.root_dir = str(ROOT)  # what src/train.py sets through PRERL_ROOT
        cfg.paths.output_dir = cfg.paths.log_dir = str(output_dir)
    return cfg


def rows(n: int) -> str:
    return "".join(json.dumps({"question": f"What is {i} + 1?", "answer": str(i + 1)}) + "\n" for i in range(n))


# --------------------------------------------------------------- data files
def test_non_utf8_jsonl_names_the_file_line_and_byte_offset(tmp_path):
    f = tmp_path / "latin1.jsonl"
    f.write_bytes(b'{"question": "a?", "answer": "1"}\n\n{"question": "caf\xe9?", "answer": "2"}\n')
    with pytest.raises(ValueError, match=r"latin1\.jsonl: line 3, column 18 \(byte offset 52 of the file\): not valid UTF-8"):
        FileSource(f).load()


def test_non_utf8_json_names_the_file_and_line(tmp_path):
    f = tmp_path / "latin1.json"
    f.write_bytes(b'[{"question": "a?", "answer": "1"},\n {"question": "\xff", "answer": "2"}]')
    with pytest.raises(ValueError, match=r"latin1\.json: line 2, column 16 \(byte offset 51 of the file\): not valid UTF-8"):
        FileSource(f).load()


def test_utf8_byte_order_mark_is_accepted(tmp_path):
    f = tmp_path / "bom.jsonl"
    f.write_bytes(b"\xef\xbb\xbf" + rows(2).encode())
    assert [p["question"] for p in FileSource(f).load()] == ["What is 0 + 1?", "What is 1 + 1?"]


def test_size_keeps_at_most_that_many_problems_for_every_source(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text(rows(10))
    assert [p["id"] for p in FileSource(f, size=3).load()] == ["d/0", "d/1", "d/2"]
    assert len(FileSource(f, size=50).load()) == 10  # "at most"
    assert len(FileSource(f, size=3, limit=2).load()) == 2
    assert len(PackagedSource("gsm8k", "test", size=5).load()) == 5
    assert len(ConcatSource([FileSource(f), FileSource(f, id_prefix="again")], size=12).load()) == 12
    with pytest.raises(ValueError, match="size must be a positive number"):
        FileSource(f, size=0)


def test_held_out_parts_are_disjoint_seeded_and_cover_the_file(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text(rows(20) + json.dumps({"question": "What is 0 + 1?", "answer": "1"}) + "\n")  # a duplicate
    part = lambda name, **kw: FileSource(f, holdout=5, holdout_seed=3, part=name, **kw).load()  # noqa: E731
    train, val = part("train"), part("val")
    assert len(val) == 5 and len(train) == 15
    assert {p["question"] for p in train}.isdisjoint(p["question"] for p in val)
    assert {p["id"] for p in train} | {p["id"] for p in val} == {f"d/{i}" for i in range(20)}
    assert part("val") == val  # the same draw every time
    assert part("val", size=2) == val[:2]
    assert [p["id"] for p in FileSource(f, holdout=5, holdout_seed=4, part="val").load()] != [p["id"] for p in val]
    with pytest.raises(ValueError, match="holdout=20 leaves no training problems"):
        FileSource(f, holdout=20, part="train").load()
    with pytest.raises(ValueError, match="part='val' with holdout=0 selects nothing"):
        FileSource(f, part="val")


# --------------------------------------------------------------- model folders
def test_a_folder_without_config_json_is_not_a_model_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "sub").mkdir()
    with pytest.raises(NotAModelFolderError, match=r"not a model folder: .* has no config\.json \(it holds: notes\.txt, sub/\)"):
        HFModelSpec(str(tmp_path)).build_tokenizer()
    with pytest.raises(NotAModelFolderError, match=r"has no config\.json \(it holds: nothing \(empty\)\)"):
        HFModelSpec(str(tmp_path / "sub")).build_tokenizer()


def test_a_parent_of_model_folders_points_at_them(tmp_path, tiny_spec):
    tiny_spec.build_model().save_pretrained(tmp_path / "my-model")
    tiny_spec.build_tokenizer().save_pretrained(tmp_path / "my-model")
    with pytest.raises(NotAModelFolderError, match=r"Model folders inside it: my-model"):
        HFModelSpec(str(tmp_path)).build_tokenizer()
    assert HFModelSpec(str(tmp_path / "my-model")).build_tokenizer().eos_token == "<|im_end|>"


def test_a_model_folder_without_tokenizer_files_says_so(tmp_path, tiny_spec):
    tiny_spec.build_model().save_pretrained(tmp_path)  # config.json and weights, no tokenizer
    with pytest.raises(NotAModelFolderError, match=r"has no tokenizer files"):
        HFModelSpec(str(tmp_path)).build_tokenizer()


def test_missing_model_path_keeps_its_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        HFModelSpec(str(tmp_path / "nope")).build_tokenizer()


# --------------------------------------------------------------- data/ in the repository
def test_example_file_is_well_formed_and_its_answers_are_right():
    problems = FileSource(EXAMPLE).load()
    assert 30 <= len(problems) <= 60
    assert len({p["question"] for p in problems}) == len(problems)
    checked = 0
    for p in problems:  # the "What is a <op> b?" ones are checked by evaluating them
        m = re.fullmatch(r"What is (\d+) (\+|-|×|divided by) (\d+)\?", p["question"])
        if m:
            a, op, b = int(m[1]), m[2], int(m[3])
            value = {"+": a + b, "-": a - b, "×": a * b, "divided by": a // b}[op]
            assert p["answer"] == str(value), p
            checked += 1
    assert checked >= 20


def test_data_readme_and_example_are_tracked_and_models_are_not():
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs a git checkout")
    def ignored(path: str) -> bool:
        return subprocess.run(["git", "-C", str(ROOT), "check-ignore", "-q", path]).returncode == 0
    assert not ignored("data/README.md") and not ignored("data/examples/arithmetic.jsonl")
    assert ignored("data/models/smollm2-135m-instruct/model.safetensors") and ignored("data/my_private.jsonl")


def test_smoke_experiment_trains_on_the_jsonl_example_out_of_the_box(tmp_path):
    from prerl.train import train

    cfg = compose_cfg("train", ["experiment=smoke", "data=jsonl", "trainer.max_steps=2", "validate_before=false",
                                "logger=csv"], tmp_path)
    assert Path(cfg.data.train.path) == EXAMPLE and cfg.data.train.size == 32 and cfg.data.val.size == 4
    summary = train(cfg)
    assert summary["global_step"] == 2
    assert 0.0 <= summary["after"]["val/avg@2"] <= 1.0


def test_eval_runs_on_the_jsonl_example(tmp_path):
    from prerl.evaluate import evaluate

    cfg = compose_cfg("eval", ["model=tiny", "reward=random", "data=jsonl", "data.val.size=4", "trainer=cpu",
                               "module.validation.samples_per_problem=2", "module.validation.max_new_tokens=8"],
                      tmp_path)
    result = evaluate(cfg)
    assert 0.0 <= result["metrics"]["val/avg@2"] <= 1.0


def test_progress_bar_off_drops_the_bar_callback_instead_of_failing(tmp_path):
    from lightning.pytorch.callbacks import ProgressBar

    from prerl.train import build

    cfg = compose_cfg("train", ["experiment=smoke", "trainer.enable_progress_bar=false", "logger=csv"], tmp_path)
    _, _, trainer = build(cfg)
    assert not any(isinstance(c, ProgressBar) for c in trainer.callbacks)
    cfg = compose_cfg("train", ["experiment=smoke", "logger=csv"], tmp_path)
    assert any(isinstance(c, ProgressBar) for c in build(cfg)[2].callbacks)  # on by default
