"""The real engine's model against HF transformers on CPU (fp32, random weights, tiny shapes).

Covers packed prefill, paged decode over scattered blocks, chunked prefill over a cached prefix,
the attention/FFN halves, and the checkpoint loader (both directions: export to HF, load HF's files).
"""
from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from policies.specs import model_spec  # noqa: E402
from real.model import Qwen3ForCausalLM  # noqa: E402
from real.model_config import ModelConfig  # noqa: E402
from real.testing import decode_batch, make_kv_cache, prefill_batch, scattered_block_tables  # noqa: E402
from real.weights import export_hf_state_dict, init_random_weights, load_checkpoint  # noqa: E402

BLOCK_SIZE = 16
NUM_BLOCKS = 64
REL_TOL = 1e-4

QWEN2_SMALL = ModelConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=8,
                          num_key_value_heads=2, head_dim=8, vocab_size=300, max_position_embeddings=512,
                          rope_theta=10000.0, tie_word_embeddings=False, attention_bias=True, qk_norm=False,
                          name="qwen2-small", model_type="qwen2")


def assert_rel_close(ours: torch.Tensor, ref: torch.Tensor, tol: float = REL_TOL):
    err = ((ours.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
    assert err < tol, f"relative error {err:.2e} >= {tol:.0e}"


def _perturb_norms_and_biases(model: torch.nn.Module, seed: int):
    """init leaves norms at 1 and biases at 0; make them matter so the comparison sees them."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn(p.shape, generator=gen))


def _hf_class(config: ModelConfig):
    return transformers.Qwen3ForCausalLM if config.model_type == "qwen3" else transformers.Qwen2ForCausalLM


@pytest.fixture(scope="module", params=["tiny", "qwen2-small"])
def pair(request):
    """(ours, hf) with identical fp32 weights, ours exported into HF's names."""
    torch.manual_seed(0)
    config = ModelConfig.from_spec(model_spec("tiny")) if request.param == "tiny" else QWEN2_SMALL
    ours = init_random_weights(Qwen3ForCausalLM(config, backend="torch"), seed=1)
    _perturb_norms_and_biases(ours, seed=2)
    hf = _hf_class(config)(config.to_hf_config()).eval()
    hf.load_state_dict(export_hf_state_dict(ours), strict=True)
    return ours.eval(), hf


def _hf_logits(hf, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf(torch.tensor([tokens])).logits[0].float()


def _prompts(vocab: int, lens: list[int], seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in lens]


@torch.no_grad()
def test_packed_prefill_matches_hf(pair):
    ours, hf = pair
    prompts = _prompts(ours.config.vocab_size, [7, 19, 33])
    meta, positions = prefill_batch([len(p) for p in prompts])
    logits = ours.compute_logits(ours(torch.tensor(sum(prompts, [])), positions, meta))
    start = 0
    for p in prompts:
        assert_rel_close(logits[start:start + len(p)], _hf_logits(hf, p))
        start += len(p)


@torch.no_grad()
def test_paged_decode_matches_hf(pair):
    ours, hf = pair
    steps = 10
    prompts = _prompts(ours.config.vocab_size, [7, 14, 30], seed=1)
    tables = scattered_block_tables([len(p) + steps for p in prompts], BLOCK_SIZE, NUM_BLOCKS, seed=3)
    assert any(t[1] != t[0] + 1 for t in tables if len(t) > 1), "block tables should be scattered"
    ours.set_kv_cache(make_kv_cache(ours.config, NUM_BLOCKS, BLOCK_SIZE))
    meta, positions = prefill_batch([len(p) for p in prompts], block_tables=tables, block_size=BLOCK_SIZE)
    hidden = ours(torch.tensor(sum(prompts, [])), positions, meta)
    last_rows = torch.tensor([len(p) for p in prompts]).cumsum(0) - 1
    next_tokens = ours.compute_logits(hidden[last_rows]).argmax(-1).tolist()
    seqs = [list(p) for p in prompts]
    for _ in range(steps):
        for s, t in zip(seqs, next_tokens):
            s.append(t)
        # a padded CUDA-graph-style batch: one extra entry with context 0 and slot -1
        meta, positions = decode_batch([len(s) for s in seqs], tables, BLOCK_SIZE, pad_to=len(seqs) + 1)
        logits = ours.compute_logits(ours(torch.tensor(next_tokens + [0]), positions, meta))
        assert torch.isfinite(logits).all()
        for i, s in enumerate(seqs):
            assert_rel_close(logits[i], _hf_logits(hf, s)[-1])
        next_tokens = logits[:len(seqs)].argmax(-1).tolist()
    ours.set_kv_cache(make_kv_cache(ours.config, NUM_BLOCKS, BLOCK_SIZE))  # leave the fixture clean


@torch.no_grad()
def test_chunked_prefill_matches_hf(pair):
    ours, hf = pair
    long, short = _prompts(ours.config.vocab_size, [40, 9], seed=2)
    first = 23
    tables = scattered_block_tables([len(long), len(short)], BLOCK_SIZE, NUM_BLOCKS, seed=4)
    ours.set_kv_cache(make_kv_cache(ours.config, NUM_BLOCKS, BLOCK_SIZE))
    meta, positions = prefill_batch([first], block_tables=tables[:1], block_size=BLOCK_SIZE)
    ours(torch.tensor(long[:first]), positions, meta)
    # chunk 2 of the long prompt over its cached prefix, batched with a fresh short prompt
    meta, positions = prefill_batch([len(long) - first, len(short)], cached_lens=[first, 0],
                                    block_tables=tables, block_size=BLOCK_SIZE)
    assert meta.has_prefix
    logits = ours.compute_logits(ours(torch.tensor(long[first:] + short), positions, meta))
    assert_rel_close(logits[:len(long) - first], _hf_logits(hf, long)[first:])
    assert_rel_close(logits[len(long) - first:], _hf_logits(hf, short))


@torch.no_grad()
def test_halves_compose_to_the_layer_and_match_hf(pair):
    ours, hf = pair
    (prompt,) = _prompts(ours.config.vocab_size, [21], seed=3)
    ids = torch.tensor(prompt)
    meta, positions = prefill_batch([len(prompt)])
    hf_hidden = hf(ids[None], output_hidden_states=True).hidden_states
    hidden, residual = ours.embed_tokens(ids), None
    for i, layer in enumerate(ours.layers):
        whole = layer(positions, hidden, residual, meta)
        h, r = layer.attention_half(positions, hidden, residual, meta)
        hidden, residual = layer.ffn_half(h, r)
        assert torch.equal(hidden, whole[0]) and torch.equal(residual, whole[1])
        if i < len(ours.layers) - 1:  # HF's last entry is after the final norm
            assert_rel_close(hidden + residual, hf_hidden[i + 1][0])
    final, _ = ours.norm(hidden, residual)
    assert torch.equal(final, ours(ids, positions, meta))
    assert_rel_close(final, hf_hidden[-1][0])


@pytest.mark.parametrize("config", [ModelConfig.from_spec(model_spec("tiny")), QWEN2_SMALL], ids=lambda c: c.name)
def test_load_checkpoint_from_hf_files(tmp_path, config):
    """HF writes a (sharded) checkpoint of its own random weights; we read config.json and the shards."""
    torch.manual_seed(5)
    hf = _hf_class(config)(config.to_hf_config()).eval()
    with torch.no_grad():  # HF's init leaves norms at 1 and biases at 0: randomise everything
        for p in hf.parameters():
            p.normal_(0.0, 0.05)
    hf.save_pretrained(tmp_path, max_shard_size="100KB")
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    loaded = ModelConfig.from_checkpoint(tmp_path)
    assert (loaded.model_type, loaded.head_dim, loaded.attention_bias, loaded.qk_norm) == \
        (config.model_type, config.head_dim, config.attention_bias, config.qk_norm)
    ours = load_checkpoint(Qwen3ForCausalLM(loaded), tmp_path).eval()
    (prompt,) = _prompts(config.vocab_size, [18], seed=6)
    meta, positions = prefill_batch([len(prompt)])
    with torch.no_grad():
        logits = ours.compute_logits(ours(torch.tensor(prompt), positions, meta))
    assert_rel_close(logits, _hf_logits(hf, prompt))


def _save_small_checkpoint(tmp_path, config: ModelConfig):
    from safetensors.torch import save_file

    ours = init_random_weights(Qwen3ForCausalLM(config), seed=0)
    state = export_hf_state_dict(ours)
    (tmp_path / "config.json").write_text(json.dumps(config.to_hf_config().to_dict()))
    return state, save_file


def test_load_checkpoint_errors_are_clear(tmp_path):
    config = ModelConfig.from_spec(model_spec("tiny"))
    model = Qwen3ForCausalLM(config)
    with pytest.raises(FileNotFoundError, match="safetensors"):
        load_checkpoint(model, tmp_path)

    state, save_file = _save_small_checkpoint(tmp_path, config)
    name = "model.layers.1.self_attn.k_proj.weight"
    save_file({k: v for k, v in state.items() if k != name}, str(tmp_path / "model.safetensors"))
    with pytest.raises(KeyError, match=name.replace(".", r"\.")):
        load_checkpoint(model, tmp_path)

    state[name] = torch.zeros(3, config.hidden_size)
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"k_proj\.weight.*\(3, 64\).*\(32, 64\)"):
        load_checkpoint(model, tmp_path)


def test_config_from_hf_dict():
    base = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=100, max_position_embeddings=256, rms_norm_eps=1e-6)
    c = ModelConfig.from_hf_dict({**base, "model_type": "qwen2", "rope_theta": 5e5, "eos_token_id": 7})
    assert (c.head_dim, c.attention_bias, c.o_proj_bias, c.qk_norm, c.rope_theta, c.eos_token_id) == \
        (16, True, False, False, 5e5, 7)
    c = ModelConfig.from_hf_dict({**base, "model_type": "qwen3", "head_dim": 32,
                                  "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}})
    assert (c.head_dim, c.attention_bias, c.qk_norm, c.rope_theta) == (32, False, True, 1e6)
    c = ModelConfig.from_hf_dict({**base, "model_type": "llama", "eos_token_id": [5, 6]})
    assert (c.qk_norm, c.eos_token_id) == (False, 5)
    with pytest.raises(ValueError, match=r"'mistral'.*qwen3, qwen2, llama"):
        ModelConfig.from_hf_dict({**base, "model_type": "mistral"})
    with pytest.raises(ValueError, match="llama3"):
        ModelConfig.from_hf_dict({**base, "model_type": "llama", "rope_scaling": {"rope_type": "llama3"}})


def test_random_init_is_deterministic():
    config = ModelConfig.from_spec(model_spec("tiny"))
    a, b, c = (init_random_weights(Qwen3ForCausalLM(config), seed=s) for s in (3, 3, 4))
    for (name, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb), name
        if "norm" not in name:
            assert not torch.equal(pa, pc), name
    assert a.lm_head.weight is a.embed_tokens.weight  # tiny ties its embeddings
    std = a.layers[0].mlp.gate_up_proj.weight.std().item()
    assert 0.018 < std < 0.022


def test_set_kv_cache_checks_shape():
    config = ModelConfig.from_spec(model_spec("tiny"))
    model = Qwen3ForCausalLM(config)
    with pytest.raises(ValueError, match="kv cache shape"):
        model.set_kv_cache(torch.zeros(2, 3, 4, 16, config.num_key_value_heads, config.head_dim))
    kv = make_kv_cache(config, 4, 16)
    model.set_kv_cache(kv)
    assert model.layers[1].self_attn.attn.v_cache.data_ptr() == kv[1, 1].data_ptr()


@pytest.mark.parametrize("kernels", ["triton", "compile"])
def test_fused_get_keeps_cpu_eager_whatever_the_kernels(kernels):
    """CPU must match HF bit for bit: the eager functions themselves, even inside graph capture's flag."""
    from real.model import Fused, add_rms_norm, qk_norm_rope, rms_norm, rope, silu_mul

    x = torch.zeros(Fused.eager_min_tokens, 8)
    saved = Fused.kernels, Fused.in_graph
    try:
        for in_graph in (False, True):
            Fused.kernels, Fused.in_graph = kernels, in_graph
            for fn in (rms_norm, add_rms_norm, silu_mul, qk_norm_rope, rope):
                assert Fused.get(fn, x) is fn
    finally:
        Fused.kernels, Fused.in_graph = saved
