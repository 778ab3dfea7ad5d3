"""
moe.py: the Mixture-of-Experts layers of MoE-LLaVA and LLaVA-MoLE, and what they record for STGC.

  MoELayer      MoE-LLaVA's sparse FFN experts (DeepSpeed v0.9.5 TopKGate semantics, docs/moe_llava.md
                §1.6): fp32 bias-free router, softmax, top-k, capacity C = ceil(S/E * cf * k) over all S tokens,
                first choices queued before second choices, positional dropping, renormalised top-2 weights,
                aux loss E * sum_e mean_prob_e * frac_top1_e. Experts are upcycled: exact copies of the
                dense FFN (§1.8). Dispatch paths that must agree: a per-expert loop (the reference), and two
                fast ones, a grouped matmul over the assignments sorted by expert and a capacity-padded bmm;
                `dispatch_path` is the one rule that chooses between them for a device and dtype.
  LoRAExperts   LLaVA-MoLE: the dense MLP frozen, E >= 2 LoRA experts on its projections, one router per layer
                shared by the projections; a soft mixture of all experts or the top-1 expert, as its released
                code has both (docs/llava_mole.md). mole_balance_loss: the released balance loss (layers pooled,
                per sample).
  LoRALinear    plain LoRA on a frozen Linear: MoLE's attention LoRA on q/k/v/o (as released), and the plain-LoRA
                baseline on the MLP projections (MoEConfig kind='lora', num_experts=1: lora_mlp, no router).
  RoutingRecord what one MoE layer decided for one forward pass; read by stgc.py, eval.py and train.py. Every
                routed layer (is_routed: MoELayer, LoRAExperts) returns (y, RoutingRecord); nothing else does.
  Router objectives beside the aux loss (docs/routing.md): z_loss (ST-MoE), sequence_aux_loss (per sample), and
                aux-loss-free balancing, the expert_bias buffer route() chooses with and update_expert_bias moves.

Only the dense FFN's wiring is needed from model.py: `ffn_forward` rebuilds it from named projections,
so one function serves the expert loop, the grouped path and the LoRA experts.

Shape suffixes: S tokens of the micro-batch (B*T, padding included, as DeepSpeed does), E experts,
K = top_k, D model width, F FFN width, r LoRA rank, M = S*K token-expert assignments.
"""
import math
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

FFN_PROJECTIONS = {"swiglu": ("gate_proj", "up_proj", "down_proj"), "gelu": ("fc1", "fc2")}
LAYER_PLACEMENTS = ("sparse", "first_half", "second_half", "dense")   # MoE-LLaVA's moe_mode names


def check_choice(key: str, value, allowed):
    """A config enum check that survives `python -O` (no assert) and says what would have been accepted; every
    config dataclass uses it (this module imports nothing of ours, so all of them can import it)."""
    allowed = tuple(allowed)
    if value not in allowed:
        raise ValueError(f"{key}={value!r} is not one of {allowed}")


