"""Debias sampling (docs/method.md §2): the rule against hand-computed logits (cutoff included), the
decode loop against an uncached recomputation and against `csr eval`'s greedy generation, the
content-free branch receiving no image features, and the CSR-generator candidate mode."""

import json
import math

import pytest
import torch

from csr.debias import sampling as S

NEG = float("-inf")



# ---------------------------------------------------------------------------------------------
# the rule on hand-computed logits
# ---------------------------------------------------------------------------------------------


def test_debias_rule_hand_computed():
    l = torch.tensor([2.0, 1.0, 0.0, -3.0])
    l_cf = torch.tensor([1.0, 2.0, 0.0, 0.0])
    # alpha = 1: 2 l - l_cf = (3, 0, 0, -6); beta = 0.1: cutoff log(0.1) + 2 = -0.3026 drops token 3 only
    out = S.debias_logits(l, l_cf, alpha=1.0, beta=0.1)
    assert out.tolist() == [3.0, 0.0, 0.0, NEG]
    # alpha = 0.5: 1.5 l - 0.5 l_cf = (2.5, 0.5, 0, -4.5); beta = 0.5: cutoff 2 + log 0.5 = 1.307 keeps token 0
    out = S.debias_logits(l, l_cf, alpha=0.5, beta=0.5)
    assert out.tolist() == [2.5, NEG, NEG, NEG]
    # beta = 0: no cutoff
    assert S.debias_logits(l, l_cf, alpha=1.0, beta=0.0).tolist() == [3.0, 0.0, 0.0, -6.0]


def test_cutoff_is_taken_on_the_original_logits():
    l = torch.tensor([2.0, 0.0, -1.0])
    l_cf = torch.tensor([2.5, -2.0, -6.0])
    # debiased: 2 l - l_cf = (1.5, 2.0, 4.0); cutoff on the ORIGINAL logits: 2 + log 0.1 = -0.303
    # keeps tokens 0 and 1 and drops token 2, although token 2 has the highest debiased logit
    out = S.debias_logits(l, l_cf, alpha=1.0, beta=0.1)
    assert out.tolist() == [1.5, 2.0, NEG]
    assert int(out.argmax()) == 1
    # without the cutoff the implausible token would win
    assert int(S.debias_logits(l, l_cf, alpha=1.0, beta=0.0).argmax()) == 2
    # a cutoff on the debiased logits (4 + log 0.1 = 1.697) would have dropped token 0 instead
    assert S.plausible(l, 0.1).tolist() == [True, True, False]
    # the arg-max of the original logits always survives
    x = torch.randn(7, 50)
    assert bool(S.plausible(x, 0.9).gather(1, x.argmax(1, keepdim=True)).all())


def test_debias_rule_batched_and_logprobs():
    torch.manual_seed(0)
    l, l_cf = torch.randn(3, 4, 11), torch.randn(3, 4, 11)
    out = S.debias_logits(l, l_cf, alpha=0.7, beta=0.2)
    keep = l >= math.log(0.2) + l.max(-1, keepdim=True).values
    want = torch.where(keep, 1.7 * l - 0.7 * l_cf, torch.full_like(l, NEG))
    assert torch.equal(out, want)
    lp = S.debiased_logprobs(l, l_cf, alpha=0.7, beta=0.2)
    assert torch.allclose(lp.exp().sum(-1), torch.ones(3, 4))
    assert torch.isneginf(lp[~keep]).all()
    # alpha = 0, beta = 0 is the identity
    assert torch.equal(S.debias_logits(l, l_cf, 0.0, 0.0), l)
    with pytest.raises(ValueError):
        S.debias_logits(l, l_cf[:, :2])
    with pytest.raises(ValueError):
        S.debias_logits(l, l_cf, beta=1.5)


def test_choose_greedy_and_sampling_respect_the_cutoff():
    scores = S.debias_logits(torch.tensor([[2.0, 0.0, -1.0, 1.9]]), torch.tensor([[2.5, -2.0, -6.0, 0.0]]))
    assert S.choose(scores, do_sample=False).tolist() == [3]
    g = torch.Generator().manual_seed(0)
    draws = {int(S.choose(scores, do_sample=True, temperature=1.5, generator=g)) for _ in range(300)}
    assert draws <= {0, 1, 3} and len(draws) >= 2            # never the cut-off token 2
    assert {int(S.choose(scores, do_sample=True, top_k=1, generator=g)) for _ in range(20)} == {3}
    # top-p 0.5: token 3 alone holds > 0.5 of the debiased mass
    assert {int(S.choose(scores, do_sample=True, top_p=0.5, generator=g)) for _ in range(50)} == {3}


# ---------------------------------------------------------------------------------------------
# the decode loop on the tiny LLaVA
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tiny_llava_dir):
    from csr.models import load_policy

    return load_policy(str(tiny_llava_dir), dtype="float32", device="cpu")


QUESTIONS = ["Describe this image in detail.", "Is there a dog in the image?", "What is in the picture?"]


