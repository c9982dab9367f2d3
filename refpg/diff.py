"""Layerwise numeric diff: where do two runs of PaliGemma part ways?

A *run* is the named activations (refpg.tap) of one prefill plus N greedy decode steps, in forward
order. It comes from refpg itself (a checkpoint directory + a backend selection) or from an
activation dump. Dumps are `.npz` files — the format other implementations write to be compared
with refpg (tools/transformers_dump.py writes one from transformers):

- one float32 array per activation, named `<phase>/<activation>`, in forward order; phase is
  `prefill` or `decode.<k>` (k = 0, 1, …), activation one of refpg's names (`vision.embeddings`,
  `vision.<i>.attn_out`, `vision.<i>.mlp_out`, `vision.<i>`, `vision.post_layernorm`, `projector`,
  `text.embeddings`, `text.<i>.attn_out`, (Gemma 2: `text.<i>.post_attn_norm`), `text.<i>.mlp_out`,
  (Gemma 2: `text.<i>.post_ff_norm`), `text.<i>`, `text.norm`, `logits`),
  each with its batch dimension first ([1, T, D]; logits [1, T, V]);
- `meta.json`: a JSON string {"format": "refpg-activations/1", "prompt", "input_ids", "tokens"}
  where `tokens` are the ids fed to the decode steps (the run's own greedy choices).

Two runs are compared as they are produced: run A is streamed to a temporary dump on disk and run
B is compared with it activation by activation, so neither is ever held whole in memory.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
import zipfile
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np

from refpg.errors import DumpError, InputError
from refpg.tap import capture

FORMAT = "refpg-activations/1"


# ---- producing runs ----------------------------------------------------------------------------

class DumpWriter:
    """Writes activations into an .npz one at a time (np.load reads it back lazily)."""

    def __init__(self, path: str):
        self.path = path
        self.zip = zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED, allowZip64=True)
        self.names: list[str] = []

    def add(self, name: str, array: np.ndarray) -> None:
        with self.zip.open(name + ".npy", "w", force_zip64=True) as f:
            np.lib.format.write_array(f, np.asarray(array), allow_pickle=False)
        self.names.append(name)

    def close(self, meta: dict) -> None:
        self.add("meta.json", np.array(json.dumps({"format": FORMAT, **meta})))
        self.zip.close()


def run_model(model, batch: dict, decode_steps: int, on_activation: Callable[[str, np.ndarray], None],
              tokens: list[int] | None = None) -> list[int]:
    """Prefill + decode steps, calling on_activation(`<phase>/<name>`, array) for each activation.

    Decode feeds `tokens` when given (to follow another run), else this run's greedy choices.
    Returns the tokens fed.
    """
    phase = ["prefill"]
    fed: list[int] = []
    ids = batch["input_ids"]
    limit = model.config.text.max_position_embeddings
    if ids.shape[1] + decode_steps > limit:
        raise InputError(f"prompt of {ids.shape[1]} tokens + {decode_steps} decode steps exceeds the model's "
                         f"limit of {limit} positions")
    cache = model.new_cache(ids.shape[0], ids.shape[1] + decode_steps)
    with capture(lambda name, x: on_activation(f"{phase[0]}/{name}", x)):
        logits = model(ids, batch["pixel_values"], token_type_ids=batch["token_type_ids"],
                       attention_mask=batch["attention_mask"], cache=cache)
        for k in range(decode_steps):
            token = tokens[k] if tokens is not None and k < len(tokens) else int(logits[0, -1].argmax())
            fed.append(token)
            phase[0] = f"decode.{k}"
            logits = model(np.array([[token]]), cache=cache)
    return fed


def dump(model, proc, image, prompt: str, out: str, decode_steps: int = 0) -> list[str]:
    """Write a run's activations to `out` (.npz); returns the activation names in order."""
    batch = proc(images=[image], prompts=[prompt])
    writer = DumpWriter(out)
    tokens = run_model(model, batch, decode_steps, writer.add)
    writer.close({"prompt": prompt, "input_ids": batch["input_ids"][0].tolist(), "tokens": tokens})
    return writer.names[:-1]