@dataclass
class MoEConfig:
    num_experts: int = 4
    top_k: int = 2
    capacity_factor: float = 1.5       # training; MoE-LLaVA scripts pass 1.5 (ModelArguments default 1.0)
    eval_capacity_factor: float = 2.0  # with E=4, k=2 this is C = S: nothing is dropped at evaluation
    min_capacity: int = 0              # MoE-LLaVA passes 0 (DeepSpeed's own default is 4)
    dropless: bool = False             # True: no capacity limit at all (C = S)
    aux_loss_coef: float = 0.01        # alpha; train.py applies it to the sum over layers (docs/moe_llava.md §1.7)
    layers: object = "sparse"          # 'sparse' (0, 2, 4, ...) | 'first_half' | 'second_half' | 'dense' | [i, ...]
    kind: str = "ffn"                  # 'ffn' (MoE-LLaVA experts) | 'lora' (LLaVA-MoLE LoRA experts)
    # DeepSpeed v0.9.5 samples the second expert with Gumbel noise, in eval too (MoE-LLaVA issue #60). We take
    # the deterministic second-highest; 'gumbel' reproduces the original in training, and at evaluation
    # only if gumbel_at_eval is also set.
    second_expert: str = "top2"        # 'top2' | 'gumbel'
    gumbel_at_eval: bool = False
    impl: str = "fast"                 # 'fast': dispatch_path's choice | 'grouped' | 'padded' | 'loop' (reference)
    # Routing objectives beside alpha * aux, to compare balancing methods on the same layer (docs/routing.md). All
    # off by default; each combines with the others and with STGC; train.py's train_step adds the terms.
    z_loss_coef: float = 0.0           # ST-MoE router z-loss: coef * sum over layers of mean_s logsumexp(z_s)^2 over real
                                       # tokens (ST-MoE uses 1e-3, Megatron's --moe-z-loss-coeff suggests 1e-3)
    seq_aux_loss_coef: float = 0.0     # the aux loss of each sample over its real tokens, averaged over samples, summed over
                                       # layers (DeepSeek-V3's sequence-wise balance loss in MoE-LLaVA's first-choice form)
    expert_bias: bool = False          # aux-loss-free balancing (DeepSeek-V3 §2.1.2): a per-expert bias on the scores that
                                       # choose the experts, never on the combine weights; aux_loss_coef = 0 for aux-free only
    expert_bias_rate: float = 0.001    # gamma: after each optimizer step bias += gamma * sign(mean load - load) (global batch)
    # LLaVA-MoLE (kind='lora'). The released code (forwchen/LLaVA-MoLE 5876301, docs/llava_mole.md) sets: rank 16,
    # alpha 32 (its checkpoint's name; its inference arguments say 32 / 64), dropout 0.05, attention LoRA of the
    # experts' rank, every layer, router bias, soft mixture, the released balance loss: configs/mole_llava15.toml.
    # The defaults here are our paper-only MoLE of before the release, kept reachable (README, "LLaVA-MoLE as released").
    lora_rank: int = 32
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05         # released: 0.05 on every LoRA input (experts and attention)
    attn_lora_rank: int = 0            # >0: plain LoRA on q/k/v/o (released: all four, the experts' rank)
    mole_router_bias: bool = False     # released: the router is Linear(D, E) with a bias; ours had none
    # 'soft': W x + sum_e p_e LoRA_e(x), every expert weighted by its router probability (the released inference,
    #         `dense_moe`); 'top1': only the argmax expert's LoRA, with the coefficient mole_top1_gate says.
    mole_mixture: str = "top1"
    # top-1 coefficient: 'one' (released sparse mode: 1, so the LM loss gives the router no gradient, only the
    # balance loss does) | 'straight_through' (onehot - p.detach() + p: the value of 'one', the gradient of the soft
    # mixture, so the LM loss reaches the router; the released code computes it but only for the balance loss)
    # | 'prob' (ours before the release: p_e, the Switch-style gate)
    mole_top1_gate: str = "prob"
    # 'switch': E * sum_e mean_prob_e * frac_e per layer, summed over layers (ours, route()) | 'released': per
    # sample over its attended positions, all MoE layers pooled, sum_e mean(p)_e * mean(onehot)_e, no factor E,
    # summed over samples / batch size (mole_balance_loss). Its weight (moe_balance_w) is not released: aux_loss_coef.
    mole_balance: str = "switch"

    def __post_init__(self):
        check_choice("moe.kind", self.kind, ("ffn", "lora"))
        check_choice("moe.second_expert", self.second_expert, ("top2", "gumbel"))
        check_choice("moe.impl", self.impl, ("fast", "grouped", "padded", "loop"))
        check_choice("moe.mole_mixture", self.mole_mixture, ("soft", "top1"))
        check_choice("moe.mole_top1_gate", self.mole_top1_gate, ("one", "straight_through", "prob"))
        check_choice("moe.mole_balance", self.mole_balance, ("switch", "released"))
        # checked here, at parse time, not when the model is built; only the indices' upper bound needs the model
        if isinstance(self.layers, (list, tuple)):
            if not all(type(i) is int and i >= 0 for i in self.layers):
                raise ValueError(f"moe.layers={self.layers!r}: a list of layer indices must hold ints >= 0")
        elif self.layers not in LAYER_PLACEMENTS:
            raise ValueError(f"moe.layers={self.layers!r} is not one of {LAYER_PLACEMENTS} or a list of layer indices")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"moe.top_k={self.top_k} must be in 1..moe.num_experts={self.num_experts}")
        if self.kind == "ffn" and self.num_experts < 2:
            raise ValueError(f"moe.num_experts={self.num_experts}: an 'ffn' MoE needs at least 2 experts")
        if self.kind == "lora" and self.top_k != 1:
            raise ValueError(f"moe.top_k={self.top_k}: LLaVA-MoLE routes each token to one LoRA expert; set top_k=1")
        for key in ("aux_loss_coef", "z_loss_coef", "seq_aux_loss_coef", "expert_bias_rate"):
            if getattr(self, key) < 0:
                raise ValueError(f"moe.{key}={getattr(self, key)} must be >= 0")
        if self.expert_bias and self.kind != "ffn":                   # the hook is route(..., bias_E=module.expert_bias)
            raise ValueError("moe.expert_bias=true is wired into the 'ffn' MoE layer only (LoRAExperts: not yet)")
        mole = [k for k, default in (("mole_router_bias", False), ("mole_mixture", "top1"), ("mole_top1_gate", "prob"),
                                     ("mole_balance", "switch")) if getattr(self, k) != default]
        if self.kind == "ffn" and mole:
            raise ValueError(f"moe.{mole[0]}={getattr(self, mole[0])!r} is a LLaVA-MoLE option: it needs moe.kind='lora'")

    def layer_indices(self, num_layers: int) -> list:
        """Which decoder layers get an MoE (docs/moe_llava.md §1.4; MoE-LLaVA's moe_mode)."""
        if isinstance(self.layers, (list, tuple)):
            if not all(i < num_layers for i in self.layers):
                raise ValueError(f"moe.layers={list(self.layers)} out of range for {num_layers} layers (0..{num_layers - 1})")
            return sorted(self.layers)
        modes = {"sparse": range(0, num_layers, 2), "first_half": range(num_layers // 2),
                 "second_half": range(num_layers // 2, num_layers), "dense": range(num_layers)}
        return list(modes[self.layers])                               # a valid name: __post_init__ checked it

    @classmethod
    def from_moe_llava(cls, moe: dict, num_layers: int):
        """The `moe` dict of a MoE-LLaVA config.json (docs/moe_llava.md §1.5, §2.3)."""
        if moe.get("use_residual"):
            raise ValueError("MoE-LLaVA use_residual=True (residual MoE) is not supported")
        n = moe["num_experts"]
        n = n if isinstance(n, int) else n[0] if len(set(n)) == 1 else None
        if n is None:
            raise ValueError(f"per-layer expert counts {moe['num_experts']} differ; only a uniform count is supported")
        return cls(num_experts=n, top_k=moe.get("top_k_experts", 2), capacity_factor=moe.get("capacity_factor", 1.0),
                   eval_capacity_factor=moe.get("eval_capacity_factor", 1.0), min_capacity=moe.get("min_capacity", 0),
                   aux_loss_coef=moe.get("router_aux_loss_coef", 0.01),
                   layers=list(moe.get("moe_layers_idx") or range(0, num_layers, 2)))


# What a config may change on MoE layers that already exist (a checkpoint's; train.resolve_moe): the runtime knobs,
# read at each forward or step, and the structure, which the weights were built and trained with. Every field of
# MoEConfig is in exactly one (tests/test_config.py).
RUNTIME_FIELDS = ("capacity_factor", "eval_capacity_factor", "min_capacity", "dropless", "aux_loss_coef", "z_loss_coef",
                  "seq_aux_loss_coef", "expert_bias_rate", "impl", "second_expert", "gumbel_at_eval")
STRUCTURAL_FIELDS = ("kind", "num_experts", "layers", "top_k", "expert_bias", "lora_rank", "lora_alpha", "lora_dropout",
                     "attn_lora_rank", "mole_router_bias", "mole_mixture", "mole_top1_gate", "mole_balance")


@dataclass
class RoutingRecord:
    """One MoE layer's decisions for one forward pass. Flattened token s = b * T + t."""
    router_logits: torch.Tensor        # [S, E] fp32, with grad (the Conflict Elimination Loss uses it)
    experts: torch.Tensor              # [S, K] chosen experts, first choice first
    weights: torch.Tensor              # [S, K] combine weights (renormalised for k>=2; 0 where dropped)
    kept: torch.Tensor                 # [S, K] bool: the assignment survived the capacity limit
    aux_loss: torch.Tensor             # scalar, E * sum_e mean_prob_e * frac_top1_e (before dropping)
    expert_counts: torch.Tensor        # [E] first-choice counts (DeepSpeed's exp_counts)
    shape: tuple = ()                  # (B, T): token s sits at batch s // T, position s % T
    inputs: torch.Tensor = None        # [S, D] the layer input (the experts' and the router's)
    output: torch.Tensor = None        # [B, T, D] the layer output; STGC hooks the gradient arriving here
    module: nn.Module = None           # the layer, for STGC's per-expert functions (expert_params / expert_apply)
    layer: int = -1                    # decoder layer index, set by the LanguageModel
    valid: torch.Tensor = None         # [S] bool, real (non-padding) tokens, set by the LanguageModel
    reaches_loss: torch.Tensor = None  # [S] bool, positions with a supervised target at or after them (only those
                                       # can carry an LM-loss gradient); set by the LanguageModel when given labels


# -----------------------------------------------------------------------------
# Routing (DeepSpeed v0.9.5 top2gating, generalised to k choices)

def capacity(num_tokens, cfg: MoEConfig, training: bool) -> int:
    """DeepSpeed v0.9.5 `_capacity`, to the bit: ceil((S / E) * tensor(cf * k)), the product in float32 (the
    Python float S / E times a float32 tensor). Python's float64 differs for some factors: S=100, E=4, k=2,
    cf=1.1 gives 55 there and 56 in float64; S=25, cf=1.2 gives 16 there and 15 in float64."""
    if cfg.dropless:
        return num_tokens
    cf = cfg.capacity_factor if training else cfg.eval_capacity_factor
    # numpy float32 on the host (a torch tensor here would land on the default device and sync): torch casts the
    # Python scalar S / E to the tensor's float32 before the product, so both factors are float32 as here
    c = math.ceil(np.float32(num_tokens / cfg.num_experts) * np.float32(cf * cfg.top_k))
    return max(c, cfg.min_capacity)


def gumbel_noise(shape, device, generator=None):
    """Standard Gumbel samples -log(-log(U)), U uniform in (0, 1) kept off both ends (as torch.distributions.Gumbel)."""
    tiny = torch.finfo(torch.float32).tiny
    u = torch.rand(shape, device=device, generator=generator).clamp(tiny, 1 - torch.finfo(torch.float32).eps)
    return -torch.log(-torch.log(u))


def route(logits_SE, cfg: MoEConfig, training: bool, generator=None, bias_E=None):
    """Choose experts, positions in their buffers, drops and combine weights for every token. bias_E [E] (fp32,
    aux-loss-free balancing) is added to the scores that choose the experts only (DeepSeek-V3 §2.1.2: "the bias term
    is only used for routing"); the combine weights and the aux loss's mean_prob stay the un-biased probabilities."""
    S, E = logits_SE.shape
    probs_SE = logits_SE.softmax(dim=-1)                               # fp32
    # k choices, best first. The first is argmax of the probabilities, as DeepSpeed takes it (softmax can tie
    # logits that differ, and argmax then keeps the lower index); each later one the same over the experts not yet
    # taken, or with 'gumbel' argmax(logits + Gumbel noise) over them (DeepSpeed's top2gating: a sample from
    # softmax over the remaining experts). The combine weights use the un-noised probabilities either way.
    gumbel = cfg.second_expert == "gumbel" and (training or cfg.gumbel_at_eval)
    taken_SE = torch.zeros_like(probs_SE, dtype=torch.bool)
    choices = []
    for k in range(cfg.top_k):
        scores_SE = probs_SE.detach()
        if gumbel and k > 0:
            scores_SE = logits_SE.detach() + gumbel_noise(logits_SE.shape, logits_SE.device, generator)
        if bias_E is not None:                                         # with 'gumbel' the bias shifts the sampled
            scores_SE = scores_SE + bias_E                             # logits (our choice: DeepSeek-V3 never samples)
        choice_S = scores_SE.masked_fill(taken_SE, float("-inf")).argmax(dim=-1)
        choices.append(choice_S)
        taken_SE = taken_SE | F.one_hot(choice_S, E).bool()
    experts_SK = torch.stack(choices, dim=1)                           # [S, K]
    # Buffer positions: all first choices in token order, then all second choices (DeepSpeed loc1, loc2).
    onehot_KSE = F.one_hot(experts_SK.T, E)                            # [K, S, E]
    before_KE = onehot_KSE.sum(dim=1).cumsum(dim=0) - onehot_KSE.sum(dim=1)   # assignments queued by earlier choices
    pos_KSE = onehot_KSE.cumsum(dim=1) - 1 + before_KE[:, None, :]
    pos_SK = (pos_KSE * onehot_KSE).sum(dim=-1).T                      # [S, K]
    kept_SK = pos_SK < capacity(S, cfg, training)                      # positional dropping, first come first served
    # Aux loss on first choices before dropping; only mean_prob carries gradient (docs/moe_llava.md §1.6 step 7).
    counts_E = onehot_KSE[0].sum(dim=0)
    aux = E * (probs_SE.mean(dim=0) * counts_E.float() / S).sum()
    # Combine weights: chosen probabilities, zeroed where dropped, renormalised over the survivors (k >= 2;
    # one survivor gets 1.0, none gets 0). Top-1 keeps the raw probability (Switch / DeepSpeed top1gating).
    w_SK = probs_SE.gather(1, experts_SK) * kept_SK
    if cfg.top_k > 1:
        w_SK = w_SK / w_SK.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(w_SK.dtype).eps)
    return experts_SK, w_SK, kept_SK, aux, counts_E


# -----------------------------------------------------------------------------
# Router objectives beside the aux loss, computed from a RoutingRecord (so they serve every routed layer) and
# added by train.py's train_step; and the aux-loss-free bias. Definitions and sources: docs/routing.md.

def masked_mean(x_S, valid_S):
    if valid_S is None:
        return x_S.mean()
    return (x_S * valid_S).sum() / valid_S.sum().clamp_min(1)


def z_loss(record) -> torch.Tensor:
    """ST-MoE's router z-loss (Zoph et al. 2022, §3.1 Eq. 5) of one layer: mean over the real tokens of
    logsumexp(z)^2, z the fp32 router logits; it keeps the logits small, where the softmax is well conditioned.
    Padding is left out (ST-MoE packs sequences and has none); its gradient reaches the logits only."""
    lse_S = record.router_logits.float().logsumexp(dim=-1)             # [S]
    return masked_mean(lse_S.square(), record.valid)


def sequence_aux_loss(record) -> torch.Tensor:
    """The aux loss E * sum_e mean_prob_e * frac_top1_e of each sample over its real tokens, averaged over the
    samples that have any: balance within every sequence, not just over the micro-batch (DeepSeek-V3 §2.1.2, Eq.
    17-20, "complementary sequence-wise auxiliary loss"; it counts all K choices, we count first choices as
    MoE-LLaVA's micro-batch loss does, so one unpadded sample gives exactly route()'s aux). As in route(), only
    mean_prob carries gradient."""
    B, T = record.shape
    E = record.router_logits.shape[1]
    probs_BTE = record.router_logits.float().softmax(dim=-1).view(B, T, E)
    valid_BT = (record.valid.view(B, T) if record.valid is not None else probs_BTE.new_ones(B, T, dtype=torch.bool)).float()
    n_B = valid_BT.sum(dim=1)                                          # [B] real tokens per sample
    first_BTE = F.one_hot(record.experts[:, 0], E).view(B, T, E).float()
    mean_prob_BE = (probs_BTE * valid_BT[..., None]).sum(dim=1) / n_B.clamp_min(1)[:, None]
    frac_BE = (first_BTE * valid_BT[..., None]).sum(dim=1) / n_B.clamp_min(1)[:, None]
    loss_B = E * (mean_prob_BE * frac_BE).sum(dim=-1)                  # [B]
    has_B = (n_B > 0).float()
    return (loss_B * has_B).sum() / has_B.sum().clamp_min(1)


def expert_bias_buffer(cfg: MoEConfig, device):
    """The aux-loss-free bias [E], fp32 like the router (its increments of gamma = 1e-3 would vanish in bf16), or None
    (then no buffer exists and the state dict is unchanged). A buffer, not a parameter: no optimizer touches it, it
    is saved in checkpoints, FSDP2 leaves it unsharded and un-cast, and DDP broadcasts rank 0's copy before each
    forward (redundant: every rank applies the same update from the same all-reduced counts, docs/routing.md)."""
    return torch.zeros(cfg.num_experts, dtype=torch.float32, device=device) if cfg.expert_bias else None


@torch.no_grad()
def update_expert_bias(module, load_E):
    """After an optimizer step (train.py; never at evaluation): bias_e += gamma * sign(mean load - load_e), load_E [E]
    the layer's token-expert assignments (real tokens, all K choices, before capacity) over the whole global batch,
    all-reduced, so every rank computes the same bias. DeepSeek-V3 §2.1.2; torchtitan's load_balance_coeff (which
    also re-centres the delta: the same choices, since argmax ignores a shift of every expert's score); Megatron's
    --moe-router-enable-expert-bias / --moe-router-bias-update-rate 1e-3."""
    load_E = load_E.to(module.expert_bias)
    module.expert_bias += module.cfg.expert_bias_rate * torch.sign(load_E.mean() - load_E)


def router_logits(router: nn.Linear, x_SD):
    """fp32 router, autocast off: DeepSpeed casts both input and wg to float32 (docs/moe_llava.md §1.6 step 1). The module
    itself is called (not its .weight), so FSDP2, which shards the router as its own fp32 unit (train.apply_fsdp),
    gathers it; its weight is fp32 by construction (routers_to_fp32)."""
    with torch.autocast(device_type=x_SD.device.type, enabled=False):
        return router(x_SD.float())                                    # [S, E]

# -----------------------------------------------------------------------------
# Experts: the dense FFN's wiring over stacked per-expert weights


def ffn_forward(kind, act, x, linear):
    """The dense FFN of model.py (SwiGLU or GELU MLP), with linear(name, x) computing each projection."""
    if kind == "swiglu":
        return linear("down_proj", act(linear("gate_proj", x)) * linear("up_proj", x))
    return linear("fc2", act(linear("fc1", x)))


class StackedLinear(nn.Module):
    """E copies of one nn.Linear: weight [E, out, in], bias [E, out] or None."""

    def __init__(self, dense: nn.Linear, num: int):
        super().__init__()
        self.weight = nn.Parameter(dense.weight.detach()[None].repeat(num, 1, 1))
        self.bias = None if dense.bias is None else nn.Parameter(dense.bias.detach()[None].repeat(num, 1))


def compute_dtype(x, weight):
    """The dtype the experts compute in: autocast's when it is on, else the weights'. The fast paths cast their
    operands explicitly and the result back to the input's dtype (as torchtitan does), because torch._grouped_mm
    has no autocast kernel: under train.py's bf16 autocast with fp32 master weights it would otherwise run in
    fp32, which CUDA refuses ("Expected mat_a to be BFloat16 ..."). The loop path's F.linear autocasts by itself."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype


def cuda_capability(device):
    """(major, minor) of a CUDA device; (0, 0) where none can be asked (fake CUDA tensors on a CPU machine)."""
    try:
        return torch.cuda.get_device_capability(device)
    except (RuntimeError, AssertionError):
        return (0, 0)


def dispatch_path(device, dtype, aligned: bool) -> str:
    """The fast path's one rule (impl='fast'); the measurements behind it are in bench/RESULTS.md (moe_dispatch).

    'grouped'  torch._grouped_mm over the S*K assignments sorted by expert: exactly the real rows, one kernel per
               projection, no host sync. It needs rows of a multiple of 16 bytes (`aligned`), and on CUDA bf16/fp16
               operands and sm90+ (H100/H200): on sm80 (A100/A800) recent torch runs it as a loop over the groups
               with a device-to-host sync (pytorch issue #186620). On CPU it runs fp32 and bf16.
    'padded'   every other CUDA case: the kept assignments scattered into zero-padded [E, C, D] buffers (C the
               capacity), one bmm per projection. E*C rows = capacity_factor times the real ones (1.5x in training,
               2x at evaluation), but any dtype, any width, any GPU, and still no host sync.
    'loop'     unaligned rows on CPU, where a host sync costs nothing: measured 1.4x faster than 'padded' there
               (the padded rows are real work on a CPU; the grouped path is 1.2x faster than the loop)."""
    if device.type == "cuda":
        fused = aligned and dtype in (torch.bfloat16, torch.float16) and cuda_capability(device) >= (9, 0)
        return "grouped" if fused else "padded"
    return "grouped" if aligned else "loop"


class MoELayer(nn.Module):
    """MoE-LLaVA's sparse FFN: router + E experts upcycled from `dense` (exact copies)."""

    def __init__(self, cfg: MoEConfig, dense: nn.Module):
        super().__init__()
        self.configure(cfg)
        self.kind = "swiglu" if hasattr(dense, "gate_proj") else "gelu"
        self.act = dense.act
        D = dense.down_proj.out_features if self.kind == "swiglu" else dense.fc2.out_features
        # fresh router, nn.Linear's default init (kaiming-uniform a=sqrt(5)), fp32, no bias (docs/moe_llava.md §1.8)
        self.router = nn.Linear(D, cfg.num_experts, bias=False, dtype=torch.float32, device=dense_device(dense))
        self.register_buffer("expert_bias", expert_bias_buffer(cfg, dense_device(dense)))   # [E] or None
        self.experts = nn.Module()
        for name in FFN_PROJECTIONS[self.kind]:
            setattr(self.experts, name, StackedLinear(getattr(dense, name), cfg.num_experts))

    def forward(self, x):                                              # [B, T, D]
        B, T, D = x.shape
        x_SD = x.reshape(-1, D)
        logits_SE = router_logits(self.router, x_SD)
        experts_SK, w_SK, kept_SK, aux, counts_E = route(logits_SE, self.cfg, self.training, bias_E=self.expert_bias)
        path = self.path(x_SD)
        if path == "loop":
            out_SKD = self.experts_loop(x_SD, experts_SK)              # every assignment, dropped ones too
        elif path == "grouped":
            out_SKD = self.experts_grouped(x_SD, experts_SK)           # every assignment, dropped ones too
        else:
            out_SKD = self.experts_padded(x_SD, experts_SK, kept_SK)   # kept assignments; dropped ones are 0
        y = (out_SKD * w_SK.to(out_SKD.dtype)[..., None]).sum(dim=1).view(B, T, D)   # dropped: weight 0
        return y, RoutingRecord(router_logits=logits_SE, experts=experts_SK, weights=w_SK, kept=kept_SK, aux_loss=aux,
                                expert_counts=counts_E, shape=(B, T), inputs=x_SD, output=y, module=self)

    def configure(self, cfg: MoEConfig):
        """The settings this layer routes with (its structure is fixed at construction: LanguageModel.set_moe)."""
        self.cfg = cfg

    def compute_dtype(self, x_SD):
        return compute_dtype(x_SD, self.experts.fc1.weight if self.kind == "gelu" else self.experts.gate_proj.weight)

    def path(self, x_SD) -> str:
        """Which dispatch this forward takes: cfg.impl, or for 'fast' the rule of `dispatch_path`."""
        if self.cfg.impl != "fast":
            return self.cfg.impl
        dtype = self.compute_dtype(x_SD)
        size = torch.empty((), dtype=dtype).element_size()
        widths = [getattr(self.experts, n).weight.shape[-1] for n in FFN_PROJECTIONS[self.kind]]   # D and F
        return dispatch_path(x_SD.device, dtype, all(w * size % 16 == 0 for w in widths))

    # One expert as a pure function of its parameters (torch.func, STGC): out = expert_apply(expert_params(e), x).
    # The combine weight multiplies the output outside the expert (gate_inside = False).
    gate_inside = False

    def expert_params(self, e) -> dict:
        p = {}
        for name in FFN_PROJECTIONS[self.kind]:
            lin = getattr(self.experts, name)
            p[name + ".weight"] = lin.weight[e]
            if lin.bias is not None:
                p[name + ".bias"] = lin.bias[e]
        return p

    def expert_apply(self, params, x, gate=None, linear=F.linear):
        return ffn_forward(self.kind, self.act, x,
                           lambda name, h: linear(h, params[name + ".weight"], params.get(name + ".bias")))

    def expert(self, e, x):
        """Expert e on x [n, D]: the dense FFN with the e-th copy of each projection."""
        return self.expert_apply(self.expert_params(e), x)

    def experts_loop(self, x_SD, experts_SK):
        """Reference: for each expert, gather the tokens that chose it, run it, scatter back (host syncs)."""
        S, K = experts_SK.shape
        out_SKD = x_SD.new_zeros(S, K, x_SD.shape[1])
        for e in range(self.cfg.num_experts):
            tok, slot = (experts_SK == e).nonzero(as_tuple=True)
            if len(tok):                                               # under autocast y is bf16: cast back
                out_SKD = out_SKD.index_put((tok, slot), self.expert(e, x_SD[tok]).to(x_SD.dtype))
        return out_SKD

    def experts_grouped(self, x_SD, experts_SK):
        """Fast path 1: sort the S*K assignments by expert (stable), one torch._grouped_mm per projection."""
        S, K = experts_SK.shape
        flat_M = experts_SK.reshape(-1)                                # assignment m = s * K + k
        order_M = flat_M.argsort(stable=True)
        counts_E = torch.bincount(flat_M, minlength=self.cfg.num_experts)
        offs_E = counts_E.cumsum(0).to(torch.int32)                    # group ends; no host sync
        dtype = self.compute_dtype(x_SD)
        x_MD = x_SD.to(dtype)[order_M // K]                            # [M, D], grouped by expert

        def linear(name, h):                                           # h [M, in] -> [M, out]
            lin = getattr(self.experts, name)
            y = torch._grouped_mm(h, lin.weight.to(dtype).transpose(-2, -1), offs=offs_E)
            if lin.bias is not None:
                y = y + lin.bias.to(dtype).repeat_interleave(counts_E, dim=0, output_size=h.shape[0])
            return y

        out_MD = ffn_forward(self.kind, self.act, x_MD, linear)
        out_MD = torch.empty_like(out_MD).index_copy(0, order_M, out_MD)   # back to assignment order
        return out_MD.view(S, K, -1).to(x_SD.dtype)                    # [S, K, D]

    def experts_padded(self, x_SD, experts_SK, kept_SK):
        """Fast path 2: each kept assignment gets a slot in its expert's buffer of C = capacity rows, one bmm per
        projection over [E, C, D]. Dropped assignments are not computed (their combine weight is 0, so the
        layer's output and every gradient equal the other paths'). No host sync: C depends on S only."""
        S, K = experts_SK.shape
        E, D = self.cfg.num_experts, x_SD.shape[1]
        C = min(capacity(S, self.cfg, self.training), S)               # an expert holds each token at most once
        kept_M, expert_M = kept_SK.reshape(-1), experts_SK.reshape(-1)   # [M]
        onehot_ME = F.one_hot(expert_M, E) * kept_M[:, None]
        slot_M = (onehot_ME.cumsum(0) * onehot_ME).sum(-1) - 1         # rank among the expert's kept assignments
        row_M = torch.where(kept_M, expert_M * C + slot_M, E * C)      # E*C: one spare row for the dropped
        token_M = torch.arange(S, device=x_SD.device).repeat_interleave(K)
        # which token fills each buffer row (S: none, a zero row); only the spare row is written twice
        token_R = torch.full((E * C + 1,), S, device=x_SD.device).scatter(0, row_M, token_M)[:E * C]
        dtype = self.compute_dtype(x_SD)
        x_ext = torch.cat([x_SD.to(dtype), x_SD.new_zeros(1, D, dtype=dtype)])   # [S + 1, D]
        x_ECD = x_ext[token_R].view(E, C, D)

        def linear(name, h):                                           # h [E, C, in] -> [E, C, out]
            lin = getattr(self.experts, name)
            y = torch.bmm(h, lin.weight.to(dtype).transpose(-2, -1))
            return y if lin.bias is None else y + lin.bias.to(dtype)[:, None, :]

        out_RD = ffn_forward(self.kind, self.act, x_ECD, linear).reshape(E * C, D)
        out_RD = torch.cat([out_RD, out_RD.new_zeros(1, D)])           # the spare row reads as 0
        return out_RD[row_M].view(S, K, D).to(x_SD.dtype)              # [S, K, D]


def dense_device(module):
    return next(module.parameters()).device

# -----------------------------------------------------------------------------
# LoRA: plain (attention, baseline) and as routed experts (LLaVA-MoLE)


class LoRALinear(nn.Module):
    """Frozen base Linear + (alpha / r) * B(A(dropout(x))); A kaiming-uniform, B zero, so it starts as the base."""

    def __init__(self, base: nn.Linear, rank, alpha, dropout=0.0):
        super().__init__()
        self.base = base.requires_grad_(False)
        dev = base.weight.device
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=dev))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=dev))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.scale, self.dropout = alpha / rank, nn.Dropout(dropout)

    def forward(self, x):
        delta = F.linear(F.linear(self.dropout(x), self.lora_A.to(x.dtype)), self.lora_B.to(x.dtype))
        return self.base(x) + self.scale * delta


