"""Packed sequences and the KV cache in `CausalLM.forward` (CPU, fp32).

A row holding several documents (segment_ids, positions restarting at 0) must
give each document exactly the logits and loss it gets alone; a KV-cached
forward, fed in chunks, must give the logits of one full forward.
"""
import pytest
import torch

from moedist.data.batch import IGNORE

V = 256
DOC_LENS = [(5, 7, 4), (9, 6)]  # documents packed into row 0 / row 1 (row 1 gets 1 padding token)
S = 16

MODELS = {
    "dense": {"model": {"moe_every": 0, "num_kv_heads": 2}},
    "moe_dropless": {"model": {"num_kv_heads": 2}, "moe": {"num_experts": 4, "top_k": 2, "capacity_factor": None}},
    "lora_moe": {"model": {"qk_norm": True}, "moe": {"num_experts": 4, "top_k": 2, "capacity_factor": None},
                 "lora": {"mode": "moe_lora", "rank": 4}},
}


def make_model(kind: str, seed: int = 0):
    """A small model of `kind`, every weight perturbed (LoRA B included, so adapters matter)."""
    from moedist.config import config_from_dict
    from moedist.models import build_model

    raw = {"model": {"hidden_size": 32, "num_layers": 2, "num_heads": 4, "ffn_size": 48, "max_seq_len": 32},
           "data": {"seq_len": 32}}
    for section, values in MODELS[kind].items():
        raw.setdefault(section, {}).update(values)
    model = build_model(config_from_dict(raw))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


def doc_tokens(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, V, (n,), generator=torch.Generator().manual_seed(seed))


def shifted_labels(ids: torch.Tensor) -> torch.Tensor:
    """Next-token targets inside one document; its last token predicts nothing."""
    return torch.cat([ids[1:], torch.tensor([IGNORE])])


def packed_batch():
    """(input_ids, labels, position_ids, segment_ids [2, S], docs [(row, start, ids)])."""
    ids = torch.zeros(2, S, dtype=torch.long)
    labels = torch.full((2, S), IGNORE)
    pos = torch.zeros(2, S, dtype=torch.long)
    seg = torch.full((2, S), -1)  # padding: its own segment
    docs = []
    for row, lens in enumerate(DOC_LENS):
        start = 0
        for j, n in enumerate(lens):
            t = doc_tokens(n, seed=10 * row + j)
            ids[row, start:start + n], labels[row, start:start + n] = t, shifted_labels(t)
            pos[row, start:start + n], seg[row, start:start + n] = torch.arange(n), j
            docs.append((row, start, t))
            start += n
    return ids, labels, pos, seg, docs


@pytest.mark.parametrize("kind", list(MODELS))
def test_packed_documents_equal_documents_alone(kind):
    model = make_model(kind)
    ids, labels, pos, seg, docs = packed_batch()
    with torch.no_grad():
        out = model(ids, labels, position_ids=pos, segment_ids=seg)
        total_sum, total_n = 0.0, 0
        for row, start, t in docs:
            alone = model(t[None], shifted_labels(t)[None])
            n = len(t)
            torch.testing.assert_close(out.logits[row, start:start + n], alone.logits[0], atol=1e-5, rtol=0)
            part = model(ids[row:row + 1, start:start + n], labels[row:row + 1, start:start + n],
                         position_ids=pos[row:row + 1, start:start + n])
            torch.testing.assert_close(part.lm_loss, alone.lm_loss, atol=1e-5, rtol=0)
            total_sum += float(alone.lm_loss_sum)
            total_n += int(alone.num_loss_tokens)
        assert out.num_loss_tokens.dtype == torch.int64 and out.num_loss_tokens.dim() == 0
        assert int(out.num_loss_tokens) == total_n == sum(n - 1 for lens in DOC_LENS for n in lens)
        torch.testing.assert_close(float(out.lm_loss_sum), total_sum, atol=1e-4, rtol=1e-6)
        torch.testing.assert_close(out.lm_loss, out.lm_loss_sum / total_n, atol=1e-6, rtol=0)
        # the test has teeth: without the segment mask a later document sees the earlier ones
        row, start, t = docs[1]
        leaky = model(ids, labels, position_ids=pos).logits[row, start:start + len(t)]
        assert (leaky - out.logits[row, start:start + len(t)]).abs().max() > 1e-3


