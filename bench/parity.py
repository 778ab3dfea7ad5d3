"""Parity table: max |ours - reference| of fp32 logits / features, per architecture, on tiny random
checkpoints written to disk (the same builders as tests/test_model.py, which asserts <= 1e-4).

    .venv/bin/python bench/parity.py        # needs requirements-test.txt (transformers is the reference)
"""
import os
import platform
import sys
import tempfile
from pathlib import Path

import torch
import transformers

sys.path[:0] = [os.path.join(os.path.dirname(__file__), ".."), os.path.join(os.path.dirname(__file__), "..", "tests")]
import tiny_hf  # noqa: E402
from model import IMAGE_TOKEN_INDEX, LanguageModel, LlavaModel, VisionTower  # noqa: E402
from test_model import LM_FORMATS, llava_checkpoint, qwen1_checkpoint, reference_llava_logits  # noqa: E402

rows = []
ids = torch.randint(0, tiny_hf.VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
    for name, fmt in LM_FORMATS.items():
        cfg = tiny_hf.lm_configs()[name]
        hf = tiny_hf.hf_causal_lm(cfg)
        ours = LanguageModel.from_pretrained(tiny_hf.save(hf, cfg, f"{tmp}/{name}", fmt))
        d = (ours(input_ids=ids).logits - hf(input_ids=ids).logits).abs().max().item()
        rows.append((f"{name} ({cfg.model_type}, {fmt})", "transformers", d))
    ours = LanguageModel.from_pretrained(qwen1_checkpoint(f"{tmp}/qwen1"))
    sd = tiny_hf.qwen1_state_dict()
    d = max((ours(input_ids=ids[b:b + 1]).logits[0].double() - tiny_hf.qwen1_reference(sd, ids[b])).abs().max().item()
            for b in range(2))
    rows.append(("qwen1 (qwen, safetensors)", "independent fp64 reference", d))
    pixels = torch.randn(2, 3, 28, 28)
    for kind in ("clip", "siglip"):
        hf = tiny_hf.hf_vision(kind)
        hf.save_pretrained(f"{tmp}/{kind}")
        ref = hf(pixel_values=pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
        d = (VisionTower.from_pretrained(f"{tmp}/{kind}")(pixels) - ref).abs().max().item()
        rows.append((f"{kind} vision tower (layer -2, patch)", "transformers", d))
    for layout in ("moe_llava_stablelm", "qwen", "llava15"):
        os.makedirs(f"{tmp}/{layout}_root")
        path, tower_dir, tower, proj, hf_lm, lm_sd = llava_checkpoint(Path(f"{tmp}/{layout}_root"), layout)
        model = LlavaModel.from_pretrained(path, vision_tower=tower_dir)
        x = torch.tensor([[5, 7, IMAGE_TOKEN_INDEX, 9, 11, 3, IMAGE_TOKEN_INDEX, 4]])
        imgs = torch.randn(2, 3, 28, 28)
        ref = reference_llava_logits(tower, proj, hf_lm, lm_sd, layout, x[0], imgs)
        rows.append((f"LLaVA checkpoint: {layout}", "transformers tower + LM" if layout != "qwen" else "transformers tower + fp64 Qwen-1",
                     (model(x, imgs).logits[0] - ref).abs().max().item()))

print(f"torch {torch.__version__}, transformers {transformers.__version__}, {platform.processor() or platform.machine()}, fp32\n")
print("| architecture (model_type, format) | reference | max abs diff |\n|---|---|---|")
for name, ref, d in rows:
    print(f"| {name} | {ref} | {d:.2e} |")
