"""Baselines: the stay-level (paper Table 1) and admission-level (Table 2) comparison models.

Usage: `STAY_MODELS["f-lstm"](cfg, dropout)(batch)` -> logits (B,) for a stay batch of
data.StayDataset (ts_idx flat into the binary (B, T, F) hourly matrix, static (B, S));
`ADMISSION_MODELS["bert-lstm"](cfg, dropout)(batch)` -> logits (B,) for an admission batch of
data.AdmissionDataset (the real stays packed: ts_idx into (Ns, T, F), static (Ns, S), stay_mask (B,
K); note (B, E), note_mask (B,)). Sizes come from models.ModelConfig (seq_len, n_features, n_static,
note_dim, d_model, n_heads); `dropout` is the fine-tuning dropout before the output layer. Every
model starts from random weights (no pretrained init).

Stay level: F-LSTM and F-CNN (Tang et al. 2020, FIDDLE), RAIM (Xu et al. 2018), DCMN (Feng et al.
2019), and the time-series-only LSTM and Transformer of the paper's unimodal comparison. Admission
level: the Yang & Wu (2021) family, a note encoder and a time-series encoder (LSTM, CNN,
Star-Transformer, Transformer) fused by a gate, the first-named modality the main one (BertLstm: the
note is the main modality, the stays gate into it), each stay encoded alone and max-pooled over the
admission's stays (paper §3.3). The note side reads the frozen note embedding stored at
preprocessing (`--text-model`), not a fine-tuned ClinicalBERT. An absent note or an admission
without a stay is masked: a learned stand-in replaces an absent main modality and an absent
auxiliary one shifts nothing, so what is masked never reaches the output (tests/test_baselines.py
puts garbage there). Written from the papers' descriptions, not from their code; `fidelity:`
comments say where a detail is unstated or simplified. Imports torch and models only (like
sequence.py), so that models.py stays MedHMP. Shapes: the legend of models.py (B, T, F, S, K, Ns, E,
D).
"""
from functools import partial

import torch
from torch import nn

from models import ModelConfig, densify, masked_softmax