class LoRAExperts(nn.Module):
    """LLaVA-MoLE: the dense MLP frozen; E LoRA experts on each of its projections; one router per layer on the
    MLP input, shared by the projections (docs/llava_mole.md §1). Each projection of token s computes
        W x + sum_e c_se * (alpha/r) * B_e A_e dropout(x)
    with coefficients c [S, E] from cfg.mole_mixture and cfg.mole_top1_gate (p = softmax of the router logits):
        soft                     c = p: every expert weighted by its probability (the released inference)
        top1, one                c = onehot(argmax p) (released sparse mode: the LM loss gives the router no gradient)
        top1, straight_through   c = onehot - p.detach() + p: the value of 'one', the gradient of 'soft'
        top1, prob               c = onehot * p (ours before the release: the router learns through p_e)
    At init (B = 0) the layer equals the dense MLP.
    Ours: one dropout mask serves every expert (the released code has one dropout per expert: the same
    distribution per expert, a different joint one; no difference at evaluation)."""

    def __init__(self, cfg: MoEConfig, dense: nn.Module):
        super().__init__()
        if cfg.num_experts < 2:
            raise ValueError("LoRAExperts needs >= 2 experts; one expert is plain LoRA (lora_mlp)")
        self.configure(cfg)
        self.base = dense.requires_grad_(False)
        self.kind = "swiglu" if hasattr(dense, "gate_proj") else "gelu"
        E, r, dev = cfg.num_experts, cfg.lora_rank, dense_device(dense)
        D = dense.down_proj.out_features if self.kind == "swiglu" else dense.fc2.out_features
        self.router = nn.Linear(D, E, bias=cfg.mole_router_bias, dtype=torch.float32, device=dev)   # default init
        self.lora_A, self.lora_B = nn.ParameterDict(), nn.ParameterDict()
        for name in FFN_PROJECTIONS[self.kind]:
            lin = getattr(dense, name)
            self.lora_A[name] = nn.Parameter(torch.empty(E, r, lin.in_features, device=dev))   # [E, r, in]
            self.lora_B[name] = nn.Parameter(torch.zeros(E, lin.out_features, r, device=dev))  # [E, out, r]
            for e in range(E):
                nn.init.kaiming_uniform_(self.lora_A[name][e], a=math.sqrt(5))
        self.scale, self.dropout = cfg.lora_alpha / r, nn.Dropout(cfg.lora_dropout)

    def configure(self, cfg: MoEConfig):
        self.cfg = replace(cfg, dropless=True)   # LoRA experts are cheap: no capacity, no dropped tokens

    def coefficients(self, probs_SE, expert_S):
        """c [S, E] of the docstring, and the chosen expert's own coefficient [S, 1] (the record's weight)."""
        onehot_SE = F.one_hot(expert_S, self.cfg.num_experts).to(probs_SE.dtype)
        if self.cfg.mole_mixture == "soft":
            c_SE = probs_SE
        elif self.cfg.mole_top1_gate == "one":
            c_SE = onehot_SE
        elif self.cfg.mole_top1_gate == "straight_through":
            c_SE = onehot_SE - probs_SE.detach() + probs_SE
        else:
            c_SE = onehot_SE * probs_SE
        return c_SE, c_SE.gather(1, expert_S[:, None])

    def forward(self, x):                                              # [B, T, D]
        B, T, D = x.shape
        x_SD = x.reshape(-1, D)
        # Top-1 without capacity needs none of route()'s queueing: argmax of the fp32 probabilities (as route()
        # and the release take it), and route()'s Switch-style aux loss of the first choices.
        S, E = x_SD.shape[0], self.cfg.num_experts
        logits_SE = router_logits(self.router, x_SD)
        probs_SE = logits_SE.softmax(dim=-1)
        expert_S = probs_SE.detach().argmax(dim=-1)                   # [S]
        counts_E = F.one_hot(expert_S, E).sum(dim=0)                  # no host sync (bincount would)
        aux = E * (probs_SE.mean(dim=0) * counts_E.float() / S).sum()
        c_SE, w_SK = self.coefficients(probs_SE, expert_S)            # [S, E], [S, 1]

        def linear(name, h):                                           # h [S, in]
            # Every expert's rank-r code times its coefficient, then all experts' B side by side as one [out, E*r]
            # matrix: one matmul, and no [S, E, out] tensor of every expert's delta. With E small and r << D this
            # costs about E*r*(in+out)/(in*out) of the base (~8% at StableLM-1.6B).
            S, E, r = h.shape[0], self.cfg.num_experts, self.lora_A[name].shape[1]
            code_SEr = torch.einsum("si,eri->ser", self.dropout(h), self.lora_A[name].to(h.dtype))
            code_SEr = code_SEr * c_SE.to(code_SEr.dtype)[:, :, None]
            B_OR = self.lora_B[name].to(h.dtype).permute(1, 0, 2).reshape(-1, E * r)   # [out, E*r]
            delta = F.linear(code_SEr.reshape(S, E * r), B_OR)             # [S, out]
            return getattr(self.base, name)(h) + self.scale * delta

        y = ffn_forward(self.kind, self.base.act, x_SD, linear).view(B, T, D)
        return y, RoutingRecord(router_logits=logits_SE, experts=expert_S[:, None], weights=w_SK,
                                kept=torch.ones_like(w_SK, dtype=torch.bool), aux_loss=aux, expert_counts=counts_E,
                                shape=(B, T), inputs=x_SD, output=y, module=self)

    # One expert as a pure function of its LoRA parameters (torch.func, STGC): the frozen MLP plus expert e's
    # deltas times `gate`, the record's weight (its coefficient; inside the expert: gate_inside = True). No dropout.
    # With 'soft' every other expert's delta is added too, from the layer's own weights (constants here) and the
    # token's router probabilities: g_{n,e} is then the gradient on the argmax expert's parameters of the layer
    # exactly as it ran, with all experts contributing (stgc.py; docs/llava_mole.md §4).
    gate_inside = True

    def expert_params(self, e) -> dict:
        return {f"{name}.{ab}": getattr(self, f"lora_{ab}")[name][e]
                for name in FFN_PROJECTIONS[self.kind] for ab in ("A", "B")}

    def expert_apply(self, params, x, gate, linear=F.linear):        # x [N, D], gate [N]
        soft = self.cfg.mole_mixture == "soft"
        if soft:                                                       # the other experts' coefficients [N, E]
            E = self.cfg.num_experts
            probs_NE = router_logits(self.router, x).softmax(dim=-1).detach()
            others_NE = probs_NE * (torch.arange(E, device=x.device) != probs_NE.argmax(dim=-1, keepdim=True))

        def proj(name, h):
            code = linear(h, params[name + ".A"], None)                # [N, r]
            out = getattr(self.base, name)(h) + (self.scale * gate[:, None]) * linear(code, params[name + ".B"], None)
            if soft:
                A_Eri, B_Eor = self.lora_A[name].detach().to(h.dtype), self.lora_B[name].detach().to(h.dtype)
                code_NEr = torch.einsum("ni,eri->ner", h, A_Eri) * others_NE.to(h.dtype)[:, :, None]
                out = out + self.scale * torch.einsum("ner,eor->no", code_NEr, B_Eor)
            return out
        return ffn_forward(self.kind, self.base.act, x, proj)


