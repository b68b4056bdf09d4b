"""Tests for models.py (and the no-learning scores of health.py on its objective): shapes, masking
invariances, losses against hand-computed values, weight transfer, and that a few optimiser steps reduce
each pretraining loss. Tiny sizes, CPU, a few seconds."""
import math

import pytest
import torch

import health
import sequence
from models import (AdmissionEncoder, AdmissionPretrainer, Classifier, CodeEncoder, Fusion, ModelConfig,
                    NoteEncoder, StaticEncoder, StayEncoder, StayPretrainer,
                    TimeSeriesEncoder, densify, info_nce, load_encoder, masked_code_loss,
                    random_code_mask, reconstruction_loss)
from sequence import SequenceClassifier

META = {"seq_len": 6, "n_features": 11, "n_static": 5, "n_icd": 13, "n_drug": 7, "note_dim": 8, "format_version": 1}
T, F, S, V_ICD, V_DRUG, E, D = 6, 11, 5, 13, 7, 8, 16


@pytest.fixture
def cfg():
    return ModelConfig.from_meta(META, d_model=D)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def stay_inputs(n, g, density=0.2):
    """Packed stays: (ts_idx (nnz,), static (n, S), dense (n, T, F))."""
    dense = (torch.rand(n, T, F, generator=g) < density).float()
    return dense.flatten().nonzero().squeeze(1), (torch.rand(n, S, generator=g) < 0.5).float(), dense


def stay_batch(B=4, seed=0):
    ts_idx, static, _ = stay_inputs(B, gen(seed))
    return {"ts_idx": ts_idx, "static": static}


def admission_batch(counts=(1, 0, 2, 3, 1, 1), K=3, seed=0):
    """Admissions with `counts` real stays each; with the defaults admission 1 has no stays, 2 no note or drugs."""
    g = gen(seed)
    B = len(counts)
    stay_mask = torch.arange(K)[None, :] < torch.tensor(counts)[:, None]  # (B, K), left-aligned
    ts_idx, static, _ = stay_inputs(int(stay_mask.sum()), g)
    icd = (torch.rand(B, V_ICD, generator=g) < 0.4).float()
    drug = (torch.rand(B, V_DRUG, generator=g) < 0.5).float()
    icd[:, 0] = 1.0  # every admission has an ICD code
    note_mask = torch.ones(B, dtype=torch.bool)
    if B > 2:
        drug[2], note_mask[2] = 0.0, False
    note = torch.randn(B, E, generator=g) * note_mask[:, None]
    return {"ts_idx": ts_idx, "static": static, "stay_mask": stay_mask, "icd": icd, "drug": drug, "note": note,
            "note_mask": note_mask, "icd_mask": icd.any(1), "drug_mask": drug.any(1)}


def patient_batch(lengths=(3, 1, 4), L=4, seed=0):
    g = gen(seed)
    mask = torch.arange(L)[None, :] < torch.tensor(lengths)[:, None]  # (B, L)
    icd = (torch.rand(len(lengths), L, V_ICD, generator=g) < 0.3).float() * mask[..., None]
    return {"icd": icd, "visit_mask": mask, "visit_time": torch.rand(len(lengths), L, generator=g) * 100}


# ------------------------------------------------------------------------------------------- config
def test_config_sizes_come_from_meta():
    cfg = ModelConfig.from_meta(META, d_model=32, cl_include_positive=True)
    assert (cfg.seq_len, cfg.n_features, cfg.n_static, cfg.n_icd, cfg.n_drug, cfg.note_dim) == (6, 11, 5, 13, 7, 8)
    assert cfg.d_model == 32 and cfg.cl_include_positive and cfg.mask_rate == 0.15
    with pytest.raises(KeyError, match="note_dim"):
        ModelConfig.from_meta({k: v for k, v in META.items() if k != "note_dim"})


