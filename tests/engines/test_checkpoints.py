"""Model sources (docs/ARCHITECTURE.md §3): official Orthrus checkpoints, plain base checkpoints, an Orthrus head
stored apart, and the mask-token choice. Weights must land exactly where the official names say."""

import json
import shutil
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from support.tiny_models import hf_greedy, hf_model, write_base, write_orthrus

from orthrus_engines import LLM, SamplingParams
from orthrus_engines.engine.sequence import Sequence
from orthrus_engines.models.heads import save_head, twin_state_dict
from orthrus_engines.models.loader import DEFAULT_BLOCK_SIZE, choose_mask_token

VOCAB = 96
SEED = 21
PROMPT = [3, 14, 15, 92, 65, 35, 89, 79, 32, 38, 46, 26]
VARIANTS = {  # id -> (family, write kwargs)
    "llama": ("llama", {}),
    "qwen3": ("qwen3", {}),
    "llama_tied": ("llama", {"tie": True}),
}


@pytest.fixture(scope="module", params=list(VARIANTS))
def orthrus(request, tmp_path_factory):
    family, kw = VARIANTS[request.param]
    d = write_orthrus(tmp_path_factory.mktemp(request.param) / "m", family, seed=SEED, twin_noise=0.1, **kw)
    return family, d, kw


def ar_logits(llm: LLM, prompt: list[int]) -> torch.Tensor:
    """The engine's AR-view logits at every prompt position (one verify pass from position 0)."""
    eng = llm.core
    seq = Sequence("probe", prompt, SamplingParams(), 1, None)
    assert eng.pages.ensure(seq, len(prompt))
    try:
        return eng.runner.verify([seq], [prompt])
    finally:
        eng.pages.free_all(seq)


def draft_logits(llm: LLM, prompt: list[int], k: int) -> torch.Tensor:
    """The engine's diffusion-view logits for the block after `prompt` (prefill, then one draft)."""
    eng = llm.core
    seq = Sequence("probe", prompt, SamplingParams(), k, None)
    assert eng.pages.ensure(seq, len(prompt) + k)
    try:
        eng.runner.prefill([seq], [len(prompt) - 1])
        seq.num_cached = len(prompt) - 1
        return eng.runner.draft([seq], [k])
    finally:
        eng.pages.free_all(seq)


def file_tensors(d) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out |= load_file(str(f))
    return out


def strip_to_base(src, dst):
    """A copy of an Orthrus checkpoint without the twins and the Orthrus config fields."""
    dst.mkdir()
    tensors = {k: v for k, v in load_file(str(src / "model.safetensors")).items() if "_diff." not in k}
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    raw = json.loads((src / "config.json").read_text())
    raw["model_type"] = raw.pop("base_model_type")
    for k in ("block_size", "mask_token_id"):
        raw.pop(k)
    (dst / "config.json").write_text(json.dumps(raw))
    return dst


# -- official checkpoints ----------------------------------------------------------------------


def test_official_checkpoint_ar_logits_match_hf(orthrus):
    """AR logits of the loaded checkpoint equal those of the HF model built from the same files."""
    family, d, _ = orthrus
    llm = LLM(model=str(d), num_pages=8)
    with torch.no_grad():
        ref = hf_model(d, family)(torch.tensor([PROMPT])).logits[0]
    got = ar_logits(llm, PROMPT)
    assert got.shape == ref.shape == (len(PROMPT), VOCAB)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    assert llm.core.source.has_twins
    assert llm.core.block_size == 8 and llm.core.source.mask_token_id == VOCAB - 1  # from config.json


