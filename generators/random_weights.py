"""Stable Diffusion pipelines of real size with random weights: throughput and memory only.

No weights can be downloaded where this project is built (nor on a lent GPU machine), but
what a denoising step costs does not depend on the weights' values: a UNet, VAE and text
encoder built from Stable Diffusion 1.5's configurations cost what the real ones cost, in
time and memory. ``generation.weights: random`` builds one here instead of loading
``generation.model``; the images are noise, so a run with it measures the pipeline and nothing
else (its summary, shards and report say so).

Architectures (:data:`ARCHITECTURES`):
    ``sd15``: SD 1.5's UNet (860 M parameters, 4 levels of 320-1280 channels, cross-attention
        768), VAE (84 M, latents at 1/8 resolution) and CLIP ViT-L/14 text encoder (123 M).
    ``tiny``: the 2-level test pipeline of :mod:`generators.tiny` (for CPU smoke runs).

The tokenizer is always the character-level one of :mod:`generators.tiny` padded to 77 tokens:
the text encoder's cost depends on the sequence length, not on which ids fill it.
"""

from __future__ import annotations

from typing import Any

#: ``generation.weights`` values: the model's own weights, or random weights of a real size.
WEIGHTS = ("pretrained", "random", "random_tiny")

#: Stable Diffusion 1.5's component configurations (diffusers / transformers keys).
SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                      "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                    "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8,
)
SD15_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
)
SD15_TEXT = dict(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_attention_heads=12,
    num_hidden_layers=12, max_position_embeddings=77, hidden_act="quick_gelu",
    projection_dim=768, bos_token_id=0, eos_token_id=1, pad_token_id=1,
)
ARCHITECTURES = ("sd15", "tiny")


def architecture_of(weights: str) -> str:
    """The architecture ``generation.weights`` builds (``random`` → sd15)."""
    if weights not in WEIGHTS[1:]:
        raise ValueError(f"generation.weights {weights!r} builds no random pipeline; one of "
                         f"{list(WEIGHTS[1:])}")
    return "tiny" if weights == "random_tiny" else "sd15"


def build_random_pipeline(architecture: str = "sd15", device: Any = None,
                          seed: int = 0) -> Any:
    """A ``StableDiffusionPipeline`` of ``architecture`` with random weights (float32),
    built on ``device`` (on a GPU the 1 B parameters are initialised there, in seconds).

    No safety checker, DDIM scheduler (the caller swaps in the configured one).
    """
    import torch
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    from generators import tiny

    if architecture not in ARCHITECTURES:
        raise ValueError(f"unknown random architecture {architecture!r}; one of "
                         f"{list(ARCHITECTURES)}")
    torch.manual_seed(seed)
    tokenizer = tiny.tiny_clip_tokenizer()
    with torch.device(device or "cpu"):
        if architecture == "sd15":
            unet = UNet2DConditionModel(**SD15_UNET)
            vae = AutoencoderKL(**SD15_VAE)
            text_encoder = CLIPTextModel(CLIPTextConfig(**SD15_TEXT))
        else:
            text = dict(vocab_size=len(tiny.tiny_clip_vocab()), **tiny._TEXT_CONFIG)
            text_encoder = CLIPTextModel(CLIPTextConfig(**text))
            unet = UNet2DConditionModel(cross_attention_dim=16, **tiny._UNET_CONFIG)
            vae = AutoencoderKL(in_channels=3, out_channels=3, **tiny._VAE_CONFIG)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=scheduler, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)


def parameter_count(pipe: Any) -> int:
    """Parameters of the pipeline's UNet, VAE and text encoder."""
    return sum(p.numel() for name in ("unet", "vae", "text_encoder")
               for p in getattr(pipe, name).parameters())
