"""A tiny random-weight Stable Diffusion pipeline folder, for tests, benchmarks and smoke runs.

No weights can be downloaded where this project is built, so the real loading path
(:class:`generators.stable_diffusion.StableDiffusionGenerator` reading a diffusers folder) is
exercised with a pipeline built here from small configs: a 2-level UNet, a 2-level VAE
(latents at 1/2 resolution), a 2-layer CLIP text encoder, and a character-level CLIP tokenizer
whose vocabulary is written here. The images are noise; shapes, plumbing and seeding are real.
"""

from __future__ import annotations

import string
from pathlib import Path

TOKENIZER_MAX_LENGTH = 77

# Component sizes shared by the SD 1.x and SDXL tiny pipelines.
_TEXT_CONFIG = dict(
    hidden_size=16, intermediate_size=32, num_attention_heads=2, num_hidden_layers=2,
    max_position_embeddings=TOKENIZER_MAX_LENGTH, projection_dim=16, bos_token_id=0,
    eos_token_id=1, pad_token_id=1,
)
_UNET_CONFIG = dict(
    sample_size=16, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=2, norm_num_groups=4,
)
_VAE_CONFIG = dict(
    block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
    up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), latent_channels=4,
    norm_num_groups=4, sample_size=32,
)


def tiny_clip_vocab() -> dict[str, int]:
    """A character-level CLIP BPE vocabulary: specials, then every char alone and word-final."""
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in string.ascii_lowercase + string.digits + ",.'-()":
        vocab[ch] = len(vocab)
        vocab[ch + "</w>"] = len(vocab)
    return vocab


def tiny_clip_tokenizer(max_length: int = TOKENIZER_MAX_LENGTH):
    """A ``CLIPTokenizer`` over :func:`tiny_clip_vocab` with no merges (one token per char)."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer(vocab=tiny_clip_vocab(), merges=[], model_max_length=max_length)


def write_tiny_sd_pipeline(folder: str | Path, seed: int = 0) -> Path:
    """Build a tiny ``StableDiffusionPipeline`` with random weights and save it to ``folder``.

    The folder loads with ``AutoPipelineForText2Image.from_pretrained(folder)``; it generates at
    any resolution that is a multiple of 8 (32-64 px keep a 2-step run well under a second).
    """
    import torch
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    tokenizer = tiny_clip_tokenizer()
    text_encoder = CLIPTextModel(
        CLIPTextConfig(vocab_size=len(tiny_clip_vocab()), **_TEXT_CONFIG)
    )
    unet = UNet2DConditionModel(cross_attention_dim=16, **_UNET_CONFIG)
    vae = AutoencoderKL(in_channels=3, out_channels=3, **_VAE_CONFIG)
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    folder = Path(folder)
    pipe.save_pretrained(folder)
    return folder


def write_tiny_sdxl_pipeline(folder: str | Path, seed: int = 0) -> Path:
    """Like :func:`write_tiny_sd_pipeline`, but a ``StableDiffusionXLPipeline`` (two text
    encoders, a UNet with SDXL's text-and-time conditioning), to exercise the SDXL path."""
    import torch
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    text_config = dict(vocab_size=len(tiny_clip_vocab()), **_TEXT_CONFIG)
    time_dim = 4
    unet = UNet2DConditionModel(
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        # 6 micro-conditioning numbers (sizes, crop) plus the pooled text embedding.
        projection_class_embeddings_input_dim=6 * time_dim + 16,
        cross_attention_dim=32,  # both encoders' hidden states, concatenated
        **_UNET_CONFIG,
    )
    vae = AutoencoderKL(**_VAE_CONFIG)
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=CLIPTextModel(CLIPTextConfig(**text_config)),
        text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**text_config)),
        tokenizer=tiny_clip_tokenizer(),
        tokenizer_2=tiny_clip_tokenizer(),
        unet=unet,
        scheduler=EulerDiscreteScheduler(
            beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
            timestep_spacing="leading",
        ),
    )
    folder = Path(folder)
    pipe.save_pretrained(folder)
    return folder
