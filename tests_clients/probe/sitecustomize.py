"""Probe for client runs (tests_clients/): on PYTHONPATH with CLIENT_PROBE_DIR set, every Python
process of the run records what its language model receives, without importing anything heavy.

For each top-level ``generate`` call of an original-codebase LLaVA (``LlavaLlamaForCausalLM``) or a
transformers LLaVA (``LlavaForConditionalGeneration``), one record: the prompt's text tokens (image
markers / image placeholder tokens excluded, padding excluded), the number of image placeholder
tokens in the ids ``generate`` receives (transformers only: the processor writes one per visual
token; otprune's integration removes those of dropped tokens before the model's ``generate``), the sequence
length each Llama decoder layer receives in the prefill (layer index -> length), and whether
``otprune`` is imported in that process. Records go to CLIENT_PROBE_DIR/<pid>.json, rewritten after
each call. Classes are wrapped right after their module executes (a meta-path finder), so the probe
changes no import order.
"""

import functools
import json
import os
import sys

_DIR = os.environ.get("CLIENT_PROBE_DIR")
_records = []


def _dump():
    with open(os.path.join(_DIR, f"{os.getpid()}.json"), "w") as f:
        json.dump(_records, f)


def _wrap_generate(cls, text_and_placeholders):
    """Record one entry per call of ``cls.generate``; ``text_and_placeholders(self, args, kwargs)``."""
    orig = cls.generate

    @functools.wraps(orig)
    def generate(self, *args, **kwargs):
        text, placeholders = text_and_placeholders(self, args, kwargs)
        _records.append({"text": text, "placeholders": placeholders, "layers": {},
                         "otprune_imported": "otprune" in sys.modules})
        try:
            return orig(self, *args, **kwargs)
        finally:
            _records[-1]["otprune_imported"] = "otprune" in sys.modules
            _dump()

    cls.generate = generate


def _patch_llama(module):
    layer_cls = module.LlamaDecoderLayer
    orig = layer_cls.forward

    @functools.wraps(orig)
    def forward(self, hidden_states, *args, **kwargs):
        n = hidden_states.shape[1]
        if _records and n > 1:  # the prefill (decode steps see one token)
            _records[-1]["layers"].setdefault(str(self.self_attn.layer_idx), n)
        return orig(self, hidden_states, *args, **kwargs)

    layer_cls.forward = forward


def _patch_llava_original(module):
    def count(self, args, kwargs):
        ids = kwargs.get("inputs", args[0] if args else None)
        mask = kwargs.get("attention_mask")
        real = ids != -200  # IMAGE_TOKEN_INDEX marks where an image's features go
        if mask is not None:
            real &= mask.bool()
        return int(real.sum()), None

    _wrap_generate(module.LlavaLlamaForCausalLM, count)


def _patch_hf_llava(module):
    def count(self, args, kwargs):
        ids, mask = kwargs["input_ids"], kwargs.get("attention_mask")
        image = ids == self.config.image_token_id
        valid = mask.bool() if mask is not None else ids == ids
        return int((~image & valid).sum()), int((image & valid).sum())

    _wrap_generate(module.LlavaForConditionalGeneration, count)


_PATCHES = {
    "transformers.models.llama.modeling_llama": _patch_llama,
    "llava.model.language_model.llava_llama": _patch_llava_original,
    "transformers.models.llava.modeling_llava": _patch_hf_llava,
}


class _AfterImport:
    """Meta-path finder: lets the other finders find a module of _PATCHES, then patches it after it runs."""

    def __init__(self):
        self._busy = set()  # names being looked up: another delegating finder may ask us back

    def find_spec(self, name, path=None, target=None):
        if name not in _PATCHES or name in self._busy:
            return None
        self._busy.add(name)
        try:
            for finder in sys.meta_path:
                if finder is self or not hasattr(finder, "find_spec"):
                    continue
                spec = finder.find_spec(name, path, target)
                if spec is not None:
                    break
            else:
                return None
        finally:
            self._busy.discard(name)
        exec_module = spec.loader.exec_module

        def run(module):
            exec_module(module)
            _PATCHES[name](module)

        spec.loader.exec_module = run
        return spec


if _DIR:
    sys.meta_path.insert(0, _AfterImport())