def mole_balance_loss(routing) -> torch.Tensor:
    """The released LLaVA-MoLE balance loss (docs/llava_mole.md §1): per sample b, over its attended positions with
    every MoE layer pooled, sum_e mean(p)_e * mean(onehot)_e (onehot of the argmax, no gradient); summed over the
    samples and divided by the batch size. No factor E, unlike Switch. `routing`: one forward's records."""
    B, T = routing[0].shape
    L, E = len(routing), routing[0].router_logits.shape[-1]
    valid = routing[0].valid
    w_BT = (valid.float() if valid is not None else routing[0].router_logits.new_ones(B * T)).view(B, T)
    probs_LBTE = torch.stack([r.router_logits.float().softmax(dim=-1) for r in routing]).view(L, B, T, E)
    onehot_LBTE = torch.stack([F.one_hot(r.experts[:, 0], E) for r in routing]).view(L, B, T, E).float()
    n_B = (L * w_BT.sum(dim=-1)).clamp_min(1)[:, None]                # pooled positions per sample
    mean_p_BE = (probs_LBTE * w_BT[None, :, :, None]).sum(dim=(0, 2)) / n_B
    mean_c_BE = (onehot_LBTE * w_BT[None, :, :, None]).sum(dim=(0, 2)) / n_B
    return (mean_p_BE * mean_c_BE).sum() / B


