"""Sequence: the patient-level models over visit sequences (paper §3.4, Table 4), one class each.

Usage: `SequenceClassifier(CodeEncoder(V_icd, D), "hitanet", cfg)(batch)` -> logits (B,), for a
batch of data.PatientDataset: icd (B, L, V) multi-hot visits, oldest first and left-aligned,
visit_mask (B, L) bool, visit_time (B, L) days from each visit's discharge to the prediction time.
The code encoder is the admission encoder's ICD MLP, pretrained (`--init admission`, the paper's
"_a" rows) or fresh (`--init none`). Every model maps (x (B, L, D), visit_mask, visit_time) -> (B,
D) and ignores the padding visits entirely (tests/test_models.py puts garbage there). Written from
the papers' descriptions, not from their code; the `fidelity:` comments say where a detail is
simplified. A module of its own so that models.py stays MedHMP. Imports torch and models only.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

from models import CodeEncoder, ModelConfig, masked_softmax


def last_visit(visit_mask: torch.Tensor) -> torch.Tensor:
    """(B,) index of each patient's last real visit (visits are left-aligned; 0 for a patient
    without any)."""
    return (visit_mask.sum(dim=1) - 1).clamp(min=0)


def at_last_visit(h: torch.Tensor, visit_mask: torch.Tensor) -> torch.Tensor:
    """h (B, L, D) at each patient's last real visit -> (B, D)."""
    return h[torch.arange(len(h), device=h.device), last_visit(visit_mask)]


class LSTMSequence(nn.Module):
    """LSTM over visits; the patient vector is the hidden state at the last real visit."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        # official health_risk_prediction.py: num_layers 2, dropout between layers
        self.rnn = nn.LSTM(cfg.d_model, cfg.d_model, num_layers=2, batch_first=True,
                           dropout=cfg.dropout)

    def forward(self, x: torch.Tensor, visit_mask: torch.Tensor,
                visit_time: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)  # (B, L, D); causal, so right-padding cannot reach the real visits
        # fidelity: the official LSTM_encoder max-pools the valid outputs; we take the last hidden
        # state
        return at_last_visit(out, visit_mask)  # (B, D)


class Retain(nn.Module):
    """RETAIN (Choi et al. 2016): reverse-time GRUs give visit attention α and variable attention β;
    the patient vector is c = Σ_j α_j β_j ⊙ v_j over the real visits."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        D = cfg.d_model
        self.alpha_rnn = nn.GRU(D, D, batch_first=True)
        self.beta_rnn = nn.GRU(D, D, batch_first=True)
        self.alpha = nn.Linear(D, 1)  # e_j = w_α·g_j + b_α
        self.beta = nn.Linear(D, D)  # β_j = tanh(W_β h_j + b_β)

    def forward(self, x: torch.Tensor, visit_mask: torch.Tensor,
                visit_time: torch.Tensor) -> torch.Tensor:
        L = x.shape[1]
        # reverse each patient's real visits (newest first) and keep them left-aligned; the padding
        # slots repeat visit 0 and are masked below. fidelity: the official Retain runs its GRUs
        # forward in time.
        slot = torch.arange(L, device=x.device)  # (L,)
        rev = (last_visit(visit_mask)[:, None] - slot).clamp(min=0)  # (B, L)
        v = x.gather(1, rev[..., None].expand_as(x))  # (B, L, D)
        e = self.alpha(self.alpha_rnn(v)[0]).squeeze(-1)  # (B, L)
        alpha = masked_softmax(e, visit_mask)  # (B, L)
        beta = torch.tanh(self.beta(self.beta_rnn(v)[0]))  # (B, L, D)
        return (alpha[..., None] * beta * v).sum(dim=1)  # (B, D)