def test_densify_matches_loop():
    ts_idx = torch.tensor([0, 5, 13, 2 * T * F - 1])
    x = densify(ts_idx, 2, T, F)
    expected = torch.zeros(2, T, F)
    for i in ts_idx.tolist():
        expected[i // (T * F), (i // F) % T, i % F] = 1.0
    assert x.shape == (2, T, F) and x.dtype == torch.float32 and torch.equal(x, expected)


# ----------------------------------------------------------------------------------------- encoders
def test_sparse_projection_equals_dense_linear(cfg):
    enc = TimeSeriesEncoder(cfg)
    ts_idx, _, dense = stay_inputs(5, gen(1))
    linear = torch.nn.Linear(F, D, bias=False)
    linear.weight.data = enc.input_proj.data.T.clone()
    assert torch.allclose(enc.project(ts_idx, 5), linear(dense), atol=1e-6)
    shuffled = ts_idx[torch.randperm(len(ts_idx), generator=gen(2))]  # any cell order gives the same result
    assert torch.allclose(enc.project(shuffled, 5), linear(dense), atol=1e-6)
    assert torch.allclose(enc.project(ts_idx[:0], 2), torch.zeros(2, T, D))  # stays with no active cell
    enc.project(shuffled, 5).square().sum().backward()
    linear(dense).square().sum().backward()
    assert torch.allclose(enc.input_proj.grad, linear.weight.grad.T, atol=1e-5)  # same gradient as well


def test_sparse_projection_backward_equals_torchs_embedding_bag(cfg):
    """The CPU projection's own backward (models._BagSum) gives torch's embedding_bag gradient, with empty
    hours and unused features; under no_grad the plain embedding_bag runs and gives the same values."""
    enc = TimeSeriesEncoder(cfg)
    ts_idx, _, _ = stay_inputs(6, gen(3))
    ts_idx = ts_idx[ts_idx % F != 0]  # feature 0 never active: a zero gradient row
    x = enc.project(ts_idx, 6)
    g = torch.randn(x.shape, generator=gen(4))
    x.backward(g)
    ours, enc.input_proj.grad = enc.input_proj.grad, None
    rows = torch.div(ts_idx, F, rounding_mode="floor")
    ref = torch.nn.functional.embedding_bag(ts_idx % F, enc.input_proj, torch.searchsorted(rows, torch.arange(6 * T)),
                                            mode="sum")
    ref.backward(g.view(6 * T, D))
    assert torch.allclose(x.view(6 * T, D), ref) and torch.allclose(ours, enc.input_proj.grad, atol=1e-6)
    assert not ours[0].any()
    with torch.no_grad():
        assert torch.allclose(enc.project(ts_idx, 6), x)


def test_time_series_encoder_returns_top_layer_cell_state(cfg):
    enc = TimeSeriesEncoder(cfg).eval()
    ts_idx, _, dense = stay_inputs(3, gen(2))
    h = enc(ts_idx, 3)
    x, _ = enc.rnn1(dense @ enc.input_proj)  # dense reference path
    _, (hidden, cell) = enc.rnn2(enc.norm(x))
    assert h.shape == (3, D)
    assert torch.allclose(h, cell[-1], atol=1e-5) and not torch.allclose(h, hidden[-1])


def test_time_series_encoder_chunks_give_the_same_result(cfg):
    """CPU chunking of the LSTMs (rnn_chunk) is a speed choice only: any chunk size gives the same h."""
    ts_idx, _, _ = stay_inputs(7, gen(5))
    whole = TimeSeriesEncoder(ModelConfig(**{**cfg.__dict__, "rnn_chunk": 0})).eval()
    chunked = TimeSeriesEncoder(ModelConfig(**{**cfg.__dict__, "rnn_chunk": 3})).eval()
    chunked.load_state_dict(whole.state_dict())
    assert torch.allclose(whole(ts_idx, 7), chunked(ts_idx, 7), atol=1e-6)
    assert chunked(ts_idx[:0], 0).shape == (0, D)


def test_modality_encoder_shapes(cfg):
    assert StaticEncoder(cfg)(torch.rand(4, S)).shape == (4, D)
    code = CodeEncoder(V_ICD, D)
    assert code(torch.rand(4, V_ICD)).shape == (4, D)
    assert code(torch.rand(4, 9, V_ICD)).shape == (4, 9, D)  # patient level: (B, L, V)
    assert NoteEncoder(cfg)(torch.rand(4, E)).shape == (4, D)
    assert StayEncoder(cfg)(stay_batch(4)).shape == (4, D)


def test_fusion_ignores_masked_tokens(cfg):
    fusion = Fusion(cfg).eval()
    x = torch.randn(3, 4, D)
    mask = torch.tensor([[True, False, True, True], [True, True, True, True], [False, False, True, False]])
    out = fusion(x, mask)
    x2 = x.clone()
    x2[~mask] = torch.randn(int((~mask).sum()), D) * 100  # change only the masked tokens
    assert out.shape == (3, D)
    assert torch.allclose(out, fusion(x2, mask), atol=1e-6)
    assert not torch.allclose(fusion(x, torch.ones_like(mask)), out)  # the masked tokens did matter unmasked
    assert torch.allclose(fusion(x), fusion(x, torch.ones(3, 4, dtype=torch.bool)), atol=1e-6)
    with torch.no_grad():  # inference (MultiheadAttention's fast path) agrees with the autograd path
        assert torch.allclose(fusion(x2, mask), out, atol=1e-6)


def test_fusion_all_masked_row_is_zero_and_finite(cfg):
    fusion = Fusion(cfg)
    x = torch.randn(2, 3, D, requires_grad=True)
    mask = torch.tensor([[False, False, False], [True, False, True]])
    out = fusion(x, mask)
    assert torch.equal(out[0], torch.zeros(D)) and torch.isfinite(out).all()
    out.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_admission_encoder_shapes_and_tokens(cfg):
    enc = AdmissionEncoder(cfg)
    batch = admission_batch()
    x, mask = enc.tokens(batch)
    assert x.shape == (6, 4, D) and mask.shape == (6, 4) and enc(batch).shape == (6, D)
    assert mask[:, 0].tolist() == [True, False, True, True, True, True]  # admission 1 has no stays
    assert not mask[2, 2] and not mask[2, 3]  # admission 2: no drugs, no note
    assert enc.fuse(x, mask, keep=("stay", "note")).shape == (6, D)


def test_admission_stay_aggregation_is_masked_mean(cfg):
    enc = AdmissionEncoder(cfg).eval()
    batch = admission_batch()
    b = enc.stay_encoder.encode(batch["ts_idx"], batch["static"])  # (Ns, D)
    means, row = [], 0
    for n in batch["stay_mask"].sum(1).tolist():
        means.append(b[row:row + n].mean(0) if n else torch.zeros(D))
        row += n
    assert torch.allclose(enc.encode_stays(batch), enc.stay_proj(torch.stack(means)), atol=1e-5)


def test_admission_encoder_ignores_stay_padding_columns(cfg):
    enc = AdmissionEncoder(cfg).eval()
    batch = admission_batch(K=3)
    wide = dict(batch, stay_mask=torch.cat([batch["stay_mask"], torch.zeros(6, 4, dtype=torch.bool)], dim=1))
    assert torch.allclose(enc(batch), enc(wide), atol=1e-6)


def test_admission_encoder_without_any_stay(cfg):
    enc = AdmissionEncoder(cfg)
    batch = admission_batch(counts=(0, 0, 0, 0, 0, 0))
    assert batch["static"].shape == (0, S)
    out = enc(batch)
    assert out.shape == (6, D) and torch.isfinite(out).all()


# ------------------------------------------------------------------------------------------- losses
def test_reconstruction_loss_hand_value():
    pred = torch.tensor([[[0.5, 1.0], [0.0, 0.0]]])
    target = torch.tensor([[[1.0, 1.0], [0.0, 1.0]]])
    assert reconstruction_loss(pred, target).item() == pytest.approx((0.25 + 0 + 0 + 1) / 4)


def test_masked_code_loss_hand_value():
    pred = torch.tensor([[0.0, math.log(3.0)], [0.0, 0.0]])  # sigmoid → 0.5, 0.75
    target = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    loss_mask = torch.tensor([[True, True], [False, True]])
    assert masked_code_loss(pred, target, loss_mask).item() == pytest.approx((0.25 + 0.5625 + 0.25) / 3)
    assert masked_code_loss(pred, target, torch.zeros(2, 2, dtype=torch.bool)).item() == 0.0


def test_info_nce_hand_value():
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0]])  # cosine ignores the scale
    b = torch.tensor([[3.0, 0.0], [0.0, 1.0]])
    # s = I / τ with τ = 1: paper form u_i = −1 + log e^0 = −1; official form u_i = −1 + log(e + 1)
    assert info_nce(a, b, 1.0).item() == pytest.approx(-1.0)
    assert info_nce(a, b, 1.0, include_positive=True).item() == pytest.approx(math.log(math.e + 1) - 1)


