"""vLLM's LLaVA-1.5 and LLaVA-NeXT with OTPrune (registered by :func:`otprune.vllm.register`).

Two places change, nothing else:
- the processor's ``get_num_image_tokens``: k = round(r * N) for an image of N visual tokens (a
  pure function of the image size, as vLLM needs before the encoder runs), so the prompt gets k
  placeholders and the scheduler, KV cache and positions see only them (LLaVA's 1-D RoPE then
  numbers the kept tokens contiguously, as the pruned transformers model does);
- the encoder's ``_process_image_input``: all images of one encoder call are scored by one batched
  :func:`otprune.select` (ragged ``lengths`` when their N differ) and each returns its k kept
  embeddings (ascending; the release's order with compat="official").
The choice depends on the image alone (no text), so vLLM's encoder cache and prefix caching stay
valid. Precomputed ``image_embeds`` inputs pass through unpruned (their count is their length).
The settings are read from the environment when vLLM builds the processor and the model, so a class
left registered after the variables are unset behaves exactly as vLLM's own.
"""

from __future__ import annotations

from typing import List, Sequence, Union

import torch
from vllm.model_executor.models.llava import (
    LlavaDummyInputsBuilder,
    LlavaForConditionalGeneration,
    LlavaImageEmbeddingInputs,
    LlavaProcessingInfo,
    PixtralHFProcessingInfo,
    _build_llava_or_pixtral_hf_info,
    _build_llava_or_pixtral_hf_processor,
)
from vllm.model_executor.models.llava_next import (
    LlavaNextForConditionalGeneration,
    LlavaNextImageEmbeddingInputs,
    LlavaNextMultiModalProcessor,
    LlavaNextProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY

from .._validate import budget
from ..autopatch import Settings, settings_from_env
from ..integrations._sequence import select_kept
from . import settings


def kept_embeddings(embeds: Union[torch.Tensor, Sequence[torch.Tensor]], s: Settings) -> List[torch.Tensor]:
    """Per-image kept embeddings [(k_j, D)] from per-image embeddings [(N_j, D)] (or one (B, N, D)).

    One batched select over all images; k_j = round(keep * N_j) rows of image j, ascending by
    position (in select's order with compat="official"); dtype and device unchanged.
    """
    feats = list(embeds)
    kept = select_kept(feats, s.keep, s.select_kwargs)
    return [f[k.to(f.device)] for f, k in zip(feats, kept)]


def _refuse_pixtral() -> None:
    raise ValueError(
        "otprune vLLM plugin: Pixtral-HF checkpoints (LlavaForConditionalGeneration with a Pixtral vision "
        "tower) are not supported (their image rows end in break tokens); unset OTPRUNE_KEEP / BASELINE"
    )


class _PrunedCounts:
    """Processing-info mixin: k = round(r * N) placeholders per image while pruning is on (the
    settings of the environment when vLLM builds its processor, i.e. at engine construction)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.otprune_settings = settings_from_env()

    def get_num_image_tokens(self, *, image_width: int, image_height: int) -> int:
        n = super().get_num_image_tokens(image_width=image_width, image_height=image_height)
        s = self.otprune_settings
        return n if s is None else budget(s.keep, n)


class OTPruneLlavaProcessingInfo(_PrunedCounts, LlavaProcessingInfo):
    pass


class OTPruneLlavaNextProcessingInfo(_PrunedCounts, LlavaNextProcessingInfo):
    pass


def _llava_info(ctx):
    info = _build_llava_or_pixtral_hf_info(ctx)
    if not isinstance(info, PixtralHFProcessingInfo):
        return OTPruneLlavaProcessingInfo(ctx)
    if settings_from_env() is not None:
        _refuse_pixtral()
    return info


class _PrunedEncoder:
    """Model mixin: the encoder returns each image's kept embeddings while pruning is on."""

    _embeds_type: type

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.otprune_settings = settings()  # checked here too: a bad value fails the engine start
        if self.otprune_settings is not None and self.config.vision_config.model_type == "pixtral":
            _refuse_pixtral()

    def _process_image_input(self, image_input):
        out = super()._process_image_input(image_input)
        if self.otprune_settings is None or isinstance(image_input, self._embeds_type):
            return out
        return kept_embeddings(out, self.otprune_settings)


@MULTIMODAL_REGISTRY.register_processor(
    _build_llava_or_pixtral_hf_processor, info=_llava_info, dummy_inputs=LlavaDummyInputsBuilder
)
class OTPruneLlavaForConditionalGeneration(_PrunedEncoder, LlavaForConditionalGeneration):
    """vLLM's LLaVA-1.5 with OTPrune's kept visual tokens."""

    _embeds_type = LlavaImageEmbeddingInputs


@MULTIMODAL_REGISTRY.register_processor(
    LlavaNextMultiModalProcessor, info=OTPruneLlavaNextProcessingInfo, dummy_inputs=LlavaDummyInputsBuilder
)
class OTPruneLlavaNextForConditionalGeneration(_PrunedEncoder, LlavaNextForConditionalGeneration):
    """vLLM's LLaVA-NeXT with OTPrune's kept visual tokens (anyres packing, newline tokens included)."""

    _embeds_type = LlavaNextImageEmbeddingInputs
