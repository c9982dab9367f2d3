"""Running the catalogue against an implementation: compare, name the first divergence and the rule.

Expected values are refpg's NumPy reference (proven equal to transformers in CI) on the same
checkpoint and inputs. Activations are compared in forward order — prefill, then each decode
step — by max |got − expected| / max |expected| over the real tokens (left padding is the
implementation's business: its activations there are not compared). A case passes when every
activation the implementation exposes is within `tol` and it returned the logits of every phase;
it fails at its first divergence; an implementation that cannot load a case or crashes on it is a
failed case with its error, never a crash of the suite.
"""

from __future__ import annotations

import math
import re
import traceback
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np

from refpg.conform.adapters import Adapter, RefpgAdapter
from refpg.conform.cases import RULES, Case, Inputs, write_case_checkpoint

# what computes an activation, for "points to" (the case's rule says which part of it is exercised)
LAYERS = [
    (r"vision\.embeddings", "SigLIP patch + position embeddings (patch order, image size)"),
    (r"vision\.\d+\.attn_out", "SigLIP attention (layer_norm1 and its eps, heads, scale)"),
    (r"vision\.\d+\.mlp_out", "SigLIP MLP (layer_norm2 and its eps, gelu tanh approximation)"),
    (r"vision\.\d+", "a SigLIP layer's residual sum"),
    (r"vision\.post_layernorm", "SigLIP's post-layernorm (its eps)"),
    (r"projector", "the multi-modal projector"),
    (r"text\.embeddings", "the input embeddings: token embeddings x sqrt(hidden), image features unscaled "
                          "at the <image> positions"),
    (r"text\.\d+\.attn_out", "decoder attention: the mask (prefix-LM, padding, sliding window), RoPE positions, "
                             "head_dim, query scale, soft-cap, kv-head mapping, input RMSNorm eps"),
    (r"text\.\d+\.post_attn_norm", "Gemma 2's post-attention RMSNorm"),
    (r"text\.\d+\.mlp_out", "the decoder MLP (pre-MLP RMSNorm, GeGLU with gelu tanh)"),
    (r"text\.\d+\.post_ff_norm", "Gemma 2's post-feedforward RMSNorm"),
    (r"text\.\d+", "a decoder layer's residual sum"),
    (r"text\.norm", "the final RMSNorm"),
    (r"logits", "the LM head (tied to the embeddings; Gemma 2's final soft-cap)"),
]


def layer_of(activation: str) -> str:
    return next((what for pattern, what in LAYERS if re.fullmatch(pattern, activation)), activation)


@dataclass
class CaseResult:
    case: str
    rule: str
    status: str                      # pass | fail | error
    phase: str | None = None         # of the first divergence
    activation: str | None = None
    max_rel: float | None = None     # at the first divergence (the worst one when passing)
    points_to: str | None = None
    error: str | None = None
    compared: int = 0                # activations compared
    not_exposed: list[str] = field(default_factory=list)  # expected, not returned (per-layer ones are optional)

    def to_json(self) -> dict:
        return asdict(self)


def _valid_rows(name: str, inputs: Inputs) -> np.ndarray | None:
    """Which [B, T] positions to compare: in the prefill's text activations, real tokens only."""
    phase, activation = name.split("/", 1)
    if phase == "prefill" and (activation.startswith("text.") or activation == "logits"):
        return inputs.attention_mask.astype(bool)
    return None


def max_rel(expected: np.ndarray, got: np.ndarray) -> float:
    """max |got - expected| / max |expected|; inf when finiteness differs."""
    e, g = expected.astype(np.float64), got.astype(np.float64)
    if not np.array_equal(np.isfinite(e), np.isfinite(g)):
        return math.inf
    d = np.abs(np.where(np.isfinite(e), g - e, 0.0))
    scale = float(np.abs(np.where(np.isfinite(e), e, 0.0)).max(initial=0.0))
    return float(d.max(initial=0.0) / scale) if scale else float(d.max(initial=0.0))