def test_info_nce_matches_explicit_loops():
    g = gen(3)
    a, b, tau = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g), 0.1
    cos = lambda u, v: float(u @ v / (u.norm() * v.norm()))  # noqa: E731
    s = [[cos(a[i], b[j]) / tau for j in range(5)] for i in range(5)]
    paper = sum(-s[i][i] + math.log(sum(math.exp(s[i][j]) for j in range(5) if j != i)) for i in range(5)) / 5
    official = sum(-s[i][i] + math.log(sum(math.exp(s[i][j]) for j in range(5))) for i in range(5)) / 5
    assert info_nce(a, b, tau).item() == pytest.approx(paper, rel=1e-5)
    assert info_nce(a, b, tau, include_positive=True).item() == pytest.approx(official, rel=1e-5)


@pytest.mark.parametrize("include", [False, True])
def test_info_nce_over_masked_rows_equals_the_selected_rows(include):
    """info_nce(rows=m) is info_nce over a[m], b[m] (what the admission objective computed by indexing, a host
    sync on a GPU), and a mask with fewer than 2 rows gives 0 with finite gradients."""
    a, b = torch.randn(7, 5, generator=gen(5), requires_grad=True), torch.randn(7, 5, generator=gen(6))
    rows = torch.tensor([True, False, True, True, False, True, False])
    expected = info_nce(a[rows], b[rows], 0.1, include).item()
    assert info_nce(a, b, 0.1, include, rows=rows).item() == pytest.approx(expected, rel=1e-6)
    one = torch.zeros(7, dtype=torch.bool)
    loss = info_nce(a, b, 0.1, include, rows=one)
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(a.grad).all()


