"""
stgc.py: Solving Token Gradient Conflict (STGC, Yang et al., ICLR 2025, arXiv 2406.19905).

Definitions (docs/stgc.md §1-2; equation numbers of the paper where they are known):
  For every MoE layer and every (token n, chosen expert e) pair that survived capacity, padding excluded:
    g_{n,e}  the gradient of the LM loss with respect to expert e's parameters through token n, i.e. the
             contribution of token n's pass through e (paper §3.2: g_n = grad_{theta_e} L_n). Two sources:
             'bias'  the paper's practical proxy: the gradient on a (virtual) bias at the expert's output,
                     u_{n,e} = w_{n,e} * dL/dy_n for MoE experts (w the combine weight), dL/dy_n for MoLE
                     experts (their gate probability sits inside the expert);
             'full'  all of e's parameters (for LoRA experts, its LoRA A and B): each linear map W of the
                     expert gets d_n x_n^T (output gradient times input), a rank-one matrix.
    gbar_e   mean of g_{n,e} over the pairs routed to e in the micro-batch (or over all ranks: mean_scope).
    conflict cos(g_{n,e}, gbar_e) < tau, tau = 0 by default (paper Fig. 2: "sufficiently low cosine").
    CEL      mean over the conflicting pairs of -log softmax(-z_n)[e], z_n the router logits (Eq. 8 inverts
             the logits, z' = -z, and takes the cross-entropy toward e, pushing e's logit down). The mask is
             detached. Layers are summed or averaged (layer_reduction).
  Total objective: LM + alpha * sum_layers aux + beta * CEL.

Two implementations that agree (tests/test_stgc.py):
  reference  the paper's two passes. Pass 1: forward, backward of the LM loss to each MoE layer's output (no
             parameter gradients), per-token expert gradients with torch.func (vmap over tokens of grad of the
             expert function), cosines of materialised vectors, masks. Pass 2: forward and backward of the full
             objective with the CEL as an ordinary loss term.
  fast       one forward, one backward. A hook on each MoE layer's output receives dL/dy during the backward,
             finds the conflicts there, and a hook on the same layer's router logits, which autograd reaches
             later, adds beta * dCEL/dz. 'full' cosines factorise: <d_n x_n^T, Gbar> = d_n^T Gbar x_n and
             |d_n x_n^T| = |d_n||x_n|, so no per-token gradient is materialised.
  Convention: the fast path's dL/dy is the gradient of the whole objective arriving at the layer output, which
  includes the aux and CEL gradients of deeper MoE layers; the paper's pass 1 uses the LM loss alone. They are
  identical when no deeper MoE layer contributes a router-loss gradient (one MoE layer, or alpha = beta = 0).
  Measured (bench/stgc_agreement.py: MoE at all 4 layers of a small random decoder, alpha = 0.01, bias source): the
  deepest layer agrees exactly; over all layers the conflict label of 1.8% of pairs differs at beta = 0.01 (2.6-2.8%
  on the shallower layers), 13.4% at beta = 0.5, 0.6% at beta = 0 (alpha's share), against a reference conflict
  ratio of ~10%: at large beta the two are different methods. The log and
  eval's statistics name theirs: LayerConflicts.definition, 'lm_loss' (reference, eval) or 'objective' (fast).

Choices where the paper is silent (each a knob of STGCConfig): beta (loss_weight) default 0.01 with layers
summed, as MoE-LLaVA sums its aux loss with 0.01; the expert mean per micro-batch and per rank; a position that no LM-loss gradient can
reach (no supervised target at or after it in its sequence: RoutingRecord.reaches_loss, from the labels) is never
a pair in either implementation, nor is a zero gradient (it has no direction); per-token gradients ignore LoRA
dropout (the functional expert has none). In 'full' mode the fast path recomputes each expert's forward once.
Also knobs: the CEL's normaliser (cel_norm: ours, GAR's, or over all pairs), tau and beta as schedules over the run,
and `measure`, the conflict statistics of a run without STGC (the baseline's curve; docs/routing.md).
"""
import math
import os
import weakref
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.func import grad, vmap

from moe import check_choice

EPS = 1e-12


