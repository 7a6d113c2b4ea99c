"""Transferability predictors besides the paper's Frobenius distance.

- SPoT (Vu et al. 2022): cosine similarity of the mean-pooled prompts, ``cos(mean_i A_i, mean_j B_j)``.
- Activated-neuron overlap (Su et al. 2022, "On Transferability of Prompt Tuning"): the prompt alone is fed to
  the frozen model; the state vector is the 0/1 activation of every FFN neuron of every layer at the prompt's last
  position (the position that attends to the whole prompt, as the reference implementation reads one position);
  the overlap of two prompts is the cosine of their state vectors. A neuron is activated when its activation is
  positive. Per family (``FFN_NEURONS``), a forward hook reads the neurons' values:
  - a plain MLP (BLOOM, GPT-2, OPT): the output of the up projection (``dense_h_to_4h``, ``c_fc``, ``fc1``), the
    input of the activation; GELU(x) > 0 and ReLU(x) > 0 exactly when x > 0, so the threshold is the same;
  - a gated MLP (Llama, Qwen2, Gemma2): the input of ``down_proj``, ``act(gate_proj(x)) * up_proj(x)``, the
    value each neuron contributes with (there is no single pre-activation to threshold).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from analysis import figures, geometry
from analysis.geometry import cosine_matrix
from analysis.inputs import Inputs
from analysis.results import Output, Section

# column -> (description, the sign of its correlation with the gain if it predicts transfer; 0: a confound)
PREDICTORS = {
    "frobenius_raw": ("Frobenius distance, raw (paper)", -1),
    "frobenius_effective": ("Frobenius distance, effective", -1),
    "rms_row_distance_raw": ("rms row distance (Frobenius / sqrt rows compared), raw", -1),
    "rms_row_distance_effective": ("rms row distance, effective", -1),
    "spot_cosine_raw": ("SPoT cosine of mean-pooled prompts, raw", 1),
    "spot_cosine_effective": ("SPoT cosine, effective", 1),
    "ffn_overlap": ("activated FFN neuron overlap (Su et al.)", 1),
    "init_text_distance": ("distance between the init-text prompts", 0),
    "rows_compared": ("rows a distance compares (prompt lengths)", 0),
}

# family -> (name of the module of each layer that the hook reads, "output" or "input": which of its tensors
# holds the FFN neurons). The module name is matched as the last part of the module's path.
FFN_NEURONS = {
    "bloom": ("dense_h_to_4h", "output"),
    "gpt2": ("c_fc", "output"),
    "opt": ("fc1", "output"),
    "llama": ("down_proj", "input"),
    "qwen2": ("down_proj", "input"),
    "gemma2": ("down_proj", "input"),
}


def spot_similarity(prompts: list[torch.Tensor]) -> np.ndarray:
    """[P, P] cosine similarity of mean-pooled prompts (each [n_i, hidden])."""
    return cosine_matrix(np.stack([p.double().mean(dim=0).numpy() for p in prompts]))


def ffn_neuron_modules(model) -> tuple[list[torch.nn.Module], str]:
    """The module of each layer whose output (a plain MLP) or input (a gated MLP's ``down_proj``) holds its FFN
    neurons, in layer order, and which of the two (``"output"`` / ``"input"``), from ``FFN_NEURONS``; a family
    outside it is read by its modules' names: ``down_proj`` (gated), else an up projection.

    Raises:
        ValueError: no such module in the model (the message names what was looked for).
    """
    from ptray.errors import PtrayError
    from ptray.lm.families import base_model, family

    try:
        known = FFN_NEURONS.get(family(model).name)
    except PtrayError:
        known = None
    candidates = [known] if known else [("down_proj", "input"), ("dense_h_to_4h", "output"), ("c_fc", "output"),
                                        ("fc1", "output"), ("fc_in", "output")]
    modules = dict(base_model(model).named_modules())
    for leaf, side in candidates:
        found = [m for name, m in modules.items() if name.rsplit(".", 1)[-1] == leaf]
        if found:
            return found, side
    raise ValueError(f"no feed-forward neurons found in {type(model).__name__} (looked for the modules "
                     f"{', '.join(leaf for leaf, _ in candidates)})")


@torch.no_grad()
def ffn_activations(model, prompts: list[torch.Tensor]) -> np.ndarray:
    """[P, layers * ffn_width] FFN neuron values (see the module docstring) at each prompt's last position, with
    the prompt (its rows [n_i, embed_dim], as training feeds them) as the only input; fp32.

    Raises:
        ValueError: the model's FFN neurons are not found (``ffn_neuron_modules``).
    """
    from ptray.lm.families import base_forward

    modules, side = ffn_neuron_modules(model)
    param = model.get_input_embeddings().weight
    captured: list[torch.Tensor] = []

    def hook(_module, args, out):
        value = args[0] if side == "input" else out
        # [1, T, F], or [T, F] where the layer flattens batch and positions first (OPT): the last row is the
        # prompt's last position either way
        captured.append(value.reshape(-1, value.shape[-1])[-1].float().cpu())

    hooks = [m.register_forward_hook(hook) for m in modules]
    values = []
    try:
        for p in prompts:
            captured.clear()
            embeds = p.to(device=param.device, dtype=param.dtype).unsqueeze(0)
            mask = torch.ones(1, p.shape[0], dtype=torch.long, device=param.device)
            base_forward(model, embeds, mask)
            values.append(torch.cat(captured).numpy().astype(np.float64))
    finally:
        for h in hooks:
            h.remove()
    return np.stack(values)


def activation_states(model, prompts: list[torch.Tensor]) -> np.ndarray:
    """[P, layers * ffn_width] 0/1 activation states of the FFN neurons (value > 0) at each prompt's last
    position (``ffn_activations``).

    Raises:
        ValueError: the model's FFN neurons are not found.
    """
    return (ffn_activations(model, prompts) > 0).astype(np.float64)


def activation_overlap(states: np.ndarray) -> np.ndarray:
    """[P, P] overlap rate: cosine similarity of the 0/1 state vectors [P, d]."""
    return cosine_matrix(states)


def predictor_matrices(*, inputs: Inputs, model, distances: dict[str, np.ndarray], rows_compared: pd.DataFrame,
                       distance: str) -> tuple[dict[str, pd.DataFrame], Section]:
    """Every PREDICTORS entry that can be computed, as a [T, T] task matrix (seed pairs averaged with
    ``geometry.task_means``, so each symmetric value is computed once); ``distances`` are the [P, P] matrices of
    ``analysis.distances.distance_matrices``, ``rows_compared`` its [T, T] row counts. Returns the matrices and a
    Section holding notes and metadata (the FFN width)."""
    labels, tasks = inputs.labels, inputs.tasks
    out = Section()
    preds = {k: geometry.task_means(v, labels, tasks) for k, v in distances.items()}
    preds["spot_cosine_raw"] = geometry.task_means(spot_similarity(inputs.raw), labels, tasks)
    if inputs.effective is not None:
        preds["spot_cosine_effective"] = geometry.task_means(spot_similarity(inputs.effective), labels, tasks)
    try:
        states = activation_states(model, inputs.raw)
        preds["ffn_overlap"] = geometry.task_means(activation_overlap(states), labels, tasks)
        out.meta["ffn_neurons"] = int(states.shape[1])
    except ValueError as err:
        out.notes.append(f"activated-neuron overlap not computed: {err}")
    if all(inputs.init.get(t) is not None for t in tasks):
        preds["init_text_distance"] = pd.DataFrame(
            geometry.distance_matrix([inputs.init[t] for t in tasks], distance), index=tasks, columns=tasks)
    preds["rows_compared"] = rows_compared.astype(float)
    return {k: preds[k] for k in PREDICTORS if k in preds}, out


def predictors_section(*, pairs: pd.DataFrame, stats: pd.DataFrame, tasks: list[str]) -> Section:
    """Every predictor side by side: correlation bars and one scatter per predictor against the exact-match gain.
    ``pairs`` and ``stats`` come from ``analysis.correlation.task_pair_table`` / ``correlation_table``."""
    cols = [c for c in PREDICTORS if c in pairs]
    labels = {c: v[0] for c, v in PREDICTORS.items()}
    signs = {c: v[1] for c, v in PREDICTORS.items()}
    out = Section()
    out.outputs.append(Output(
        "predictors", "predictors", "Transferability predictors side by side",
        "Spearman correlation (rho) of each predictor with the transfer gain over the ordered task pairs, with the "
        "Mantel p-value (exact permutation test over task labels; the naive p-values, which treat the pairs as "
        "independent, are in the CSV). Distances should correlate negatively, similarities positively (expected "
        "sign). SPoT: cosine of mean-pooled prompts (Vu et al. 2022). FFN overlap: cosine of the 0/1 activation "
        "states (value > 0) of every feed-forward neuron at the prompt's last position, the prompt alone as input "
        "(Su et al. 2022; a gated MLP's neurons are the input of its down projection, act(gate) * up). "
        "Confounds: init_text_distance is the distance between the tasks' starting prompts (if it predicts "
        "as well as the trained prompts do, the distances mostly reflect the init texts); rows_compared is how "
        "many rows a distance compares (if it predicts, the distances mostly reflect the prompts' lengths).",
        stats.assign(description=stats.predictor.map(labels), expected_sign=stats.predictor.map(signs)),
        figures.correlation_bars_figure(stats, labels, signs)))
    panels = [(c, "delta_exact_match", labels[c], _row(stats, c, "delta_exact_match")) for c in cols]
    out.outputs.append(Output(
        "predictor_scatter", "predictors", "Every predictor against the exact-match transfer gain",
        "One panel per predictor; each point an ordered task pair (colour = source, marker = target).", pairs,
        figures.scatter_figure(pairs, panels, tasks), show_table=False))
    return out


def _row(stats: pd.DataFrame, predictor: str, gain: str) -> dict:
    return stats[(stats.predictor == predictor) & (stats.gain == gain)].iloc[0].to_dict()