def test_info_nce_prefers_aligned_pairs():
    a = torch.randn(8, 16, generator=gen(4))
    b = a + 0.05 * torch.randn(8, 16, generator=gen(5))
    shuffled = b[torch.roll(torch.arange(8), 1)]
    for include in (False, True):
        assert info_nce(a, b, 0.1, include) < info_nce(a, shuffled, 0.1, include)
    # including the positive only adds to the denominator, so that form is always larger
    assert info_nce(a, b, 0.1, True) > info_nce(a, b, 0.1, False)


def test_random_code_mask_only_masks_present_codes_at_rate():
    codes = (torch.rand(200, 50, generator=gen(6)) < 0.3).float()
    keep = random_code_mask(codes, 0.15, gen(7))
    assert keep.dtype == torch.bool and keep.shape == codes.shape
    assert keep[codes == 0].all()  # absent codes are never masked
    rate = (~keep[codes == 1]).float().mean().item()
    assert 0.12 < rate < 0.18, rate  # ~3000 present codes: sd of the rate ≈ 0.0065
    assert torch.equal(keep, random_code_mask(codes, 0.15, gen(7)))  # deterministic given a generator


# -------------------------------------------------------------------------------------- pretraining
def test_stay_pretrainer_shapes(cfg):
    batch = stay_batch(4)
    out = StayPretrainer(StayEncoder(cfg), cfg)(batch)
    assert out["recon"].shape == (4, T, F) and out["loss"].ndim == 0
    assert ((out["recon"] > 0) & (out["recon"] < 1)).all()
    target = densify(batch["ts_idx"], 4, T, F)
    assert out["loss"].item() == pytest.approx(reconstruction_loss(out["recon"], target).item())