_PHASE = re.compile(r"(prefill|decode\.(0|[1-9][0-9]*))/.+")


def _int_list(v) -> bool:
    return isinstance(v, list) and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in v)


class Dump:
    """A dump on disk, read lazily activation by activation; its entries are checked as they are read."""

    def __init__(self, path: str):
        self.path = path
        if not os.path.isfile(path):
            raise DumpError(f"{path}: activation dump not found")
        try:
            self.npz = np.load(path, allow_pickle=False)
            if not isinstance(self.npz, np.lib.npyio.NpzFile):
                raise ValueError("a single .npy array, not an .npz archive")
            meta = json.loads(str(self.npz["meta.json"])) if "meta.json" in self.npz.files else None
        except (OSError, ValueError, EOFError, zipfile.BadZipFile, RecursionError) as e:
            raise DumpError(f"{path}: not an activation dump ({type(e).__name__}: {e})") from None
        if meta is None:
            raise DumpError(f"{path}: not an activation dump (no meta.json entry)")
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise DumpError(f"{path}: dump format {meta.get('format') if isinstance(meta, dict) else meta!r}, "
                            f"expected {FORMAT!r}")
        for key in ("input_ids", "tokens"):
            if key in meta and not _int_list(meta[key]):
                raise DumpError(f"{path}: meta.json {key!r} must be a list of token ids")
        self.meta = meta
        self.names = [n for n in self.npz.files if n != "meta.json"]
        bad = [n for n in self.names if not _PHASE.fullmatch(n)]
        if bad:
            raise DumpError(f"{path}: entry {bad[0]!r} is not named <phase>/<activation> "
                            f"(phase prefill or decode.<k>)")

    @staticmethod
    def step(name: str) -> int:
        """The decode step of an entry (-1 for prefill)."""
        phase = name.split("/", 1)[0]
        return -1 if phase == "prefill" else int(phase.split(".")[1])

    def __getitem__(self, name: str) -> np.ndarray:
        try:
            a = self.npz[name]
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
            raise DumpError(f"{self.path}: entry {name!r} is unreadable ({e})") from None
        if not (np.issubdtype(a.dtype, np.number) or a.dtype == bool) or np.iscomplexobj(a):
            raise DumpError(f"{self.path}: entry {name!r} holds {a.dtype}, not real numbers")
        return a


# ---- comparing ---------------------------------------------------------------------------------

@dataclass
class Record:
    name: str
    shape: list[int]
    max_abs: float  # max |b − a|
    max_rel: float  # max |b − a| / max |a|
    rms_rel: float  # rms(b − a) / rms(a)
    cosine: float
    top1_agree: float | None = None  # logits: fraction of positions whose argmax agrees
    divergent: bool = False


def compare(name: str, a: np.ndarray, b: np.ndarray, tol: float) -> Record:
    """Metrics of b against the reference a."""
    a, b = np.asarray(a), np.asarray(b)  # a live cuda run hands over DeviceArrays
    if a.shape != b.shape:
        return Record(name, list(a.shape), math.inf, math.inf, math.inf, 0.0, None, True)
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    d = b64 - a64
    scale = float(np.abs(a64).max())
    rms_a = float(np.sqrt((a64 * a64).mean()))
    denom = float(np.linalg.norm(a64) * np.linalg.norm(b64))
    rec = Record(
        name=name, shape=list(a.shape), max_abs=float(np.abs(d).max()),
        max_rel=float(np.abs(d).max() / scale) if scale else float(np.abs(d).max()),
        rms_rel=float(np.sqrt((d * d).mean()) / rms_a) if rms_a else float(np.sqrt((d * d).mean())),
        cosine=float((a64 * b64).sum() / denom) if denom else 1.0,
    )
    if name.endswith("logits"):
        rec.top1_agree = float((a.argmax(-1) == b.argmax(-1)).mean())
    finite_mismatch = not np.array_equal(np.isfinite(a), np.isfinite(b))
    rec.divergent = finite_mismatch or not rec.max_rel <= tol
    return rec


