"""analysis/: pure functions on constructed prompts with known answers, and the CLI's one-line errors."""

import math

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats

from analysis import correlation, fonts, geometry, inputs, nearest, predictors, transfer
from analysis.records import EvalRun, PromptRun, Study
from ptray import layout


# ----------------------------------------------------------------------------------------------- nearest tokens
def test_rows_equal_to_token_embeddings_return_those_tokens_first():
    gen = torch.Generator().manual_seed(0)
    emb = torch.randn(1000, 32, generator=gen)
    ids = torch.tensor([5, 999, 0, 431, 432])
    sims, got = nearest.nearest_tokens(emb[ids] * 2.5, emb, k=3, chunk=97)  # chunks split the vocabulary oddly
    assert torch.equal(got[:, 0], ids)
    assert torch.allclose(sims[:, 0], torch.ones(5), atol=1e-5)
    assert (sims[:, 1] <= sims[:, 0]).all() and (sims[:, 2] <= sims[:, 1]).all()


def test_chunked_search_equals_the_full_matrix_reference():
    gen = torch.Generator().manual_seed(1)
    emb, rows = torch.randn(5000, 48, generator=gen), torch.randn(40, 48, generator=gen)
    sims, ids = nearest.nearest_tokens(rows, emb, k=5, chunk=333)
    ref = torch.nn.functional.normalize(rows, dim=1) @ torch.nn.functional.normalize(emb, dim=1).T
    ref_sims, ref_ids = ref.topk(5, dim=1)
    assert torch.equal(ids, ref_ids)
    assert torch.allclose(sims, ref_sims, atol=1e-6)


def test_effective_nearest_tokens_ignore_a_rows_scale_and_shift():
    gen = torch.Generator().manual_seed(2)
    emb = torch.randn(300, 16, generator=gen)
    norm = torch.nn.LayerNorm(16)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(16, generator=gen) + 0.5)
        norm.bias.copy_(torch.randn(16, generator=gen) * 0.1)
    ids = torch.tensor([7, 150, 299])
    moved = emb[ids] * 3.7 + 10.0  # what the input LayerNorm undoes
    with torch.no_grad():
        _, eff = nearest.nearest_tokens(moved, emb, k=1, transform=norm)
    _, raw = nearest.nearest_tokens(moved, emb, k=1)
    assert torch.equal(eff[:, 0], ids)
    assert (raw[:, 0] != ids).any()  # a shift changes the raw cosine reading


def test_tokens_are_shown_as_their_exact_text(tiny):
    _, tok = tiny
    vocab = tok.get_vocab()
    assert nearest.token_text(tok, vocab["Ġthe"]) == " the"
    assert nearest.visible(" the") == "␣the"
    assert nearest.token_text(tok, vocab["Ċ"]) == "\n" and nearest.visible("\n") == "\\n"
    assert nearest.token_text(tok, vocab["Ã"]) == "\\xc3"  # one byte of a two-byte character: kept as bytes
    assert nearest.token_text(tok, tok.eos_token_id) == "</s>"
    assert nearest.visible("a\u200bb\tc") == "a\\u200bb\\tc"
    assert nearest.visible("准确 دقیق") == "准确␣دقیق"  # other scripts are kept as they are


# the paper's languages (French, Arabic, Farsi, Punjabi, Chinese, Kannada) and Gemma 3's neighbours in issue 31
SCRIPTS = {"oder": "Latin", "ou": "Latin", "adalah": "Latin", "تناقض": "Arabic", "درست": "Arabic",
           "ਸਹੀ": "Gurmukhi", "正确": "CJK", "ಸರಿ": "Kannada", "нейтра": "Cyrillic", "，": nearest.COMMON,
           "▁": nearest.COMMON, "123": nearest.COMMON, "ｏｄｅｒ": "Latin", "ひら正": "CJK+Hiragana",
           "नहीं": "Devanagari"}


def test_every_token_has_the_script_of_its_letters():
    for text, script in SCRIPTS.items():
        assert nearest.token_script(text) == script, text
    assert nearest.token_script("<bos>", special=True) == nearest.SPECIAL
    latin = nearest.text_scripts("Does the hypothesis entail, contradict or is neutral about the premise?")
    assert latin == {"Latin"}
    assert not nearest.in_other_script("Latin", latin) and not nearest.in_other_script(nearest.COMMON, latin)
    assert nearest.in_other_script("Arabic", latin) and nearest.in_other_script("CJK+Hiragana", latin)
    assert not nearest.in_other_script(nearest.SPECIAL, latin)
    assert not nearest.in_other_script("Arabic", frozenset())  # no init text: nothing to differ from