@dataclass
class STGCConfig:
    enabled: bool = False
    threshold: float = 0.0             # tau: conflict if cos < tau
    loss_weight: float = 0.01          # beta; the paper's value is not known (GAR's reimplementation searched 0.25-4)
    grad_source: str = "bias"          # 'bias' (virtual output bias) | 'full' (all expert / LoRA parameters)
    impl: str = "fast"                 # 'fast' (one backward, hooks) | 'reference' (two passes, torch.func)
    mean_scope: str = "rank"           # 'rank': expert mean over this rank's micro-batch | 'global': all-reduced
    layer_reduction: str = "sum"       # 'sum' | 'mean' over MoE layers
    # The CEL's normaliser, its sum over conflicting pairs divided by (the paper's is unknown, docs/stgc.md §2):
    #   'conflicts'  the number of conflicting pairs (a mean over them: our reading of Eq. 8)
    #   'gar'        E * max(1, N_conflicts) (GAR's reimplementation, its Appendix D.10): 'conflicts' / E
    #   'pairs'      the number of pairs (a mean over every kept, real pair, non-conflicting ones contributing 0)
    cel_norm: str = "conflicts"
    # tau and beta as schedules over the run: 'constant' (threshold / loss_weight throughout), or from them at step 0
    # to threshold_final / loss_weight_final at the last step, 'linear' or 'cosine' (half a cosine, as the lr's)
    threshold_schedule: str = "constant"
    threshold_final: float = 0.0
    loss_weight_schedule: str = "constant"
    loss_weight_final: float = 0.01
    # conflict statistics in the training log when STGC is off too (the fast path's hooks reading dL/dy, no CEL):
    # the baseline's conflict ratio and gradient consistency, for comparing objectives; numbers train identically
    measure: bool = True

    def __post_init__(self):
        check_choice("stgc.grad_source", self.grad_source, ("bias", "full"))
        check_choice("stgc.impl", self.impl, ("fast", "reference"))
        check_choice("stgc.mean_scope", self.mean_scope, ("rank", "global"))
        check_choice("stgc.layer_reduction", self.layer_reduction, ("sum", "mean"))
        check_choice("stgc.cel_norm", self.cel_norm, ("conflicts", "gar", "pairs"))
        check_choice("stgc.threshold_schedule", self.threshold_schedule, SCHEDULES)
        check_choice("stgc.loss_weight_schedule", self.loss_weight_schedule, SCHEDULES)
        if self.loss_weight < 0 or self.loss_weight_final < 0:
            raise ValueError(f"stgc.loss_weight={self.loss_weight}, loss_weight_final={self.loss_weight_final} must be >= 0")

    def at(self, step, total_steps) -> tuple:
        """(tau, beta) at this optimizer step (a pure function of the step, as the lr: nothing to checkpoint)."""
        return (scheduled(self.threshold_schedule, self.threshold, self.threshold_final, step, total_steps),
                scheduled(self.loss_weight_schedule, self.loss_weight, self.loss_weight_final, step, total_steps))


SCHEDULES = ("constant", "linear", "cosine")


def scheduled(kind, start, final, step, total_steps):
    if kind == "constant":
        return start
    p = min(max(step / max(total_steps - 1, 1), 0.0), 1.0)            # 0 at the first step, 1 at the last
    w = p if kind == "linear" else 0.5 * (1 - math.cos(math.pi * p))
    return start + (final - start) * w