@dataclass
class DiffResult:
    records: list[Record]
    first_divergent: str | None
    tol: float
    missing: list[str]  # activations one side has and the other lacks

    def to_json(self) -> dict:
        return {"tol": self.tol, "first_divergent": self.first_divergent, "missing": self.missing,
                "records": [asdict(r) for r in self.records]}


def diff_streams(stored_names: list[str], get_stored: Callable[[str], np.ndarray],
                 produce_live: Callable[[Callable[[str, np.ndarray], None]], None], tol: float,
                 live_is_a: bool) -> DiffResult:
    """Compare a run as it is produced (live) with a stored one, activation by activation.

    B is always measured against A; `live_is_a` says which of the two is the live run.
    """
    records: list[Record] = []
    seen: set[str] = set()
    known = set(stored_names)

    def on_live(name: str, x: np.ndarray) -> None:
        seen.add(name)
        if name in known:
            stored = get_stored(name)
            a, b = (x, stored) if live_is_a else (stored, x)
            records.append(compare(name, a, b, tol))

    produce_live(on_live)
    missing = [n for n in stored_names if n not in seen] + sorted(seen - known)
    first = next((r.name for r in records if r.divergent), None)
    return DiffResult(records, first, tol, missing)


def diff_runs(model_a, model_b, proc, image, prompt: str, decode_steps: int = 0, tol: float = 1e-3,
              dump_b: "str | Dump | None" = None) -> DiffResult:
    """Run A is a model; run B is another model, or (dump_b) a dump file.

    Decode steps feed the same tokens to both sides: the dump's own tokens when B is a dump, else
    A's greedy choices; `top1` then says whether B would have chosen the same.
    """
    batch = proc(images=[image], prompts=[prompt])
    if dump_b is not None:
        b = dump_b if isinstance(dump_b, Dump) else Dump(dump_b)
        if b.meta.get("input_ids") not in (None, batch["input_ids"][0].tolist()):
            raise DumpError(f"{b.path}: the dump was made from other input ids (another prompt or tokenizer)")
        tokens = b.meta.get("tokens", [])
        steps = min(decode_steps, len(tokens))
        if any(t >= model_a.config.text.vocab_size for t in tokens[:steps]):
            raise DumpError(f"{b.path}: its decode tokens lie outside this model's vocabulary "
                            f"of {model_a.config.text.vocab_size} (a dump of another model?)")
        names = [n for n in b.names if Dump.step(n) < steps]
        return diff_streams(names, b.__getitem__, lambda on: run_model(model_a, batch, steps, on, tokens=tokens),
                            tol, live_is_a=True)
    with tempfile.TemporaryDirectory() as tmp:
        writer = DumpWriter(os.path.join(tmp, "a.npz"))
        tokens = run_model(model_a, batch, decode_steps, writer.add)
        writer.close({"tokens": tokens})
        a = Dump(writer.path)
        return diff_streams(a.names, a.__getitem__,
                            lambda on: run_model(model_b, batch, decode_steps, on, tokens=tokens), tol,
                            live_is_a=False)


# ---- reporting ---------------------------------------------------------------------------------

def format_table(result: DiffResult, color: bool = False) -> str:
    """The terminal report: one row per activation, the first divergence marked."""
    head = f"{'activation':34s} {'shape':>18s} {'max abs':>9s} {'max rel':>9s} {'rms rel':>9s} {'cosine':>10s} {'top1':>5s}"
    lines = [head, "-" * len(head)]
    for r in result.records:
        shape = "x".join(map(str, r.shape))
        top1 = f"{r.top1_agree * 100:4.0f}%" if r.top1_agree is not None else ""
        line = (f"{r.name:34s} {shape:>18s} {r.max_abs:9.2e} {r.max_rel:9.2e} {r.rms_rel:9.2e} "
                f"{r.cosine:10.7f} {top1:>5s}")
        if r.name == result.first_divergent:
            line += "   <-- first divergence"
            if color:
                line = f"\033[1;31m{line}\033[0m"
        lines.append(line)
    lines.append("")
    if result.first_divergent:
        lines.append(f"first activation beyond max rel {result.tol:g}: {result.first_divergent}")
    else:
        lines.append(f"no divergence: every activation within max rel {result.tol:g}")
    if result.missing:
        lines.append(f"only in one run ({len(result.missing)}): {', '.join(result.missing[:6])}"
                     + (" …" if len(result.missing) > 6 else ""))
    return "\n".join(lines)