def compare(name: str, rule: str, inputs: Inputs, expected: dict, got: dict, tol: float) -> CaseResult:
    """Expected vs got, in the expected activations' (forward) order; the first beyond tol fails."""
    result = CaseResult(name, rule, "pass", max_rel=0.0)
    phases = ["prefill"] + [f"decode.{k}" for k in range(inputs.steps)]
    missing_logits = [p for p in phases if f"{p}/logits" not in got]
    for key, want in expected.items():
        if key not in got:
            result.not_exposed.append(key)
            continue
        have = np.asarray(got[key])
        rows = _valid_rows(key, inputs)
        if have.shape != want.shape:
            err = math.inf
        else:
            err = max_rel(want[rows] if rows is not None else want, have[rows] if rows is not None else have)
        result.compared += 1
        if not err <= tol:
            phase, activation = key.split("/", 1)
            shape_note = f" (shape {list(have.shape)}, expected {list(want.shape)})" if have.shape != want.shape else ""
            return CaseResult(name, rule, "fail", phase, activation, err, layer_of(activation) + shape_note,
                              compared=result.compared, not_exposed=result.not_exposed)
        result.max_rel = max(result.max_rel, err)
    if missing_logits:
        result.status, result.error = "fail", f"returned no logits for {', '.join(missing_logits)}"
    return result


def check(adapter: Adapter, name: str, rule: str, model_dir: str, inputs: Inputs, tol: float,
          reference: Adapter | None = None) -> CaseResult:
    """One check: the reference's and the adapter's activations on the same checkpoint and inputs."""
    expected = (reference or RefpgAdapter("numpy")).run(name, model_dir, inputs)
    try:
        got = adapter.run(name, model_dir, inputs)
    except Exception as e:  # noqa: BLE001 — the implementation under test failed: that is a result
        last = traceback.extract_tb(e.__traceback__)[-1:] or [None]
        where = f" ({last[0].filename.rsplit('/', 1)[-1]}:{last[0].lineno})" if last[0] else ""
        message = " ".join(f"{type(e).__name__}: {e}".split())  # one line, whatever the implementation wrote
        return CaseResult(name, rule, "error", error=f"{message}{where}"[:400])
    return compare(name, rule, inputs, expected, got, tol)


def run_case(adapter: Adapter, case: Case, root: str, tol: float, reference: Adapter | None = None) -> CaseResult:
    """A catalogue case: its checkpoint written under root (once), then check()."""
    model_dir = write_case_checkpoint(case, root)
    return check(adapter, case.name, case.rule, model_dir, case.inputs(case.config()), tol, reference)


def run_suite(adapter: Adapter, cases: list[Case], root: str, tol: float,
              on_result: Callable[[CaseResult], None] | None = None) -> list[CaseResult]:
    results = []
    for case in cases:
        results.append(run_case(adapter, case, root, tol))
        if on_result:
            on_result(results[-1])
    return results


def format_table(results: list[CaseResult], tol: float) -> str:
    """The report: case, rule, result, where it first diverged and what that points to."""
    head = f"{'case':31s} {'rule':16s} {'result':6s}  first divergence (max rel) / error"
    lines = [head, "-" * 100]
    for r in results:
        if r.status == "pass":
            detail = f"all {r.compared} activations within {tol:g} (worst {r.max_rel:.1e})"
        elif r.status == "error":
            detail = r.error or ""
        elif r.activation:
            detail = f"{r.phase}/{r.activation} ({r.max_rel:.1e}): {r.points_to}"
        else:
            detail = r.error or ""
        lines.append(f"{r.case:31s} {r.rule:16s} {r.status.upper() if r.status != 'pass' else 'pass':6s}  {detail}")
    failed = [r for r in results if r.status != "pass"]
    lines.append("")
    lines.append(f"{len(results) - len(failed)} of {len(results)} cases pass (max rel <= {tol:g})")
    for rule in dict.fromkeys(r.rule for r in failed):
        lines.append(f"  rule {rule}: {RULES[rule]}")
    return "\n".join(lines)
