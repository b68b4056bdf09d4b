"""Features: FIDDLE-style binary features fitted on training stays, code vocabularies, note
embeddings.

Own module so data.py keeps to the processed format; imports numpy and `tables` (and
torch/transformers only inside `load_text_model` and `embed_notes`, for a Hugging Face text model).
Everything is fitted on the training split and then applied unchanged to every stay (docs/design.md,
Preprocessing):
  * time series: per (stay, hour, variable) the last value becomes a presence column plus a one-hot
    quantile bin (numbers) or category (text); variables and columns seen in fewer than theta of the
    training stays are dropped; the result is stored sparse as flat indices t * F + f.
  * static vector: one-hot categories and quantile bins of numbers, same frequency rule.
  * notes: embedded once by a frozen text model, cached by text hash and model.
"""
from __future__ import annotations

import hashlib
import re
import zlib
from pathlib import Path

import numpy as np

from data import lookup, row_of
from folders import InputError
from preprocessing.extract import EVENT_ARRAYS
from preprocessing.tables import unique


def _quantile_edges(values: np.ndarray, n_bins: int) -> list[float]:
    """Inner edges of `n_bins` quantile bins (FIDDLE discretize: quintiles), duplicates removed."""
    if len(values) == 0:
        return []
    qs = np.quantile(values, np.linspace(0, 1, n_bins + 1)[1:-1])
    return [float(q) for q in unique(qs)]


# -------------------------------------------------------------------------------------- time series
# events per chunk when fitting and applying: bounds the temporaries (~200 bytes per event)
CHUNK_EVENTS = 1 << 22


def event_chunks(events: dict, size: int | None = None):
    """Consecutive slices of `events` (extract.EventStore.result: sorted by stay) of about `size`
    (default CHUNK_EVENTS) events each, never splitting a stay; the per-event arrays are sliced
    (views), the rest passed on."""
    stay, n, size = events["stay"], len(events["stay"]), size or CHUNK_EVENTS
    # the first event of a stay
    cuts = unique(np.searchsorted(stay, stay[np.arange(size, n, size)]))
    bounds = [0, *cuts[cuts > 0].tolist(), n]
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end > start or n == 0:
            yield {k: (v[start:end] if k in EVENT_ARRAYS else v) for k, v in events.items()}


def fit_timeseries(events: dict, train: np.ndarray, names: dict, theta: float, n_bins: int) -> dict:
    """Choose variables, bins and categories on the training stays (`train`: bool per stay), in
    chunks of events.

    Returns a JSON-able spec: per variable its key, name, kind and bins/categories, plus the names
    of the F output columns in order. `names` maps variable keys to readable names.
    """
    n_train, keys = int(train.sum()), events["var_keys"]
    stats = _variable_stats(events, train)
    freq = stats["stays"] / max(n_train, 1)
    chosen = np.flatnonzero(freq >= theta)
    numeric = chosen[(stats["finite"][chosen] >= 0.5 * stats["events"][chosen])
                     & (stats["finite"][chosen] > 0)]
    values = _numeric_values(events, train, numeric, stats["finite"])
    pairs = stats["categories"]                                # (variable << 32 | category), sorted
    variables, columns = [], []
    for k in chosen:
        v = {"key": int(keys[k]), "name": names[int(keys[k])], "frequency": float(freq[k])}
        lo, hi = np.searchsorted(pairs, [k << 32, (k + 1) << 32])
        cats = (pairs[lo:hi] & 0xFFFFFFFF).tolist()
        if k in values:
            v.update(kind="numeric", edges=_quantile_edges(values[k], n_bins))
            labels = [f"q{i + 1}" for i in range(len(v["edges"]) + 1)]
        elif cats:
            v.update(kind="categorical", categories=cats)
            labels = [f"= {events['category_names'][c]}" for c in v["categories"]]
        else:
            v.update(kind="presence")
            labels = []
        v["columns"] = [len(columns)] + list(range(len(columns) + 1,
                                                   len(columns) + 1 + len(labels)))
        columns += [f"{v['name']} present"] + [f"{v['name']} {x}" for x in labels]
        variables.append(v)
    spec = {"variables": variables, "columns": columns}
    # post-filter (FIDDLE theta_2): drop value columns active in fewer than theta of the training
    # stays
    stays_with = np.zeros(len(columns), np.int64)
    for chunk in event_chunks(events):
        stay, _, column = _columns(chunk, spec, train)
        stays_with += _stays_per(stay, column, len(columns))
    keep = stays_with / max(n_train, 1) >= theta
    new_index = np.cumsum(keep) - 1
    for v in variables:
        v["columns"] = [int(new_index[c]) if keep[c] else -1 for c in v["columns"]]
    spec["columns"] = [c for c, k in zip(columns, keep) if k]
    return spec