def _tower(activation: str) -> str | None:
    """Which panel of the plot an activation belongs to."""
    if activation.startswith("vision.") or activation == "projector":
        return "vision"
    if activation.startswith("text.") or activation == "logits":
        return "text"
    return None


def plot(result: DiffResult, path: str) -> None:
    """A PNG of max rel error (log scale) of every activation in forward order, one panel per tower:
    prefill as a line, each decode step as a lighter one; the first divergence circled and named."""
    from PIL import Image, ImageDraw

    W, H, pad = 1000, 340, 60
    towers = ("vision", "text")
    series: dict[str, dict[str, list[tuple[str, float]]]] = {t: {} for t in towers}  # tower -> phase -> points
    for r in result.records:
        phase, activation = r.name.split("/", 1)
        tower = _tower(activation)
        if tower is not None:
            series[tower].setdefault(phase, []).append((activation, r.max_rel))
    img = Image.new("RGB", (W, H * len(towers)), "white")
    draw = ImageDraw.Draw(img)
    floor = 1e-12
    values = [v for t in towers for pts in series[t].values() for _, v in pts if v > 0 and math.isfinite(v)]
    values = values or [floor]
    lo = math.floor(math.log10(max(min(values), floor)))
    hi = max(math.ceil(math.log10(max(values))), lo + 1)
    for p, tower in enumerate(towers):
        top = p * H
        x0, x1, y0, y1 = pad, W - 20, top + 30, top + H - 50
        draw.rectangle([x0, y0, x1, y1], outline="black")
        draw.text((x0, top + 8), f"{tower}: max rel error of each activation, in forward order (log scale; "
                                 f"blue: prefill, grey: decode steps; orange: --tol)", fill="black")
        for e in range(lo, hi + 1):
            y = y1 - (e - lo) / (hi - lo) * (y1 - y0)
            draw.line([x0, y, x1, y], fill=(225, 225, 225))
            draw.text((5, y - 6), f"1e{e}", fill="black")
        tol_y = y1 - (math.log10(result.tol) - lo) / (hi - lo) * (y1 - y0)
        if y0 <= tol_y <= y1:
            draw.line([x0, tol_y, x1, tol_y], fill=(240, 150, 0), width=1)
        order = [a for a, _ in series[tower].get("prefill", [])]
        for pts in series[tower].values():
            order += [a for a, _ in pts if a not in order]
        n = max(len(order), 1)
        x_of = {a: x0 + (i + 0.5) / n * (x1 - x0) for i, a in enumerate(order)}
        for a in order:  # tick the layer outputs with their index
            parts = a.split(".")
            if len(parts) == 2 and parts[1].isdigit():
                draw.text((x_of[a] - 4, y1 + 5), parts[1], fill="black")

        def y_of(v: float) -> float:
            v = min(max(v, 10.0 ** lo), 10.0 ** hi) if math.isfinite(v) else 10.0 ** hi
            return y1 - (math.log10(v) - lo) / (hi - lo) * (y1 - y0)

        phases = sorted(series[tower], key=lambda ph: (ph != "prefill", ph))
        for phase in reversed(phases):  # prefill drawn last, on top
            color = (30, 90, 200) if phase == "prefill" else (170, 170, 170)
            xy = [(x_of[a], y_of(v)) for a, v in series[tower][phase]]
            if len(xy) > 1:
                draw.line(xy, fill=color, width=2 if phase == "prefill" else 1)
            for x, y in xy:
                draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=color)
        if result.first_divergent:
            phase, activation = result.first_divergent.split("/", 1)
            if _tower(activation) == tower:
                v = dict(series[tower][phase])[activation]
                x, y = x_of[activation], y_of(v)
                draw.ellipse([x - 7, y - 7, x + 7, y + 7], outline=(220, 20, 20), width=2)
                label = f"first divergence: {result.first_divergent}"
                draw.text((min(x + 10, x1 - 7 * len(label)), max(y - 18, y0 + 2)), label, fill=(220, 20, 20))
    img.save(path)
