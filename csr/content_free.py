"""Content-free inputs: what the model is shown in place of the image, for every method that asks
"what would the model say without seeing it?" (docs/method.md §2 and §3).

Three methods, three sets of kinds (each method's paper and code chose its own):

- calibration of closed-set answers (`csr.debias.calibration`, `CALIBRATION_INPUTS`): ``none`` (the
  image placeholder removed from the prompt, no pixels), ``unk`` (the placeholder replaced by the
  tokenizer's unknown token), ``blank`` (a white image of the real image's size), ``noise`` (uniform
  RGB noise of that size, seeded);
- debias sampling's content-free branch (`csr.debias.sampling`, ``generate.debias_content_free``,
  `SAMPLING_INPUTS`): ``none``, ``unk``, or ``mean`` (the mean of both branches' logits);
- Visual Information Gain's I_cf (`csr.vig`, ``score.vig_content_free``, `VIG_INPUTS`): ``blur`` (a
  Gaussian-blurred copy of the image; the VIG paper's), ``none`` (no image at all), ``blank`` (a plain
  image of the real image's size, white unless told otherwise).

The prompts: `content_free_prompt` turns a chat prompt that holds the image placeholder into its
text-only form (``none`` / ``unk``); `no_image_prompt` renders a question with the model's chat
template and no image at all. The images: `blank_or_noise_image` (calibration: a blank or a noise
image of a given size) and `vig_content_free_image` (VIG: the real image blurred, a blank of its size,
or None).

No torch here: config validation and the command lines import the lists.
"""

from __future__ import annotations

import re

CALIBRATION_INPUTS = ("none", "unk", "blank", "noise")
TEXT_ONLY_INPUTS = ("none", "unk")
SAMPLING_INPUTS = ("none", "unk", "mean")
VIG_INPUTS = ("blur", "none", "blank")
BLUR_UNITS = ("fraction", "pixels")
WHITE = (255, 255, 255)


# ---------------------------------------------------------------------------------------------
# Prompts
# ---------------------------------------------------------------------------------------------


def content_free_prompt(prompt: str, processor, mode: str) -> str:
    """The text-only version of a chat prompt that holds the image placeholder.

    none: the placeholder and one newline right after it removed; unk: the placeholder replaced by
    the tokenizer's unknown-token text. Either way the processor then gets no image.
    """
    from csr.models import image_token_text

    token = image_token_text(processor)
    if token not in prompt:
        raise ValueError(f"prompt has no image placeholder {token!r}: {prompt[:80]!r}")
    if mode == "none":
        return re.sub(re.escape(token) + r"\n?", "", prompt)
    if mode == "unk":
        unk = processor.tokenizer.unk_token
        if unk is None:
            raise ValueError("the tokenizer has no unknown token: the 'unk' content-free input is "
                             "not available for this model (use none, blank or noise)")
        return prompt.replace(token, unk)
    raise ValueError(f"{mode!r} is not a text-only content-free input {TEXT_ONLY_INPUTS}")


def no_image_prompt(processor, question: str) -> str:
    """The chat prompt around the question without any image placeholder (VIG's `none` input)."""
    from csr.data import strip_image_token

    question = strip_image_token(question, processor)
    messages = [{"role": "user", "content": [{"type": "text", "text": question}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def check_text_only(enc: dict, model) -> None:
    """Refuse a content-free batch that would carry image features: pixel inputs, or image
    placeholder tokens that the model would fill with image features."""
    for key in enc:
        if "pixel" in key or key in ("image_sizes", "image_grid_thw"):
            raise AssertionError(f"content-free batch carries image input '{key}'")
    image_id = getattr(model.config, "image_token_id", None) or getattr(model.config, "image_token_index", None)
    if image_id is not None and bool((enc["input_ids"] == image_id).any()):
        raise AssertionError("content-free batch holds image placeholder tokens")


# ---------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------


def blank_or_noise_image(kind: str, size: tuple[int, int] = (336, 336), rng=None):
    """Calibration's image inputs: a blank (white) or noise (uniform RGB, `rng` else seed 0) PIL image
    of `size` (width, height)."""
    import numpy as np
    from PIL import Image

    if kind == "blank":
        return Image.new("RGB", size, WHITE)
    if kind == "noise":
        rng = rng if rng is not None else np.random.default_rng(0)
        arr = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
        return Image.fromarray(arr, "RGB")
    raise ValueError(f"{kind!r} is not an image content-free input (blank, noise)")


def blur_pixels(image, options) -> float:
    """The Gaussian radius in pixels of `image` that `options` (a `csr.vig.VIGOptions`) asks for."""
    if options.blur_units == "pixels":
        return float(options.blur_radius)
    return float(options.blur_radius) * min(image.size)


def vig_content_free_image(image, options):
    """VIG's I_cf for a PIL image, as `options` (a `csr.vig.VIGOptions`) names it: the blurred copy,
    a blank image of its size (`options.blank_color`), or None (no image)."""
    from PIL import Image, ImageFilter

    if options.content_free == "none":
        return None
    if options.content_free == "blank":
        return Image.new("RGB", image.size, tuple(options.blank_color))
    return image.convert("RGB").filter(ImageFilter.GaussianBlur(blur_pixels(image, options)))