def hourly(batch: dict, cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The dense binary hourly matrix x (n, T, F) and the static vectors s (n, S) of a batch's
    (packed) stays."""
    s = batch["static"]  # (n, S)
    return densify(batch["ts_idx"], s.shape[0], cfg.seq_len, cfg.n_features), s  # (n, T, F), (n, S)


def with_static(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """s (n, S) repeated at every hour beside x (n, T, F) -> (n, T, F + S)."""
    return torch.cat([x, s[:, None].expand(-1, x.shape[1], -1)], dim=-1)  # (n, T, F + S)


def vector_norm(v: torch.Tensor) -> torch.Tensor:
    """‖v‖ over the last dim, keeping it (..., 1); finite, with a finite gradient, at v = 0."""
    return v.pow(2).sum(-1, keepdim=True).add(1e-12).sqrt()


class HourlyInput(nn.Module):
    """(x (n, T, F), s (n, S)) -> (n, T, D): Linear(F→D) of each hour, plus Linear(S→D) of s when
    `static` (= one Linear over [x_t; s]), plus a learned embedding of the hour when `position`
    (attention models)."""

    def __init__(self, cfg: ModelConfig, static: bool = True, position: bool = False):
        super().__init__()
        D = cfg.d_model
        self.hour = nn.Linear(cfg.n_features, D)
        self.static = nn.Linear(cfg.n_static, D, bias=False) if static else None
        # (T, D) learned positions, or None
        self.position = nn.Parameter(torch.randn(cfg.seq_len, D) * 0.02) if position else None

    def forward(self, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        h = self.hour(x)  # (n, T, F) → (n, T, D)
        if self.static is not None:
            h = h + self.static(s)[:, None]  # (n, T, D) + (n, 1, D)
        return h if self.position is None else h + self.position  # (n, T, D)


class Baseline(nn.Module):
    """A model's representation `encode(batch)` (B, width) → Dropout → Linear(width→1) → logits
    (B,)."""

    def __init__(self, width: int, dropout: float):
        super().__init__()
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(width, 1)

    def forward(self, batch: dict) -> torch.Tensor:
        return self.head(self.drop(self.encode(batch))).squeeze(-1)  # (B, width) → (B,)


# --------------------------------------------------------------------------------------- stay level
class FLSTM(Baseline):
    """F-LSTM (Tang et al. 2020, FIDDLE): an LSTM over the hourly FIDDLE vectors with the static
    vector beside every hour; the stay vector is its last hidden state."""

    def __init__(self, cfg: ModelConfig, dropout: float):
        super().__init__(cfg.d_model, dropout)
        self.cfg = cfg
        # fidelity: the paper gives no FIDDLE model sizes; one layer of width D. FIDDLE feeds s with
        # X; here s is repeated at every hour (input F + S), the simplest reading.
        self.rnn = nn.LSTM(cfg.n_features + cfg.n_static, cfg.d_model, batch_first=True)

    def encode(self, batch: dict) -> torch.Tensor:
        _, (h, _) = self.rnn(with_static(*hourly(batch, self.cfg)))  # (B, T, F + S) → h (1, B, D)
        return h[-1]  # (B, D)


class FCNN(Baseline):
    """F-CNN (Tang et al. 2020, FIDDLE): a 1-D convolution over the hours of the FIDDLE vectors (the
    static vector beside every hour), ReLU, max over time."""

    def __init__(self, cfg: ModelConfig, dropout: float, kernel: int = 3):
        super().__init__(cfg.d_model, dropout)
        self.cfg = cfg
        # fidelity: FIDDLE tunes the kernel size and depth; one layer, kernel 3, D channels here
        self.conv = nn.Conv1d(cfg.n_features + cfg.n_static, cfg.d_model, kernel,
                              padding=kernel // 2)

    def encode(self, batch: dict) -> torch.Tensor:
        x = with_static(*hourly(batch, self.cfg)).transpose(1, 2)  # (B, F + S, T)
        return torch.relu(self.conv(x)).amax(dim=2)  # (B, D, T) → (B, D)


class RAIM(Baseline):
    """RAIM (Xu et al. 2018): an LSTM over the hourly measurements, read by a multi-channel
    attention over the hours whose scores are guided by the other inputs, e_t^c = v_c · tanh(W h_t +
    G_c g_t^c); the channels' contexts Σ_t α_t^c h_t are concatenated and mapped to the stay
    vector."""

    def __init__(self, cfg: ModelConfig, dropout: float):
        super().__init__(cfg.d_model, dropout)
        D, self.cfg = cfg.d_model, cfg
        self.inp = HourlyInput(cfg, static=False)
        self.rnn = nn.LSTM(D, D, batch_first=True)
        # fidelity: RAIM's guidance is the discrete events (interventions, lab tests) and its
        # continuous stream includes waveforms (read by a CNN); here channel 1 is guided by the
        # static vector and channel 2 by the hour's own FIDDLE vector, and one attention at the last
        # hour replaces its per-step windows
        self.guide_static = nn.Linear(cfg.n_static, D)
        self.guide_hour = nn.Linear(cfg.n_features, D)
        self.att = nn.Linear(D, D)
        self.v = nn.Parameter(torch.randn(2, D) * D ** -0.5)  # (2, D) one score vector per channel
        self.out = nn.Linear(2 * D, D)

    def encode(self, batch: dict) -> torch.Tensor:
        x, s = hourly(batch, self.cfg)  # (B, T, F), (B, S)
        h, _ = self.rnn(self.inp(x, s))  # (B, T, D)
        guide = torch.stack([self.guide_static(s)[:, None].expand_as(h),
                             self.guide_hour(x)], dim=2)  # (B, T, 2, D)
        e = (torch.tanh(self.att(h)[:, :, None] + guide) * self.v).sum(-1)  # (B, T, 2)
        alpha = torch.softmax(e, dim=1)  # (B, T, 2) over the hours, per channel
        ctx = torch.einsum("btc,btd->bcd", alpha, h).flatten(1)  # (B, 2, D) → (B, 2D)
        return torch.tanh(self.out(ctx))  # (B, D)


class DCMN(Baseline):
    """DCMN (Feng et al. 2019), a double-core memory network: each modality is a memory that the
    other modality queries over several hops (q ← q + Σ_j softmax_j(q·k_j) v_j). Core 1: the LSTM
    states of the hours, queried from the static vector; core 2: the static vector's present
    features (one key and value embedding each), queried from the last LSTM state. The two final
    queries are concatenated."""

    def __init__(self, cfg: ModelConfig, dropout: float, hops: int = 2):
        super().__init__(2 * cfg.d_model, dropout)
        D, S, self.cfg, self.hops = cfg.d_model, cfg.n_static, cfg, hops
        # fidelity: DCMN's second modality is the notes (a sequence); here it is the static vector,
        # as a memory of its present features. Hops: 2 (not given in the MedHMP paper).
        self.inp = HourlyInput(cfg, static=False)
        self.rnn = nn.LSTM(D, D, batch_first=True)
        self.ts_value = nn.Linear(D, D)
        self.static_key = nn.Parameter(torch.randn(S, D) * D ** -0.5)  # (S, D)
        self.static_value = nn.Parameter(torch.randn(S, D) * D ** -0.5)  # (S, D)
        self.static_query = nn.Linear(S, D)

    @staticmethod
    def read(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
             mask: torch.Tensor | None) -> torch.Tensor:
        """One memory hop: q (B, D), keys/values (B, M, D), mask (B, M) or None → q + Σ_m α_m v_m
        (B, D)."""
        scores = (keys @ q[..., None]).squeeze(-1) / q.shape[-1] ** 0.5  # (B, M)
        alpha = masked_softmax(scores, mask)  # (B, M)
        return q + (alpha[..., None] * values).sum(1)  # (B, D)

    def encode(self, batch: dict) -> torch.Tensor:
        x, s = hourly(batch, self.cfg)  # (B, T, F), (B, S)
        h, (last, _) = self.rnn(self.inp(x, s))  # (B, T, D), last (1, B, D)
        ts_values = self.ts_value(h)  # (B, T, D)
        s_keys, s_values = s[..., None] * self.static_key, s[..., None] * self.static_value
        # (B, S, D) each
        q1, q2 = self.static_query(s), last[-1]  # (B, D) each
        for _ in range(self.hops):
            q1 = self.read(q1, h, ts_values, None)  # static → time-series core
            q2 = self.read(q2, s_keys, s_values, s != 0)  # time series → static core
        return torch.cat([q1, q2], dim=-1)  # (B, 2D)


class TSLSTM(Baseline):
    """Unimodal LSTM (the paper's time-series-only comparison): Linear(F→D) per hour → Dropout →
    LSTM → max over the hours. Reads the hourly matrix only, not the static vector."""

    def __init__(self, cfg: ModelConfig, dropout: float):
        super().__init__(cfg.d_model, dropout)
        self.cfg = cfg
        self.inp = HourlyInput(cfg, static=False)
        self.inner_drop = nn.Dropout(cfg.dropout)
        self.rnn = nn.LSTM(cfg.d_model, cfg.d_model, batch_first=True)

    def encode(self, batch: dict) -> torch.Tensor:
        h, _ = self.rnn(self.inner_drop(self.inp(*hourly(batch, self.cfg))))  # (B, T, D)
        return h.amax(dim=1)  # (B, D)


class TSTransformer(Baseline):
    """Unimodal Transformer: Linear(F→D) per hour plus a learned hour embedding → one encoder layer
    (self-attention, FFN 4D) → max over the hours. Reads the hourly matrix only."""

    def __init__(self, cfg: ModelConfig, dropout: float):
        super().__init__(cfg.d_model, dropout)
        self.cfg = cfg
        # fidelity: the hour embedding is ours (attention alone does not see the order of the hours)
        self.inp = HourlyInput(cfg, static=False, position=True)
        self.layer = nn.TransformerEncoderLayer(cfg.d_model, cfg.n_heads, 4 * cfg.d_model,
                                                cfg.dropout, batch_first=True)

    def encode(self, batch: dict) -> torch.Tensor:
        return self.layer(self.inp(*hourly(batch, self.cfg))).amax(dim=1)  # (B, T, D) → (B, D)


# ------------------------------------------------------------------- admission level: stay encoders
class StayLSTM(nn.Module):
    """x (n, T, F), s (n, S) → (n, D): an LSTM over [x_t; s] projected to D; its last hidden
    state."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.inp = HourlyInput(cfg)
        self.rnn = nn.LSTM(cfg.d_model, cfg.d_model, batch_first=True)

    def forward(self, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        _, (h, _) = self.rnn(self.inp(x, s))  # (n, T, D) → h (1, n, D)
        return h[-1]  # (n, D)


class StayCNN(nn.Module):
    """x (n, T, F), s (n, S) → (n, D): a convolution (kernel 3) over the hours of [x_t; s] projected
    to D, ReLU, max over time."""

    def __init__(self, cfg: ModelConfig, kernel: int = 3):
        super().__init__()
        self.inp = HourlyInput(cfg)
        self.conv = nn.Conv1d(cfg.d_model, cfg.d_model, kernel, padding=kernel // 2)

    def forward(self, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        h = self.inp(x, s).transpose(1, 2)  # (n, D, T)
        return torch.relu(self.conv(h)).amax(dim=2)  # (n, D)


class StayStar(nn.Module):
    """x (n, T, F), s (n, S) → (n, D): a Star-Transformer (Guo et al. 2019). Satellites h_t start at
    the hour embeddings e_t and a relay r at their mean; each cycle updates every h_t by attention
    over [h_{t-1}, h_t, h_{t+1}, e_t, r], then r by attention over [r; h_1..h_T] (each followed by
    ReLU and LayerNorm). The stay vector is max_t h_t + r."""

    def __init__(self, cfg: ModelConfig, cycles: int = 2):
        super().__init__()
        D, self.cycles = cfg.d_model, cycles
        self.inp = HourlyInput(cfg, position=True)
        # fidelity: 2 cycles sharing their weights (the paper's count is not given here)
        self.sat_att = nn.MultiheadAttention(D, cfg.n_heads, batch_first=True)
        self.relay_att = nn.MultiheadAttention(D, cfg.n_heads, batch_first=True)
        self.sat_norm, self.relay_norm = nn.LayerNorm(D), nn.LayerNorm(D)

    def forward(self, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        e = self.inp(x, s)  # (n, T, D)
        n, T, D = e.shape
        h, r = e, e.mean(dim=1, keepdim=True)  # (n, T, D), (n, 1, D)
        for _ in range(self.cycles):
            # (n, T + 2, D) zero neighbours at both ends
            padded = nn.functional.pad(h, (0, 0, 1, 1))
            ctx = torch.stack([padded[:, :-2], h, padded[:, 2:], e, r.expand(n, T, D)],
                              dim=2)  # (n, T, 5, D)
            q = h.reshape(n * T, 1, D)  # (nT, 1, D)
            kv = ctx.reshape(n * T, 5, D)  # (nT, 5, D)
            att = self.sat_att(q, kv, kv, need_weights=False)[0]  # (nT, 1, D)
            h = self.sat_norm(torch.relu(att)).view(n, T, D)  # (n, T, D)
            kv = torch.cat([r, h], dim=1)  # (n, T + 1, D)
            att = self.relay_att(r, kv, kv, need_weights=False)[0]  # (n, 1, D)
            r = self.relay_norm(torch.relu(att))  # (n, 1, D)
        return h.amax(dim=1) + r[:, 0]  # (n, D)


class StayTransformer(nn.Module):
    """x (n, T, F), s (n, S) → (n, D): [x_t; s] projected to D plus a learned hour embedding → one
    transformer encoder layer → max over the hours."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.inp = HourlyInput(cfg, position=True)
        self.layer = nn.TransformerEncoderLayer(cfg.d_model, cfg.n_heads, 4 * cfg.d_model,
                                                cfg.dropout, batch_first=True)

    def forward(self, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        return self.layer(self.inp(x, s)).amax(dim=1)  # (n, T, D) → (n, D)


STAY_ENCODERS = {"lstm": StayLSTM, "cnn": StayCNN, "star": StayStar, "encoder": StayTransformer}


# ---------------------------------------------------------------------------------- admission level
class GatedFusion(nn.Module):
    """main m (B, D) + gated auxiliary u (B, D) → (B, D), the multimodal adaptation gate (Rahman et
    al. 2020): g = ReLU(W_g [m; u]), H = g ⊙ W_u u + b, M = m + α H with α = min(β ‖m‖ / ‖H‖, 1),
    then LayerNorm and dropout. H is zero where the auxiliary modality is absent (`aux_present` (B,)
    False)."""

    def __init__(self, d_model: int, dropout: float, beta: float = 1.0):
        super().__init__()
        # fidelity: Yang & Wu fuse by gating; the gate's form and β are MAG's (β = 1), not given in
        # the paper
        self.gate = nn.Linear(2 * d_model, d_model)
        self.shift = nn.Linear(d_model, d_model)
        self.beta = beta
        self.norm, self.drop = nn.LayerNorm(d_model), nn.Dropout(dropout)

    def forward(self, m: torch.Tensor, u: torch.Tensor, aux_present: torch.Tensor,
                main_present: torch.Tensor | None = None) -> torch.Tensor:
        g = torch.relu(self.gate(torch.cat([m, u], dim=-1)))  # (B, 2D) → (B, D)
        H = g * self.shift(u) * aux_present[:, None]  # (B, D), zero without the auxiliary modality
        alpha = torch.clamp(self.beta * vector_norm(m) / vector_norm(H), max=1.0)  # (B, 1)
        # where m is a stand-in for an absent main modality, H is added unscaled
        if main_present is not None:
            alpha = torch.where(main_present[:, None], alpha, 1.0)  # (B, 1)
        return self.drop(self.norm(m + alpha * H))  # (B, D)


class YangWu(Baseline):
    """Yang & Wu (2021): a time-series encoder (STAY_ENCODERS[ts]) over each stay, max-pooled over
    the admission's real stays, and a note encoder (the frozen note embedding →
    Linear(E→D)-LN-ReLU); the `main` modality ("note" or "ts") is the main one and the other gates
    into it (GatedFusion)."""

    def __init__(self, cfg: ModelConfig, dropout: float, ts: str = "lstm", main: str = "note"):
        super().__init__(cfg.d_model, dropout)
        D, self.cfg, self.main = cfg.d_model, cfg, main
        self.stay_encoder = STAY_ENCODERS[ts](cfg)
        # fidelity: Yang & Wu fine-tune ClinicalBERT; here the note is the frozen embedding of
        # preprocessing (`--text-model`) and only this projection learns
        self.note_encoder = nn.Sequential(nn.Linear(cfg.note_dim, D), nn.LayerNorm(D), nn.ReLU())
        # fidelity: their cohorts have every modality; an absent main modality is this learned
        # vector (and the auxiliary shift is then added unscaled)
        self.missing = nn.Parameter(torch.randn(D) * 0.02)  # (D,)
        self.fusion = GatedFusion(D, dropout=cfg.dropout)

    def encode_stays(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, D) the max over each admission's real stays of their vectors (zeros without a stay),
        and (B,) whether it has a stay."""
        stay_mask = batch["stay_mask"]  # (B, K)
        (B, K), D, has = stay_mask.shape, self.cfg.d_model, stay_mask.any(dim=1)
        if batch["static"].shape[0] == 0:  # no stay in the whole batch
            return batch["note"].new_zeros(B, D), has
        z = self.stay_encoder(*hourly(batch, self.cfg))  # (Ns, D)
        slots = z.new_full((B, K, D), float("-inf"))
        slots[stay_mask] = z  # (B, K, D): stays are packed in row-major order of stay_mask
        return torch.where(has[:, None], slots.amax(dim=1), 0.0), has  # (B, D)

    def encode(self, batch: dict) -> torch.Tensor:
        ts, has_ts = self.encode_stays(batch)  # (B, D), (B,)
        has_note = batch["note_mask"]  # (B,)
        note = self.note_encoder(batch["note"])  # (B, D)
        note = torch.where(has_note[:, None], note, 0.0)  # (B, D), zeros where masked
        (m, has_m), (u, has_u) = ((note, has_note), (ts, has_ts)) if self.main == "note" else \
            ((ts, has_ts), (note, has_note))
        m = torch.where(has_m[:, None], m, self.missing)  # (B, D)
        return self.fusion(m, u, has_u, has_m)  # (B, D)


# one class per model: __init__(cfg, dropout), forward(batch) → logits (B,)
STAY_MODELS = {"f-lstm": FLSTM, "f-cnn": FCNN, "raim": RAIM, "dcmn": DCMN, "ts-lstm": TSLSTM,
               "ts-transformer": TSTransformer}
# paper Table 2 names: BertLstm = bert-lstm (the note main), LstmBert = lstm-bert (the stays main)
ADMISSION_MODELS = {name: partial(YangWu, ts=ts, main=main) for ts in STAY_ENCODERS
                    for name, main in ((f"bert-{ts}", "note"), (f"{ts}-bert", "ts"))}