def _word_tokenizer(words):
    """A tokenizer whose tokens are whole words (any script), split on spaces."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="<pad>")


def test_nearest_scripts_from_init_to_the_best_epoch(tmp_path):
    """A constructed 8-dimensional vocabulary whose neighbours are known by hand: at init every row's nearest token
    is its init token and two rows have a neighbour in another script (нейтра, تناقض); the trained prompt moved
    row 1 to нейтра and row 3 to 正确. The shares, the per-token scripts and a figure that draws every glyph."""
    from analysis.inputs import Inputs

    words = ["[UNK]", "<pad>", "is", "neutral", "or", "contradiction", "adalah", "нейтра", "oder", "تناقض", "正确",
             "ਸਹੀ", "ಸರಿ", "，"]
    tok = _word_tokenizer(words)
    e = torch.eye(8)
    far = -(e[0] + e[1] + e[2] + e[3])  # never near any row below
    vec = {"is": e[0], "adalah": e[0] + 0.5 * e[5], "neutral": e[1], "нейтра": e[1] + 0.5 * e[6], "or": e[2],
           "oder": e[2] + 0.5 * e[7], "contradiction": e[3], "تناقض": e[3] + 0.5 * e[4], "正确": e[4]}
    emb = torch.stack([vec.get(w, far + 0.1 * i * e[5]) for i, w in enumerate(words)])
    trained = torch.stack([e[0], e[1] + 0.6 * e[6], e[2], e[4] + 0.2 * e[3]])
    p = PromptRun("r0", "cb", 0, trained, config={"init": "text", "init_text": "is neutral or contradiction"},
                  metrics={"best_epoch": 7})
    section, top1 = nearest.nearest_section(inputs=Inputs([p], ["cb"], emb, {"cb": None}), tokenizer=tok,
                                            top_k=2, chunk=5)
    by = {o.name: o for o in section.outputs}
    table = by["nearest_cb"].data
    got = table.sort_values(["row", "rank"])[["token", "script", "other_script"]].values.tolist()
    assert got == [["is", "Latin", False], ["adalah", "Latin", False],
                   ["нейтра", "Cyrillic", True], ["neutral", "Latin", False],
                   ["or", "Latin", False], ["oder", "Latin", False],
                   ["正确", "CJK", True], ["تناقض", "Arabic", True]]
    assert top1["raw"][0].tolist() == [words.index(w) for w in ("is", "нейтра", "or", "正确")]
    move = by["nearest_scripts"].data.iloc[0].to_dict()
    assert move == {"space": "raw", "task": "cb", "seed": 0, "prompt": "cb-seed0", "init_scripts": "Latin",
                    "best_epoch": 7,
                    "top1_is_init_token_init": 1.0, "top1_is_init_token_best": 0.5,
                    "rows_other_script_init": 0.5, "rows_other_script_best": 0.5,
                    "neighbours_other_script_init": 0.25, "neighbours_other_script_best": 0.375,
                    "other_scripts_best": "Cyrillic 1, CJK 1, Arabic 1"}
    summary = by["nearest_summary"].data.iloc[0]
    assert summary["rows_other_script"] == 0.5 and summary["rows_other_script_init"] == 0.5
    assert summary["neighbours_other_script"] == 0.375 and summary["top1_is_init_token"] == 0.5
    if fonts.font_set().missing("".join(words)):
        pytest.skip("the Noto fonts are not installed (make system-deps): glyphs would fall back to [Script×n]")
    labels = [t.get_text() for t in by["nearest_cb"].figure.axes[0].texts]
    assert {"нейтра", "正确", "تناقض", "Cyrillic", "CJK", "Arabic"} <= set(labels)
    assert not any("×" in label for label in labels)  # every glyph drawn, no [Script×n] fallback
    by["nearest_cb"].figure.savefig(tmp_path / "cb.png")


def test_font_fallback_never_leaves_an_uncovered_character():
    latin = frozenset(range(32, 0x250)) | {0x2423}
    fs = fonts.FontSet(["Base"], {"Base": latin})
    assert fs.prepare("␣准确")[0] == "␣[CJK×2]"
    assert fs.prepare("ಸರಿ")[0] == "[Kannada×3]"  # the vowel sign stays with its letter's run
    assert fs.prepare("ab准κ")[0] == "ab[CJK×1][Greek×1]"
    both = fonts.FontSet(["Base", "Cjk"], {"Base": latin, "Cjk": frozenset(map(ord, "准确"))})
    label, families = both.prepare("x准确")
    assert label == "x准确" and families == ["Base", "Cjk"]
    for text in ("准确 ಸರಿ", "دقیق", "\\xe0", "Ελλάδα"):
        label, families = fs.prepare(text)
        assert all(ord(c) in latin or c in "[]×" for c in label)


def test_installed_fonts_cover_latin():
    fs = fonts.font_set()
    assert fs.families[0] == fonts.BASE_FAMILY
    assert not fs.missing("Given the premise ␣")


# ----------------------------------------------------------------------------------------------- geometry
A = torch.zeros(2, 3)
B = torch.ones(2, 3)
C = torch.eye(3)  # three rows: a longer prompt


def test_distances_between_constructed_prompts_equal_hand_computed_values():
    assert geometry.prompt_distance(A, B) == pytest.approx(math.sqrt(6))
    assert geometry.prompt_distance(A, C, "truncate") == pytest.approx(math.sqrt(2))  # first 2 rows of C
    assert geometry.prompt_distance(A, C, "pad") == pytest.approx(math.sqrt(3))  # A padded with a zero row
    assert geometry.prompt_distance(B, C, "truncate") == pytest.approx(math.sqrt(4))  # (0,1,1), (1,0,1)
    assert geometry.prompt_distance(B, C, "pad") == pytest.approx(math.sqrt(5))
    d = geometry.distance_matrix([A, B, C])
    np.testing.assert_allclose(d, [[0, math.sqrt(6), math.sqrt(2)], [math.sqrt(6), 0, 2], [math.sqrt(2), 2, 0]])
    per_row = geometry.distance_matrix([A, B, C], rms_row=True)
    assert per_row[0, 1] == pytest.approx(math.sqrt(6) / math.sqrt(2))
    with pytest.raises(ValueError, match="truncate"):
        geometry.prompt_distance(A, B, "align")


def test_task_means_average_seed_pairs_and_leave_self_pairs_out():
    # two tasks: x (prompts 0, 1) and y (prompts 2, 3, 4)
    d = np.array([[0, 1, 2, 3, 4],
                  [1, 0, 5, 6, 7],
                  [2, 5, 0, 8, 9],
                  [3, 6, 8, 0, 10],
                  [4, 7, 9, 10, 0]], dtype=float)
    m = geometry.task_means(d, ["x", "x", "y", "y", "y"], ["x", "y"])
    assert m.loc["x", "x"] == 1.0
    assert m.loc["x", "y"] == m.loc["y", "x"] == pytest.approx(np.mean([2, 3, 4, 5, 6, 7]))
    assert m.loc["y", "y"] == pytest.approx(np.mean([8, 9, 10]))
    single = geometry.task_means(np.zeros((2, 2)), ["x", "y"], ["x", "y"])
    assert np.isnan(single.loc["x", "x"])


def test_silhouettes_equal_scikit_learn_and_task_clusters_find_separated_tasks():
    from sklearn.metrics import silhouette_score

    from analysis import distances

    rng = np.random.default_rng(11)
    for sizes in ((4, 4, 4, 4), (1, 3, 5), (2, 1)):  # equal, unequal, a one-prompt cluster
        lab = np.repeat(np.arange(len(sizes)), sizes)
        x = rng.normal(size=(lab.size, 6))
        d = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1))
        labelings = np.stack([rng.permutation(lab) for _ in range(20)])
        want = [silhouette_score(d, lb, metric="precomputed") for lb in labelings]
        np.testing.assert_allclose(distances.silhouettes(d, labelings), want, atol=1e-12)
    tasks = [t for t in ("cb", "rte", "copa", "wsc") for _ in range(4)]
    x = rng.normal(size=(16, 6)) + np.repeat(np.eye(4, 6) * 4, 4, axis=0)  # each task its own centre
    d = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1))
    far = distances.task_clusters({"rms_row_distance_raw": d, "frobenius_raw": d}, tasks, n_perm=999).iloc[0]
    assert far.measure == "rms_row_distance_raw" and far.num_permutations == 999  # frobenius: not a row measure
    same = np.equal.outer(tasks, tasks) & ~np.eye(16, dtype=bool)
    assert far.within_mean == pytest.approx(d[same].mean()) and far.within_mean < far.between_mean
    assert far.silhouette > 0.3 and far.p_permutation == 1 / 1000  # no relabelling does as well
    mixed = distances.task_clusters({"rms_row_distance_raw": d}, [tasks[i] for i in rng.permutation(16)],
                                    n_perm=999).iloc[0]
    assert mixed.p_permutation > 0.01
    assert distances.task_clusters({"rms_row_distance_raw": d[:4, :4]}, tasks[:4]).empty  # one task


def test_drift_distances_measure_the_moves_from_the_init_not_where_the_prompts_started():
    from analysis import distances

    gen = torch.Generator().manual_seed(5)
    init = {"cb": torch.zeros(3, 4), "rte": torch.full((2, 4), 10.0)}  # far apart before any training
    move = torch.tensor([1.0, 0.0, 0.0, 0.0])  # every seed of both tasks moves the same way, plus noise
    prompts = [PromptRun(f"{t}{s}", t, s, init[t] + move + 0.01 * torch.randn(init[t].shape, generator=gen),
                         {"init_text": "x"}) for t in ("cb", "rte") for s in range(3)]
    inp = inputs.Inputs(prompts=prompts, tasks=["cb", "rte"], embedding=torch.randn(5, 4), init=init)
    drift = distances.drift_matrices(inp, "truncate")
    assert set(drift) == {"rms_row_distance_drift_raw"}  # no effective prompt here
    m0, m3 = prompts[0].prompt - init["cb"], prompts[3].prompt - init["rte"]
    want = torch.linalg.matrix_norm(m0[:2] - m3[:2]).item() / math.sqrt(2)  # over the 2 common rows
    assert drift["rms_row_distance_drift_raw"][0, 3] == pytest.approx(want, rel=1e-6)
    mats = {**distances.distance_matrices(inp, "truncate"), **drift}
    table = distances.task_clusters(mats, inp.labels, n_perm=199).set_index("measure")
    assert table.loc["rms_row_distance_raw", "silhouette"] > 0.9  # where they started
    assert table.loc["rms_row_distance_drift_raw", "silhouette"] < 0.5  # how they moved: alike across tasks
    assert distances.drift_matrices(inputs.Inputs(prompts=prompts, tasks=["cb", "rte"], embedding=torch.randn(5, 4),
                                                  init={"cb": None, "rte": init["rte"]}), "truncate") == {}
    with pytest.raises(ValueError):
        distances.silhouettes(np.zeros((2, 2)), np.array([[0, -1]]))


def test_claim_readings_follow_their_stated_rules():
    from analysis import claims

    assert claims.interval_reading(0.01, 0.2) == claims.SUPPORTED
    assert claims.interval_reading(-0.2, -0.01) == claims.CONTRADICTED
    assert claims.interval_reading(-0.2, -0.01, "-") == claims.SUPPORTED
    assert claims.interval_reading(0.0, 0.2) == claims.interval_reading(np.nan, 0.2) == claims.OPEN  # 0 inside
    assert claims.p_reading(-0.8, 0.01, "-") == claims.SUPPORTED and claims.p_reading(0.8, 0.01, "-") == \
        claims.CONTRADICTED
    assert claims.p_reading(1.0, 0.083, "+") == claims.OPEN  # 4 tasks at best: never below 0.05
    s, c, o = claims.SUPPORTED, claims.CONTRADICTED, claims.OPEN
    assert [claims.count_reading(r) for r in ([s, s], [s, o], [o, c], [o, o], [])] == \
        [s, claims.MIXED, c, o, o]


def test_claims_side_by_side_match_rows_by_claim_and_measure(tmp_path, capsys):
    from analysis import claims

    def table(rows):
        return pd.DataFrame([dict(zip(claims.COLUMNS, r)) for r in rows], columns=claims.COLUMNS)

    a = table([("x beats y", "6.3", "em", "+0.200", "[+0.100, +0.300]", "supported", ""),
               ("rows keep init", "5.1", "share", "0.900", "", "descriptive", "")])
    b = table([("rows keep init", "5.1", "share", "0.500", "", "descriptive", ""),
               ("only b", "7", "m", "1.000", "p = 0.01", "supported", "")])
    both = claims.side_by_side({"smollm2": a, "gemma": b})
    assert list(both.columns) == ["claim", "measure", "smollm2", "gemma"]
    assert both.values.tolist() == [
        ["x beats y", "em", "+0.200 [+0.100, +0.300] (supported)", "-"],
        ["rows keep init", "share", "0.900 (descriptive)", "0.500 (descriptive)"],
        ["only b", "m", "-", "1.000 p = 0.01 (supported)"]]
    for name, t in (("a", a), ("b", b)):
        (tmp_path / name).mkdir()
        t.to_csv(tmp_path / name / "claims.csv", index=False)
    assert claims.main([f"smollm2={tmp_path / 'a'}", f"gemma={tmp_path / 'b'}"]) == 0
    out = capsys.readouterr().out
    assert "| claim | measure | smollm2 | gemma |" in out and "0.500 (descriptive)" in out
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "claims.csv").write_text("a,b\n1,2\n")
    for argv in ([str(tmp_path / "a")], [f"x={tmp_path / 'missing'}"], [f"x={tmp_path / 'c'}"], []):
        assert claims.main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1


def test_rms_row_norms_divide_by_the_square_root_of_the_length():
    n = geometry.prompt_norms([torch.ones(4, 9), torch.ones(1, 9)])
    assert n["frobenius"].tolist() == pytest.approx([6.0, 3.0])
    assert n["rms_row_norm"].tolist() == pytest.approx([3.0, 3.0])


def test_effective_metrics_are_invariant_to_scaling_and_shifting_a_row_and_raw_ones_are_not(tiny):
    model, _ = tiny
    gen = torch.Generator().manual_seed(3)
    p, q = torch.randn(5, 64, generator=gen), torch.randn(4, 64, generator=gen)
    p2 = p.clone()
    p2[1] = p2[1] * 3.7 + 2.0
    p2[3] = p2[3] * 0.5 - 1.0  # (exact up to the LayerNorm's eps, 1e-5 against a row variance near 1)
    # the effective rows are exactly what BLOOM's LayerNorm makes of them
    ln = model.transformer.word_embeddings_layernorm
    with torch.no_grad():
        assert torch.allclose(inputs.effective_prompt(model, p), ln(p), atol=1e-6)
    e, e2, eq = (inputs.effective_prompt(model, x) for x in (p, p2, q))
    assert torch.allclose(e, e2, atol=1e-4)
    for method in geometry.DISTANCE_METHODS:
        assert geometry.prompt_distance(e, eq, method) == pytest.approx(geometry.prompt_distance(e2, eq, method),
                                                                        rel=1e-5)
        assert geometry.prompt_distance(p, q, method) != pytest.approx(geometry.prompt_distance(p2, q, method),
                                                                       rel=1e-3)
    assert geometry.prompt_norms([e])["frobenius"][0] == pytest.approx(geometry.prompt_norms([e2])["frobenius"][0],
                                                                       rel=1e-5)
    assert geometry.prompt_norms([p])["frobenius"][0] != pytest.approx(geometry.prompt_norms([p2])["frobenius"][0])
    eff_sim = predictors.spot_similarity([e, eq])[0, 1]
    assert eff_sim == pytest.approx(predictors.spot_similarity([e2, eq])[0, 1], rel=1e-5)
    # BLOOM's LayerNorm treats each row alone: the family maps the vocabulary the same way (effective_rows)
    transform = inputs.vocabulary_transform(model)
    assert transform is not None and inputs.effective_name(model) == "word_embeddings_layernorm"
    assert torch.allclose(transform(torch.cat([p, q])), torch.cat([e, eq]), atol=1e-6)


def _tiny_causal_lm(kind: str):
    from transformers import GPT2Config, GPT2LMHeadModel, OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    if kind == "gpt2":
        return GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=32, n_embd=16, n_layer=1, n_head=2)).eval()
    return OPTForCausalLM(OPTConfig(vocab_size=50, max_position_embeddings=32, hidden_size=16, word_embed_proj_dim=16,
                                    num_hidden_layers=1, num_attention_heads=2, ffn_dim=32,
                                    do_layer_norm_before=False)).eval()


def test_effective_prompt_is_na_where_the_family_defines_none_or_depends_on_position():
    gpt2 = _tiny_causal_lm("gpt2")
    rows = torch.randn(3, 16)
    assert inputs.effective_prompt(gpt2, rows).shape == (3, 16)  # defined: ln_1 of token + position
    assert inputs.vocabulary_transform(gpt2) is None  # but it depends on the position: no effective vocabulary
    post_norm_opt = _tiny_causal_lm("opt")
    assert inputs.effective_prompt(post_norm_opt, rows) is None
    assert inputs.vocabulary_transform(post_norm_opt) is None


def test_tsne_and_pca_of_16_prompts_have_the_right_shape():
    gen = torch.Generator().manual_seed(4)
    prompts = [torch.randn(n, 8, generator=gen) + i // 4 for i, n in enumerate([15] * 4 + [14] * 4 + [12] * 4 +
                                                                             [20] * 4)]
    assert geometry.tsne_perplexity(16) == 5.0 and geometry.tsne_perplexity(3) < 2
    d = geometry.distance_matrix(prompts)
    kept = d.copy()
    xy = geometry.tsne_map(d, seed=0)
    assert xy.shape == (16, 2) and np.isfinite(xy).all()
    assert (d == kept).all()  # the caller's matrix is left as it was (scikit-learn squares its input in place)
    feats, m = geometry.common_length_features(prompts)
    assert m == 12 and feats.shape == (16, 12 * 8)
    coords, ratio = geometry.pca_map(feats)
    assert coords.shape == (16, 2) and 0 < ratio.sum() <= 1


# ----------------------------------------------------------------------------------------------- statistics
def test_correlation_equals_scipy():
    gen = np.random.default_rng(0)
    x, y = gen.normal(size=12), gen.normal(size=12)
    y = y + 0.8 * x
    c = correlation.correlation(x, y)
    s, p = stats.spearmanr(x, y), stats.pearsonr(x, y)
    assert c["n"] == 12
    assert c["spearman_rho"] == pytest.approx(s.statistic) and c["spearman_p_naive"] == pytest.approx(s.pvalue)
    assert c["pearson_r"] == pytest.approx(p.statistic) and c["pearson_p_naive"] == pytest.approx(p.pvalue)
    x[3] = np.nan
    assert correlation.correlation(x, y)["n"] == 11
    assert np.isnan(correlation.correlation(np.arange(5), np.zeros(5))["spearman_rho"])  # constant: undefined


def test_bootstrap_interval_brackets_the_mean_and_is_reproducible():
    x = np.array([1.0] * 10 + [0.0] * 46)  # 56 examples like CB
    lo, hi = transfer.bootstrap_mean_ci(x, 2000, seed=0)
    assert lo < x.mean() < hi and 0 <= lo and hi <= 1
    assert (lo, hi) == transfer.bootstrap_mean_ci(x, 2000, seed=0)
    assert transfer.bootstrap_mean_ci(np.full(20, 0.25), 500) == (0.25, 0.25)


def _study_with_known_outcomes() -> Study:
    """Two tasks a (2 seeds) and b (1 seed); 4 examples each. Known per-example outcomes."""
    def prompt(task, seed, em, rank):
        return PromptRun(f"{task}{seed}", task, seed, torch.zeros(2, 4), {"init_text": ""},
                         {"exact_match": np.mean(em), "rank_accuracy": np.mean(rank)},
                         {layout.IDX: [0, 1, 2, 3], layout.EM_CORRECT: em, layout.RANK_CORRECT: rank,
                          layout.BASELINES: {"no_prompt": {layout.EM_CORRECT: [0, 0, 0, 0],
                                                           layout.RANK_CORRECT: [1, 0, 0, 0]}}})

    prompts = [prompt("a", 0, [1, 1, 0, 0], [1, 1, 1, 0]), prompt("a", 1, [1, 0, 0, 0], [1, 1, 0, 0]),
               prompt("b", 0, [1, 1, 1, 1], [1, 1, 1, 1])]
    evals = [
        EvalRun("base-b", "baseline", "b", idx=[3, 2, 1, 0], em_correct=[0, 0, 0, 1], rank_correct=[0, 0, 1, 1]),
        # examples come in another order than the baseline's: they are matched by idx
        EvalRun("a0b", "transfer", "b", "a", 0, idx=[0, 1, 2, 3], em_correct=[1, 1, 1, 0],
                rank_correct=[1, 1, 1, 1]),
        EvalRun("a1b", "transfer", "b", "a", 1, idx=[0, 1, 2, 3], em_correct=[1, 0, 0, 0],
                rank_correct=[1, 1, 0, 0]),
        EvalRun("b0a", "transfer", "a", "b", 0, idx=[0, 1, 2, 3], em_correct=[0, 0, 0, 0],
                rank_correct=[1, 0, 0, 0]),
    ]
    return Study("exp", "test", prompts, evals)


def test_transfer_table_equals_hand_computed_deltas():
    per_seed, summary = transfer.transfer_tables(_study_with_known_outcomes(), n_boot=500)
    row = summary.set_index(["source", "target", "metric"])
    # a on b, exact match: seed 0 gets 3/4, seed 1 gets 1/4; the baseline (by idx) gets 1/4
    ab = row.loc[("a", "b", "exact_match")]
    assert ab.baseline == 0.25 and ab.delta_mean == pytest.approx(0.25)
    assert ab.delta_sd_ddof1 == pytest.approx(np.std([0.5, 0.0], ddof=1)) and ab.n_seeds == 2 and ab.n_examples == 4
    assert ab["from"] == "transfer runs" and ab.ci95_examples_low <= 0.25 <= ab.ci95_examples_high
    assert ab.ci95_seeds_examples_low <= 0.25 <= ab.ci95_seeds_examples_high
    # the diagonal comes from the train runs: a on a, rank accuracy (3/4, 2/4) against no prompt 1/4
    aa = row.loc[("a", "a", "rank_accuracy")]
    assert aa.delta_mean == pytest.approx(0.375) and aa["from"] == "train runs"
    ba = row.loc[("b", "a", "rank_accuracy")]
    assert ba.delta_mean == 0.0 and np.isnan(ba.delta_sd_ddof1)  # one seed: no spread
    assert len(per_seed) == 2 * (2 + 2 + 1 + 1)  # (a0,a1 on a,b) + (b0 on a,b), two metrics
    mat = transfer.summary_matrix(summary, "exact_match", "delta_mean", ["a", "b"])
    assert mat.loc["a", "b"] == pytest.approx(0.25) and mat.shape == (2, 2)


def test_a_seed_without_predictions_against_a_baseline_without_that_metric_is_left_out():
    """A seed with recorded metrics only, on a target whose no-prompt run has per-example results but no recorded
    metrics, has nothing to compare: it is left out of the cell (it used to crash on float(None))."""
    a0 = PromptRun("a0", "a", 0, torch.zeros(2, 4), {"init_text": ""}, {"exact_match": 0.5, "rank_accuracy": 0.5},
                   {layout.IDX: [0, 1], layout.EM_CORRECT: [1, 0], layout.RANK_CORRECT: [1, 0],
                    layout.BASELINES: {"no_prompt": {layout.EM_CORRECT: [0, 0], layout.RANK_CORRECT: [0, 1]}}})
    a1 = PromptRun("a1", "a", 1, torch.zeros(2, 4), {"init_text": ""}, {"exact_match": 0.5, "rank_accuracy": 0.5})
    evals = [EvalRun("base-b", "baseline", "b", idx=[0, 1], em_correct=[0, 1], rank_correct=[0, 1]),
             EvalRun("a0b", "transfer", "b", "a", 0, idx=[0, 1], em_correct=[1, 1], rank_correct=[1, 1]),
             EvalRun("a1b", "transfer", "b", "a", 1, metrics={"exact_match": 1.0, "rank_accuracy": 1.0})]
    _, summary = transfer.transfer_tables(Study("e", "s", [a0, a1], evals), n_boot=20)
    ab = summary.set_index(["source", "target", "metric"]).loc[("a", "b", "exact_match")]
    assert ab.n_seeds == 1 and ab.baseline == 0.5 and ab.delta_mean == 0.5  # seed 0 only: 2/2 against 1/2


def test_asymmetry_and_own_task_tables_equal_hand_computed_values_and_a_naive_bootstrap():
    study = _study_with_known_outcomes()
    cells = transfer.delta_cells(study)
    asym = transfer.asymmetry_table(cells, ["a", "b"], n_boot=300, seed=4).set_index("metric")
    # exact match: a on b +0.25 (above); b on a: 0/4 against a's no prompt 0/4 -> 0
    em = asym.loc["exact_match"]
    assert (em.task_a, em.task_b, em.delta_ab, em.delta_ba, em.difference) == ("a", "b", 0.25, 0.0, 0.25)
    own = transfer.own_task_table(cells, ["a", "b"], n_boot=300, seed=4).set_index(["source", "metric"])
    # a on a, exact match: (2/4, 1/4) against 0/4 -> 0.375; a on b: 0.25
    row = own.loc[("a", "exact_match")]
    assert (row.own, row.other, row.own_minus_other) == (0.375, 0.25, 0.125)
    # b on b: 4/4 against base-b's 1/4 (matched by idx) -> 0.75; b on a: 0 (exact match)
    assert own.loc[("b", "exact_match")].own_minus_other == 0.75

    def naive(x, rng, n_boot, seed_draws=None):  # one resample at a time, the same generator calls in order
        x = np.asarray(x, dtype=float)
        out = []
        for k in range(n_boot):
            s = rng.integers(0, x.shape[0], size=x.shape[0]) if seed_draws is None else seed_draws[k]
            e = rng.integers(0, x.shape[1], size=x.shape[1])
            out.append(x[np.ix_(s, e)].mean())
        return np.array(out)

    a_a, a_b = cells["a", "a", "exact_match"].matrix, cells["a", "b", "exact_match"].matrix
    b_a = cells["b", "a", "exact_match"].matrix
    diff = naive(a_b, np.random.default_rng(4), 300) - naive(b_a, np.random.default_rng(5), 300)
    assert (em.ci95_low, em.ci95_high) == pytest.approx(tuple(np.quantile(diff, [0.025, 0.975])))
    draws = np.random.default_rng(4).integers(0, 2, size=(300, 2))
    diff = naive(a_a, np.random.default_rng(5), 300, draws) - naive(a_b, np.random.default_rng(6), 300, draws)
    assert (row.ci95_low, row.ci95_high) == pytest.approx(tuple(np.quantile(diff, [0.025, 0.975])))
    # b has one seed on either side of the pair: its interval resamples the examples only, still finite
    assert np.isfinite(own.loc[("b", "rank_accuracy")].ci95_low)


def test_spot_and_activation_overlap_on_constructed_vectors():
    p = torch.tensor([[1.0, 0.0], [3.0, 0.0]])  # mean (2, 0)
    q = torch.tensor([[0.0, 1.0]])  # mean (0, 1)
    r = torch.tensor([[1.0, 1.0], [1.0, 1.0]])
    s = predictors.spot_similarity([p, q, r])
    np.testing.assert_allclose(s, [[1, 0, 1 / math.sqrt(2)], [0, 1, 1 / math.sqrt(2)],
                                   [1 / math.sqrt(2), 1 / math.sqrt(2), 1]], atol=1e-12)
    states = np.array([[1, 1, 0, 0], [1, 0, 1, 0], [1, 1, 0, 0]], dtype=float)
    o = predictors.activation_overlap(states)
    assert o[0, 1] == pytest.approx(0.5) and o[0, 2] == pytest.approx(1.0)


def test_activation_states_read_every_ffn_neuron_at_the_last_position(tiny):
    model, _ = tiny
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randn(5, 64, generator=gen), torch.randn(3, 64, generator=gen)]
    states = predictors.activation_states(model, prompts)
    assert states.shape == (2, 2 * 256) and set(np.unique(states)) <= {0.0, 1.0}
    # reference: the MLP input of layer 1 captured separately, through the FFN's first layer and its GELU
    seen = []
    hook = model.transformer.h[1].mlp.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    try:
        with torch.no_grad():
            model.transformer(inputs_embeds=prompts[0].unsqueeze(0), attention_mask=torch.ones(1, 5,
                                                                                                  dtype=torch.long))
    finally:
        hook.remove()
    mlp = model.transformer.h[1].mlp
    with torch.no_grad():
        act = mlp.gelu_impl(mlp.dense_h_to_4h(seen[0]))[0, -1]
    np.testing.assert_array_equal(states[0, 256:], (act > 0).numpy().astype(float))
    assert 0 < states.mean() < 1


# ----------------------------------------------------------------------------------------------- CLI errors
def _cli(argv, capsys):
    from analysis.__main__ import main

    capsys.readouterr()  # drop what the test's own setup printed
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    return code, err


def test_unreachable_tracking_server_is_one_line_error(tmp_path, capsys):
    code, err = _cli(["--experiment", "x", "--tracking-uri", "http://127.0.0.1:9", "--out", str(tmp_path / "o")],
                     capsys)
    assert code == 2 and len(err) == 1 and err[0].startswith("error: cannot reach the MLflow tracking server")
    assert not (tmp_path / "o").exists()


def test_missing_store_and_unknown_experiment_are_one_line_errors(tmp_path, capsys):
    code, err = _cli(["--experiment", "x", "--tracking-uri", f"sqlite:///{tmp_path}/none.db"], capsys)
    assert code == 2 and len(err) == 1 and "no MLflow database" in err[0]
    assert not (tmp_path / "none.db").exists()  # not created as a side effect

    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("smoke-study", artifact_location=(tmp_path / "art").as_uri())
    run = client.create_run(exp, run_name="baseline-none-on-cb", tags={"ptray.kind": "baseline"})
    client.set_terminated(run.info.run_id, "FINISHED")
    code, err = _cli(["--experiment", "smoke-studdy", "--tracking-uri", uri, "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and len(err) == 1
    assert err[0] == "error: no experiment named 'smoke-studdy' in this MLflow store; did you mean 'smoke-study'? " \
                     "(experiments: Default, smoke-study)"
    code, err = _cli(["--experiment", "smoke-study", "--tracking-uri", uri, "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and len(err) == 1 and "has no finished train runs" in err[0]
    assert not (tmp_path / "o").exists()
    assert [r.info.run_name for r in client.search_runs([exp])] == ["baseline-none-on-cb"]  # no analysis run


@pytest.mark.parametrize("experiment", ["a/b", "../../x", "/tmp/x", "étude", ".x"])
def test_an_experiment_that_names_no_folder_needs_out(tmp_path, monkeypatch, capsys, experiment):
    """The default report folder is outputs/analysis/<experiment>: a name that is no folder name (nesting, leaving
    outputs/analysis, absolute, non-ASCII, hidden) is refused before the store is read (issue 32)."""
    monkeypatch.chdir(tmp_path)
    code, err = _cli(["--experiment", experiment, "--tracking-uri", f"sqlite:///{tmp_path}/none.db"], capsys)
    assert code == 2 and err == [
        f"error: --experiment {experiment!r}: use only ASCII letters (a-z, A-Z), digits, '-', '_' and '.', starting "
        f"with a letter or digit (it names the report folder outputs/analysis/<experiment>; or pass --out DIR)"]
    assert list(tmp_path.iterdir()) == []  # nothing written, no store created
    code, err = _cli(["--experiment", experiment, "--tracking-uri", f"sqlite:///{tmp_path}/none.db", "--out",
                      str(tmp_path / "o")], capsys)  # with --out the name is only a name: the store is read
    assert code == 2 and "no MLflow database" in err[0]


def test_bad_arguments_are_one_line_errors(capsys):
    with pytest.raises(SystemExit) as exc:
        _cli(["--experiment", "x", "--top-k", "0"], capsys)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: argument --top-k")


def test_the_cli_flags_are_the_options_fields(capsys):
    from analysis.__main__ import build_parser
    from analysis.results import AnalysisOptions
    from ptray.cli import config_from_args

    args = build_parser().parse_args(["--experiment", "x", "--bootstrap", "5", "--no-faithfulness", "--seed", "3",
                                      "--distance", "pad"])
    assert config_from_args(AnalysisOptions, args) == AnalysisOptions(n_boot=5, faithfulness=False, seed=3,
                                                                      distance="pad")
    assert config_from_args(AnalysisOptions, build_parser().parse_args(["--experiment", "x"])) == AnalysisOptions()
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--experiment", "x", "--seed", "-1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: argument --seed")


def test_run_is_importable_from_the_package_as_the_entry_script_uses_it():
    import analysis
    import analysis.runner
    from analysis import run

    assert run is analysis.run is analysis.runner.run and callable(run)


def test_a_non_empty_output_folder_is_refused(tmp_path, capsys):
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "keep.txt").write_text("mine")
    code, err = _cli(["--experiment", "x", "--tracking-uri", f"sqlite:///{tmp_path}/none.db", "--out",
                      str(tmp_path / "o")], capsys)
    assert code == 2 and "already holds files" in err[0]
    assert (tmp_path / "o" / "keep.txt").read_text() == "mine"


def test_records_sort_by_task_registry_order_then_seed():
    ps = [PromptRun(str(i), t, s, torch.zeros(1, 2)) for i, (t, s) in
          enumerate([("wsc", 1), ("cb", 1), ("wsc", 0), ("copa", 0), ("cb", 0)])]
    study = Study("e", "s", ps)
    assert study.tasks == ["cb", "copa", "wsc"]
    assert [p.label for p in study.sorted_prompts()] == ["cb-seed0", "cb-seed1", "copa-seed0", "wsc-seed0",
                                                          "wsc-seed1"]


# ----------------------------------------------------------------------------------------------- issue 13
TASKS4 = ["cb", "rte", "copa", "wsc"]


def test_spearman_of_a_study_whose_distances_tie_ranks_equal_distances_equally():
    # 4 tasks x 4 seeds of random prompts: the task-level distance of (a, b) and (b, a) is one quantity
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 8))
    d = geometry.distance_matrix([torch.from_numpy(r[None]) for r in x])
    labels = [t for t in TASKS4 for _ in range(4)]
    means = geometry.task_means(d, labels, TASKS4)
    assert (means.to_numpy() == means.to_numpy().T).all()  # bit for bit: equal things are identical
    # averaging the transposed block again (the bug) breaks the ties in the last bit on these prompts
    lab = np.asarray(labels)
    twice = np.array([[np.mean(d[np.ix_(lab == a, lab == b)]) for b in TASKS4] for a in TASKS4])
    assert (twice != twice.T).any()
    gain = pd.DataFrame(rng.integers(-3, 4, size=(4, 4)) / 10, index=TASKS4, columns=TASKS4)
    off = ~np.eye(4, dtype=bool)
    # the right rho: each unordered pair's mean distance computed once, so each of the 6 values is a tie of two
    once = {frozenset((a, b)): np.mean(d[np.ix_(lab == a, lab == b)]) for a in TASKS4 for b in TASKS4 if a < b}
    xs = [once[frozenset((a, b))] for a in TASKS4 for b in TASKS4 if a != b]
    ys = [gain.loc[a, b] for a in TASKS4 for b in TASKS4 if a != b]
    right = stats.spearmanr(xs, ys)
    assert len(set(xs)) == 6
    table = correlation.correlation_table({"frobenius_raw": means}, {"delta_exact_match": gain}, TASKS4)
    row = table.iloc[0]
    assert row.spearman_rho == pytest.approx(right.statistic, abs=1e-15)
    assert row.spearman_p_naive == pytest.approx(right.pvalue, abs=1e-15)
    wrong = stats.spearmanr(twice[off], gain.to_numpy()[off]).statistic
    assert abs(wrong - right.statistic) > 0.005  # -0.134 against the right -0.124
    # cosine similarities (SPoT, FFN overlap) are symmetric bit for bit too
    c = geometry.cosine_matrix(rng.normal(size=(16, 33)))
    assert (c == c.T).all()
    with pytest.raises(ValueError, match="symmetric"):
        geometry.task_means(rng.normal(size=(16, 16)), labels, TASKS4)


def test_mantel_test_by_hand_three_and_four_tasks():
    # 3 tasks, gain = -distance, pair values (01, 02, 12) = (1, 2, 3). With 3 tasks a pair is the complement of
    # a task, so the 6 relabellings put the 3 values in all 6 orders: (1, 2, 3) rho -1 (the identity), (3, 2, 1)
    # rho +1 (swapping tasks 0 and 2), and four orders with rho -0.5 or +0.5. Two-sided: p = 2/6.
    d3 = np.array([[0, 1, 2], [1, 0, 3], [2, 3, 0]], dtype=float)
    m = correlation.mantel_test(d3, -d3)
    assert m["spearman_rho"] == pytest.approx(-1.0) and m["mantel_permutations"] == 6 and m["mantel_exact"] == 1
    assert m["spearman_p_mantel"] == pytest.approx(2 / 6) and m["pearson_p_mantel"] == pytest.approx(2 / 6)
    null = [correlation._off_diagonal_stats(d3[np.ix_(p, p)], -d3)[0] for p in ([1, 0, 2], [1, 2, 0], [2, 1, 0])]
    assert null == pytest.approx([-0.5, 0.5, 1.0])  # (1, 3, 2), (3, 1, 2), (3, 2, 1) against (3, 2, 1) in ranks
    # 4 tasks, 6 distinct distances, the same perfect relation: only the identity keeps the 6 values in order
    # (and none reverses it: the map from a pair to its complement comes from no relabelling of 4 tasks), so
    # p = 1/24, the smallest possible, while scipy's naive p-value (12 independent points) is far smaller
    d4 = np.zeros((4, 4))
    d4[np.triu_indices(4, 1)] = [1, 2, 3, 4, 5, 6]
    d4 = d4 + d4.T
    gain = -d4 + np.diag([9, 9, 9, 9])  # the diagonal (a task on itself) is not a pair: ignored
    m = correlation.mantel_test(d4, gain)
    assert m["mantel_permutations"] == 24 and m["spearman_p_mantel"] == pytest.approx(1 / 24)
    assert correlation.correlation(d4[~np.eye(4, dtype=bool)], gain[~np.eye(4, dtype=bool)])[
        "spearman_p_naive"] < 1e-6
    # a constant distance: no correlation is defined, for any relabelling
    got = correlation.mantel_test(np.ones((4, 4)), gain)
    assert np.isnan(got["spearman_rho"]) and np.isnan(got["spearman_p_mantel"])
    # past max_exact: the identity plus random relabellings
    m = correlation.mantel_test(d4, gain, max_exact=1, n_random=99)
    assert m["mantel_permutations"] == 100 and m["mantel_exact"] == 0 and 0.01 <= m["spearman_p_mantel"] <= 0.2
    with pytest.raises(ValueError, match=r"\[T, T\]"):
        correlation.mantel_test(np.zeros((3, 3)), np.zeros((4, 4)))


def test_hierarchical_bootstrap_sees_seeds_that_disagree_and_the_examples_only_interval_does_not():
    # seed 0 gets every example right, seed 1 none: the seed mean is 0.5 on every example
    disagree = np.array([[1.0] * 56, [0.0] * 56])
    assert transfer.bootstrap_mean_ci(disagree.mean(axis=0), 2000) == (0.5, 0.5)  # sd over seeds 0.71, width 0
    lo, hi = transfer.hierarchical_bootstrap_ci(disagree, 2000)
    assert (lo, hi) == (0.0, 1.0)  # half the resamples draw the same seed twice
    # seeds that agree: the hierarchical interval is the examples' one (up to the bootstrap's own noise)
    rng = np.random.default_rng(1)
    row = (rng.random(100) < 0.3).astype(float)
    agree = np.stack([row, row, row, row])
    e_lo, e_hi = transfer.bootstrap_mean_ci(row, 4000, seed=2)
    h_lo, h_hi = transfer.hierarchical_bootstrap_ci(agree, 4000, seed=2)
    assert h_lo == pytest.approx(e_lo, abs=0.02) and h_hi == pytest.approx(e_hi, abs=0.02)
    assert transfer.hierarchical_bootstrap_ci(agree, 500, seed=3) == transfer.hierarchical_bootstrap_ci(
        agree, 500, seed=3)
    with pytest.raises(ValueError, match="seeds, examples"):
        transfer.hierarchical_bootstrap_ci(row, 10)


def test_hierarchical_bootstrap_equals_a_naive_loop_over_the_same_draws():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(3, 40))
    n_boot = 300
    ref_rng = np.random.default_rng(7)  # the same generator, drawn in the same order: seeds, then examples
    seeds, examples = ref_rng.integers(0, 3, size=(n_boot, 3)), ref_rng.integers(0, 40, size=(n_boot, 40))
    means = [np.mean([[x[s, e] for e in examples[b]] for s in seeds[b]]) for b in range(n_boot)]
    expected = tuple(np.quantile(means, [0.025, 0.975]))
    got = transfer.hierarchical_bootstrap_ci(x, n_boot, seed=7, block=n_boot)
    assert got == pytest.approx(expected, abs=1e-12)


def _inputs_without_effective() -> "inputs.Inputs":
    gen = torch.Generator().manual_seed(6)
    prompts = [PromptRun(f"{t}{s}", t, s, torch.randn(n, 8, generator=gen), {"init_text": ""})
               for t, n in (("cb", 3), ("rte", 4), ("copa", 2)) for s in range(3)]
    study = Study("e", "s", prompts)
    return inputs.Inputs(prompts=study.sorted_prompts(), tasks=study.tasks, embedding=torch.randn(20, 8),
                         init={"cb": None, "rte": None, "copa": None})


def test_effective_numbers_are_na_when_the_model_defines_no_effective_prompt():
    from analysis import distances, stochasticity

    inp = _inputs_without_effective()
    mats = distances.distance_matrices(inp, "truncate")
    assert set(mats) == {"frobenius_raw", "rms_row_distance_raw"}
    sec = stochasticity.stochasticity_section(inputs=inp, distances=mats, distance="truncate", seed=0)
    table = sec.outputs[0].data
    assert table["frobenius_raw_mean"].notna().all()
    assert table["frobenius_effective_mean"].isna().all() and table["rms_row_norm_effective_var_ddof0"].isna().all()
    assert "n/a" in sec.outputs[0].text
    sec = distances.distances_section(inputs=inp, matrices=mats, distance="truncate")
    assert any("n/a" in n for n in sec.notes)
    long = sec.outputs[0].data
    # the length confound is stated per task pair: cb (3 rows) with copa (2 rows) compares 2 rows
    assert set(long[(long.source == "cb") & (long.target == "copa")]["rows_compared"]) == {2}
    within = sec.outputs[1].data
    sub = within[(within.task == "cb") & (within.measure == "frobenius_raw")].iloc[0]
    pair_d = [geometry.prompt_distance(inp.raw[i], inp.raw[j]) for i, j in ((0, 1), (0, 2), (1, 2))]
    assert sub.sd_ddof1 == pytest.approx(np.std(pair_d, ddof=1))
    assert sub.cv_ddof1 == pytest.approx(np.std(pair_d, ddof=1) / np.mean(pair_d))


def test_table1_variance_is_the_population_variance_and_the_paper_ratio_is_sourced():
    from analysis import paper, stochasticity

    per_prompt = pd.DataFrame({"task": ["cb", "cb", "wsc", "wsc"], "seed": [0, 1, 0, 1], "num_tokens": [4, 4, 9, 9],
                               **{c: [1.0, 3.0, 2.0, 6.0] for c in stochasticity.NORM_COLUMNS}})
    t1 = stochasticity.table1(per_prompt, ["cb", "wsc"])
    assert t1["frobenius_raw_var_ddof0"].tolist() == [1.0, 4.0]  # (1 - 2)^2 + (3 - 2)^2 over 2, not over 1
    r = stochasticity.wsc_cb_ratio(t1)
    assert r["frobenius_raw_ratio"] == 2.0 and r["sqrt_length_ratio"] == 1.5
    assert r["paper_ratio"] == paper.wsc_cb_norm_ratio() == pytest.approx(135.3 / 119.2)


def test_spread_vs_outcome_equals_hand_computed_values():
    from analysis import paper, stochasticity

    # cb: 3 seeds of a 2-row prompt; rte: one seed (no spread); norms and accuracies chosen by hand
    rows = {("cb", 0): [[3.0, 4.0], [0.0, 0.0]], ("cb", 1): [[0.0, 0.0], [6.0, 8.0]],
            ("cb", 2): [[0.0, 0.0], [0.0, 1.0]], ("rte", 0): [[1.0, 0.0], [0.0, 1.0]]}
    acc = {("cb", 0): (0.5, 0.25), ("cb", 1): (0.75, 0.75), ("cb", 2): (0.625, 0.5), ("rte", 0): (0.6, 0.6)}
    prompts = [PromptRun(f"{t}{s}", t, s, torch.tensor(m), {"init_text": ""},
                         {"rank_accuracy": acc[t, s][0], "exact_match": acc[t, s][1]}) for (t, s), m in rows.items()]
    inp = inputs.Inputs(prompts=prompts, tasks=["cb", "rte"], embedding=torch.randn(5, 2),
                        init={"cb": None, "rte": None})
    from analysis import distances

    mats = distances.distance_matrices(inp, "truncate")
    table = stochasticity.spread_vs_outcome(stochasticity.per_prompt_norms(inp), prompts, mats["rms_row_distance_raw"],
                                            ["cb", "rte"]).set_index("task")
    cb, rte = table.loc["cb"], table.loc["rte"]
    assert cb.num_seeds == 3 and rte.num_seeds == 1
    assert cb.frobenius_raw_var_ddof0 == pytest.approx(np.var([5.0, 10.0, 1.0]))  # ||P||_F = 5, 10, 1
    assert cb.rms_row_norm_raw_var_ddof0 == pytest.approx(np.var([5.0, 10.0, 1.0]) / 2)  # divided by sqrt(2 rows)
    pair = lambda a, b: math.sqrt(sum((x - y) ** 2 for ra, rb in zip(a, b) for x, y in zip(ra, rb)) / 2)
    c = [rows["cb", s] for s in range(3)]
    assert cb.within_rms_row_distance_raw == pytest.approx(np.mean([pair(c[0], c[1]), pair(c[0], c[2]),
                                                                    pair(c[1], c[2])]))
    assert (cb.rank_accuracy_median, cb.rank_accuracy_max, cb.rank_accuracy_delta) == (0.625, 0.75, 0.125)
    assert (cb.exact_match_median, cb.exact_match_max, cb.exact_match_delta) == (0.5, 0.75, 0.25)
    assert cb.paper_table2_delta == paper.TABLE2["cb"][2] == 0.08  # as printed
    assert (cb.paper_table2_median, cb.paper_table2_max) == (0.43, 0.61)
    assert cb.paper_table2_max_minus_median == pytest.approx(0.18)  # not the printed 0.08
    assert cb.paper_table1_var == 1.31
    assert np.isnan(rte.frobenius_raw_var_ddof0) and np.isnan(rte.within_rms_row_distance_raw)
    assert np.isnan(rte.rank_accuracy_delta) and rte.rank_accuracy_max == 0.6


def test_spearman_exact_equals_scipys_permutation_test_and_a_naive_loop():
    import itertools

    from analysis import stochasticity

    rng = np.random.default_rng(3)
    for n in (3, 4, 5):
        for _ in range(4):
            x, y = rng.normal(size=n), rng.integers(0, 3, size=n).astype(float)  # ties in y
            if np.ptp(y) == 0:
                continue
            got = stochasticity.spearman_exact(x, y)
            observed = stats.spearmanr(x, y).statistic
            null = np.array([stats.spearmanr(x, y[list(q)]).statistic for q in itertools.permutations(range(n))])
            one_sided = min((null >= observed - 1e-12).mean(), (null <= observed + 1e-12).mean())
            assert got["n"] == n and got["spearman_rho"] == pytest.approx(observed)
            assert got["p_exact"] == pytest.approx(min(1.0, 2 * one_sided))
            if n <= 4:  # the slow reference: scipy enumerates every pairing of both samples
                ref = stats.permutation_test((x, y), lambda a, b: stats.spearmanr(a, b).statistic,
                                             permutation_type="pairings", n_resamples=np.inf)
                assert got["p_exact"] == pytest.approx(ref.pvalue)
    distinct = stochasticity.spearman_exact([1, 2, 3, 4], [1, 2, 3, 4])
    assert distinct["p_exact"] == distinct["p_smallest"] == pytest.approx(2 / 24)
    tied = stochasticity.spearman_exact([1, 2, 3, 4], [0.01, 0.01, 0.08, 0.12])  # the paper's Table 2 deltas tie
    assert tied["p_smallest"] == pytest.approx(4 / 24) and tied["p_exact"] >= tied["p_smallest"]
    assert np.isnan(stochasticity.spearman_exact([1, 2, np.nan, 4], [1, 1, 2, 1])["spearman_rho"])  # y constant
    assert np.isnan(stochasticity.spearman_exact([1, 2], [2, 1])["p_exact"])
    with pytest.raises(ValueError):
        stochasticity.spearman_exact(range(9), range(9))


def _random_study(hidden: int) -> Study:
    """3 tasks x 2 seeds of random prompts of different lengths, with transfer and baseline outcomes."""
    gen = torch.Generator().manual_seed(8)
    rng = np.random.default_rng(8)
    lengths = {"cb": 3, "rte": 4, "copa": 2}
    prompts = [PromptRun(f"{t}{s}", t, s, torch.randn(n, hidden, generator=gen), {"init_text": ""},
                         {"exact_match": 0.5, "rank_accuracy": 0.5}) for t, n in lengths.items() for s in (0, 1)]
    idx = list(range(10))
    evals = [EvalRun(f"base-{t}", "baseline", t, idx=idx, em_correct=[0] * 10,
                     rank_correct=rng.integers(0, 2, 10).tolist()) for t in lengths]
    evals += [EvalRun(f"{a}{s}{b}", "transfer", b, a, s, idx=idx, em_correct=rng.integers(0, 2, 10).tolist(),
                      rank_correct=rng.integers(0, 2, 10).tolist())
              for a in lengths for s in (0, 1) for b in lengths]
    return Study("e", "s", prompts, evals)


def test_a_model_without_an_effective_prompt_gets_n_a_in_the_whole_report(tiny, tmp_path):
    from analysis import report
    from analysis.pipeline import AnalysisOptions, compute

    _, tokenizer = tiny
    model = _tiny_causal_lm("opt")  # post-norm OPT: the family defines no effective prompt
    results = compute(_random_study(16), model, tokenizer, AnalysisOptions(faithfulness=False, n_boot=50))
    names = {o.name for o in results.outputs}
    assert "nearest_cb" in names and not any(n.endswith("_effective") for n in names)
    assert results.meta["effective_prompt"] is None
    assert any("effective" in n and "n/a" in n for n in results.meta["notes"])
    report.write_all(results, tmp_path)
    t1 = pd.read_csv(tmp_path / "table1_norms.csv")
    assert t1["frobenius_effective_mean"].isna().all() and t1["frobenius_raw_mean"].notna().all()
    md = (tmp_path / "report.md").read_text(encoding="utf-8")
    assert "Effective prompt: n/a" in md
    assert "frobenius_effective" not in set(pd.read_csv(tmp_path / "predictors.csv")["predictor"])
    stats_ = pd.read_csv(tmp_path / "correlation_stats.csv")
    assert (stats_["mantel_permutations"] == 6).all()  # 3 tasks: 3! relabellings, enumerated
    # GPT-2: the effective prompt is defined (ln_1 of token + position) but the vocabulary has no effective rows
    gpt2 = _tiny_causal_lm("gpt2")
    results = compute(_random_study(16), gpt2, tokenizer, AnalysisOptions(faithfulness=False, n_boot=50))
    names = {o.name for o in results.outputs}
    assert not any(n.startswith("nearest_") and n.endswith("_effective") for n in names)
    assert results.meta["effective_prompt"] == "h.0.ln_1"
    t1 = next(o.data for o in results.outputs if o.name == "table1_norms")
    assert t1["frobenius_effective_mean"].notna().all()


def test_equal_transfer_changes_are_identical_floats():
    # a on b: 3/10 right against a baseline of 1/10; c on a: 2/10 against 0/10. Both change by exactly 1/5, but
    # 0.3 - 0.1 != 0.2 in floating point: the table divides integer counts once, so the two are one value.
    idx = list(range(10))
    ones = lambda k: [1] * k + [0] * (10 - k)  # noqa: E731
    prompts = [PromptRun(t, t, 0, torch.zeros(1, 2)) for t in ("a", "b", "c")]
    evals = [EvalRun("base-b", "baseline", "b", idx=idx, em_correct=ones(1), rank_correct=ones(1)),
             EvalRun("base-a", "baseline", "a", idx=idx, em_correct=ones(0), rank_correct=ones(0)),
             EvalRun("ab", "transfer", "b", "a", 0, idx=idx, em_correct=ones(3), rank_correct=ones(3)),
             EvalRun("ca", "transfer", "a", "c", 0, idx=idx, em_correct=ones(2), rank_correct=ones(2))]
    _, summary = transfer.transfer_tables(Study("e", "s", prompts, evals), n_boot=10)
    row = summary.set_index(["source", "target", "metric"])
    assert 0.3 - 0.1 != 0.2
    assert row.loc[("a", "b", "exact_match"), "delta_mean"] == row.loc[("c", "a", "exact_match"), "delta_mean"]
    assert row.loc[("a", "b", "exact_match"), "accuracy_mean"] == 0.3
