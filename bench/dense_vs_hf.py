"""Dense decoder speed: model.py's LanguageModel against transformers' model of the same config, with the
same weights and the same batch, one forward + backward of the causal-LM loss (labels = input ids, so both
compute logits at every position), SDPA attention in both. Measured side by side in one run (interleaved
repeats, median); reported as transformers time / ours (> 1: ours is faster).

Before timing, `check_agreement` asserts that loss and every parameter gradient agree (the gradients are
matched through model.py's strict key map, so a mis-mapped tensor also fails here).

    .venv/bin/python bench/dense_vs_hf.py      # CPU tiny Llama-family shape (fp32); on CUDA also StableLM-2-1.6B (bf16)

Writes its table into bench/RESULTS.md (the `dense_vs_hf` block).
"""
import torch
import transformers as tf

import common  # noqa: F401  (puts the repo root on sys.path)
from common import header, set_cpu_threads, time_interleaved, update_results
from model import LanguageModel, LMConfig, convert_state_dict, lm_ignored, lm_key_map


def tiny_config():
    """Llama family, D=256, 4 layers; vocab 2048 so that lm_head is ~15% of the parameters, as in StableLM-2-1.6B."""
    return tf.LlamaConfig(vocab_size=2048, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                          num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                          tie_word_embeddings=False)


def stablelm_1_6b_config():
    """stabilityai/stablelm-2-1_6b's config.json values (docs/moe_llava.md §1.3)."""
    return tf.StableLmConfig(vocab_size=100352, hidden_size=2048, intermediate_size=5632, num_hidden_layers=24,
                             num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                             use_qkv_bias=True, partial_rotary_factor=0.25, layer_norm_eps=1e-5,
                             use_parallel_residual=False, tie_word_embeddings=False)


def build_pair(hf_cfg, device, dtype, seed=0, std=None):
    """transformers' causal LM (SDPA) and ours with the same weights (copied through the strict key map).
    std: redraw every weight with this spread (norm weights around 1) instead of transformers' 0.02 init,
    whose flat logits make greedy decoding loop on two tokens (eval_throughput.py wants varied tokens)."""
    torch.manual_seed(seed)
    with torch.device(device):
        hf = tf.AutoModelForCausalLM.from_config(hf_cfg, attn_implementation="sdpa", dtype=dtype)
    if std is not None:
        with torch.no_grad():
            for name, p in hf.named_parameters():
                p.normal_(1.0 if p.dim() == 1 and "norm" in name else 0.0, std)
    cfg = LMConfig.from_hf(hf_cfg.to_dict())
    assert not cfg.tie_embeddings, "untied configs only: a tied lm_head would need model.py's private helpers"
    with torch.device("meta"):
        ours = LanguageModel(cfg)
    sd = convert_state_dict({k: v.detach().clone() for k, v in hf.state_dict().items()}, lm_key_map(cfg),
                            lm_ignored(cfg), ours.state_dict(), "transformers")
    ours.load_state_dict(sd, strict=True, assign=True)
    return hf.train(), ours.train()


def loss_ours(ours, ids):
    return ours(input_ids=ids, labels=ids).loss


def loss_hf(hf, ids):
    return hf(input_ids=ids, labels=ids).loss


def check_agreement(hf, ours, ids, tol=1e-4):
    """Loss and all gradients (matched under our names) agree. Returns (|loss diff|, max over parameters
    of max|grad diff| / max|grad|); asserts both are below tol unless tol is None (bf16: reported only)."""
    for m in (hf, ours):
        m.zero_grad(set_to_none=True)
    lo, lh = loss_ours(ours, ids), loss_hf(hf, ids)
    lo.backward()
    lh.backward()
    cfg = ours.cfg
    hf_grads = convert_state_dict({k: p.grad for k, p in hf.named_parameters()}, lm_key_map(cfg), lm_ignored(cfg),
                                  dict(ours.named_parameters()), "transformers grads")
    grad_diff = max(((p.grad.float() - hf_grads[k].float()).abs().max() / hf_grads[k].float().abs().max().clamp_min(1e-30)).item()
                    for k, p in ours.named_parameters())
    loss_diff = (lo - lh).abs().item()
    assert tol is None or (loss_diff < tol and grad_diff < tol), \
        f"ours vs transformers: loss diff {loss_diff:.2e}, relative grad diff {grad_diff:.2e}"
    for m in (hf, ours):
        m.zero_grad(set_to_none=True)
    return loss_diff, grad_diff


TABLE = ["| shape | device, dtype | ours ms | transformers ms | transformers / ours | loss diff | max grad diff (relative) |",
         "|---|---|---|---|---|---|---|"]


def bench(name, hf_cfg, B, T, device, dtype, repeats, tol, warmup=2):
    hf, ours = build_pair(hf_cfg, device, dtype)
    ids = torch.randint(0, hf_cfg.vocab_size, (B, T), device=device, generator=torch.Generator(device).manual_seed(0))
    loss_diff, grad_diff = check_agreement(hf, ours, ids, tol)
    t = time_interleaved({"ours": lambda: loss_ours(ours, ids).backward(),
                          "transformers": lambda: loss_hf(hf, ids).backward()}, repeats, device, warmup=warmup)
    n = sum(p.numel() for p in ours.parameters())
    return (f"| {name}, {n / 1e6:.1f}M params, B={B} T={T} | {device} {dtype} | {t['ours'] * 1e3:.1f} | "
            f"{t['transformers'] * 1e3:.1f} | **{t['transformers'] / t['ours']:.2f}x** | {loss_diff:.1e} | {grad_diff:.1e} |")


if __name__ == "__main__":
    set_cpu_threads()
    lines = [header(f", transformers {tf.__version__}"), ""] + TABLE
    print("\n".join(lines))
    lines.append(bench("tiny Llama: D=256, F=704, 4 layers, 4 heads, V=2048", tiny_config(), 4, 256, "cpu",
                       torch.float32, repeats=10, tol=1e-4))
    print(lines[-1])
    if torch.cuda.is_available():
        # bf16 weights in both models: they agree to bf16 rounding only, so the differences are reported, not asserted
        lines.append(bench("StableLM-2-1.6B: D=2048, F=5632, 24 layers, V=100352", stablelm_1_6b_config(), 4, 2048,
                           "cuda", torch.bfloat16, repeats=10, tol=None))
        print(lines[-1])
    else:
        lines += ["", "**Missing: StableLM-2-1.6B (D=2048, 24 layers, B=4, T=2048, bf16) on GPU**: no GPU was lent "
                  "to this session; the script runs it automatically when CUDA is available."]
    update_results("dense_vs_hf", "Dense decoder vs transformers (`bench/dense_vs_hf.py`)", "\n".join(lines))