def _images(images_dir):
    return [images_dir / "red.png", images_dir / "green.png", images_dir / "blue.png"]


def test_alpha_zero_is_csr_eval_greedy(tiny, images_dir):
    from csr.eval.run import generate_answers

    model, proc = tiny
    ims = _images(images_dir)
    want = generate_answers(model, proc, ims, QUESTIONS, max_new_tokens=10, batch_size=3)
    got = S.debiased_generate(model, proc, ims, QUESTIONS, alpha=0.0, beta=0.0, max_new_tokens=10, batch_size=2)
    assert got == want


def _naive_debiased_greedy(model, proc, image, question, steps, alpha, beta, cf_mode):
    """Recompute both branches from scratch at every step (no caches, batch of one)."""
    from csr.data import load_image
    from csr.content_free import content_free_prompt
    from csr.models import build_chat_prompt

    prompt = build_chat_prompt(proc, question)
    enc = proc(text=[prompt], images=[load_image(image)], return_tensors="pt")
    cfs = [proc.tokenizer([content_free_prompt(prompt, proc, m)], return_tensors="pt")["input_ids"]
           for m in (("none", "unk") if cf_mode == "mean" else (cf_mode,))]
    ids, toks = enc["input_ids"], []
    with torch.no_grad():
        for _ in range(steps):
            l = model(input_ids=ids, pixel_values=enc["pixel_values"]).logits[0, -1]
            l_cf = torch.stack([model(input_ids=c).logits[0, -1] for c in cfs]).mean(0)
            t = int(S.debias_logits(l, l_cf, alpha, beta).argmax())
            toks.append(t)
            if t == proc.tokenizer.eos_token_id:
                break
            ids = torch.cat([ids, torch.tensor([[t]])], 1)
            cfs = [torch.cat([c, torch.tensor([[t]])], 1) for c in cfs]
    return proc.tokenizer.decode([t for t in toks if t != proc.tokenizer.eos_token_id],
                                 skip_special_tokens=True).strip()


@pytest.mark.parametrize("cf_mode,alpha,beta", [("none", 1.0, 0.1), ("unk", 2.0, 0.3), ("mean", 1.0, 0.1)])
def test_cached_loop_matches_uncached_recomputation(tiny, images_dir, cf_mode, alpha, beta):
    model, proc = tiny
    ims = _images(images_dir)
    got = S.debiased_generate(model, proc, ims, QUESTIONS, alpha=alpha, beta=beta, max_new_tokens=6,
                              cf_mode=cf_mode, batch_size=3)
    want = [_naive_debiased_greedy(model, proc, im, q, 6, alpha, beta, cf_mode) for im, q in zip(ims, QUESTIONS)]
    assert got == want


def test_content_free_branch_receives_no_image_features(tiny, images_dir):
    """Count every model call: only the image branch's prefill (one per batch) gets pixel values
    and runs the vision tower; every content-free call holds no image placeholder token."""
    model, proc = tiny
    image_id = model.config.image_token_id
    log = {"vision": 0, "calls": []}

    def pre(m, args, kwargs):
        ids = kwargs.get("input_ids")
        log["calls"].append((kwargs.get("pixel_values") is not None,
                             bool((ids == image_id).any()) if ids is not None else False, ids.shape[1]))

    h1 = model.model.vision_tower.register_forward_pre_hook(lambda m, a: log.__setitem__("vision", log["vision"] + 1))
    h2 = model.register_forward_pre_hook(pre, with_kwargs=True)
    try:
        S.debiased_generate(model, proc, _images(images_dir), QUESTIONS, alpha=1.0, beta=0.1, max_new_tokens=4,
                            cf_mode="mean", batch_size=2, eos_token_ids=[])  # no early stop
    finally:
        h1.remove()
        h2.remove()
    # 2 batches x (1 image + 2 content-free branches) x (1 prefill + 3 steps)
    assert len(log["calls"]) == 2 * 3 * 4
    with_pixels = [c for c in log["calls"] if c[0]]
    assert len(with_pixels) == 2 and log["vision"] == 2          # the image prefills, nothing else
    assert all(c[1] for c in with_pixels)                         # they hold the image tokens
    assert not any(c[1] for c in log["calls"] if not c[0])       # no other call holds one
    # the content-free branch has no image argument at all, and gives the same logits whatever the image
    branch = S.ContentFreeBranch(model, proc, "none")
    with pytest.raises(TypeError):
        branch.prefill(["USER: <image>\nhi ASSISTANT:"], images=[None])


def test_content_free_logits_do_not_depend_on_the_image(tiny, images_dir):
    """Swap the images: the image branch changes, the content-free logits and their effect don't."""
    from csr.models import build_chat_prompt

    model, proc = tiny
    prompts = [build_chat_prompt(proc, q) for q in QUESTIONS[:2]]
    with torch.no_grad():
        cf1 = S.ContentFreeBranch(model, proc, "mean").prefill(prompts)
        cf2 = S.ContentFreeBranch(model, proc, "mean").prefill(prompts)
        im_a = S.ImageBranch(model, proc).prefill(_images(images_dir)[:2], prompts)
        im_b = S.ImageBranch(model, proc).prefill(_images(images_dir)[1:], prompts)
    assert torch.equal(cf1, cf2)
    assert not torch.allclose(im_a, im_b)


