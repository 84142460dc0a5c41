"""The examples and collators of VIG scoring and VIG-selective training: which tokens are the answer,
and how a record becomes model inputs and labels (the same in scoring and in training).

Which tokens are "the answer"
-----------------------------
Exactly the tokens TRL's `SFTTrainer` supervises for a vision processor on a prompt-completion
conversational record: the data are collated by TRL's own `DataCollatorForVisionLanguageModeling`
(`completion_only_loss=True`), which renders the prompt with the processor's chat template
(`add_generation_prompt=True`) and the completion as the rest of the rendered conversation (for
LLaVA-1.5: ``" <answer></s>"``, EOS included), tokenises both without special tokens, and labels the
completion tokens. VIG_t is computed at the positions whose label is not -100, in order, so the
j-th VIG_t of a sample is the j-th supervised token of that sample in training (`csr.vig.train`
relies on this). The content-free pass uses the same collator on the same completion, so the
answer tokens are identical by construction (checked, not assumed).

One deliberate addition (`add_bos`, default auto): TRL tokenises with add_special_tokens=False and
LLaVA-1.5's chat template renders no `<s>`, so TRL's sequences start without the BOS that generation
(`processor(text=...)`, `csr eval`) and LLaVA's own training put first. When the tokenizer adds BOS
on plain calls, `PrependBOS` puts it back (label -100), in scoring and in training alike, so both
stay aligned with each other and with inference. `add_bos=never` is TRL's collation unchanged.
"""

from __future__ import annotations

from typing import Sequence

import torch

from csr.models import PrependBOS, close_answer, tokenizer_adds_bos
from csr.vig.maths import IGNORE_INDEX

BOS_MODES = ("auto", "always", "never")
TURNS_KEY = "vig_turns"


def sft_example(prompt: str, answer: str, image=None) -> dict:
    """One record in TRL's prompt-completion conversational format (what `csr vig train` trains on).

    With `image=None` the prompt holds no image placeholder (the `none` content-free input).
    """
    content = ([{"type": "image"}] if image is not None else []) + [{"type": "text", "text": prompt}]
    return {"prompt": [{"role": "user", "content": content}],
            "completion": [{"role": "assistant", "content": [{"type": "text", "text": answer}]}],
            "images": [image] if image is not None else []}


def vig_example(turns: Sequence[dict], image=None) -> dict:
    """A scoring / training example for any record: TRL's prompt-completion columns of the first turn
    (what TRL's collator reads for a single-turn record with an image) plus every turn under
    `TURNS_KEY` (what `ConversationCollator` reads)."""
    ex = sft_example(turns[0]["prompt"], turns[0]["answer"], image)
    ex[TURNS_KEY] = [{"prompt": t["prompt"], "answer": t["answer"]} for t in turns]
    return ex


def conversation_messages(turns: Sequence[dict], with_image: bool) -> list[dict]:
    """Chat messages of a conversation; the image (if any) goes first in the first user turn."""
    msgs = []
    for k, t in enumerate(turns):
        content = ([{"type": "image"}] if with_image and k == 0 else []) + [{"type": "text", "text": t["prompt"]}]
        msgs.append({"role": "user", "content": content})
        msgs.append({"role": "assistant", "content": [{"type": "text", "text": t["answer"]}]})
    return msgs


def conversation_segments(processor, messages: Sequence[dict]) -> list[tuple[str, bool]]:
    """The chat-template rendering of a conversation cut into (text, is_answer) segments.

    Before assistant turn i: the rendering of messages[:i] with the generation prompt; the answer is
    what the rendering of messages[:i + 1] adds to it (as TRL splits prompt and completion). The
    template must render each prefix as a prefix of the next (LLaVA's and Vicuna's do).
    """
    segs, done = [], ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        head = processor.apply_chat_template(list(messages[:i]), add_generation_prompt=True, tokenize=False)
        full = processor.apply_chat_template(list(messages[:i + 1]), tokenize=False)
        if not head.startswith(done) or not full.startswith(head):
            raise ValueError("the chat template does not render a conversation's turns as prefixes of each other; "
                             "multi-turn VIG needs one that does (use turns=first)")
        # every answer of the data is whole: closed by EOS whatever the template renders
        segs += [(head[len(done):], False), (close_answer(full[len(head):], processor), True)]
        done = full
    return segs


