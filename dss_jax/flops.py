"""FLOPs of a train step counted two ways: the model's useful work, and what the compiled program executes.

``model_flops``: MaxText's count. 6 x the matmul parameters a token passes through x the tokens that are not
padding (forward 2, backward 4; the decoder's cross-attention keys and values are computed from encoder tokens,
so they count per encoder token), plus attention at each example's real lengths: 3 x 4 x (query heads x head
dim) x the (query, key) pairs a query may see: all of its own sequence in the encoder, the causal half in the
decoder (t (t + 1) / 2 pairs), every encoder token in cross-attention. Embedding lookups are not matmuls; the
output head is. Remat recomputation, padding, and masked attention blocks are waste, so they are not counted.

``loop_scaled_cost``: XLA's cost analysis counts a ``while`` body once whatever its trip count, and a train step
is loops (scanned layers, attention blocks and rows, microbatches). This reads the optimized HLO text, finds
each while loop's trip count from its condition (``i < N``), its initial value and its increment, and adds
(trip count - 1) x the body's cost, scaled by how many times the loop itself runs (nested loops multiply). The
body's cost is XLA's own (``hlo_module_cost_analysis`` on a module whose entry is the body). A loop whose
trip count cannot be read counts once and is listed. Branches of a ``conditional`` are costed as XLA does
(attention block pairs skipped at run time still count: an upper bound).

No TensorFlow; jax only for the cost analysis.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterable
from typing import Any

import numpy as np

from dss_jax.model import ModelConfig

_COMP = re.compile(r"^(ENTRY )?%([\w.\-]+) .*\{\s*$")
_INSTR = re.compile(r"^\s+(?:ROOT )?%([\w.\-]+) = (.*)$")
_WHILE = re.compile(r" while\(%([\w.\-]+)\), condition=%([\w.\-]+), body=%([\w.\-]+)")
_KNOWN_TRIPS = re.compile(r'"known_trip_count":\{"n":"(\d+)"')
_REF = re.compile(r"%([\w.\-]+)")
COST_KEYS = ("flops", "bytes accessed", "transcendentals")


@dataclasses.dataclass(frozen=True)
class AttentionShape:
    """Matmul parameters a token passes through and attention widths (query heads x head dim) of a model."""

    enc_params: float
    dec_params: float
    cross_params: float  # the decoder's cross-attention K and V: per encoder token, once per decoder layer
    enc_layers: int
    dec_layers: int
    enc_width: int
    dec_width: int
    enc_windows: tuple[int | None, ...] = ()  # per encoder layer: sliding window, None for global attention
    dec_windows: tuple[int | None, ...] = ()


def model_shape(cfg: ModelConfig) -> AttentionShape:
    """The shape of a ``model.T5Config`` or a ``gemma.GemmaConfig`` (each config states its own)."""
    return AttentionShape(**cfg.flop_shape())


def _pairs(lengths: np.ndarray, windows: tuple[int | None, ...], layers: int, causal: bool) -> float:
    """(query, key) pairs a query may see, summed over sequences and layers (a window caps the keys)."""
    total = 0.0
    for w in windows or (None,) * layers:
        keys = lengths if w is None else np.minimum(lengths, w)
        total += float(np.sum(lengths * (keys + 1) / 2 if causal else lengths * keys))
    return total


def model_flops(cfg: Any, enc_len: Iterable[int], dec_len: Iterable[int]) -> dict[str, float]:
    """A train step's model FLOPs (global) for examples of these real encoder and decoder lengths."""
    s = model_shape(cfg)
    e, t = np.asarray(list(enc_len), np.float64), np.asarray(list(dec_len), np.float64)
    matmul = 6.0 * ((s.enc_params + s.cross_params) * e.sum() + s.dec_params * t.sum())
    enc_pairs = _pairs(e, s.enc_windows, s.enc_layers, causal=False)
    dec_pairs = _pairs(t, s.dec_windows, s.dec_layers, causal=True) + s.dec_layers * float(np.sum(t * e))
    attention = 3.0 * 4.0 * (s.enc_width * enc_pairs + s.dec_width * dec_pairs)
    return {"matmul": matmul, "attention": attention, "total": matmul + attention, "tokens": float(e.sum() + t.sum())}