class Dipole(nn.Module):
    """Dipole (Ma et al. 2017) with location-based attention: a GRU over visits gives h_1..h_t; the
    weights α_i = softmax_i(w·h_i + b) over the visits before the last give c = Σ_i α_i h_i, and the
    patient vector is tanh(W_c [c; h_t] + b_c)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        D = cfg.d_model
        # fidelity: Dipole's GRU is bidirectional; the official MedHMP code's "gruself" (reported as
        # Dipole) is unidirectional, which also keeps the right-hand padding away from the real
        # visits.
        self.rnn = nn.GRU(D, D, batch_first=True)
        self.score = nn.Linear(D, 1)
        self.combine = nn.Linear(2 * D, D)

    def forward(self, x: torch.Tensor, visit_mask: torch.Tensor,
                visit_time: torch.Tensor) -> torch.Tensor:
        h, _ = self.rnn(x)  # (B, L, D)
        h_t = at_last_visit(h, visit_mask)  # (B, D)
        slot = torch.arange(h.shape[1], device=h.device)[None, :]  # (1, L)
        # (B, L) the real visits before the last
        before = visit_mask & (slot < last_visit(visit_mask)[:, None])
        # (B, L); zeros for a single visit
        alpha = masked_softmax(self.score(h).squeeze(-1), before)
        c = (alpha[..., None] * h).sum(dim=1)  # (B, D)
        return torch.tanh(self.combine(torch.cat([c, h_t], dim=-1)))  # (B, D)


class AdaCare(nn.Module):
    """AdaCare (Ma et al. 2020): causal convolutions dilated 1, 3 and 5 visits read the history at
    three time scales; squeeze-and-excitation gates recalibrate the convolution features and the
    visit vector, and a GRU over their concatenation ends in the patient vector (its state at the
    last real visit)."""

    DILATIONS = (1, 3, 5)

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        D, C = cfg.d_model, cfg.d_model // 2  # C channels per dilation
        self.convs = nn.ModuleList(
            nn.Conv1d(D, C, kernel_size=2, dilation=r) for r in self.DILATIONS)
        width = C * len(self.DILATIONS)
        # fidelity: AdaCare gates the input with sparsemax; sigmoid here for both gates
        self.conv_gate = nn.Sequential(nn.Linear(width, width // 4), nn.ReLU(),
                                       nn.Linear(width // 4, width))
        self.input_gate = nn.Sequential(nn.Linear(D, D // 4), nn.ReLU(), nn.Linear(D // 4, D))
        self.rnn = nn.GRU(width + D, D, batch_first=True)

    def forward(self, x: torch.Tensor, visit_mask: torch.Tensor,
                visit_time: torch.Tensor) -> torch.Tensor:
        seq = x.transpose(1, 2)  # (B, D, L)
        # left padding by r makes each convolution causal: visit t sees t - r and t, never the
        # padding after it
        conv = torch.cat([conv(F.pad(seq, (r, 0))) for conv, r in zip(self.convs, self.DILATIONS)],
                         dim=1)
        conv = torch.relu(conv).transpose(1, 2)  # (B, L, 3C)
        conv = conv * torch.sigmoid(self.conv_gate(conv))  # (B, L, 3C) per-visit recalibration
        inp = x * torch.sigmoid(self.input_gate(x))  # (B, L, D)
        h, _ = self.rnn(torch.cat([conv, inp], dim=-1))  # (B, L, D)
        return at_last_visit(h, visit_mask)  # (B, D)


class HiTANet(nn.Module):
    """HiTANet (Luo et al. 2020): visits carry a time embedding of their distance to the prediction
    time, τ_j = W_τ (1 − tanh²(w Δt_j + b)); a transformer layer relates the visits (local
    attention); the patient vector pools them with a gate θ between a time-aware key-query attention
    α_j ∝ exp(q(τ_j)·k(h_j)/√D) and a self-attention β_j ∝ exp(w·h_j): z = Σ_j (θ α_j + (1 − θ) β_j)
    h_j, θ = σ(w_θ · h_last)."""

    def __init__(self, cfg: ModelConfig, time_dim: int = 64):
        super().__init__()
        D = cfg.d_model
        self.time_in = nn.Linear(1, time_dim)
        self.time_out = nn.Linear(time_dim, D)
        # fidelity: one layer and a D-wide feed-forward; the paper's depth and widths are not given
        # here
        self.layer = nn.TransformerEncoderLayer(D, cfg.n_heads, dim_feedforward=D,
                                                dropout=cfg.dropout, batch_first=True)
        self.query, self.key = nn.Linear(D, D), nn.Linear(D, D)
        self.self_score = nn.Linear(D, 1)
        self.gate = nn.Linear(D, 1)

    def forward(self, x: torch.Tensor, visit_mask: torch.Tensor,
                visit_time: torch.Tensor) -> torch.Tensor:
        D = x.shape[-1]
        # (B, L, 1) in half-years, so tanh starts away from saturation
        dt = (visit_time / 180.0)[..., None]
        tau = self.time_out(1 - torch.tanh(self.time_in(dt)) ** 2)  # (B, L, D)
        pad = ~visit_mask
        # a patient without visits keeps one key (masked below)
        pad[:, 0] = pad[:, 0] & visit_mask.any(dim=1)
        h = self.layer(x + tau, src_key_padding_mask=pad)  # (B, L, D)
        alpha = masked_softmax((self.query(tau) * self.key(h)).sum(-1) / math.sqrt(D),
                               visit_mask)  # (B, L)
        beta = masked_softmax(self.self_score(h).squeeze(-1), visit_mask)  # (B, L)
        theta = torch.sigmoid(self.gate(at_last_visit(h, visit_mask)))  # (B, 1)
        return ((theta * alpha + (1 - theta) * beta)[..., None] * h).sum(dim=1)  # (B, D)


# one class per model: __init__(cfg), forward(x (B, L, D), visit_mask (B, L), visit_time (B, L)) →
# (B, D)
SEQUENCE_MODELS = {"lstm": LSTMSequence, "retain": Retain, "dipole": Dipole, "adacare": AdaCare,
                   "hitanet": HiTANet}


class SequenceClassifier(nn.Module):
    """Patient-level risk model: CodeEncoder per visit → a SEQUENCE_MODELS model → Linear → logits
    (B,).

    `code_encoder` is the admission encoder's ICD MLP (pretrained, `--init admission`) or a fresh
    one.
    """

    def __init__(self, code_encoder: CodeEncoder, kind: str, cfg: ModelConfig,
                 dropout: float | None = None):
        super().__init__()
        if kind not in SEQUENCE_MODELS:
            raise ValueError(f"unknown sequence model {kind!r}; choose from "
                             f"{sorted(SEQUENCE_MODELS)}")
        self.code_encoder = code_encoder
        self.drop = nn.Dropout(cfg.dropout if dropout is None else dropout)
        self.model = SEQUENCE_MODELS[kind](cfg)
        self.head = nn.Linear(cfg.d_model, 1)
        # a fixed per-dimension standardisation of the visit embeddings (identity until
        # `standardize_codes`)
        self.register_buffer("code_mean", torch.zeros(cfg.d_model))
        self.register_buffer("code_scale", torch.ones(cfg.d_model))

    @torch.no_grad()
    def standardize_codes(self, batches) -> None:
        """Fix `code_mean`/`code_scale` to the mean and sd of the code encoder's output over the
        real visits of `batches` (codes only, no labels). fidelity: the paper feeds the ICD MLP's
        output to the sequence model as it is; pretrained, that output is ~4x smaller and sparser
        than a fresh MLP's, and SGD on a fresh sequence model did not use it with <= 100 labels
        (docs/results.md, Patient-level inputs)."""
        # (visits, D): every real visit's embedding
        z = torch.cat([self.code_encoder(b["icd"])[b["visit_mask"]] for b in batches])
        self.code_mean.copy_(z.mean(0))
        self.code_scale.copy_(z.std(0).clamp(min=1e-3))

    def forward(self, batch: dict) -> torch.Tensor:
        codes = self.code_encoder(batch["icd"])  # (B, L, V_icd) → (B, L, D)
        x = (codes - self.code_mean) / self.code_scale
        x = self.drop(x)
        z = self.model(x, batch["visit_mask"], batch["visit_time"])  # (B, D)
        return self.head(self.drop(z)).squeeze(-1)  # (B,)