def test_every_twin_tensor_lands_in_the_model(orthrus):
    """twin_state_dict(model) has exactly the checkpoint's *_diff names and values; the AR view holds
    the AR tensors, not the twins."""
    family, d, _ = orthrus
    model = LLM(model=str(d), num_pages=8).core.runner.model
    tensors = file_tensors(d)
    twins = {k: v for k, v in tensors.items() if "_diff." in k}
    expected_parts = {"q_proj", "k_proj", "v_proj", "o_proj"} | ({"q_norm", "k_norm"} if family == "qwen3" else set())
    assert {k.split(".")[-2].removesuffix("_diff") for k in twins} == expected_parts
    got = twin_state_dict(model)
    assert set(got) == set(twins)
    for name, t in twins.items():
        assert torch.equal(got[name], t), name
    for i, layer in enumerate(model.layers):
        pre = f"model.layers.{i}.self_attn."
        qkv = torch.cat([tensors[pre + f"{p}_proj.weight"] for p in "qkv"])
        assert torch.equal(layer.self_attn.ar.qkv.weight.detach().cpu(), qkv)
        assert torch.equal(layer.self_attn.ar.o.weight.detach().cpu(), tensors[pre + "o_proj.weight"])
        assert not torch.equal(layer.self_attn.diff.o.weight, layer.self_attn.ar.o.weight)


def test_sharded_checkpoint_loads_the_same(orthrus, tmp_path):
    """The same checkpoint split over two safetensors shards (with an index) loads identically."""
    family, d, _ = orthrus
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    shutil.copy(d / "config.json", sharded / "config.json")
    tensors = load_file(str(d / "model.safetensors"))
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for fname, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, str(sharded / fname), metadata={"format": "pt"})
        weight_map |= {k: fname for k in keys}
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    a, b = LLM(model=str(d), num_pages=8), LLM(model=str(sharded), num_pages=8)
    assert torch.equal(ar_logits(a, PROMPT), ar_logits(b, PROMPT))
    assert torch.equal(draft_logits(a, PROMPT, 8), draft_logits(b, PROMPT, 8))


def test_twins_change_the_draft_not_the_ar_view(orthrus, tmp_path):
    """Twins (AR + noise) give other draft logits than twins copied from the AR view, and the same
    AR logits."""
    family, d, _ = orthrus
    full, base = LLM(model=str(d), num_pages=8), LLM(model=str(strip_to_base(d, tmp_path / "base")), num_pages=8)
    assert torch.equal(ar_logits(full, PROMPT), ar_logits(base, PROMPT))
    assert not torch.allclose(draft_logits(full, PROMPT, 8), draft_logits(base, PROMPT, 8), atol=1e-3)


# -- head stored apart -------------------------------------------------------------------------


def test_head_stored_apart_equals_full_checkpoint(orthrus, tmp_path):
    """save_head + LLM(model=base, head=...) reproduces the full checkpoint: twins, draft logits,
    greedy and sampled outputs, and the speculative counters."""
    family, d, kw = orthrus
    full = LLM(model=str(d), num_pages=64, block_size=8)  # fixed K: the counters are deterministic
    src = full.core.source
    head = tmp_path / "head.safetensors"
    save_head(full.core.runner.model, head, src.block_size, src.mask_token_id)
    with safe_open(str(head), "pt") as st:
        assert all("_diff." in k for k in st.keys())  # only the twins are stored
    base_dir = write_base(tmp_path / "base", family, seed=SEED, **kw)  # the same base weights, written afresh
    apart = LLM(model=str(base_dir), head=str(head), num_pages=64, block_size=8)
    assert apart.core.block_size == full.core.block_size
    assert apart.core.source.mask_token_id == src.mask_token_id
    a, b = twin_state_dict(full.core.runner.model), twin_state_dict(apart.core.runner.model)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(draft_logits(full, PROMPT, 8), draft_logits(apart, PROMPT, 8))
    prompts = [PROMPT, PROMPT[:5], [7] * 9]
    for sp in (SamplingParams(max_tokens=24), SamplingParams(max_tokens=24, temperature=1.0, seed=3)):
        for x, y in zip(full.generate(prompts, sp), apart.generate(prompts, sp)):
            assert x.token_ids == y.token_ids
            assert (x.forward_passes, x.drafted_tokens, x.accepted_tokens) == (
                y.forward_passes, y.drafted_tokens, y.accepted_tokens)


