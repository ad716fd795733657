"""Tiny random-weight SAM and CLIP models, for tests, benchmarks and smoke runs.

Built from segment-anything's own modules (``ImageEncoderViT``, ``PromptEncoder``,
``MaskDecoder`` with a ``TwoWayTransformer``) and transformers' ``CLIPModel`` with small sizes,
so the real annotation code runs end to end without downloading weights. Masks are arbitrary;
shapes, batching and loading are real.
"""

from __future__ import annotations

import string
from functools import partial
from pathlib import Path


def build_tiny_sam(img_size: int = 64, embed_dim: int = 32, seed: int = 0):
    """A ``Sam`` with a 2-block ViT encoder on ``img_size`` inputs (patch 8), eval mode."""
    import torch
    from segment_anything.modeling import (
        ImageEncoderViT,
        MaskDecoder,
        PromptEncoder,
        Sam,
        TwoWayTransformer,
    )

    if img_size % 8:
        raise ValueError(f"img_size must be a multiple of the patch size 8, got {img_size}")
    torch.manual_seed(seed)
    grid = img_size // 8
    sam = Sam(
        image_encoder=ImageEncoderViT(
            img_size=img_size,
            patch_size=8,
            embed_dim=embed_dim,
            depth=2,
            num_heads=2,
            mlp_ratio=2.0,
            out_chans=embed_dim,
            qkv_bias=True,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            use_rel_pos=True,
            window_size=4,
            global_attn_indexes=(1,),
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=embed_dim,
            image_embedding_size=(grid, grid),
            input_image_size=(img_size, img_size),
            mask_in_chans=4,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(
                depth=1, embedding_dim=embed_dim, mlp_dim=2 * embed_dim, num_heads=2
            ),
            transformer_dim=embed_dim,
            iou_head_depth=2,
            iou_head_hidden_dim=embed_dim,
        ),
    )
    return sam.eval()


def write_tiny_clip(folder: str | Path, image_size: int = 32, seed: int = 0) -> Path:
    """A tiny random ``CLIPModel`` and its processor (char-level tokenizer), saved to ``folder``."""
    import torch
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        CLIPProcessor,
        CLIPTokenizer,
    )

    torch.manual_seed(seed)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in string.ascii_lowercase + string.digits + ",.'-()":
        vocab[ch] = len(vocab)
        vocab[ch + "</w>"] = len(vocab)
    max_length = 77
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_attention_heads=2,
            num_hidden_layers=1, max_position_embeddings=max_length, bos_token_id=0,
            eos_token_id=1, pad_token_id=1,
        ),
        vision_config=dict(
            hidden_size=16, intermediate_size=32, num_attention_heads=2, num_hidden_layers=1,
            image_size=image_size, patch_size=8,
        ),
        projection_dim=8,
    )
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessor(
            size={"shortest_edge": image_size},
            crop_size={"height": image_size, "width": image_size},
        ),
        tokenizer=tokenizer,
    )
    folder = Path(folder)
    CLIPModel(config).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder
