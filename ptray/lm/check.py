"""The load-time check of a model outside the tested families: ptray's own paths against the model's forward.

``ptray.lm.families`` knows the tested families; any other ``model_type`` is run here through the same equality
checks ``tests/test_families.py`` runs on the tested ones, on a few random inputs, once, when ``load_model`` loads it.
It is refused with a one-line ``PtrayError`` naming the failed check, or accepted (its ``Family`` kept on the model
object) with the shared source pass only if that check passed too.
"""

from __future__ import annotations

import torch

from ptray.data.batching import Encoded, collate
from ptray.errors import PtrayError
from ptray.lm.evaluate import evaluate
from ptray.lm.families import CHECKED, FAMILIES, Family, _accepts_position_ids, embed, embed_dim
from ptray.lm.forward import answer_logprobs


def check_model(model) -> Family:
    """The ``Family`` of ``model``: a tested family at once; an untested one after ``check_family`` (kept on the
    model, so later calls are free). Raises PtrayError in one line when the model fails a check or cannot run one."""
    known = FAMILIES.get(getattr(model.config, "model_type", None))
    if known is not None:
        return known
    cached = model.__dict__.get(CHECKED)
    if cached is None:
        try:
            cached = check_family(model)
        except PtrayError:
            raise
        except Exception as err:  # the model cannot even run ptray's way (e.g. no inputs_embeds): refuse it
            raise PtrayError(
                f"model type {getattr(model.config, 'model_type', None)!r} is not supported: ptray's checks could not "
                f"run it ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); supported families: "
                f"{', '.join(FAMILIES)}"
            ) from None
        model.__dict__[CHECKED] = cached
    return cached


def check_family(model, seed: int = 0) -> Family:
    """Run ptray's equality checks on an untested family, on a few random inputs; return its ``Family``.

    Checks, in order (the first failure raises PtrayError naming it): "input vectors" (the model on
    ``embed(ids)`` as ``inputs_embeds`` gives its logits on ``input_ids``), "logits at the answer positions"
    (``answer_logprobs`` with a prompt equals the model's own full forward), then "shared source" (the shared
    source pass equals one pass per label; a failure only turns that pass off).
    """
    model_type = getattr(model.config, "model_type", None)
    probe = Family(str(model_type), "ids" if _accepts_position_ids(model) else "mask", None, True, False)
    model.__dict__[CHECKED] = probe  # the checks below run ptray's paths with this family
    try:
        gen = torch.Generator().manual_seed(seed)
        vocab = model.get_input_embeddings().weight.shape[0]
        device = model.get_input_embeddings().weight.device
        dtype = model.get_input_embeddings().weight.dtype
        tol = 1e-3 if dtype == torch.float32 else 5e-2

        def rand_ids(lo, hi):
            return torch.randint(0, vocab, (int(torch.randint(lo, hi, (1,), generator=gen)),), generator=gen).tolist()

        def fail(check, detail):
            raise PtrayError(f"model type {model_type!r} is not supported: ptray's {check} differ from the model's "
                             f"own ({detail}); supported families: {', '.join(FAMILIES)}")

        ids = torch.tensor([rand_ids(4, 9)], device=device)
        with torch.no_grad():
            own = model(input_ids=ids).logits.float()
            ours = model(inputs_embeds=embed(model, ids)).logits.float()
        if not torch.allclose(own, ours, atol=tol, rtol=tol):
            fail("input vectors", f"max logit difference {(own - ours).abs().max().item():.3g}")

        seqs = [(rand_ids(2, 8), rand_ids(1, 3)) for _ in range(3)]
        prompt = torch.randn(3, embed_dim(model), generator=gen) * embed(model, ids).float().std().item()
        eos = int(torch.randint(0, vocab, (1,), generator=gen))
        batch = collate(seqs, 0, eos).to(device)
        with torch.no_grad():
            fast, _ = answer_logprobs(model, batch, prompt.to(device))
            ref = []
            for src, ans in seqs:
                x = embed(model, torch.tensor([src + ans], device=device))
                x = torch.cat([prompt.to(device, dtype)[None], x], 1)
                lp = model(inputs_embeds=x).logits[0].float().log_softmax(-1)
                pos = torch.arange(len(src) - 1, len(src) + len(ans), device=device) + 3
                ref.append(lp[pos].gather(1, torch.tensor(ans + [eos], device=device)[:, None]).squeeze(1))
            ref = torch.cat(ref)
        if not torch.allclose(fast, ref, atol=tol, rtol=tol):
            fail("logits at the answer positions",
                 f"max log-probability difference {(fast - ref).abs().max().item():.3g}")

        data = [Encoded(i, rand_ids(1, 12), (rand_ids(1, 3), rand_ids(1, 4)), i % 2) for i in range(5)]
        kw = dict(batch_size=4, pad_id=0, eos_id=eos)
        shares = True
        try:
            a = evaluate(model, data, prompt, share_source=False, **kw)
            b = evaluate(model, data, prompt, share_source=True, **kw)
            shares = abs(a.loss - b.loss) <= tol * max(1.0, abs(a.loss)) and a.em_correct == b.em_correct
        except Exception:  # any failure of the cache path: fall back to one pass per label
            shares = False
        return Family(probe.name, probe.positions, None, shares, False)
    finally:
        model.__dict__.pop(CHECKED, None)