def reuse_timeseries(meta: dict, events: dict) -> dict:
    """The time-series spec fitted for another processed folder (its meta.json), for this extract's
    events (--vocab-from): variables are matched by key, categories by name (their ids are numbered
    per extract); a category this extract lacks never matches. The columns and their order are the
    other folder's."""
    ids = {name: i for i, name in enumerate(events["category_names"])}
    unseen = len(ids)                                  # ids no event carries
    variables = []
    for v in meta["features"]["variables"]:
        v = dict(v)
        if v["kind"] == "categorical":
            prefix, pairs = f"{v['name']} = ", []
            for col in v["columns"][1:]:
                name = meta["feature_names"][col][len(prefix):] if col >= 0 else None
                cat = ids.get(name) if name is not None else None
                if cat is None:
                    cat, unseen = unseen, unseen + 1
                pairs.append((cat, col))
            # _columns looks (variable, category) up in sorted order
            pairs.sort()
            v["categories"], v["columns"] = ([c for c, _ in pairs],
                                             v["columns"][:1] + [col for _, col in pairs])
        variables.append(v)
    return {"variables": variables, "columns": list(meta["feature_names"])}


def _stays_per(stay: np.ndarray, label: np.ndarray, n: int) -> np.ndarray:
    """(n,) int64: for each label 0..n-1, the number of distinct stays among the (stay, label) pairs
    given."""
    pairs = unique(stay.astype(np.int64) * n + label)
    return np.bincount(pairs % n, minlength=n)


def _variable_stats(events: dict, train: np.ndarray) -> dict:
    """Per variable over the training stays' events: "stays" with it, "events", "finite" numbers;
    and the sorted (variable << 32 | category) pairs seen, "categories"."""
    n_vars = len(events["var_keys"])
    stats = {name: np.zeros(n_vars, np.int64) for name in ("stays", "events", "finite")}
    pairs = [np.zeros(0, np.int64)]
    for chunk in event_chunks(events):
        mine = train[chunk["stay"]]
        stay, var, num, cat = (chunk[k][mine] for k in ("stay", "var", "num", "cat"))
        stats["stays"] += _stays_per(stay, var, n_vars)
        stats["events"] += np.bincount(var, minlength=n_vars)
        stats["finite"] += np.bincount(var[np.isfinite(num)], minlength=n_vars)
        pairs.append(unique(var[cat >= 0].astype(np.int64) << 32 | cat[cat >= 0]))
    stats["categories"] = unique(np.concatenate(pairs))
    return stats


def _numeric_values(events: dict, train: np.ndarray, numeric: np.ndarray,
                    finite: np.ndarray) -> dict:
    """{variable: its finite training values (float32)} for the `numeric` variables, gathered chunk
    by chunk into one buffer grouped by variable (a counting sort: one copy of those values, no
    per-event index arrays)."""
    slot = np.full(len(events["var_keys"]), -1, np.int64)
    slot[numeric] = np.arange(len(numeric))
    offsets = np.concatenate(([0], np.cumsum(finite[numeric])))
    buffer, filled = np.empty(offsets[-1], np.float32), offsets[:-1].copy()
    for chunk in event_chunks(events):
        s = slot[chunk["var"]]
        mine = train[chunk["stay"]] & np.isfinite(chunk["num"]) & (s >= 0)
        s, num = s[mine], chunk["num"][mine]
        order = np.argsort(s, kind="stable")
        s, num = s[order], num[order]
        # position within its variable's run
        rank = np.arange(len(s)) - np.searchsorted(s, s)
        buffer[filled[s] + rank] = num
        filled += np.bincount(s, minlength=len(numeric))
    return {int(k): buffer[offsets[i]:offsets[i + 1]] for i, k in enumerate(numeric)}