@pytest.mark.parametrize("decoder_input", ["stay", "zeros"])
def test_stay_decoder_inputs(cfg, decoder_input):
    """Both decoder variants reconstruct (B, T, F); with "stay" inputs b reaches every hour's input."""
    model = StayPretrainer(StayEncoder(cfg), ModelConfig(**{**cfg.__dict__, "decoder_input": decoder_input}))
    out = model(stay_batch())
    assert out["recon"].shape == (4, T, F) and torch.isfinite(out["loss"])
    assert model.decoder.input_size == (D if decoder_input == "stay" else 1)


def test_admission_pretrainer_outputs(cfg):
    model = AdmissionPretrainer(AdmissionEncoder(cfg), cfg).eval()
    batch = admission_batch()
    out = model(batch, generator=gen(8))
    masked = out.pop("masked_codes")
    assert set(out) == {"loss", "mcp", "cl"} and all(v.ndim == 0 and torch.isfinite(v) for v in out.values())
    assert set(masked) == {"icd", "drug"} and masked["icd"][0].shape == masked["icd"][1].shape == batch["icd"].shape
    # chance: the mean over the ICD (6 rows), drug (5) and note (5) terms of log(n − 1)
    assert health.contrastive_chance(batch, False).item() == pytest.approx((math.log(5) + 2 * math.log(4)) / 3)
    assert out["loss"].item() == pytest.approx(out["mcp"].item() + cfg.cl_weight * out["cl"].item(), rel=1e-5)
    assert out["loss"].item() == pytest.approx(model(batch, generator=gen(8))["loss"].item())  # same masks
    official = AdmissionPretrainer(model.encoder, ModelConfig.from_meta(META, d_model=D, cl_include_positive=True))
    official.icd_head, official.drug_head = model.icd_head, model.drug_head
    assert official.eval()(batch, generator=gen(8))["cl"] > out["cl"]  # positive in the denominator


def test_admission_pretrainer_skips_contrastive_terms_without_negatives(cfg):
    model = AdmissionPretrainer(AdmissionEncoder(cfg), cfg)
    batch = admission_batch(counts=(1, 2))  # 2 admissions, both with ICD codes; one note, no drugs
    batch["note_mask"] = torch.tensor([True, False])
    batch["drug"], batch["drug_mask"] = torch.zeros(2, V_DRUG), torch.zeros(2, dtype=torch.bool)
    out = model(batch, generator=gen(9))
    assert torch.isfinite(out["loss"]) and out["cl"] != 0  # only the ICD term is left
    assert health.contrastive_chance(batch, False).item() == pytest.approx(math.log(1))  # ICD: 1 negative
    single = admission_batch(counts=(1,))
    assert model(single, generator=gen(9))["cl"].item() == 0.0  # B = 1: no term at all


def test_no_learning_priors_score_like_constant_predictions(cfg):
    """health.prior_losses: mcp_<name> is the masked-code loss of constant probabilities on the batch's own
    masks; after init_priors the heads predict exactly the prior (bias = logit, weight = 0), so mcp ==
    mcp_frequency."""
    model = AdmissionPretrainer(AdmissionEncoder(cfg), cfg).eval()
    batch = admission_batch()
    prior = {"icd": torch.full((V_ICD,), 0.02), "drug": torch.full((V_DRUG,), 0.05)}
    none = {"icd": torch.zeros(V_ICD), "drug": torch.zeros(V_DRUG)}
    model.init_priors(prior)
    out = model(batch, generator=gen(8))
    out.update(health.prior_losses(out["masked_codes"], {"frequency": prior, "none": none}, cfg.code_loss))
    assert out["mcp"].item() == pytest.approx(out["mcp_frequency"].item(), rel=1e-5)
    assert out["mcp_none"].item() != pytest.approx(out["mcp_frequency"].item())
    for kind in ("mse", "bce"):  # hand value: one position, target 1, p = 0.25
        loss = masked_code_loss(torch.logit(torch.tensor([[0.25]])), torch.ones(1, 1), torch.ones(1, 1, dtype=torch.bool),
                                kind=kind)
        assert loss.item() == pytest.approx(0.5625 if kind == "mse" else -math.log(0.25), rel=1e-5)