# -----------------------------------------------------------------------------
# Building: replace the dense MLPs of a LanguageModel (model.py calls this; so does stage-III upcycling)

def is_routed(module) -> bool:
    """A layer with a router, whose forward returns (y, RoutingRecord) (model.Block, eval, train.apply_fsdp)."""
    return isinstance(module, (MoELayer, LoRAExperts))


def make_moe_mlp(cfg: MoEConfig, dense: nn.Module) -> nn.Module:
    if cfg.kind == "ffn":
        return MoELayer(cfg, dense)
    return LoRAExperts(cfg, dense) if cfg.num_experts > 1 else lora_mlp(cfg, dense)


def lora_mlp(cfg: MoEConfig, dense: nn.Module) -> nn.Module:
    """Plain LoRA (the MoLE paper's baseline, train.stage 'lora'): the dense MLP itself, each projection wrapped
    in a LoRALinear of [moe]'s rank, alpha and dropout. No router, no routing record: it is not a routed layer."""
    for name in FFN_PROJECTIONS["swiglu" if hasattr(dense, "gate_proj") else "gelu"]:
        setattr(dense, name, LoRALinear(getattr(dense, name), cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout))
    return dense


def apply_attention_lora(blocks, cfg: MoEConfig):
    """Plain LoRA on q/k/v/o of every block: the released MoLE's peft targets, with the experts' alpha and dropout
    (its rank equals the experts' there; attn_lora_rank may differ here)."""
    for block in blocks:
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            setattr(block.attn, name, LoRALinear(getattr(block.attn, name), cfg.attn_lora_rank,
                                                  cfg.lora_alpha, cfg.lora_dropout))


def routers_to_fp32(module):
    """Routers (and the aux-loss-free expert bias) stay fp32 whatever dtype the model is loaded or cast in
    (docs/moe_llava.md §1.6 step 1)."""
    for m in module.modules():
        if is_routed(m):
            m.router.float()
        if getattr(m, "expert_bias", None) is not None:
            m.expert_bias = m.expert_bias.float()
    return module


def is_moe_trainable(name: str, kind: str) -> bool:
    """Stage III trainables of the LLM (docs/moe_llava.md §1.9). 'ffn' (MoE-LLaVA): every FFN, the dense ones of
    the non-MoE layers too, and the routers (the projector is the caller's). 'lora' (MoLE): adapters + routers."""
    if kind == "ffn":
        return ".mlp." in name
    return "lora_" in name or ".router." in name