@dataclasses.dataclass
class Hlo:
    """An optimized HLO module's text split into computations (instruction lines by name)."""

    header: str
    entry: str
    comps: dict[str, list[str]]
    lines: dict[str, str]  # computation name -> its opening line

    @classmethod
    def parse(cls, text: str) -> Hlo:
        comps: dict[str, list[str]] = {}
        lines: dict[str, str] = {}
        entry, cur = "", None
        for line in text.splitlines():
            m = _COMP.match(line)
            if m:
                cur = m.group(2)
                comps[cur], lines[cur] = [], line[len("ENTRY ") :] if m.group(1) else line
                entry = cur if m.group(1) else entry
            elif line.startswith("}"):
                cur = None
            elif cur is not None:
                comps[cur].append(line)
        return cls(text.splitlines()[0], entry, comps, lines)

    def defs(self, comp: str) -> dict[str, str]:
        """Instruction name -> its right-hand side, in one computation."""
        out = {}
        for line in self.comps[comp]:
            m = _INSTR.match(line)
            if m:
                out[m.group(1)] = re.sub(r"/\*.*?\*/", "", m.group(2))
        return out

    def callees(self, comp: str) -> list[tuple[str, str]]:
        """(called computation, the calling line) for every computation this one calls."""
        return [(ref, line) for line in self.comps[comp] for ref in _REF.findall(line) if ref in self.comps]

    def reachable(self, root: str) -> list[str]:
        seen, todo = {root}, [root]
        while todo:
            for ref, _ in self.callees(todo.pop()):
                if ref not in seen:
                    seen.add(ref)
                    todo.append(ref)
        return [c for c in self.comps if c in seen]

    def module_text(self, entry: str) -> str:
        """A module of the computations ``entry`` reaches, with ``entry`` as its entry (callees first)."""
        parts = ["HloModule sub"]
        for c in self.reachable(entry):
            opening = ("ENTRY " if c == entry else "") + self.lines[c]
            parts += [opening, *self.comps[c], "}", ""]
        return "\n".join(parts)


_OPCODE = re.compile(r" ([a-z][a-z\-]*)\(")


def _opcode(rhs: str) -> str:
    m = _OPCODE.search(" " + rhs)
    return m.group(1) if m else ""


def _operands(rhs: str) -> list[str]:
    """The operand names of an instruction's right-hand side (``type opcode(%a, %b), attrs``)."""
    m = _OPCODE.search(" " + rhs)
    if not m:
        return []
    inner = (" " + rhs)[m.end() :]
    depth, out, cur = 0, [], ""
    for ch in inner:
        if ch == "(" or ch == "{":
            depth += 1
        elif ch == ")" or ch == "}":
            if depth == 0:
                break
            depth -= 1
        if ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
        else:
            cur += ch
    out.append(cur.strip())
    return [o.lstrip("%") for o in out if o]


def _constant(defs: dict[str, str], name: str) -> int | None:
    """An integer constant, through copies and bitcasts; None otherwise."""
    for _ in range(8):
        rhs = defs.get(name, "")
        m = re.search(r"\bconstant\((-?\d+)\)", rhs)
        if m:
            return int(m.group(1))
        if _opcode(rhs) not in ("copy", "bitcast", "convert") or not _operands(rhs):
            return None
        name = _operands(rhs)[0]
    return None


def _tuple_index(defs: dict[str, str], name: str) -> int | None:
    rhs = defs.get(name, "")
    m = re.search(r"get-tuple-element\(.*index=(\d+)", rhs)
    return int(m.group(1)) if m and " parameter(" not in rhs else None


def _unwrap(hlo: Hlo, rhs: str) -> tuple[str, list[str], str]:
    """(opcode, operands, right-hand side) of an instruction; a fusion of one instruction on its parameters (XLA:CPU
    wraps a lone add or compare in one) reads as that instruction on the fusion's operands."""
    m = re.search(r"calls=%([\w.\-]+)", rhs)
    if _opcode(rhs) != "fusion" or not m or m.group(1) not in hlo.comps:
        return _opcode(rhs), _operands(rhs), rhs
    inner = hlo.defs(m.group(1))
    root = next((ln for ln in hlo.comps[m.group(1)] if ln.lstrip().startswith("ROOT")), "")
    im = _INSTR.match(root)
    if not im:
        return "fusion", _operands(rhs), rhs
    outer = _operands(rhs)
    params = {n: int(p.group(1)) for n, r in inner.items() if (p := re.search(r" parameter\((\d+)\)", " " + r))}
    mapped = [outer[params[o]] if o in params and params[o] < len(outer) else o for o in _operands(im.group(2))]
    return _opcode(im.group(2)), mapped, im.group(2)


def _root(hlo: Hlo, comp: str) -> str:
    line = next((ln for ln in hlo.comps[comp] if ln.lstrip().startswith("ROOT")), "")
    m = _INSTR.match(line)
    return re.sub(r"/\*.*?\*/", "", m.group(2)) if m else ""