@pytest.mark.parametrize("kind", list(MODELS))
def test_kv_cache_matches_full_forward(kind):
    from moedist.models.llama import KVCache

    model = make_model(kind, seed=1)
    ids = torch.randint(0, V, (2, 14), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model(ids).logits  # [2, 14, V]
        cache = KVCache(len(model.layers))
        chunks = [model(ids[:, :5], cache=cache).logits]   # prefill
        chunks.append(model(ids[:, 5:9], cache=cache).logits)  # several new tokens after a past: explicit mask
        for i in range(9, 14):                                 # one token at a time
            chunks.append(model(ids[:, i:i + 1], cache=cache).logits)
        assert cache.past_len == 14 and cache.layers[0].k.shape[2] == 14
    torch.testing.assert_close(torch.cat(chunks, dim=1), full, atol=1e-5, rtol=0)


def test_explicit_positions_equal_default_and_limits():
    from moedist.models.llama import KVCache

    model = make_model("dense")
    ids = torch.randint(0, V, (2, 8), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = model(ids).logits
        pos = torch.arange(8).expand(2, 8)
        torch.testing.assert_close(model(ids, position_ids=pos).logits, ref, atol=1e-6, rtol=0)
        torch.testing.assert_close(model(ids, segment_ids=torch.zeros(2, 8, dtype=torch.long)).logits, ref,
                                   atol=1e-6, rtol=0)
        shifted = model(ids, position_ids=pos + torch.tensor([[3], [0]])).logits  # per-row offsets
        spread = model(ids, position_ids=pos * 2).logits
        cache = KVCache(len(model.layers))
        model(torch.zeros(2, 28, dtype=torch.long), cache=cache)
        with pytest.raises(ValueError, match="max_seq_len"):
            model(ids[:, :5], cache=cache)
    torch.testing.assert_close(shifted, ref, atol=1e-4, rtol=0)  # RoPE sees relative positions only
    assert (spread - ref).abs().max() > 1e-3                      # ... and those are the given ones
    with pytest.raises(ValueError, match="segment_ids"):
        model(ids[:, :1], segment_ids=torch.zeros(2, 1, dtype=torch.long), cache=cache)


@pytest.mark.parametrize("kind", ["dense", "moe_dropless"])
def test_masked_labels_and_no_counted_tokens(kind):
    model = make_model(kind).train()
    ids = torch.randint(0, V, (2, 10), generator=torch.Generator().manual_seed(5))
    labels = ids.roll(-1, dims=1)
    labels[:, :4] = IGNORE   # a prompt
    labels[1, 7:] = IGNORE
    out = model(ids, labels)
    counted = labels != IGNORE
    ref = torch.nn.functional.cross_entropy(out.logits[counted].float(), labels[counted])
    assert int(out.num_loss_tokens) == int(counted.sum()) == 9
    torch.testing.assert_close(out.lm_loss, ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(out.lm_loss_sum, ref * 9, atol=1e-5, rtol=0)
    assert out.lm_loss_sum.dtype == torch.float32

    none = model(ids, torch.full_like(ids, IGNORE))
    assert int(none.num_loss_tokens) == 0 and none.num_loss_tokens.dtype == torch.int64
    assert none.lm_loss.item() == 0.0 and none.lm_loss_sum.item() == 0.0
    assert torch.isfinite(none.loss) and none.lm_loss.requires_grad
    none.lm_loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() and not g.any() for g in grads)
