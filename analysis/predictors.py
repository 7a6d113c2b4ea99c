"""Transferability predictors besides the paper's Frobenius distance.

- SPoT (Vu et al. 2022): cosine similarity of the mean-pooled prompts, ``cos(mean_i A_i, mean_j B_j)``.
- Activated-neuron overlap (Su et al. 2022, "On Transferability of Prompt Tuning"): the prompt alone is fed to
  the frozen model; a feed-forward neuron is activated when its activation is positive (GELU(x) > 0 exactly when
  x > 0, so the input of the activation is thresholded). The state vector is the 0/1 activation of every FFN
  neuron of every layer at the prompt's last position (the position that attends to the whole prompt, as the
  reference implementation reads one position); the overlap of two prompts is the cosine of their state vectors.
"""

from __future__ import annotations

import numpy as np
import torch

from analysis.geometry import cosine_matrix


def spot_similarity(prompts: list[torch.Tensor]) -> np.ndarray:
    """[P, P] cosine similarity of mean-pooled prompts (each [n_i, hidden])."""
    return cosine_matrix(np.stack([p.double().mean(dim=0).numpy() for p in prompts]))


def _ffn_inputs(model) -> list[torch.nn.Module]:
    """The modules whose outputs are the FFN neurons' pre-activations, one per layer (BLOOM, GPT-2 style)."""
    found = []
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in ("dense_h_to_4h", "c_fc", "fc1", "fc_in") and ".mlp" in f".{name}":
            found.append(module)
    if not found:
        raise ValueError(f"no feed-forward input projections found in {type(model).__name__} "
                         f"(looked for mlp.dense_h_to_4h / c_fc / fc1 / fc_in)")
    return found


@torch.no_grad()
def activation_states(model, prompts: list[torch.Tensor]) -> np.ndarray:
    """[P, layers * ffn_width] 0/1 activation states of the FFN neurons at each prompt's last position, with the
    prompt (its raw rows, as training feeds them) as the only input."""
    modules = _ffn_inputs(model)
    device = next(model.parameters()).device
    dtype = model.get_input_embeddings().weight.dtype
    captured: list[torch.Tensor] = []
    hooks = [m.register_forward_hook(lambda _m, _i, out: captured.append(out[0, -1].float().cpu()))
             for m in modules]
    states = []
    try:
        for p in prompts:
            captured.clear()
            embeds = p.to(device=device, dtype=dtype).unsqueeze(0)
            mask = torch.ones(1, p.shape[0], dtype=torch.long, device=device)
            model.base_model(inputs_embeds=embeds, attention_mask=mask, use_cache=False)
            states.append((torch.cat(captured) > 0).numpy().astype(np.float64))
    finally:
        for h in hooks:
            h.remove()
    return np.stack(states)


def activation_overlap(states: np.ndarray) -> np.ndarray:
    """[P, P] overlap rate: cosine similarity of the 0/1 state vectors [P, d]."""
    return cosine_matrix(states)
