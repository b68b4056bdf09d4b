"""Models: the MedHMP encoders, fusion blocks, pretraining objectives, losses and classifiers.

Usage: `cfg = ModelConfig.from_meta(meta)`, then e.g. `StayPretrainer(StayEncoder(cfg),
cfg)(batch)["loss"]`, `AdmissionPretrainer(AdmissionEncoder(cfg), cfg)(batch)`,
`Classifier(encoder)(batch)` → logits. Reads and writes nothing: pure torch modules and functions.
Batches are the `dict[str, Tensor]` of docs/data-format.md, already on the module's device. Imports
no project module. The patient-level sequence models (LSTM, RETAIN, Dipole, AdaCare, HiTANet) that
build on CodeEncoder are in sequence.py. A pretrainer given a `Shard` (a run of several processes,
docs/distributed.md) returns its process's share of the loss of the whole batch split across the
processes: the contrastive negatives are gathered from every process, and every mean over rows or
masked cells divides by the whole batch's count.

Shape legend:
    B  batch                          T  hours (seq_len, 48)       F  features (n_features)
    S  static features (n_static)     K  stay slots per admission  Ns real stays in a batch
    V  code vocabulary (V_icd, V_drug)                             E  note-embedding dim (note_dim)
    D  model width (d_model)          L  visits per patient        N  tokens entering a fusion block
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class ModelConfig:
    """Architecture and objective settings; the six sizes come from meta.json (`from_meta`)."""
    seq_len: int  # T, meta.json
    n_features: int  # F, meta.json
    n_static: int  # S, meta.json
    n_icd: int  # V_icd, meta.json
    n_drug: int  # V_drug, meta.json
    note_dim: int  # E, meta.json
    d_model: int = 256  # paper App. B/C: d_r = 256 everywhere
    n_heads: int = 4  # official operations.py SelfAttention
    dropout: float = 0.1  # official SelfAttention and LSTM inter-layer dropout
    static_hidden: int = 64  # official table_encoder 73→64→256
    mask_rate: float = 0.15  # paper App. B, "following BERT"
    temperature: float = 0.1  # paper App. B (also the info-nce default the official code uses)
    cl_weight: float = 0.1  # paper Eq. 11, λ
    # paper Eq. 10 excludes the positive; official info-nce includes it
    cl_include_positive: bool = False
    # perf, CPU only: stays per LSTM call (bench/train.py); 0 runs every stay at once
    rnn_chunk: int = 512
    # stage-1 decoder input at every hour: "stay" (b) or "zeros" (paper text, see below)
    decoder_input: str = "stay"
    # fidelity: the paper's read-out has an (F,) bias; a learned (T, F) bias, started at the
    # training cells' means (StayPretrainer.init_pattern), lets b explain only how a stay departs
    # from the population pattern
    hour_bias: bool = True
    recon_loss: str = "mse"  # stage-1 objective: "mse" (paper Eq. 3) or "bce" (see StayPretrainer)
    # stage-2 masked-code objective: "mse" (paper Eq. 9) or "bce" (see masked_code_loss)
    code_loss: str = "mse"

    SIZES = ("seq_len", "n_features", "n_static", "n_icd", "n_drug", "note_dim")
    # what shapes the encoders' weights; the other fields only change the pretraining objectives
    ENCODER = SIZES + ("d_model", "n_heads", "static_hidden")

    @classmethod
    def from_meta(cls, meta: dict, **overrides) -> "ModelConfig":
        """Build from a processed folder's meta.json dict; `overrides` replace any field."""
        missing = [k for k in cls.SIZES if k not in meta]
        if missing:
            raise KeyError(f"meta.json lacks {missing}; re-run `python medhmp.py preprocess`")
        return cls(**{**{k: int(meta[k]) for k in cls.SIZES}, **overrides})


@dataclass(frozen=True)
class Shard:
    """This process's rows of a batch split across the processes of a run (DDP): rows offset ...
    offset + b of the whole batch of `size` rows. The training loop builds it with the run's
    collectives (runtime.Ranks), so this module needs nothing beyond torch. None (one process)
    everywhere: the batch is the whole batch."""
    offset: int       # this process's first row in the whole batch
    size: int         # B: rows of the whole batch (this process holds b of them)
    gather: object    # (b, ...) → (B, ...): every process's rows in order, gradients flowing back
    total: object     # tensor → its sum over the processes (counts; no gradient)