def test_stay_pattern_init_predicts_the_cell_means(cfg):
    """init_pattern sets the (T, F) bias to logit(cell mean); with the read-out weights at 0 the
    reconstruction is exactly that pattern."""
    model = StayPretrainer(StayEncoder(cfg), cfg).eval()
    mean = torch.rand(T, F) * 0.5 + 0.01
    model.init_pattern(mean)
    with torch.no_grad():
        model.readout.weight.zero_(), model.readout.bias.zero_()
    torch.testing.assert_close(model(stay_batch())["recon"][0], mean, rtol=1e-4, atol=1e-6)


def test_pretraining_steps_reduce_loss(cfg):
    cfg = ModelConfig.from_meta(META, d_model=D, dropout=0.0)
    torch.manual_seed(0)
    for model, batch in ((StayPretrainer(StayEncoder(cfg), cfg), stay_batch(8)),
                         (AdmissionPretrainer(AdmissionEncoder(cfg), cfg), admission_batch())):
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        losses = []
        for _ in range(15):
            loss = model(batch)["loss"] if isinstance(model, StayPretrainer) else model(batch, gen(10))["loss"]
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        # the paper-form InfoNCE can go below 0, so compare differences, not ratios
        assert losses[-1] < losses[0] - 0.05, (type(model).__name__, losses)


# ------------------------------------------------------------------------------- transfer, downstream
def test_load_encoder_transfers_every_stay_weight(cfg):
    stay_model = StayPretrainer(StayEncoder(cfg), cfg)
    adm = AdmissionEncoder(cfg)
    n = load_encoder(adm.stay_encoder, stay_model.state_dict(), "encoder.")  # decoder keys are not under it
    for k, v in stay_model.encoder.state_dict().items():
        assert torch.equal(adm.state_dict()["stay_encoder." + k], v), k
    assert n == len(stay_model.encoder.state_dict()) == sum(k.startswith("stay_encoder.") for k in adm.state_dict())


def test_load_encoder_is_strict(cfg):
    enc = StayEncoder(cfg)
    sd = {"encoder." + k: v for k, v in StayEncoder(cfg).state_dict().items()}
    missing = {k: v for k, v in sd.items() if k != "encoder.fusion.norm.bias"}
    with pytest.raises(RuntimeError, match="fusion.norm.bias"):
        load_encoder(enc, missing, "encoder.")
    load_encoder(enc, missing, "encoder.", expected_missing={"fusion.norm.bias"})  # allowed explicitly
    with pytest.raises(RuntimeError, match="extra.weight"):
        load_encoder(enc, {**sd, "encoder.extra.weight": torch.zeros(1)}, "encoder.")
    with pytest.raises(RuntimeError, match="missing"):
        load_encoder(enc, sd, "wrong_prefix.")


def test_classifiers_and_pretrained_transfer(cfg):
    adm_model = AdmissionPretrainer(AdmissionEncoder(cfg), cfg)
    clf = Classifier(AdmissionEncoder(cfg), dropout=0.2)
    load_encoder(clf.encoder, adm_model.state_dict(), "encoder.")
    assert all(k.startswith(("encoder.", "head.")) for k in clf.state_dict())
    assert clf(admission_batch()).shape == (6,)
    stay_clf = Classifier(StayEncoder(cfg), n_out=3)
    load_encoder(stay_clf.encoder, adm_model.state_dict(), "encoder.stay_encoder.")  # admission → stay task
    assert stay_clf(stay_batch(4)).shape == (4, 3)
    seq = SequenceClassifier(CodeEncoder(V_ICD, D), "retain", cfg)
    load_encoder(seq.code_encoder, adm_model.state_dict(), "encoder.icd_encoder.")
    assert torch.equal(seq.code_encoder.mlp[0].weight, adm_model.encoder.icd_encoder.mlp[0].weight)
    with pytest.raises(ValueError, match="retain"):
        SequenceClassifier(CodeEncoder(V_ICD, D), "nope", cfg)