def test_head_metadata_sets_block_size_and_mask(orthrus, tmp_path):
    """block_size and mask_token_id recorded in the head file override the base's defaults."""
    family, d, _ = orthrus
    head = tmp_path / "head.safetensors"
    save_head(LLM(model=str(d), num_pages=8).core.runner.model, head, block_size=4, mask_token_id=5)
    eng = LLM(model=str(strip_to_base(d, tmp_path / "base")), head=str(head), num_pages=8).core
    assert eng.block_size == 4
    assert eng.source.mask_token_id == 5 and eng.runner.mask_token_id == 5


# -- plain base checkpoints --------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_plain_base_gets_ar_twins_and_a_mask_token(tmp_path, family):
    """A base checkpoint: twins are copies of the AR weights, a mask token and the default K are
    recorded, and greedy decoding equals the HF oracle."""
    d = write_base(tmp_path / "base", family, seed=22)
    llm = LLM(model=str(d), num_pages=16)
    src = llm.core.source
    assert not src.has_twins
    assert src.mask_token_id == VOCAB - 1  # no tokenizer: the last id
    assert llm.core.runner.mask_token_id == src.mask_token_id
    assert llm.core.block_size == DEFAULT_BLOCK_SIZE
    tensors = file_tensors(d)
    twins = twin_state_dict(llm.core.runner.model)
    assert twins
    for name, t in twins.items():
        assert torch.equal(t, tensors[name.replace("_diff.", ".")]), name
    out = llm.generate(PROMPT, SamplingParams(max_tokens=16))[0]
    assert out.token_ids == hf_greedy(hf_model(d, family), PROMPT, 16)


# -- the mask token ----------------------------------------------------------------------------


def fake_tokenizer(n: int, added: dict[int, str], template: str = "", **special):
    tok = SimpleNamespace(
        added_tokens_decoder={i: SimpleNamespace(content=c, special=True) for i, c in added.items()},
        chat_template=template,
        **({"bos_token_id": None, "eos_token_id": None, "pad_token_id": None, "unk_token_id": None} | special),
    )
    return type("Tok", (), {"__len__": lambda self: n, "__getattr__": lambda self, a: getattr(tok, a)})()


def test_choose_mask_token_rules():
    """Padded embedding row first; else the highest special token that is neither BOS/EOS/PAD/UNK nor
    in the chat template; else the last id."""
    assert choose_mask_token(100, None) == 99
    assert choose_mask_token(100, fake_tokenizer(90, {0: "<s>"})) == 90  # padded rows 90..99
    added = {0: "<s>", 1: "</s>", 2: "<|im_start|>", 3: "<unused>", 4: "<|im_end|>"}
    tok = fake_tokenizer(100, added, template="<|im_start|>{{m}}<|im_end|>", bos_token_id=0, eos_token_id=1)
    assert choose_mask_token(100, tok) == 3
    tok = fake_tokenizer(100, {0: "<s>", 1: "</s>"}, bos_token_id=0, eos_token_id=1)
    assert choose_mask_token(100, tok) == 99


@pytest.mark.slow
def test_builtin_mask_token_is_an_unused_special_token(builtin_dir):
    """For the built-in SmolLM2 tokenizer the mask is a special token that is not BOS/EOS/PAD/UNK,
    not in the chat template, and never produced by chat formatting of ordinary text."""
    from transformers import AutoTokenizer

    from orthrus_engines.models.loader import resolve_model

    tok = AutoTokenizer.from_pretrained(str(builtin_dir))
    vocab_size = json.loads((builtin_dir / "config.json").read_text())["vocab_size"]
    m = choose_mask_token(vocab_size, tok)
    assert 0 <= m < vocab_size
    assert m in tok.added_tokens_decoder and tok.added_tokens_decoder[m].special
    assert m not in {tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id}
    assert tok.added_tokens_decoder[m].content not in tok.chat_template
    conv = [{"role": "user", "content": "Hello there, how are you?"}]
    chat = tok.apply_chat_template(conv, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    assert m not in chat
    assert m not in tok("A plain sentence with some words, numbers 123 and symbols <>!")["input_ids"]
    assert resolve_model(builtin_dir, None, tok).mask_token_id == m