def masked_softmax(scores: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Softmax over dim 1 of scores (B, L) restricted to mask (B, L) bool (None: all); a row with no
    True is all zeros, not NaN. The attention of the patient-level models and of the baselines."""
    if mask is None:
        return torch.softmax(scores, dim=1)
    scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    return torch.softmax(scores, dim=1) * mask  # (B, L)


def densify(ts_idx: torch.Tensor, n: int, T: int, F: int) -> torch.Tensor:
    """Binary (n, T, F) float tensor with ones at the flat indices `ts_idx` = (i*T + t)*F + f."""
    return torch.zeros(n * T * F, device=ts_idx.device).index_fill_(0, ts_idx, 1.0).view(n, T, F)


# ------------------------------------------------------------------------------------------- losses
def reconstruction_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """L = mean_{b,t,f} (pred − target)²; pred, target (B, T, F) → scalar.

    Paper Eq. 3 sums ‖m_t − m̃_t‖² over the F features before averaging over stays and hours, so
    this is Eq. 3 divided by the constant F (the official `nn.MSELoss()` does the same).
    """
    return F.mse_loss(pred, target)


def masked_code_loss(pred: torch.Tensor, target: torch.Tensor, loss_mask: torch.Tensor,
                     kind: str = "mse", total=None) -> torch.Tensor:
    """L = Σ m ⊙ ℓ(pred, target) / Σ m; pred logits, target 0/1, loss_mask m bool, all (B, V) →
    scalar.

    kind "mse": ℓ = (σ(pred) − target)², paper Eq. 9, an MSE between σ(logits) and the masked codes;
    its element-wise product (lost in the printed equation) is read as restricting the mean to the
    positions the model cannot see (m = every position except the still-visible present codes). kind
    "bce": ℓ is the binary cross-entropy of the logits. An empty mask gives 0. `total` (Shard.total,
    a batch split across processes): Σ m is the whole batch's, so the processes' results add up to
    the loss of the whole batch.
    """
    if kind == "mse":
        err = (torch.sigmoid(pred) - target) ** 2  # (B, V)
    else:
        err = F.binary_cross_entropy_with_logits(pred.float(), target.float(), reduction="none")
    m = loss_mask.to(err.dtype)
    if total is None:
        return (err * m).sum() / m.sum().clamp(min=1.0)
    return (err * m).sum() / total(m.sum().float()).clamp(min=1.0)  # the whole batch's Σ m


def info_nce(a: torch.Tensor, b: torch.Tensor, temperature: float = 0.1,
             include_positive: bool = False, rows: torch.Tensor | None = None,
             shard: Shard | None = None) -> torch.Tensor:
    """One-directional InfoNCE a → b with in-batch negatives; a, b (B, D) → scalar (mean over B).

    s_ij = cos(a_i, b_j) / τ. Paper Eq. 10 (include_positive=False): u_i = −s_ii + log Σ_{j≠i}
    e^{s_ij}. Official info-nce (include_positive=True): u_i = −s_ii + log Σ_j e^{s_ij}, i.e.
    cross-entropy with diagonal labels. The paper form needs B ≥ 2 (B = 1 leaves an empty
    denominator: −inf). `rows` (B,) bool: the loss of the rows a[rows], b[rows] alone (the others
    are neither anchors nor negatives; 0 when no row is kept), without indexing by the mask, which
    would read it back to the host. The caller keeps at least two rows (one in the paper form gives
    an empty denominator). `shard`: a, b and rows are this process's rows of a batch split across
    processes (`sharded_info_nce`).
    """
    if shard is not None:
        return sharded_info_nce(a, b, temperature, include_positive, rows, shard)
    s = F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T / temperature  # (B, B)
    pos = s.diagonal()  # (B,)
    if not include_positive:
        s = s.masked_fill(torch.eye(len(s), dtype=torch.bool, device=s.device), float("-inf"))
    if rows is None:
        return (torch.logsumexp(s, dim=1) - pos).mean()
    # other columns out of every denominator; other rows all 0 (finite: no NaN reaches the
    # gradient), weight 0
    s = torch.where(rows[:, None], s.masked_fill(~rows[None, :], float("-inf")), 0.0)  # (B, B)
    u = torch.where(rows, torch.logsumexp(s, dim=1) - pos, 0.0)  # (B,)
    return u.sum() / rows.sum().clamp(min=1)


def sharded_info_nce(a: torch.Tensor, b: torch.Tensor, temperature: float, include_positive: bool,
                     rows: torch.Tensor | None, shard: Shard) -> torch.Tensor:
    """info_nce's rows a (b, D) of this process against the columns b of the whole batch (B, D),
    gathered from every process with their gradients: the negatives are the whole batch's, row i's
    positive is column offset + i, and the result is this process's share (its rows' terms over
    the whole batch's count), so the processes' shares add up to info_nce of the whole batch.
    Memory is (b, B): linear in this process's rows."""
    cols = shard.gather(b)  # (B, D)
    s = F.normalize(a, dim=-1) @ F.normalize(cols, dim=-1).T / temperature  # (b, B)
    own = torch.arange(len(a), device=s.device) + shard.offset  # (b,) each row's positive column
    pos = s.gather(1, own[:, None]).squeeze(1)  # (b,)
    if not include_positive:
        s = s.masked_fill(own[:, None] == torch.arange(s.shape[1], device=s.device), float("-inf"))
    if rows is None:
        return (torch.logsumexp(s, dim=1) - pos).sum() / shard.size
    kept = shard.gather(rows)  # (B,) the whole batch's rows kept
    s = torch.where(rows[:, None], s.masked_fill(~kept[None, :], float("-inf")), 0.0)  # (b, B)
    u = torch.where(rows, torch.logsumexp(s, dim=1) - pos, 0.0)  # (b,)
    return u.sum() / kept.sum().clamp(min=1)


def random_code_mask(codes: torch.Tensor, rate: float, generator: torch.Generator | None = None,
                     shard: Shard | None = None) -> torch.Tensor:
    """keep (bool, same shape as codes): False exactly at the present codes that got masked.

    Each present code is masked independently with probability `rate` (paper App. B: 15 %); absent
    codes are always kept, and no code is guaranteed to be masked (as in the official code). With a
    `shard` the draws are the whole batch's (B, V), of which this process keeps its rows, so that
    processes drawing from generators in the same state mask as one process would.
    """
    if shard is None:
        u = torch.rand(codes.shape, generator=generator, device=codes.device)
    else:
        u = torch.rand((shard.size, *codes.shape[1:]), generator=generator, device=codes.device)
        u = u[shard.offset:shard.offset + len(codes)]  # (b, V) this process's rows
    return (u >= rate) | (codes == 0)


class _BagSum(torch.autograd.Function):
    """embedding_bag(cols, weight, offsets, "sum") with a CPU backward 2-3x faster than torch's at
    stage-2 sizes.

    perf: torch's CPU backward of a sum-bag sorts and accumulates the ~10 M cells of an admission
    batch row by row (7 s at batch 4096, bench/profile_train.py); here the gradient of each weight
    row f is itself a sum-bag: the gradient rows of the (stay, hour) rows where f is active, grouped
    by a stable sort of the columns.
    """

    @staticmethod
    def forward(ctx, weight, cols, rows, offsets):
        # weight (F, D); cols, rows (nnz,) column and (stay, hour) row of each cell; offsets (n*T,)
        ctx.save_for_backward(cols, rows)
        ctx.n_rows = weight.shape[0]
        return F.embedding_bag(cols, weight, offsets, mode="sum")  # (n*T, D)

    @staticmethod
    def backward(ctx, grad):  # grad (n*T, D)
        cols, rows = ctx.saved_tensors
        by_col = torch.sort(cols.int(), stable=True)  # int32 sorts faster than int64
        f = torch.arange(ctx.n_rows, dtype=torch.int32, device=cols.device)  # (F,)
        starts = torch.searchsorted(by_col.values, f)  # (F,) first cell of each weight row
        grad_weight = F.embedding_bag(rows[by_col.indices], grad.contiguous(), starts, mode="sum")
        return grad_weight, None, None, None


# ----------------------------------------------------------------------------------------- encoders
class TimeSeriesEncoder(nn.Module):
    """Binary hourly matrix (sparse) → stay vector h = final cell state of the top LSTM layer (paper
    Eq. 1)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        D = cfg.d_model
        self.T, self.F = cfg.seq_len, cfg.n_features
        # perf/fidelity: the paper's first LSTM(F→D) input weight (4D, F) is factored as W_ih (4D,
        # D) · P (D, F), rank ≤ D, so the 4%-dense binary input is projected by summing rows of P
        # over the active cells instead of a dense F-wide matmul. P needs no bias: the LSTM's own
        # input bias absorbs it.
        bound = self.F ** -0.5  # nn.Linear's default init
        self.input_proj = nn.Parameter(torch.empty(self.F, D).uniform_(-bound, bound))  # (F, D)
        self.rnn1 = nn.LSTM(D, D, batch_first=True)
        self.drop = nn.Dropout(cfg.dropout)
        self.norm = nn.LayerNorm(D)
        # official LSTM_Encoder
        self.rnn2 = nn.LSTM(D, D, num_layers=2, batch_first=True, dropout=cfg.dropout)
        self.rnn_chunk = cfg.rnn_chunk

    def project(self, ts_idx: torch.Tensor, n: int) -> torch.Tensor:
        """Linear(F→D, no bias) of the binary (n, T, F) matrix given by `ts_idx`, without densifying
        it."""
        # embedding_bag wants each (stay, hour) row's cells contiguous: data.collate_stay emits
        # ts_idx sorted (the encoding of docs/data-format.md, Batches), and sorting again makes any
        # order safe. perf: on the CPU a sort of ~10 M cells (an admission batch of 4096) takes a
        # second, a check of the order 20 ms; the check would be a device sync on CUDA, where
        # sorting is cheap.
        if ts_idx.is_cuda or not bool((ts_idx[1:] >= ts_idx[:-1]).all()):
            ts_idx = ts_idx.sort().values  # (nnz,)
        # (nnz,) row i*T + t of each active cell
        rows = torch.div(ts_idx, self.F, rounding_mode="floor")
        bags = torch.arange(n * self.T, device=rows.device)  # (n*T,)
        offsets = torch.searchsorted(rows, bags)  # (n*T,) bag starts
        # perf: a fused gather-sum; index_add_ over weight[cols] materialises (nnz, D) and is far
        # slower on CPU
        if ts_idx.is_cuda or not torch.is_grad_enabled():
            x = F.embedding_bag(ts_idx % self.F, self.input_proj, offsets, mode="sum")  # (n*T, D)
        else:
            # the same values, with a faster backward
            x = _BagSum.apply(self.input_proj, ts_idx % self.F, rows, offsets)
        return x.view(n, self.T, -1)  # (n, T, D)

    def forward(self, ts_idx: torch.Tensor, n: int) -> torch.Tensor:
        if n == 0:
            return self.input_proj.new_zeros(0, self.input_proj.shape[1])  # (0, D)
        x = self.project(ts_idx, n)  # (n, T, D)
        # perf: on the CPU, oneDNN's LSTMs over thousands of stays at once lose cache locality;
        # chunks of `rnn_chunk` stays give the same result faster at admission batch sizes (docs/
        # performance.md). cuDNN wants the whole batch, so CUDA runs it in one piece.
        size = n if x.is_cuda or self.rnn_chunk <= 0 else self.rnn_chunk
        return torch.cat([self._recur(x[i:i + size]) for i in range(0, n, size)])  # (n, D)

    def _recur(self, x: torch.Tensor) -> torch.Tensor:
        x, _ = self.rnn1(x)  # (n, T, D)
        x = self.norm(self.drop(x))
        _, (_, c) = self.rnn2(x)  # c (2, n, D)
        return c[-1]  # (n, D): cell state of the top layer at hour T


class StaticEncoder(nn.Module):
    """Demographics MLP: Linear(S→64) → ReLU → Linear(64→D) (official table_encoder; paper "MLP with
    ReLU")."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(cfg.n_static, cfg.static_hidden), nn.ReLU(),
                                 nn.Linear(cfg.static_hidden, cfg.d_model))

    def forward(self, static: torch.Tensor) -> torch.Tensor:
        return self.mlp(static)  # (n, S) → (n, D)


class CodeEncoder(nn.Module):
    """Multi-hot code set → D: Linear-LN-ReLU-Linear-LN-ReLU (official embbedding1/2). Input (...,
    V)."""

    def __init__(self, n_codes: int, d_model: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(n_codes, d_model), nn.LayerNorm(d_model), nn.ReLU(),
                                 nn.Linear(d_model, d_model), nn.LayerNorm(d_model), nn.ReLU())

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        return self.mlp(codes)  # (..., V) → (..., D)


class NoteEncoder(nn.Module):
    """Frozen text-model vector → D: Linear(E→D)-LN-ReLU (official embbedding4)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(cfg.note_dim, cfg.d_model), nn.LayerNorm(cfg.d_model),
                                 nn.ReLU())

    def forward(self, note: torch.Tensor) -> torch.Tensor:
        return self.mlp(note)  # (B, E) → (B, D)


class Fusion(nn.Module):
    """One self-attention layer over modality tokens + masked max-pool (paper Eq. 2 and 7).

    x (B, N, D), mask (B, N) bool, True = token present (None = all present) → (B, D). Absent tokens
    are neither attended to nor pooled; a row with no token at all returns zeros.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        # official operations.py: bias-free Q/K/V/output projections, dropout after the output
        # projection
        self.attn = nn.MultiheadAttention(cfg.d_model, cfg.n_heads, bias=False, batch_first=True)
        self.drop = nn.Dropout(cfg.dropout)
        self.norm = nn.LayerNorm(cfg.d_model)
        # fidelity: no FFN after the attention (paper Eq. 2/7); the official code adds a 4D FFN
        # here.

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if mask is None:
            y, _ = self.attn(x, x, x, need_weights=False)  # (B, N, D)
            # post-LN residual, then max over tokens → (B, D)
            return self.norm(x + self.drop(y)).amax(dim=1)
        empty = ~mask.any(dim=1)  # (B,) rows with no token
        # an empty row attends over its (meaningless) tokens so softmax sees no all-masked row, then
        # is zeroed
        pad = ~(mask | empty[:, None])  # (B, N) True = ignored key
        y, _ = self.attn(x, x, x, key_padding_mask=pad, need_weights=False)  # (B, N, D)
        z = self.norm(x + self.drop(y))  # (B, N, D)
        # (B, D) max over present tokens
        z = z.masked_fill(~mask[..., None], float("-inf")).amax(dim=1)
        return z.masked_fill(empty[:, None], 0.0)


class StayEncoder(nn.Module):
    """ICU stay → b: tokens [h (time series), d (demographics)] → Fusion (paper §2.2.1, Eq. 1–2)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.d_model = cfg.d_model
        self.ts_encoder = TimeSeriesEncoder(cfg)
        self.static_encoder = StaticEncoder(cfg)
        self.fusion = Fusion(cfg)

    def encode(self, ts_idx: torch.Tensor, static: torch.Tensor) -> torch.Tensor:
        """Packed stays: ts_idx flat into (n, T, F), static (n, S) → b (n, D)."""
        h = self.ts_encoder(ts_idx, static.shape[0])  # (n, D)
        d = self.static_encoder(static)  # (n, D)
        return self.fusion(torch.stack([h, d], dim=1))  # (n, 2, D) → (n, D)

    def forward(self, batch: dict) -> torch.Tensor:
        return self.encode(batch["ts_idx"], batch["static"])  # (B, D)


class AdmissionEncoder(nn.Module):
    """Admission → a: tokens ⟨s, c, g, l⟩ (stays, ICD, drugs, note) → Fusion (paper §2.3.1, Eq.
    4–7)."""

    TOKENS = ("stay", "icd", "drug", "note")  # paper Eq. 6 order; official code uses [l, c, g, s]

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.d_model = D = cfg.d_model
        self.stay_encoder = StayEncoder(cfg)
        # official embbedding3
        self.stay_proj = nn.Sequential(nn.Linear(D, D), nn.LayerNorm(D), nn.ReLU())
        self.icd_encoder = CodeEncoder(cfg.n_icd, D)
        self.drug_encoder = CodeEncoder(cfg.n_drug, D)
        self.note_encoder = NoteEncoder(cfg)
        self.fusion = Fusion(cfg)

    def encode_stays(self, batch: dict) -> torch.Tensor:
        """s (B, D): the admission's real stays, encoded once as a packed batch, masked mean,
        Linear-LN-ReLU."""
        stay_mask = batch["stay_mask"]  # (B, K)
        B, Ns, D = stay_mask.shape[0], batch["static"].shape[0], self.d_model
        if Ns == 0:  # no admission in the batch has a stay (cuDNN rejects an empty batch)
            return self.stay_proj(batch["static"].new_zeros(B, D))
        b = self.stay_encoder.encode(batch["ts_idx"], batch["static"])  # (Ns, D)
        n = stay_mask.sum(dim=1)  # (B,) stays per admission
        # stays are packed in row-major order of stay_mask, so admission i owns the next n_i rows;
        # output_size keeps this free of a device→host sync
        owner = torch.arange(B, device=b.device).repeat_interleave(n, output_size=Ns)  # (Ns,)
        mean = b.new_zeros(B, D).index_add_(0, owner, b) / n.clamp(min=1)[:, None]  # (B, D)
        # fidelity: paper Eq. 4 applies a linear layer to the concatenation of a fixed M = 3 stays
        # (official: Linear(3D→D)-LN-ReLU over 3 padded slots); a masked mean keeps K free and
        # padding out of s.
        return self.stay_proj(mean)  # (B, D)

    def tokens(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Unimodal embeddings x (B, 4, D) in TOKENS order and their presence mask (B, 4) bool."""
        x = torch.stack([self.encode_stays(batch), self.icd_encoder(batch["icd"]),
                         self.drug_encoder(batch["drug"]), self.note_encoder(batch["note"])],
                        dim=1)  # (B, 4, D)
        mask = torch.stack([batch["stay_mask"].any(dim=1), batch["icd_mask"],
                            batch["drug_mask"], batch["note_mask"]], dim=1)  # (B, 4)
        return x, mask

    def fuse(self, x: torch.Tensor, mask: torch.Tensor,
             keep: tuple[str, ...] = TOKENS) -> torch.Tensor:
        """Fuse the tokens named in `keep` (a subset of TOKENS) of x (B, 4, D) → (B, D)."""
        if tuple(keep) == self.TOKENS:
            return self.fusion(x, mask)
        idx = [self.TOKENS.index(t) for t in keep]
        return self.fusion(x[:, idx], mask[:, idx])  # (B, len(keep), D) → (B, D)

    def forward(self, batch: dict) -> torch.Tensor:
        return self.fuse(*self.tokens(batch))  # (B, D)


# ------------------------------------------------------------------------------------- pretraining
class StayPretrainer(nn.Module):
    """Stage 1: reconstruct the (T, F) binary matrix from b with an LSTM decoder; MSE (paper §2.2.2,
    Eq. 3)."""

    def __init__(self, stay_encoder: StayEncoder, cfg: ModelConfig):
        super().__init__()
        self.encoder = stay_encoder
        self.T, self.F = cfg.seq_len, cfg.n_features
        # fidelity: paper §2.2.2 makes b the decoder's initial hidden state, so the decoder has
        # width D and a linear read-out to F (the official code feeds b as the first input of an
        # F-wide LSTM instead). With b as the initial state only (decoder_input "zeros") the decoder
        # learns the features' average pattern and b carries little; feeding b as every hour's input
        # as well ("stay", the default) lets it carry the stay (docs/results.md, "Why
        # pretraining did not learn": bench/learning.py).
        self.decoder_input, self.recon_loss = cfg.decoder_input, cfg.recon_loss
        self.decoder = nn.LSTM(cfg.d_model if cfg.decoder_input == "stay" else 1, cfg.d_model,
                               batch_first=True)
        self.readout = nn.Linear(cfg.d_model, cfg.n_features)
        # (T, F) bias, or None
        self.hour_bias = (nn.Parameter(torch.zeros(cfg.seq_len, cfg.n_features)) if cfg.hour_bias
                          else None)

    @torch.no_grad()
    def init_pattern(self, cell_mean: torch.Tensor) -> None:
        """Start the (T, F) bias at the logit of the training cells' means, so that step 0 already
        predicts the population pattern and training spends its steps on what the stay vector
        adds."""
        if self.hour_bias is not None:
            self.hour_bias.copy_(torch.logit(cell_mean.clamp(1e-4, 1 - 1e-4)))
        else:  # no (T, F) bias: the read-out's (F,) bias starts at each feature's rate
            self.readout.bias.copy_(torch.logit(cell_mean.mean(0).clamp(1e-4, 1 - 1e-4)))

    def forward(self, batch: dict, shard: Shard | None = None) -> dict:
        """"loss" and "mse" (means over the batch's stays, hours and features) and "recon"; with a
        `shard`, this process's share of the whole batch's means (its stays' mean times b / B)."""
        b = self.encoder(batch)  # (B, D)
        B = b.shape[0]
        h0 = b.unsqueeze(0)  # (1, B, D)
        steps = b.unsqueeze(1).expand(B, self.T, b.shape[1]) if self.decoder_input == "stay" \
            else b.new_zeros(B, self.T, 1)  # (B, T, D) or (B, T, 1)
        out, _ = self.decoder(steps, (h0, torch.zeros_like(h0)))  # (B, T, D)
        logits = self.readout(out)  # (B, T, F)
        if self.hour_bias is not None:
            # (B, T, F): b only has to explain how a stay departs from it
            logits = logits + self.hour_bias
        recon = torch.sigmoid(logits)  # (B, T, F), in (0, 1) like the binary targets
        target = densify(batch["ts_idx"], B, self.T, self.F)  # (B, T, F)
        mse = reconstruction_loss(recon, target)
        if self.recon_loss == "mse":
            loss = mse
        else:
            loss = F.binary_cross_entropy_with_logits(logits.float(), target)
        if shard is not None:
            loss, mse = loss * (B / shard.size), mse * (B / shard.size)
        return {"loss": loss, "mse": mse.detach(), "recon": recon}


class AdmissionPretrainer(nn.Module):
    """Stage 2: masked code prediction + inter-modality contrastive learning (paper §2.3.2–2.3.3,
    Eq. 6–11)."""

    def __init__(self, admission_encoder: AdmissionEncoder, cfg: ModelConfig):
        super().__init__()
        self.encoder = admission_encoder
        self.cfg = cfg
        # fidelity: paper Eq. 8 is one FC + sigmoid per code set; the official code puts an FFN
        # before each.
        self.icd_head = nn.Linear(cfg.d_model, cfg.n_icd)
        self.drug_head = nn.Linear(cfg.d_model, cfg.n_drug)

    @torch.no_grad()
    def init_priors(self, prior: dict) -> None:
        """Start each code head at its no-learning prior ({"icd": (V_icd,), "drug": (V_drug,)}
        probabilities): bias = logit(prior), weight = 0, so step 0 predicts each code's frequency
        exactly (instead of ½ everywhere, which Adam's bounded steps take thousands of steps to
        undo) and training spends its steps on what the admission adds. The weights leave 0 at the
        first step."""
        for m, head in (("icd", self.icd_head), ("drug", self.drug_head)):
            head.bias.copy_(torch.logit(prior[m].clamp(1e-6, 1 - 1e-6)))
            head.weight.zero_()

    def forward(self, batch: dict, generator: torch.Generator | None = None,
                shard: Shard | None = None) -> dict:
        """Loss parts of one batch: "loss" (Eq. 11), "mcp", "cl", and "masked_codes" {"icd" |
        "drug": (targets, scored)} (B, V) each, the masks the code loss was scored on, so that the
        trainer can score the no-learning predictors on the same masks (health.prior_losses). With
        a `shard`, each part is this process's share of the whole batch's (module docstring)."""
        enc, cfg = self.encoder, self.cfg
        total = None if shard is None else shard.total
        x, mask = enc.tokens(batch)  # (B, 4, D), (B, 4): full inputs, stays encoded once per step
        icd, drug = batch["icd"], batch["drug"]  # (B, V_icd), (B, V_drug)

        # (a) MCP: one view ⟨s, c', g', l⟩ with both code sets masked (paper Eq. 6; the official
        # code builds one view per code set and adds a learned count-of-masked-codes embedding; we
        # follow the paper)
        keep_icd = random_code_mask(icd, cfg.mask_rate, generator, shard)  # (B, V_icd)
        keep_drug = random_code_mask(drug, cfg.mask_rate, generator, shard)  # (B, V_drug)
        x_masked = torch.stack([x[:, 0], enc.icd_encoder(icd * keep_icd),
                                enc.drug_encoder(drug * keep_drug), x[:, 3]],
                               dim=1)  # (B, 4, D), TOKENS order: stay and note unchanged
        a_masked = enc.fuse(x_masked, mask)  # (B, D)
        # targets are the masked codes; scored where the code is not visible, in admissions that
        # have the set
        targets = {"icd": (icd * ~keep_icd,  # (B, V_icd)
                           ~(icd.bool() & keep_icd) & batch["icd_mask"][:, None]),
                   "drug": (drug * ~keep_drug,  # (B, V_drug)
                            ~(drug.bool() & keep_drug) & batch["drug_mask"][:, None])}
        logits = {"icd": self.icd_head(a_masked), "drug": self.drug_head(a_masked)}  # (B, V) each
        # official ½(·+·) over the two code sets
        mcp = 0.5 * sum(masked_code_loss(logits[m], *targets[m], kind=cfg.code_loss, total=total)
                        for m in targets)

        # (b) CL: r ∈ {c, g, l} (s is never the anchor, paper §2.3.3) against the fusion of the
        # other three; a term needs an in-batch negative (n ≥ 2 rows with the modality), counted on
        # the device (no host sync), over the whole batch
        present = mask.sum(dim=0) if shard is None else shard.total(mask.sum(dim=0))  # (4,)
        terms, used = [], []
        for i, name in enumerate(enc.TOKENS[1:], start=1):
            used.append(present[i] >= 2)  # rows with modality r
            key = enc.fuse(x, mask, keep=tuple(t for t in enc.TOKENS if t != name))  # (B, D) = a\r
            terms.append(info_nce(x[:, i], key, cfg.temperature, cfg.cl_include_positive,
                                  rows=mask[:, i] & used[-1], shard=shard))
        used = torch.stack(used).float()  # (3,) the terms kept; cl is their mean (0: none)
        cl = (torch.stack(terms) * used).sum() / used.sum().clamp(min=1)

        loss = mcp + cfg.cl_weight * cl  # paper Eq. 11
        return {"loss": loss, "mcp": mcp.detach(), "cl": cl.detach(), "masked_codes": targets}

    def skip_masks(self, n: int, generator: torch.Generator) -> None:
        """Draw and drop the code masks of a batch of n admissions: `generator` then stands where
        `forward` on such a batch leaves it, so a process that validates only some of the batches
        still masks each of its batches as one process validating them all does."""
        for size in (self.cfg.n_icd, self.cfg.n_drug):  # forward's draws, in its order
            torch.rand((n, size), generator=generator, device=generator.device)


# --------------------------------------------------------------------------------------- downstream
class Classifier(nn.Module):
    """encoder(batch) (B, D) → Dropout → Linear(D→n_out) → logits (B,) (or (B, n_out) when n_out >
    1).

    Wraps a StayEncoder or AdmissionEncoder (anything with `d_model` mapping a batch to (B, D)); its
    weights live under the state-dict prefix `encoder.`, so a pretrained encoder loads with
    `load_encoder`.
    """

    def __init__(self, encoder: nn.Module, n_out: int = 1, dropout: float = 0.1):
        super().__init__()
        self.encoder = encoder
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(encoder.d_model, n_out)

    def forward(self, batch: dict) -> torch.Tensor:
        logits = self.head(self.drop(self.encoder(batch)))  # (B, n_out)
        return logits.squeeze(-1) if logits.shape[-1] == 1 else logits


# ------------------------------------------------------------------------------------------ helpers
def load_encoder(model: nn.Module, state_dict: dict, prefix: str, expected_missing=()) -> int:
    """Load the entries of `state_dict` whose keys start with `prefix` (prefix stripped) into
    `model`; returns the number of tensors loaded.

    Strict: raises RuntimeError listing every key of `model` that is missing (apart from
    `expected_missing`) and every key under `prefix` that `model` does not have. Shape mismatches
    raise from `load_state_dict`. E.g. stay → admission: `load_encoder(adm.stay_encoder, stay_sd,
    "encoder.")`.
    """
    sub = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    own = set(model.state_dict())
    missing = sorted(own - set(sub) - set(expected_missing))
    unexpected = sorted(set(sub) - own)
    if missing or unexpected:
        raise RuntimeError(f"cannot load prefix {prefix!r} ({len(sub)} keys) into "
                           f"{type(model).__name__}: missing {missing}, unexpected {unexpected}")
    model.load_state_dict(sub, strict=False)  # strictness checked above, allowing expected_missing
    return len(sub)


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (elements) of `module`."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
