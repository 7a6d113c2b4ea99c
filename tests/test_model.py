"""The answer-only fast path against the full model and against PEFT; model loading errors."""

import pytest
import torch

from ptray.data.batching import collate
from ptray.errors import PtrayError
from ptray.lm.forward import answer_logprobs
from ptray.lm.load import load_model


def _random_seqs(gen, vocab, n, eos):
    seqs = []
    for _ in range(n):
        src = torch.randint(4, vocab, (int(torch.randint(3, 12, (1,), generator=gen)),), generator=gen).tolist()
        ans = torch.randint(4, vocab, (int(torch.randint(1, 4, (1,), generator=gen)),), generator=gen).tolist()
        seqs.append((src, ans))
    return seqs


def _full_reference(model, seqs, prompt, eos):
    """Per sequence, no padding: full logits over every position, log-probs of the answer tokens + EOS."""
    out = []
    emb = model.get_input_embeddings()
    for src, ans in seqs:
        ids = torch.tensor([src + ans])
        x = emb(ids)
        if prompt is not None:
            x = torch.cat([prompt.unsqueeze(0), x], dim=1)
        logits = model(inputs_embeds=x).logits[0].float()
        n = 0 if prompt is None else prompt.shape[0]
        pos = torch.arange(len(src) - 1, len(src) + len(ans)) + n
        tgt = torch.tensor(ans + [eos])
        out.append(torch.log_softmax(logits[pos], -1).gather(1, tgt[:, None]).squeeze(1))
    return torch.cat(out)


@pytest.mark.parametrize("with_prompt", [False, True])
def test_answer_logprobs_equal_full_logits(tiny, with_prompt):
    model, tok = tiny
    gen = torch.Generator().manual_seed(1)
    seqs = _random_seqs(gen, len(tok), 6, tok.eos_token_id)
    prompt = torch.randn(5, model.config.hidden_size, generator=gen) * 0.3 if with_prompt else None
    batch = collate(seqs, tok.pad_token_id, tok.eos_token_id)
    assert batch.input_ids.shape[0] == 6 and (batch.attention_mask.sum(1) < batch.input_ids.shape[1]).any()
    with torch.no_grad():
        fast, ok = answer_logprobs(model, batch, prompt)
        ref = _full_reference(model, seqs, prompt, tok.eos_token_id)
    torch.testing.assert_close(fast, ref, atol=2e-5, rtol=1e-5)
    assert ok.dtype == torch.bool and ok.shape == fast.shape


def test_missing_model_path(tmp_path):
    with pytest.raises(PtrayError, match=r"model path '.*/nope' does not exist; pass --model"):
        load_model(str(tmp_path / "nope"))


def test_folder_without_config(tmp_path):
    with pytest.raises(PtrayError, match="has no config.json"):
        load_model(str(tmp_path))


def test_hub_unreachable_is_one_clear_error(monkeypatch):
    import ptray.lm.load

    monkeypatch.setattr(ptray.lm.load, "_hub_reachable", lambda timeout=3.0: False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(PtrayError, match=r"cannot reach the Hugging Face Hub to download 'someorg/some-model-x'.*"
                                         r"pass --model DIR"):
        load_model("someorg/some-model-x")


def test_model_is_frozen(tiny):
    model, _ = tiny
    assert not any(p.requires_grad for p in model.parameters()) and not model.training