def trip_count(hlo: Hlo, parent: str, operand: str, cond: str, body: str) -> int | None:
    """The trip count of ``while(operand)`` in ``parent``: ``i < N`` (or <=, >, >=) on a tuple element with a
    constant start and a constant step in the body; None when the loop does not have that form."""
    cdefs, pdefs, bdefs = hlo.defs(cond), hlo.defs(parent), hlo.defs(body)
    op, args, rhs = _unwrap(hlo, _root(hlo, cond))
    m = re.search(r"direction=(\w+)", rhs)
    if op != "compare" or len(args) != 2 or not m:
        return None
    (a, b), direction = args, m.group(1)
    if _constant(cdefs, a) is not None:  # N > i: the same loop written the other way round
        a, b, direction = b, a, {"GT": "LT", "GE": "LE", "LT": "GT", "LE": "GE"}.get(direction, direction)
    idx, limit = _tuple_index(cdefs, a), _constant(cdefs, b)
    init_rhs = pdefs.get(operand, "")
    if idx is None or limit is None or _opcode(init_rhs) != "tuple":
        return None
    start = _constant(pdefs, _operands(init_rhs)[idx])
    broot = _root(hlo, body)
    nxt = _operands(broot)[idx] if _opcode(broot) == "tuple" else ""
    for _ in range(8):  # through copies to the increment
        if _opcode(bdefs.get(nxt, "")) not in ("copy", "bitcast") or not _operands(bdefs[nxt]):
            break
        nxt = _operands(bdefs[nxt])[0]
    op, args, _ = _unwrap(hlo, bdefs.get(nxt, ""))
    step = next((c for c in (_constant(bdefs, x) for x in args) if c is not None), None) if op == "add" else None
    if start is None or not step:
        return None
    span = {"LT": limit - start, "LE": limit - start + 1, "GT": start - limit, "GE": start - limit + 1}.get(direction)
    return None if span is None or step * (1 if direction in ("LT", "LE") else -1) <= 0 else max(0, -(-span // abs(step)))


def loop_scaled_cost(text: str, cost_fn: Any = None) -> dict[str, Any]:
    """XLA's cost of an optimized HLO module with every while body counted by its trip count (see the module
    docstring). ``cost_fn(module_text) -> dict`` defaults to XLA:CPU's ``hlo_module_cost_analysis``. Each loop
    is listed with its trip count, how often it runs, its jax op name and the FLOPs of all its trips (nested
    loops inside its body counted once there)."""
    cost_fn = cost_fn or xla_cost
    hlo = Hlo.parse(text)
    once = cost_fn(hlo.module_text(hlo.entry))
    runs: dict[str, float] = {hlo.entry: 1.0}  # how many times each computation runs per step
    total = {k: float(once.get(k, 0.0)) for k in COST_KEYS}
    loops, unresolved = [], []
    for comp in _topological(hlo):
        n_comp = runs.get(comp, 0.0)
        for line in hlo.comps[comp]:
            w = _WHILE.search(line)
            calls = {ref for ref in _REF.findall(line) if ref in hlo.comps}
            trips = None
            if w:
                operand, cond, body = w.groups()
                known = _KNOWN_TRIPS.search(line)  # XLA:CPU annotates it; the TPU's optimized HLO does not
                trips = int(known.group(1)) if known else trip_count(hlo, comp, operand, cond, body)
                body_cost = cost_fn(hlo.module_text(body)) if trips not in (None, 1) else {}
                for k in COST_KEYS:
                    total[k] += ((trips or 1) - 1) * n_comp * float(body_cost.get(k, 0.0))
                if trips is None:
                    unresolved.append(body)
                name = re.search(r'op_name="([^"]*)"', line)
                loops.append({
                    "body": body, "trips": trips, "runs": n_comp, "op_name": name.group(1) if name else "",
                    "flops": (trips or 1) * n_comp * float(body_cost.get("flops", 0.0)),
                })  # fmt: skip
            for ref in calls:
                factor = trips if (w and ref == w.group(3) and trips is not None) else 1
                runs[ref] = runs.get(ref, 0.0) + n_comp * factor
    return {**total, "once": {k: float(once.get(k, 0.0)) for k in COST_KEYS}, "loops": loops, "unresolved": unresolved}


def _topological(hlo: Hlo) -> list[str]:
    """Computations reachable from the entry, every caller before its callees."""
    order: list[str] = []
    seen: set[str] = set()

    def visit(c: str) -> None:
        seen.add(c)
        for ref, _ in hlo.callees(c):
            if ref not in seen:
                visit(ref)
        order.append(c)

    visit(hlo.entry)
    return order[::-1]


def xla_cost(module_text: str) -> dict[str, float]:
    """XLA's cost analysis (XLA:CPU's shape sizes) of an HLO module given as text."""
    import jax
    from jax._src.lib import _jax
    from jaxlib import _hlo  # type: ignore[attr-defined]  # jaxlib's private HLO bindings ship no stubs

    client = jax.devices("cpu")[0].client
    return dict(_jax.hlo_module_cost_analysis(client, _hlo.hlo_module_from_text(module_text)))


def roofline(flops: float, bytes_accessed: float, peak_flops: float, hbm_bytes_per_s: float) -> float:
    """The step time the chip's peak and memory bandwidth allow: max(compute time, memory time)."""
    return max(flops / peak_flops, bytes_accessed / hbm_bytes_per_s) if peak_flops > 0 else math.nan