def test_standardize_codes_gives_the_real_visits_zero_mean_and_unit_sd(cfg):
    model = SequenceClassifier(CodeEncoder(V_ICD, D), "lstm", cfg).eval()
    batch = patient_batch()
    before = model(batch)
    with torch.no_grad():
        model.code_encoder.mlp[-2].bias.fill_(-0.5)   # a shrunken, sparse output, as after pretraining
    model.standardize_codes([{k: v[:2] for k, v in batch.items()}, {k: v[2:] for k, v in batch.items()}])
    z = (model.code_encoder(batch["icd"]) - model.code_mean) / model.code_scale  # (B, L, D)
    real = z[batch["visit_mask"]]                                                   # (visits, D)
    alive = model.code_encoder(batch["icd"])[batch["visit_mask"]].std(0) > 1e-3     # dims ReLU did not zero
    assert torch.allclose(real.mean(0), torch.zeros(D), atol=1e-5)
    assert torch.allclose(real.std(0)[alive], torch.ones(int(alive.sum())), atol=1e-4)
    assert not torch.allclose(before, model(batch))
    assert {"code_mean", "code_scale"} <= model.state_dict().keys()   # kept with the best fine-tuned weights


@pytest.mark.parametrize("kind", sorted(sequence.SEQUENCE_MODELS))
def test_sequence_classifier_respects_visit_mask(cfg, kind):
    model = SequenceClassifier(CodeEncoder(V_ICD, D), kind, cfg).eval()
    batch = patient_batch()
    out = model(batch)
    assert out.shape == (3,) and torch.isfinite(out).all()
    # garbage in the padding visits, and two extra padding visits, change nothing
    noisy = dict(batch, icd=batch["icd"] + (~batch["visit_mask"])[..., None] * torch.rand(3, 4, V_ICD))
    longer = {k: torch.cat([v, torch.ones_like(v[:, :2]) if k == "icd" else torch.zeros_like(v[:, :2])], 1)
              for k, v in batch.items()}
    assert torch.allclose(out, model(noisy), atol=1e-6) and torch.allclose(out, model(longer), atol=1e-6)
    # while a real visit does change the output
    changed = dict(batch, icd=batch["icd"].clone())
    changed["icd"][0, 0] = 1 - changed["icd"][0, 0]
    assert not torch.allclose(out, model(changed))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_pretrainers_on_cuda_with_bf16_autocast(cfg):
    dev = torch.device("cuda")
    for model, batch in ((StayPretrainer(StayEncoder(cfg), cfg), stay_batch(8)),
                         (AdmissionPretrainer(AdmissionEncoder(cfg), cfg), admission_batch())):
        model.to(dev)
        batch = {k: v.to(dev) for k, v in batch.items()}
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(batch)["loss"]
        loss.backward()
        assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters()
                                            if p.grad is not None)


def test_admission_objectives_match_explicit_reference(cfg):
    model = AdmissionPretrainer(AdmissionEncoder(cfg), cfg).eval()
    batch = admission_batch()
    out = model(batch, generator=gen(8))
    enc, g = model.encoder, gen(8)
    keep = {"icd": random_code_mask(batch["icd"], 0.15, g), "drug": random_code_mask(batch["drug"], 0.15, g)}
    with torch.no_grad():
        x, mask = enc.tokens(batch)
        x_masked = x.clone()
        x_masked[:, 1] = enc.icd_encoder(batch["icd"] * keep["icd"])
        x_masked[:, 2] = enc.drug_encoder(batch["drug"] * keep["drug"])
        a = enc.fuse(x_masked, mask)
        heads = {"icd": torch.sigmoid(model.icd_head(a)), "drug": torch.sigmoid(model.drug_head(a))}
    mcp = 0.0
    for name in ("icd", "drug"):  # squared error over the codes the model cannot see, admissions with the set
        errs = [(heads[name][i, v].item() - (1.0 if batch[name][i, v] and not keep[name][i, v] else 0.0)) ** 2
                for i in range(6) if batch[f"{name}_mask"][i] for v in range(batch[name].shape[1])
                if not (batch[name][i, v] and keep[name][i, v])]
        mcp += 0.5 * sum(errs) / len(errs)
    cl = []
    for i, name in ((1, "icd"), (2, "drug"), (3, "note")):
        others = tuple(t for t in enc.TOKENS if t != name)
        rows = mask[:, i]
        cl.append(info_nce(x[rows, i], enc.fuse(x, mask, others)[rows], 0.1).item())
    assert out["mcp"].item() == pytest.approx(mcp, rel=1e-5)
    assert out["cl"].item() == pytest.approx(sum(cl) / 3, rel=1e-5)