@dataclass
class LayerConflicts:
    """One MoE layer's verdict, over its M = S*K assignments (m = s*K + k)."""
    token: torch.Tensor                # [M] token index s
    expert: torch.Tensor               # [M] expert e
    pair: torch.Tensor                 # [M] bool: kept after capacity and a real token
    cos: torch.Tensor                  # [M] cos(g_{n,e}, gbar_e); 0 outside `pair`
    conflict: torch.Tensor             # [M] bool
    cel: torch.Tensor = None           # the layer's CEL value (detached)
    layer: int = -1
    definition: str = "lm_loss"        # whose gradient: 'lm_loss' (paper pass 1) | 'objective' (fast: + deeper aux, CEL)

    def totals(self, num_experts) -> torch.Tensor:
        """[4 + 2E] sums that add up over micro-batches and ranks: pairs, conflicts, sum of cos over pairs, CEL,
        then per expert the sum of cos and the pairs. `stats_from_totals` turns them into the logged numbers."""
        pair = self.pair.float()
        cos_E = torch.zeros(num_experts, device=pair.device).index_add_(0, self.expert, self.cos * pair)
        pairs_E = torch.zeros(num_experts, device=pair.device).index_add_(0, self.expert, pair)
        cel = self.cel.float().reshape(1) if self.cel is not None else pair.new_zeros(1)
        return torch.cat([torch.stack([pair.sum(), self.conflict.float().sum(), (self.cos * pair).sum()]), cel, cos_E, pairs_E])

    def kind_totals(self, kind_S, num_kinds=3) -> torch.Tensor:
        """[3 * num_kinds] sums per token kind (kind_S [S]: 0 image, 1 prompt text, 2 answer, -1 padding; routing.py):
        pairs, conflicts, sum of cos over pairs, kind after kind; `kind_stats_from_totals` reads them."""
        pair = self.pair.float()
        kind_M = kind_S.to(self.token.device)[self.token]              # [M]
        out = torch.zeros(num_kinds, 3, device=pair.device)
        ok = kind_M >= 0
        rows = torch.stack([pair, self.conflict.float() * pair, self.cos * pair], dim=1) * ok[:, None]   # [M, 3]
        return out.index_add_(0, kind_M.clamp_min(0), rows).reshape(-1)

    def stats(self, num_experts) -> dict:
        """Plain numbers for the log, of this micro-batch alone (train.py logs stats_from_totals over a step)."""
        return stats_from_totals(self.totals(num_experts), num_experts, self.layer, self.definition, 1)


def stats_from_totals(t, num_experts, layer, definition, num_micro) -> dict:
    """The logged numbers from summed `totals` (one host sync): pairs, conflict_ratio = conflicts / pairs, mean_cos
    over pairs, cel = the mean over the `num_micro` micro-batches of each one's CEL, consistency = per expert the
    mean cos of its pairs to its mean."""
    t = t.tolist()
    E, n = num_experts, max(t[0], 1)
    cos_E, pairs_E = t[4:4 + E], t[4 + E:4 + 2 * E]
    return {"layer": layer, "definition": definition, "pairs": int(t[0]), "conflict_ratio": t[1] / n,
            "mean_cos": t[2] / n, "cel": t[3] / max(num_micro, 1),
            "consistency": [c / max(k, 1) for c, k in zip(cos_E, pairs_E)]}


def kind_stats_from_totals(t, kinds) -> dict:
    """Per token kind, from summed `kind_totals` (a list): pairs, conflict_ratio, consistency (mean cos of the kind's
    pairs to their expert's mean, the paper's gradient consistency restricted to the kind)."""
    out = {}
    for n, kind in enumerate(kinds):
        pairs, conflicts, cos = t[3 * n:3 * n + 3]
        out[kind] = {"pairs": int(pairs), "conflict_ratio": conflicts / max(pairs, 1), "consistency": cos / max(pairs, 1)}
    return out


# -----------------------------------------------------------------------------
# Per-token expert gradients and their cosines to the expert mean

def assignments(record, delta_SD):
    """Flatten a routing record into assignments, with the output gradient u of each: [M] token, expert,
    pair mask, gate, and u [M, D] (combine weight times dL/dy for MoE experts, dL/dy for MoLE experts)."""
    S, K = record.experts.shape
    token = torch.arange(S, device=delta_SD.device).repeat_interleave(K)
    expert = record.experts.reshape(-1)
    gate = record.weights.detach().reshape(-1)
    pair = record.kept.reshape(-1)
    if record.valid is not None:
        pair = pair & record.valid[token]
    if record.reaches_loss is not None:                                # no LM gradient can arrive there: the
        pair = pair & record.reaches_loss[token]                       # fast path would see only aux / CEL grads
    u = delta_SD[token] if record.module.gate_inside else delta_SD[token] * gate[:, None].to(delta_SD.dtype)
    return token, expert, pair, gate, u.float()