def _columns(events: dict, spec: dict, rows: np.ndarray | None = None):
    """(stay, hour, column) of every active cell of `events` (a chunk) under `spec`, int64; columns
    may be -1 (dropped) before filtering. `rows` (bool per stay) keeps the events of those stays
    only."""
    sel = np.ones(len(events["stay"]), bool) if rows is None else rows[events["stay"]]
    var, num, cat = events["var"][sel], events["num"][sel], events["cat"][sel]
    stay, hour = events["stay"][sel].astype(np.int64), events["hour"][sel].astype(np.int64)
    variables = spec["variables"]
    keys = np.array([v["key"] for v in variables], dtype=np.int64)
    # variable index -> spec position
    position = np.full(len(events["var_keys"]) + 1, -1, np.int64)
    position[lookup(events["var_keys"], keys)] = np.arange(len(keys))
    pos = position[var]                                                      # -1: not a feature
    present = np.array([v["columns"][0] for v in variables] + [-1], dtype=np.int64)
    value_col = np.full(len(var), -1, np.int64)
    # group 0 holds the unknown variables
    order, bounds = _groups(pos + 1, len(keys) + 1)
    # numbers: per-variable quantile bins
    for i, v in enumerate(variables):
        if v["kind"] == "numeric":
            mine = order[bounds[i + 1]:bounds[i + 2]]
            mine = mine[np.isfinite(num[mine])]
            value_col[mine] = np.array(v["columns"][1:])[
                np.searchsorted(v["edges"], num[mine], side="right")]
    pairs = [(i, c, col) for i, v in enumerate(variables) if v["kind"] == "categorical"
             for c, col in zip(v["categories"], v["columns"][1:])]
    # categories: one lookup of (variable, category)
    if pairs:
        p = np.array(pairs, dtype=np.int64)
        table = p[:, 0] << 32 | p[:, 1]
        key = pos << 32 | cat.astype(np.int64)
        hit = np.minimum(np.searchsorted(table, key), len(table) - 1)
        found = (table[hit] == key) & (cat >= 0)
        value_col[found] = p[hit[found], 2]
    stay2, hour2 = np.concatenate([stay, stay]), np.concatenate([hour, hour])
    col = np.concatenate([present[pos], value_col])
    ok = col >= 0
    return stay2[ok], hour2[ok], col[ok]


