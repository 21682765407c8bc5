"""Tiny random checkpoints with LLaVA-1.5's visual geometry (336 px / patch 14 = 576 visual tokens),
saved the way the real ones are published, for the clients to load by path. No downloads.

    path = save_llava_original(folder)  # original codebase (llava-torch): config, weights, tokenizer,
                                        # CLIP tower in a sibling folder named by mm_vision_tower
    path = save_llava_hf(folder)        # transformers LlavaForConditionalGeneration + LlavaProcessor
    path = save_task(folder)            # an lmms-eval task folder (YAML + functions + dataset on disk)

The models are the test suite's tiny builders (tests/llava_tiny.py, tests/hf_tiny.py) at 336 px.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))

import hf_tiny  # noqa: E402
import llava_tiny  # noqa: E402

IMAGE_SIZE = 336
VISUAL_TOKENS = (IMAGE_SIZE // 14) ** 2  # 576
TASK = "otprune_tiny"


def save_llava_original(folder: str) -> str:
    """Save a tiny LlavaLlamaForCausalLM (flat merge, pad aspect ratio) with a tokenizer; the folder
    name holds "llava" because LLaVA's loader picks the model class by name."""
    model = llava_tiny._build(folder, IMAGE_SIZE, 0, mm_patch_merge_type="flat", image_aspect_ratio="pad")
    path = os.path.join(folder, "llava-v1.5-tiny")
    model.save_pretrained(path)
    hf_tiny._tokenizer().save_pretrained(path)
    return path


# The chat template published with the llava-hf LLaVA-1.5 checkpoints: "USER: <image>\n... ASSISTANT:".
LLAVA_HF_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}"
    "{% endif %}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def save_llava_hf(folder: str) -> str:
    """Save a tiny transformers LLaVA (float32) and its processor (576 image tokens per image)."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    tokenizer = hf_tiny._tokenizer()
    cfg = LlavaConfig(
        vision_config=hf_tiny._vision_config(IMAGE_SIZE), text_config=hf_tiny._text_config(),
        image_token_index=tokenizer.convert_tokens_to_ids(hf_tiny.IMAGE_TOKEN), vision_feature_layer=-2,
        vision_feature_select_strategy="default", image_seq_length=VISUAL_TOKENS,
    )
    import torch

    torch.manual_seed(0)
    model = hf_tiny._finish(LlavaForConditionalGeneration(cfg), tokenizer)
    image_processor = hf_tiny._image_processor(
        "CLIPImageProcessor", size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=14,
                               vision_feature_select_strategy="default", image_token=hf_tiny.IMAGE_TOKEN,
                               num_additional_image_tokens=1)
    processor.chat_template = LLAVA_HF_CHAT_TEMPLATE  # lmms-eval's chat llava_hf applies the processor's
    path = os.path.join(folder, "llava-1.5-tiny-hf")
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


TASK_YAML = """\
task: {task}
dataset_path: {data}
dataset_kwargs:
  load_from_disk: True
test_split: test
output_type: generate_until
doc_to_visual: !function tiny_task.doc_to_visual
doc_to_text: !function tiny_task.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: 3
  temperature: 0
  top_p: 1.0
  num_beams: 1
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  - version: 0.0
"""

TASK_FUNCTIONS = '''\
def doc_to_visual(doc):
    return [doc["image"].convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]
'''


def save_task(folder: str, n_docs: int = 2) -> str:
    """An lmms-eval task folder for ``--include_path``: ``n_docs`` random photos of different shapes
    with a question each, saved with ``datasets`` and loaded from disk (no hub access)."""
    import datasets

    images = hf_tiny.tiny_images(n_docs, sizes=((300, 400), (420, 280)))
    data = datasets.Dataset.from_dict(
        {"question": ["what is in the image ?"] * n_docs, "answer": ["cat"] * n_docs, "image": images},
        features=datasets.Features({"question": datasets.Value("string"), "answer": datasets.Value("string"),
                                    "image": datasets.Image()}))
    task_dir = os.path.join(folder, "task")
    datasets.DatasetDict({"test": data}).save_to_disk(os.path.join(task_dir, "data"))
    with open(os.path.join(task_dir, f"{TASK}.yaml"), "w") as f:
        f.write(TASK_YAML.format(task=TASK, data=os.path.join(task_dir, "data")))
    with open(os.path.join(task_dir, "tiny_task.py"), "w") as f:
        f.write(TASK_FUNCTIONS)
    return task_dir
