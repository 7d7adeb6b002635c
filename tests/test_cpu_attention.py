"""The bf16 attention SignRound uses on CPUs with fast bf16 agrees with torch's SDPA (to bf16
precision) in every form transformers calls it, and the routing falls back and restores cleanly."""
import pytest
import torch
import torch.nn.functional as F

from lowbit.algorithms import cpu_attention
from lowbit.algorithms.cpu_attention import attention, bf16_attention


def qkv(b, h, hk, length, s, d, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(b, h, length, d, generator=gen), torch.randn(b, hk, s, d, generator=gen),
            torch.randn(b, hk, s, d, generator=gen))


@pytest.mark.parametrize("h,hk", [(8, 8), (8, 4), (6, 2)])
@pytest.mark.parametrize("length,s", [(256, 256), (100, 100), (7, 9), (9, 7)])
@pytest.mark.parametrize("causal", [False, True])
def test_matches_sdpa(h, hk, length, s, causal):
    q, k, v = qkv(2, h, hk, length, s, 16)
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=causal, enable_gqa=True)
    out = attention(q, k, v, is_causal=causal)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    assert (out.double() - ref).abs().max() < 0.05  # bf16 inputs: ~3 significant digits


def test_masks_and_scale():
    q, k, v = qkv(2, 8, 4, 12, 12, 16)
    keep = torch.rand(2, 1, 12, 12, generator=torch.Generator().manual_seed(1)) > 0.3
    keep[..., 0] = True
    additive = torch.randn(1, 8, 12, 12)
    for mask in (keep, additive):
        ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3, enable_gqa=True)
        assert (attention(q, k, v, mask, scale=0.3) - ref).abs().max() < 0.05


def test_gradients_match_sdpa():
    q, k, v = qkv(2, 8, 4, 256, 256, 16)
    grads = []
    for fn in (lambda *t: F.scaled_dot_product_attention(*t, is_causal=True, enable_gqa=True),
               lambda *t: attention(*t, is_causal=True)):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        fn(*leaves).pow(2).sum().backward()
        grads.append([t.grad for t in leaves])
    for a, b in zip(*grads):
        assert (a - b).norm() < 0.02 * b.norm()


def _tiny_llama(attn="sdpa"):
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    cfg._attn_implementation = attn
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


def test_block_routing_falls_back_and_restores(monkeypatch):
    """Within bf16_attention(block) the block's sdpa attention runs `attention`; nothing global
    changes (torch's function, other models), the config comes back on exit and on errors, and
    what the plain matmuls do not take goes to transformers' SDPA."""
    sdpa = F.scaled_dot_product_attention
    model, other = _tiny_llama(), _tiny_llama()
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids).logits
        with bf16_attention(model.model.layers[0]):
            assert model.config._attn_implementation == cpu_attention.ATTENTION_NAME
            assert other.config._attn_implementation == "sdpa"
            assert F.scaled_dot_product_attention is sdpa
            routed = model(ids).logits
            monkeypatch.setattr(cpu_attention, "MAX_SCORES", 10)  # too many scores: transformers' SDPA
            big = model(ids).logits
        assert model.config._attn_implementation == "sdpa"
        assert not torch.equal(routed, ref) and (routed - ref).abs().max() < 0.05 * ref.abs().max()
        assert torch.equal(big, ref)
        with pytest.raises(RuntimeError), bf16_attention(model.model.layers[0]):
            raise RuntimeError("restored on errors too")
        assert model.config._attn_implementation == "sdpa"


def test_block_routing_leaves_eager_alone():
    model = _tiny_llama("eager")
    with bf16_attention(model.model.layers[0]):
        assert model.config._attn_implementation == "eager"