def _sum_over_ranks(t, scope):
    if scope == "global" and dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t


def per_token_grads(layer, e, x_ND, u_ND, gate_N):
    """Reference: [N, P] per-token gradients of expert e's parameters, torch.func.vmap over tokens of grad of
    <u_n, expert_e(x_n)>, which is token n's share of the LM loss gradient by the chain rule."""
    params = {k: v.detach().float() for k, v in layer.expert_params(e).items()}

    def token_objective(p, x, u, g):
        return (u * layer.expert_apply(p, x[None], g[None])[0]).sum()

    if x_ND.shape[0] == 0:                                             # an expert with no token on this rank
        return x_ND.new_zeros(0, sum(p.numel() for p in params.values()), dtype=torch.float32)
    grads = vmap(grad(token_objective), in_dims=(None, 0, 0, 0))(params, x_ND.float(), u_ND, gate_N.float())
    return torch.cat([g.flatten(1) for g in grads.values()], dim=1)


def factorised_full_cos(layer, e, x_ND, u_ND, gate_N, scope):
    """Fast 'full': cos(g_n, gbar) with g_n = concat over the expert's linear maps of d_n h_n^T (and d_n for a
    bias), never materialised. Recompute the expert on its tokens with a zero 'probe' added to every trainable
    linear output; the probes' gradients are the per-token output gradients d_n."""
    inputs, probes = [], []

    def probed_linear(h, W, b):
        probe = torch.zeros(h.shape[0], W.shape[0], device=h.device, dtype=h.dtype, requires_grad=True)
        inputs.append((h.detach(), b is not None))
        probes.append(probe)
        return F.linear(h, W, b) + probe

    params = {k: v.detach().float() for k, v in layer.expert_params(e).items()}
    with torch.enable_grad():
        out = layer.expert_apply(params, x_ND.detach().float(), gate_N.float(), probed_linear)
        d_list = torch.autograd.grad(out, probes, grad_outputs=u_ND)
    n = _sum_over_ranks(torch.tensor(float(x_ND.shape[0]), device=x_ND.device), scope).clamp_min(1)
    dot = gn2 = 0.0
    gbar2 = torch.zeros((), device=x_ND.device)
    for (h, has_bias), d in zip(inputs, d_list):                     # h [N, in], d [N, out]
        gbar = _sum_over_ranks(d.T @ h, scope) / n                     # [out, in] mean per-token gradient
        dot = dot + ((h @ gbar.T) * d).sum(-1)                         # d_n^T gbar h_n
        gn2 = gn2 + (d * d).sum(-1) * (h * h).sum(-1)
        gbar2 = gbar2 + (gbar * gbar).sum()
        if has_bias:
            bbar = _sum_over_ranks(d.sum(0), scope) / n
            dot, gn2, gbar2 = dot + d @ bbar, gn2 + (d * d).sum(-1), gbar2 + (bbar * bbar).sum()
    return dot / (gn2.sqrt() * gbar2.sqrt()).clamp_min(EPS), gn2


def find_conflicts(record, delta_SD, cfg: STGCConfig, materialise=False, threshold=None) -> LayerConflicts:
    """Cosines of every pair's gradient to its expert's mean, and the conflict mask (all detached). Always in
    fp32 with autocast off: train.py calls backward inside its autocast region, and on CPU the backward hooks
    run on that thread with autocast on, on CUDA on autograd's device thread with it off; this makes both the same."""
    with torch.autocast(device_type=delta_SD.device.type, enabled=False):
        return _find_conflicts(record, delta_SD, cfg, materialise, cfg.threshold if threshold is None else threshold)


def per_token_grad_bytes(record, pairs) -> int:
    """What the reference 'full' source materialises for one expert: [pairs, P] fp32 per-token gradients."""
    return 4 * pairs * sum(p.numel() for p in record.module.expert_params(0).values())