def _groups(labels: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(order, bounds): the items with label k are order[bounds[k]:bounds[k + 1]] (one sort, no
    n-fold scan)."""
    order = np.argsort(labels, kind="stable")
    return order, np.searchsorted(labels[order], np.arange(n + 1))


def apply_timeseries(events: dict, spec: dict, n_stays: int, hours: int) -> dict:
    """Sparse binary (T, F) matrices of every stay, compactly: per stay and hour the count of active
    features (`ts_count` (N, T) int16), the active feature indices in (hour, feature) order
    (`ts_feat` (nnz,) int16) and CSR offsets into them (`ts_ptr` (N+1,)). Two bytes per active cell.
    Built chunk by chunk of stays, so the temporaries stay bounded whatever the number of events."""
    n_features = len(spec["columns"])
    count = np.zeros(n_stays * hours, np.int64)
    feats = [np.zeros(0, np.int16)]
    for chunk in event_chunks(events):
        stay, hour, col = _columns(chunk, spec)
        # sorted by stay, then hour, then feature
        cell = unique((stay * hours + hour) * n_features + col)
        bag = cell // n_features                                      # stay * T + hour
        if len(bag):
            count[bag[0]:bag[-1] + 1] += np.bincount(bag - bag[0])
        feats.append((cell % n_features).astype(np.int16))
    count = count.reshape(n_stays, hours)
    ptr = np.concatenate(([0], np.cumsum(count.sum(axis=1)))).astype(np.int64)
    return {"ts_ptr": ptr, "ts_count": count.astype(np.int16), "ts_feat": np.concatenate(feats)}


# ------------------------------------------------------------------------------------------- static
def fit_static(columns: dict, train: np.ndarray, theta: float, n_bins: int) -> dict:
    """Spec of the static vector: quantile bins for number columns, categories for text columns,
    each output column kept when active in at least theta of the training stays."""
    spec, names = [], []
    for name, values in columns.items():
        if isinstance(values, np.ndarray) and values.dtype.kind == "f":
            finite = values[train & np.isfinite(values)]
            edges = _quantile_edges(finite, n_bins)
            bins = np.searchsorted(np.array(edges), finite, side="right")
            freq = np.bincount(bins, minlength=len(edges) + 1) / max(train.sum(), 1)
            spec.append({"name": name, "edges": edges, "keep": [bool(f >= theta) for f in freq]})
            names += [f"{name} q{i + 1}" for i, f in enumerate(freq) if f >= theta]
        else:
            values = np.asarray(values, dtype=object)
            cats, counts = unique(values[train & (values != "")], return_counts=True)
            kept = [str(c) for c, n in zip(cats, counts) if n / max(train.sum(), 1) >= theta]
            spec.append({"name": name, "categories": kept})
            names += [f"{name} = {c}" for c in kept]
    return {"variables": spec, "columns": names}


def apply_static(columns: dict, spec: dict) -> np.ndarray:
    """(N, S) uint8 static vectors under `spec`; a column the extract lacks (a spec reused from
    another layout) gives all-zero columns."""
    parts, n = [], len(next(iter(columns.values()))) if columns else 0
    for v in spec["variables"]:
        if v["name"] not in columns:
            parts.append(np.zeros((n, sum(v["keep"]) if "edges" in v else len(v["categories"])),
                                  bool))
            continue
        values = columns[v["name"]]
        if "edges" in v:
            bins = np.searchsorted(np.array(v["edges"]), values, side="right")
            onehot = ((bins[:, None] == np.arange(len(v["keep"]))[None, :])
                      & np.isfinite(values)[:, None])
            parts.append(onehot[:, np.array(v["keep"], dtype=bool)])
        else:
            values = np.asarray(values, dtype=object)
            parts.append(np.stack([values == c for c in v["categories"]], axis=1) if v["categories"]
                         else np.zeros((len(values), 0), bool))
    return np.concatenate(parts, axis=1).astype(np.uint8) if parts else np.zeros((n, 0), np.uint8)


# ------------------------------------------------------------------------------------------- codes
def build_vocab(codes: np.ndarray, train_rows: np.ndarray) -> list[str]:
    """Codes seen in training admissions, most frequent first (ties by code): the vocabulary."""
    cats, counts = unique(codes[train_rows], return_counts=True)
    order = np.lexsort((cats, -counts))
    return [c.decode("utf-8", "replace") for c in cats[order].tolist()]


def codes_to_csr(rows: np.ndarray, codes: np.ndarray, vocab: list[str], n_rows: int):
    """CSR sets (ptr (n_rows+1,), idx) of vocabulary indices per row; out-of-vocabulary codes are
    dropped.
    Returns (ptr, idx, n_dropped)."""
    table = np.array([v.encode() for v in vocab], dtype=bytes) if vocab else np.zeros(0, "S1")
    # -1: not in the vocabulary
    index = row_of(table, codes)
    known = index >= 0
    pair = unique(rows[known].astype(np.int64) * (len(vocab) + 1) + index[known])
    ptr = np.searchsorted(pair // (len(vocab) + 1), np.arange(n_rows + 1)).astype(np.int64)
    return ptr, (pair % (len(vocab) + 1)).astype(np.int32), int((~known).sum())


# ------------------------------------------------------------------------------------------- notes
TOKEN = re.compile(r"[a-z0-9]+")


def hashing_embed(text: str, dim: int, memo: dict | None = None) -> np.ndarray:
    """The built-in `hashing` text model: signed feature hashing of word unigrams and bigrams,
    log-scaled counts, L2-normalised. No weights, offline, deterministic (crc32). `memo` caches the
    hash of each gram across notes (clinical vocabulary repeats, so this halves the time)."""
    memo = {} if memo is None else memo
    words = TOKEN.findall(text.lower())
    grams = words + [a + " " + b for a, b in zip(words, words[1:])]
    if not grams:
        return np.zeros(dim, np.float32)
    h = np.fromiter((memo[g] if g in memo else memo.setdefault(g, zlib.crc32(g.encode()))
                     for g in grams), dtype=np.int64, count=len(grams))
    # signed counts
    vec = np.bincount(h % dim, weights=np.where((h >> 20) & 1, 1.0, -1.0), minlength=dim)
    vec = np.sign(vec) * np.log1p(np.abs(vec))
    return (vec / max(float(np.linalg.norm(vec)), 1e-12)).astype(np.float32)


def text_key(model_id: str, pooling: str, text: str) -> str:
    return hashlib.sha1(f"{model_id}\0{pooling}\0{text}".encode()).hexdigest()


def load_text_model(name: str, device: str):
    """The frozen text model `name` ("hashing", a local Hugging Face folder or a hub name), loaded
    before any table is read so that a mistyped path or an unreachable hub fails in seconds, in one
    line: None for "hashing", else {"tokenizer", "net", "architecture"} (T5 models through their
    encoder only)."""
    if name == "hashing":
        return None
    path = Path(name).expanduser()
    if not path.exists() and (name.startswith((".", "/", "~")) or name.count("/") > 1
                              or "\\" in name):
        raise InputError(f"--text-model {name}: no such folder (give 'hashing', a local "
                         "Hugging Face model folder, or a hub name)")
    try:
        from transformers import AutoConfig, AutoModel, AutoTokenizer, T5EncoderModel
        from transformers.utils import logging as hf_logging
        hf_logging.set_verbosity_error()
        local = path.exists()
        source = str(path) if local else name
        config = AutoConfig.from_pretrained(source, local_files_only=local)
        cls = T5EncoderModel if config.model_type in ("t5", "mt5", "umt5") else AutoModel
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local)
        net = cls.from_pretrained(source, local_files_only=local).to(device).eval()
    # transformers raises OSError, ValueError, ImportError, ... with long messages
    except Exception as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        where = "a local folder" if path.exists() else "not a local folder, and as a hub name"
        raise InputError(f"--text-model {name}: {where}, it cannot be loaded ({first}); give "
                         "'hashing', a Hugging Face model folder, or a hub name with network "
                         "access") from None
    return {"tokenizer": tokenizer, "net": net, "architecture": type(net).__name__}


def embed_notes(texts: list[str], model: str, cache: dict, *, dim: int, max_tokens: int,
                pooling: str, device: str, batch_size: int, progress,
                loaded=None) -> tuple[np.ndarray, dict, dict]:
    """(n, E) float16 embeddings of `texts` by a frozen text model, the text model's part of
    meta.json, and the embeddings computed here ({text key: vector}, for the note cache); `cache`
    ({text key: vector}, read only) holds those of earlier runs. `model` is "hashing" or a local
    Hugging Face folder / hub name, whose `load_text_model` result is `loaded` (loaded here when not
    given); `progress(name, total)` is a context giving an advance(n) callback."""
    model_id = f"hashing-{dim}" if model == "hashing" else model
    keys = [text_key(model_id, pooling, t) for t in texts]
    todo = sorted({k: t for k, t in zip(keys, texts) if k not in cache}.items(),
                  key=lambda kt: len(kt[1]))
    info = {"text_model": model,
            "pooling": pooling if model != "hashing" else "hashed bag of words",
            "max_tokens": max_tokens, "cached": len(texts) - len(todo)}
    computed: dict = {}
    with progress("embedding notes", len(todo)) as advance:
        if model == "hashing":
            memo: dict = {}
            for k, t in todo:
                computed[k] = hashing_embed(t, dim, memo).astype(np.float16)
                advance(1)
        elif todo:
            loaded = loaded or load_text_model(model, device)
            info["architecture"] = loaded["architecture"]
            computed = _embed_hf(todo, loaded, max_tokens, pooling, device, batch_size, advance)
    if not texts:
        # HF width unknown
        return np.zeros((0, dim if model == "hashing" else 0), np.float16), info, computed
    out = np.stack([computed[k] if k in computed else cache[k] for k in keys]).astype(np.float16)
    info["dim"] = int(out.shape[1])
    return out, info, computed


def _embed_hf(todo, loaded, max_tokens, pooling, device, batch_size, advance) -> dict:
    """{text key: float16 vector} of the (key, text) pairs `todo` by a frozen Hugging Face encoder
    (T5 models through their encoder only), mean-pooled last hidden state."""
    import torch
    tokenizer, net, computed = loaded["tokenizer"], loaded["net"], {}
    with torch.inference_mode():
        for i in range(0, len(todo), batch_size):
            chunk = todo[i:i + batch_size]
            # fidelity: the official code mean-pools T5 over all 512 positions, padding included
            pad = "max_length" if pooling == "mean_unmasked" else True
            enc = tokenizer([t for _, t in chunk], padding=pad, truncation=True,
                            max_length=max_tokens, return_tensors="pt").to(device)
            hidden = net(input_ids=enc["input_ids"],
                         attention_mask=enc["attention_mask"]).last_hidden_state
            mask = (torch.ones_like(enc["attention_mask"]) if pooling == "mean_unmasked"
                    else enc["attention_mask"])
            # (b, E)
            pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
            for (k, _), v in zip(chunk, pooled.float().cpu().numpy()):
                computed[k] = v.astype(np.float16)
            advance(len(chunk))
    return computed