class ConversationCollator:
    """Multi-turn and text-only examples (`TURNS_KEY` + ``images``) into model inputs and labels.

    Each example's rendering is cut by `conversation_segments`; the first segment goes through the
    processor with the image (placeholder expanded, pixel values), the others through the tokenizer
    alone, all without special tokens (as TRL tokenises prompt and completion). Labels are the tokens
    of the assistant segments, -100 elsewhere; rows are right-padded and cut at `max_length`.
    """

    PER_TOKEN_KEYS = ("token_type_ids", "mm_token_type_ids")

    def __init__(self, processor, max_length: int | None = None):
        self.processor = processor
        self.max_length = max_length

    def _example(self, ex: dict):
        images = ex.get("images") or []
        image = images[0] if images else None
        segs = conversation_segments(self.processor, conversation_messages(ex[TURNS_KEY], image is not None))
        tok = self.processor.tokenizer
        ids, labels, extra = [], [], {}
        for k, (text, is_answer) in enumerate(segs):
            if k == 0 and image is not None:
                enc = self.processor(text=[text], images=[image], return_tensors="pt", add_special_tokens=False)
                bad = [key for key in self.PER_TOKEN_KEYS if key in enc]
                if bad:
                    raise NotImplementedError(f"multi-turn / text-only VIG collation does not handle {bad} (this "
                                              f"model's processor); use turns=first and text_only=skip")
                part = enc["input_ids"][0].tolist()
                extra = {key: v for key, v in enc.items() if key not in ("input_ids", "attention_mask")}
            else:
                part = tok(text, add_special_tokens=False)["input_ids"]
            ids += part
            labels += part if is_answer else [IGNORE_INDEX] * len(part)
        if self.max_length is not None:
            ids, labels = ids[:self.max_length], labels[:self.max_length]
        return ids, labels, extra

    def __call__(self, examples: list[dict]) -> dict:
        rows = [self._example(ex) for ex in examples]
        tok = self.processor.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        length = max(len(ids) for ids, _, _ in rows)
        input_ids = torch.full((len(rows), length), pad, dtype=torch.long)
        labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
        attention = torch.zeros((len(rows), length), dtype=torch.long)
        for b, (ids, lab, _) in enumerate(rows):
            input_ids[b, :len(ids)] = torch.tensor(ids, dtype=torch.long)
            labels[b, :len(lab)] = torch.tensor(lab, dtype=torch.long)
            attention[b, :len(ids)] = 1
        batch = {"input_ids": input_ids, "attention_mask": attention}
        extras = [e for _, _, e in rows if e]
        for key in (extras[0] if extras else {}):
            batch[key] = torch.cat([e[key] for e in extras], dim=0)
        batch["labels"] = labels
        return batch


class VIGCollator:
    """TRL's vision collator for batches of single-turn examples that all have an image (or all have
    none), exactly as SFTTrainer collates them; `ConversationCollator` for any batch holding a
    multi-turn example or mixing examples with and without an image."""

    def __init__(self, trl_collator, conversation: ConversationCollator):
        self.trl = trl_collator
        self.conversation = conversation

    def _closed(self, ex: dict) -> dict:
        """A conversational prompt-completion example rendered as TRL renders it, its answer closed by
        EOS (`csr.models.close_answer`); TRL collates the plain text the same way."""
        from trl.data_utils import apply_chat_template, is_conversational, prepare_multimodal_messages

        ex = {k: v for k, v in ex.items() if k != TURNS_KEY}
        if not is_conversational(ex):
            return ex
        messages = {"prompt": prepare_multimodal_messages(ex["prompt"], images=ex.get("images")),
                    "completion": prepare_multimodal_messages(ex["completion"])}
        text = apply_chat_template(messages, self.trl.processor)
        return {**ex, "prompt": text["prompt"], "completion": close_answer(text["completion"], self.trl.processor)}

    def __call__(self, examples: list[dict]) -> dict:
        single = all(len(ex.get(TURNS_KEY) or [None]) == 1 for ex in examples)
        has_image = [bool(ex.get("images")) for ex in examples]
        if single and (all(has_image) or not any(has_image)):
            return self.trl([self._closed(ex) for ex in examples])
        missing = [i for i, ex in enumerate(examples) if not ex.get(TURNS_KEY)]
        if missing:
            raise ValueError(f"examples {missing} lack '{TURNS_KEY}': build them with csr.vig.collate.vig_example")
        return self.conversation(examples)


def sft_collator(processor, max_length: int | None = None, pad_to_multiple_of: int | None = None,
                 add_bos: str = "auto"):
    """TRL's vision collator as SFTTrainer builds it for prompt-completion data (loss on the completion),
    with `ConversationCollator` for multi-turn and text-only examples (`VIGCollator`).

    add_bos: "auto" (default) prepends BOS when the tokenizer adds one on plain calls (LLaVA's does)
    and the chat template does not render it, so that training, VIG scoring and generation see the
    same sequence start; "always" / "never" force it on / off ("never": exactly TRL's own collation).
    """
    from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

    trl_inner = DataCollatorForVisionLanguageModeling(processor=processor, max_length=max_length,
                                                      completion_only_loss=True, pad_to_multiple_of=pad_to_multiple_of)
    inner = VIGCollator(trl_inner, ConversationCollator(processor, max_length))
    tok = processor.tokenizer
    if add_bos not in BOS_MODES:
        raise ValueError(f"add_bos={add_bos!r} is not one of {BOS_MODES}")
    if add_bos == "always" or (add_bos == "auto" and tokenizer_adds_bos(tok)):
        if tok.bos_token_id is None:
            raise ValueError("add_bos is on but the tokenizer has no BOS token")
        return PrependBOS(inner, tok.bos_token_id)
    return inner
