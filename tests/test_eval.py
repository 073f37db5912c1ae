"""train.py's evaluation machinery (data/loader.py): score()'s one-pass exact match against greedy
decoding, the image shuffle of the image-use check, and the question kinds accuracy is grouped by."""

import json

import torch
from conftest import write_tiny_dataset

import casa
from data.loader import Dataset, answer, eval_batches, question_kind, score, shuffle_images, turn_kinds

S = 16


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return casa.VLM(casa.Config(n_layer=2, n_head=2, n_embd=32, n_vis_layer=1, n_vis_head=2, n_vis_embd=32,
                                image_size=S, patch_size=8, block_size=256)).eval()


def greedy(model, data):
    """{(sample, turn): greedy answer string} by generation, the reference score() must agree with."""
    out = {}
    for idx, images, chunk in eval_batches(data.eval_items(), 16):
        for it, pred in zip(chunk, answer(model, idx, images, data.tokenizer, data.max_answer_len() + 4)):
            out[it["sample"], it["turn"]] = pred
    return out


def test_score_agrees_with_greedy_decoding(tmp_path):
    """A briefly trained model, and a validation split where every other answer is changed to a
    colour the image does not show: score() must call right exactly the answers that greedy
    generation reproduces, without generating."""
    folder = write_tiny_dataset(tmp_path)
    model = tiny_model().train()
    train = Dataset(str(folder), "train", S)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(60):
        idx, targets, images, _ = train.get_batch(8, gen)
        model(idx, images, targets)[1].backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    lines = [json.loads(line) for line in (folder / "val.jsonl").read_text().splitlines()]
    for i, rec in enumerate(lines[1::2]):
        last = (rec.get("turns") or [rec])[-1]
        last["answer"] = {"red": "green", "green": "blue", "blue": "red"}[last["answer"]]
    (folder / "val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    data = Dataset(str(folder), "val", S)
    truth = {k: pred.strip() == data.samples[k[0]].turns[k[1]][1] for k, pred in greedy(model, data).items()}
    loss, right = score(model, data, batch_size=4)
    assert right == truth
    assert any(truth.values()) and not all(truth.values())
    # the loss is the mean over answer tokens, as the model's own loss on the whole split
    idx, targets, images = data.batch(range(len(data)))
    assert abs(loss - model(idx, images, targets)[1].item()) < 1e-5


def test_shuffle_moves_every_image():
    gen = torch.Generator().manual_seed(0)
    for m in (2, 3, 7, 50):
        images = torch.arange(m).float()[:, None, None, None].expand(m, 3, 2, 2)
        out = shuffle_images(images, gen)
        order = out[:, 0, 0, 0].long()
        assert sorted(order.tolist()) == list(range(m))  # a permutation
        assert (order != torch.arange(m)).all()  # no image keeps its place


def test_blind_model_scores_the_same_with_images_shuffled(tmp_path):
    folder = write_tiny_dataset(tmp_path)
    data = Dataset(str(folder), "val", S, blind=True)
    model = tiny_model(1)
    assert score(model, data, 4) == score(model, data, 4, shuffle=True)
    # with real images the shuffled forward sees other images: its logits differ
    data = Dataset(str(folder), "val", S)
    idx, targets, images = data.batch(range(len(data)))
    shuffled = shuffle_images(images, torch.Generator().manual_seed(0))
    assert not torch.allclose(model(idx, images)[0], model(idx, shuffled)[0])


def test_question_kinds():
    assert question_kind("<|image|>what is the value of bar c?") == "what is the value of bar _?"
    assert question_kind("what number is 42?") == "what number is _?"
    assert question_kind("<|image|>") == ""

    class S_:
        def __init__(self, task, prompts):
            self.task, self.turns = task, [(p, "x") for p in prompts]

    video = S_("video_memory", ["<|image|>", "<|image|> what color was it?"])
    charts = S_("charts", ["<|image|>which bar is the tallest?"])
    assert turn_kinds([video, charts]) == [["video_memory", "video_memory: what color was it?"],
                                           ["charts: which bar is the tallest?"]]
    # free-form questions: more kinds than MAX_KINDS in a task -> grouped by their first two words
    free = [S_("vqa", [f"is there a {w * 3} thing?"]) for w in "abcdefghijklm"]
    free += [S_("vqa", [f"what colour is {w * 2}?"]) for w in "pqrs"]
    kinds = {k for ks in turn_kinds(free) for k in ks}
    assert kinds == {"vqa: is there", "vqa: what colour"}
    assert turn_kinds([S_("", ["<|image|>"])]) == [["all"]]