def test_sequence_models_match_per_patient_reference(cfg):
    batch = patient_batch(lengths=(3, 1, 4))
    lstm = SequenceClassifier(CodeEncoder(V_ICD, D), "lstm", cfg).eval()
    retain = SequenceClassifier(CodeEncoder(V_ICD, D), "retain", cfg).eval()
    with torch.no_grad():
        for i, n in enumerate((3, 1, 4)):
            v = lstm.code_encoder(batch["icd"][i, :n])  # (n, D): this patient's real visits only
            h = lstm.model.rnn(v[None])[0][0, -1]  # last hidden state, no padding
            assert torch.allclose(lstm(batch)[i], lstm.head(h), atol=1e-5)
            m = retain.model
            v = retain.code_encoder(batch["icd"][i, :n]).flip(0)[None]  # (1, n, D), newest visit first
            alpha = torch.softmax(m.alpha(m.alpha_rnn(v)[0]), dim=1)  # (1, n, 1)
            beta = torch.tanh(m.beta(m.beta_rnn(v)[0]))  # (1, n, D)
            c = (alpha * beta * v).sum(1)[0]
            assert torch.allclose(retain(batch)[i], retain.head(c), atol=1e-5)


@pytest.mark.parametrize("kind", sorted(sequence.SEQUENCE_MODELS))
def test_sequence_models_score_each_patient_alone(cfg, kind):
    """A patient's logit in a padded batch equals its logit alone with no padding: no model reads across
    patients or into the padding, whatever its mechanism (convolutions, attention, recurrences)."""
    torch.manual_seed(0)
    model = SequenceClassifier(CodeEncoder(V_ICD, D), kind, cfg).eval()
    lengths = (3, 1, 4, 2)
    batch = patient_batch(lengths=lengths, L=6)
    with torch.no_grad():
        out = model(batch)  # (4,)
        for i, n in enumerate(lengths):
            alone = {k: v[i:i + 1, :n] for k, v in batch.items()}
            assert torch.allclose(out[i], model(alone)[0], atol=1e-5), (kind, i)


@pytest.mark.parametrize("kind", ["dipole", "hitanet"])
def test_time_and_history_reach_the_attention_models(cfg, kind):
    """HiTANet reads the time to prediction; Dipole's context reads the visits before the last."""
    torch.manual_seed(0)
    model = SequenceClassifier(CodeEncoder(V_ICD, D), kind, cfg).eval()
    batch = patient_batch(lengths=(3, 4), L=4)
    later = dict(batch, visit_time=batch["visit_time"] + 365.0)
    first = dict(batch, icd=batch["icd"].clone())
    first["icd"][:, 0] = 1 - first["icd"][:, 0]
    with torch.no_grad():
        out = model(batch)
        assert not torch.allclose(out, model(first), atol=1e-6)
        moved = model(later)
    assert (kind == "hitanet") == (not torch.allclose(out, moved, atol=1e-6))


def test_dipole_matches_its_formula(cfg):
    model = SequenceClassifier(CodeEncoder(V_ICD, D), "dipole", cfg).eval()
    batch = patient_batch(lengths=(3, 1), L=3)
    m = model.model
    with torch.no_grad():
        for i, n in enumerate((3, 1)):
            h = m.rnn(model.code_encoder(batch["icd"][i, :n])[None])[0][0]  # (n, D)
            alpha = torch.softmax(m.score(h[:-1]).squeeze(-1), dim=0) if n > 1 else torch.zeros(0)
            c = (alpha[:, None] * h[:-1]).sum(0)  # (D,): zeros for a single visit
            z = torch.tanh(m.combine(torch.cat([c, h[-1]])))
            assert torch.allclose(model(batch)[i], model.head(z), atol=1e-5)