def _available_bytes(device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _find_conflicts(record, delta_SD, cfg: STGCConfig, materialise, threshold):
    token, expert, pair, gate, u = assignments(record, delta_SD.detach())
    E = record.router_logits.shape[1]
    cos = torch.zeros(token.shape[0], device=u.device)
    norm2 = torch.zeros_like(cos)
    if cfg.grad_source == "bias":
        # g = u: the expert mean by index_add over experts, no per-expert loop and no host sync
        w = pair.float()[:, None]
        total = _sum_over_ranks(torch.zeros(E, u.shape[1], device=u.device).index_add_(0, expert, u * w), cfg.mean_scope)
        count = _sum_over_ranks(torch.zeros(E, device=u.device).index_add_(0, expert, w[:, 0]), cfg.mean_scope)
        mean = (total / count.clamp_min(1)[:, None])[expert]           # [M, D]
        cos = F.cosine_similarity(u, mean, dim=-1, eps=EPS) * pair
        norm2 = (u * u).sum(-1)
    else:
        x_SD = record.inputs.detach()
        for e in range(E):
            idx = (pair & (expert == e)).nonzero().flatten()
            if cfg.mean_scope == "rank" and len(idx) == 0:
                continue
            args = (record.module, e, x_SD[token[idx]], u[idx], gate[idx])
            if materialise:                                            # reference: explicit [N, P] gradients
                need, free = per_token_grad_bytes(record, len(idx)), _available_bytes(u.device)
                if need > free / 2:                                    # vmap holds about twice that at its peak
                    raise MemoryError(
                        f"stgc impl='reference' grad_source='full': layer {record.layer} expert {e} would materialise "
                        f"{len(idx)} per-token gradients of {need // (4 * len(idx)):,} parameters = {need / 2**30:.1f} GiB "
                        f"({free / 2**30:.1f} GiB free); use stgc.impl='fast' (same cosines, never materialised)")
                g = per_token_grads(*args)
                n = _sum_over_ranks(torch.tensor(float(len(idx)), device=u.device), cfg.mean_scope).clamp_min(1)
                gbar = _sum_over_ranks(g.sum(0), cfg.mean_scope) / n
                cos[idx] = F.cosine_similarity(g, gbar[None], dim=-1, eps=EPS)
                norm2[idx] = (g * g).sum(-1)
            else:
                cos[idx], norm2[idx] = factorised_full_cos(*args, cfg.mean_scope)
    conflict = pair & (cos < threshold) & (norm2 > 0)                 # a zero gradient has no direction
    return LayerConflicts(token, expert, pair, cos, conflict, layer=record.layer)

# -----------------------------------------------------------------------------
# The Conflict Elimination Loss


def cel_denominator(c: LayerConflicts, num_experts, norm="conflicts"):
    """What the CEL's sum over conflicting pairs is divided by (STGCConfig.cel_norm); a device scalar, no sync."""
    conflicts = c.conflict.sum().clamp_min(1)
    if norm == "conflicts":
        return conflicts
    if norm == "gar":                                                  # GAR Appendix D.10: 1 / (E * max(1, N^C))
        return num_experts * conflicts
    return c.pair.sum().clamp_min(1)                                   # 'pairs'


def conflict_elimination_loss(logits_SE, c: LayerConflicts, norm="conflicts"):
    """Sum over conflicting pairs of -log softmax(-z_n)[e] (paper Eq. 8, z' = -z) / cel_denominator: by default the
    mean over conflicting pairs; 0 without conflicts."""
    logp_ME = F.log_softmax(-logits_SE[c.token].float(), dim=-1)
    nll_M = -logp_ME.gather(1, c.expert[:, None])[:, 0]
    return (nll_M * c.conflict).sum() / cel_denominator(c, logits_SE.shape[1], norm)


def cel_logit_grad(logits_SE, c: LayerConflicts, norm="conflicts"):
    """d CEL / d z, in closed form: per conflicting pair (onehot(e) - softmax(-z_n)) / cel_denominator."""
    S, E = logits_SE.shape
    g_ME = F.one_hot(c.expert, E).float() - F.softmax(-logits_SE[c.token].float(), dim=-1)
    g_ME = g_ME * (c.conflict.float() / cel_denominator(c, E, norm))[:, None]
    return torch.zeros(S, E, device=logits_SE.device).index_add_(0, c.token, g_ME)


class STGC:
    """measure_only: find and log the conflicts (fast path's hooks) but add no CEL (train.py, stgc.measure)."""

    def __init__(self, cfg: STGCConfig, measure_only=False):
        self.cfg, self.measure_only = cfg, measure_only
        self.threshold, self.loss_weight = cfg.at(0, 1)                # tau, beta now; train.py calls set_step
        self.conflicts = []            # LayerConflicts of the last step, for logging

    def set_step(self, step, total_steps):
        self.threshold, self.loss_weight = self.cfg.at(step, total_steps)

    def layer_weight(self, num_layers):
        if self.measure_only:
            return 0.0
        return self.loss_weight / (num_layers if self.cfg.layer_reduction == "mean" else 1)

    # --- reference: two passes -------------------------------------------------------------
    def reference_conflicts(self, forward):
        """Pass 1: run `forward()` (returns a ModelOutput with loss and routing), take the LM loss gradient at
        each MoE layer's output (parameter .grad untouched), find the conflicts. The RNG state is restored
        afterwards, so pass 2 routes identically (Gumbel sampling, dropout)."""
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices):
            out = forward()
            with torch.autocast(device_type=out.loss.device.type, enabled=False):   # backward outside autocast
                deltas = torch.autograd.grad(out.loss, [r.output for r in out.routing], allow_unused=True)
            self.conflicts = [find_conflicts(r, (torch.zeros_like(r.output) if d is None else d).reshape(-1, r.output.shape[-1]),
                                             self.cfg, materialise=True, threshold=self.threshold)
                              for r, d in zip(out.routing, deltas)]
        return self.conflicts

    def cel(self, routing, conflicts, scale=1.0):
        """Pass 2's loss term: beta * CEL over layers (already weighted by beta), times `scale` (train.py
        passes 1 / gradient-accumulation steps)."""
        total = 0.0
        for r, c in zip(routing, conflicts):
            layer_cel = conflict_elimination_loss(r.router_logits, c, self.cfg.cel_norm)
            c.cel = layer_cel.detach()
            total = total + scale * self.layer_weight(len(routing)) * layer_cel
        return total

    # --- fast: one backward ----------------------------------------------------------------
    def attach(self, routing, scale=1.0):
        """Hooks for the coming backward: at each MoE layer output, find the conflicts from the gradient
        arriving there; at its router logits (reached later), add scale * beta * dCEL/dz."""
        self.conflicts = [None] * len(routing)
        weight = scale * self.layer_weight(len(routing))
        for i, r in enumerate(routing):
            pending = {}

            # The hook lives on r.output, so a strong reference to r from it would be a cycle through
            # autograd that Python's GC cannot see: every step's graph would leak (~8 MB a step at the
            # demo's size). The caller keeps the routing records alive through the backward.
            def on_output_grad(delta, record=weakref.ref(r), i=i, pending=pending):
                r = record()
                c = find_conflicts(r, delta.reshape(-1, delta.shape[-1]), self.cfg, threshold=self.threshold)
                c.definition = "objective"                             # the whole objective's gradient arrives here
                logits = r.router_logits.detach()
                c.cel = conflict_elimination_loss(logits, c, self.cfg.cel_norm)
                if not self.measure_only:
                    pending["grad"] = weight * cel_logit_grad(logits, c, self.cfg.cel_norm)
                self.conflicts[i] = c

            def on_logits_grad(g, pending=pending):
                return g + pending.pop("grad") if "grad" in pending else g

            r.output.register_hook(on_output_grad)
            if not self.measure_only:                                  # measuring leaves every gradient as it is
                r.router_logits.register_hook(on_logits_grad)

    def cel_values(self) -> tuple:
        """(CEL summed over the layers, the same weighted as the objective weighs it: beta, / layers with 'mean', 0
        when measuring only) of the last forward's conflicts: what train.py logs, with no re-derivation there."""
        found = [c for c in self.conflicts if c is not None]
        total = sum(float(c.cel) for c in found)
        return total, total * self.layer_weight(len(self.conflicts) or 1)

    def stats(self, num_experts):
        return [c.stats(num_experts) for c in self.conflicts if c is not None]