def test_sampling_is_seeded_and_keeps_knobs(tiny, images_dir):
    model, proc = tiny
    ims = _images(images_dir)
    kw = dict(alpha=1.0, beta=0.1, max_new_tokens=6, do_sample=True, temperature=1.3, top_k=40, top_p=0.95)
    a = S.debiased_generate(model, proc, ims, QUESTIONS, seed=1, **kw)
    b = S.debiased_generate(model, proc, ims, QUESTIONS, seed=1, **kw)
    assert a == b and len(a) == 3
    # beta = 1 keeps only the original arg-max: sampling then equals greedy decoding
    g = S.debiased_generate(model, proc, ims, QUESTIONS, alpha=0.0, beta=0.0, max_new_tokens=6)
    s = S.debiased_generate(model, proc, ims, QUESTIONS, alpha=3.0, beta=1.0, max_new_tokens=6, do_sample=True,
                            seed=0)
    assert s == g


# ---------------------------------------------------------------------------------------------
# candidate-generation mode of the CSR generator
# ---------------------------------------------------------------------------------------------


def _search(model, proc, image, prompt, debias=None, G=3, max_new_tokens=5):
    """diverse_group_search over one node, the way LlavaExpander._search drives it."""
    from csr.generate.beam import diverse_group_search

    branch = S.ImageBranch(model, proc)
    first = branch.prefill([image], [prompt])
    branch.repeat_interleave(G)
    step = branch.step
    if debias is not None:
        first, step, _ = debias.wrap(first, step, [prompt], G)
    tok = proc.tokenizer
    return diverse_group_search(first, step, num_groups=G, diversity_penalty=3.0, max_new_tokens=max_new_tokens,
                                stop_ids=[tok.eos_token_id], eos_ids=[tok.eos_token_id], pad_id=tok.pad_token_id)[0]


def test_debiased_candidates_drive_diverse_group_search(tiny, images_dir):
    from csr.models import build_chat_prompt

    model, proc = tiny
    image = images_dir / "red.png"
    prompt = build_chat_prompt(proc, "Describe this image in detail.")
    plain = _search(model, proc, image, prompt)
    neutral = _search(model, proc, image, prompt, S.DebiasedCandidates(model, proc, alpha=0.0, beta=0.0))
    assert [c.token_ids for c in neutral] == [c.token_ids for c in plain]
    deb = S.DebiasedCandidates(model, proc, alpha=1.0, beta=0.1, cf_mode="none")
    cands = _search(model, proc, image, prompt, deb)
    # group 0 (no diversity penalty) is debiased greedy decoding
    greedy = S.debiased_generate(model, proc, [image], ["Describe this image in detail."], alpha=1.0, beta=0.1,
                                 max_new_tokens=5, eos_token_ids=[proc.tokenizer.eos_token_id])
    assert proc.tokenizer.decode(cands[0].token_ids, skip_special_tokens=True).strip() == greedy[0]
    # every chosen token was plausible: finite debiased log-prob
    assert all(math.isfinite(lp) for c in cands for lp in c.logprobs)
    with pytest.raises(ValueError):
        S.DebiasedCandidates(model, proc, cf_mode="blank")


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def test_cli_sample_chair_and_pope(tiny_llava_dir, tmp_path, images_dir):
    from csr.debias.cli import main

    chair = tmp_path / "chair.jsonl"
    chair.write_text("".join(json.dumps({"id": str(i), "image": str(images_dir / f), "objects": objs}) + "\n"
                             for i, (f, objs) in enumerate([("red.png", ["dog"]), ("blue.png", ["cat", "car"])])))
    (tmp_path / "synonyms.json").write_text(json.dumps({"dog": ["puppy"], "cat": [], "car": [], "tree": []}))
    pope = tmp_path / "pope.jsonl"
    pope.write_text(json.dumps({"question_id": 0, "image": str(images_dir / "red.png"), "text": "Is there a dog?",
                                "label": "yes"}) + "\n")
    out = tmp_path / "out"
    assert main(["sample", "--model", str(tiny_llava_dir), "--chair", str(chair), "--pope", str(pope),
                 "--max-new-tokens", "8", "--out", str(out), "--device", "cpu"]) == 0
    res = json.loads((out / "metrics.json").read_text())
    assert res["settings"]["alpha"] == 1.0 and res["settings"]["beta"] == 0.1 and res["settings"]["cf"] == "none"
    assert set(res["chair"]) == {"debiased", "baseline"} and "chair_s" in res["chair"]["debiased"]
    assert set(res["pope"]) == {"debiased", "baseline"}
    assert len((out / "chair_captions_debiased.jsonl").read_text().splitlines()) == 2
