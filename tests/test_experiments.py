"""The experiment scripts' own machinery (not the experiments: those take an hour and no test runs
them): the runner that launches train.py and skips finished runs, the job lists, the activation
counter, the attention-mass batching and the video memory evaluation."""

import json
import os
import statistics

import pytest
import torch

import casa
from conftest import TINY_MODEL, run, write_tiny_dataset
from data.loader import load_image
from experiments import accuracy, attention, efficiency, learning, plots, runs, token_scale, video, vision_probe


def test_run_all_runs_once_skips_finished_runs_and_resumes_interrupted_ones(tmp_path, capsys):
    data = write_tiny_dataset(tmp_path / "data")
    settings = dict(arg[2:].split("=", 1) for arg in TINY_MODEL)
    settings.update(dataset=str(data), max_iters=6, eval_interval=3, lr_decay_iters=6)
    straight = str(tmp_path / "straight")
    record = runs.run_all([(straight, settings)], parallel=1)[straight]
    with open(os.path.join(straight, "log.jsonl")) as f:
        finals = [r for r in map(json.loads, f) if r.get("final")]
    assert record == finals[-1] and record["step"] == 6 and "wall_s" in record
    assert "final:" in open(os.path.join(straight, "train.txt")).read()
    assert "$ python train.py --n_layer=2" in capsys.readouterr().out  # the command, as a user would type it
    # finished: not run again
    before = os.path.getmtime(os.path.join(straight, "log.jsonl"))
    assert runs.run_all([(straight, settings)], parallel=1)[straight] == record
    assert os.path.getmtime(os.path.join(straight, "log.jsonl")) == before
    assert "1 already done, 0 to run" in capsys.readouterr().out
    # finished with other settings than a job asks for (a table's settings changed since): its numbers
    # must not be reported as that job's, so run_all stops and names the setting
    with pytest.raises(SystemExit, match=r"eval_interval=3 \(this job asks for 2\)"):
        runs.run_all([(straight, dict(settings, eval_interval=2))], parallel=1)
    assert runs.settings_clash(straight, dict(settings, learning_rate="3e-4")) == []  # "3e-4" is the 0.0003 it ran with

    # the same run stopped at step 3: a checkpoint there, no final line (as after Ctrl-C or a kill)
    split = str(tmp_path / "split")
    run("train.py", *(f"--{k}={v}" for k, v in dict(settings, max_iters=3).items()), f"--out_dir={split}")
    with open(os.path.join(split, "log.jsonl")) as f:
        kept = [line for line in f if not json.loads(line).get("final")]
    with open(os.path.join(split, "log.jsonl"), "w") as f:  # and a line logged after its last checkpoint
        f.writelines(kept + [json.dumps({"step": 4, "loss": 9.9}) + "\n"])
    with open(os.path.join(split, "train.txt"), "w") as f:
        f.write("the first part's output\n")
    capsys.readouterr()
    record = runs.run_all([(split, settings)], parallel=1)[split]
    assert "0 already done, 1 to run" in capsys.readouterr().out
    assert record["step"] == 6
    output = open(os.path.join(split, "train.txt")).read()
    assert output.startswith("the first part's output") and "resumed" in output
    losses = [[(r["step"], r["loss"]) for r in map(json.loads, open(os.path.join(d, "log.jsonl"))) if "loss" in r]
              for d in (straight, split)]
    assert [step for step, _ in losses[1]] == list(range(1, 7))  # each step logged once
    assert losses[0] == losses[1]  # exactly the uninterrupted run


def test_published_runs_keep_their_log_in_the_repo_and_count_as_finished_from_it(tmp_path, monkeypatch, capsys):
    # runs/ is not committed: a table trained over several days must survive a fresh clone
    monkeypatch.setattr(runs, "RUNS", str(tmp_path / "runs"))
    monkeypatch.setattr(runs, "KEPT_LOGS", str(tmp_path / "docs" / "runs"))
    data = write_tiny_dataset(tmp_path / "data")
    settings = dict(arg[2:].split("=", 1) for arg in TINY_MODEL)
    settings.update(dataset=str(data), max_iters=4, eval_interval=2, lr_decay_iters=4)
    kept, other = str(tmp_path / "runs" / "task" / "kept-s1"), str(tmp_path / "runs" / "task" / "other-s1")
    record = runs.run_all([(kept, settings), (other, settings)], parallel=2, keep_logs={kept})[kept]
    copy = tmp_path / "docs" / "runs" / "task" / "kept-s1.jsonl"
    assert not (tmp_path / "docs" / "runs" / "task" / "other-s1.jsonl").exists()  # not a published run
    lines = [json.loads(line) for line in open(copy)]
    assert lines[0] == {"settings": settings}
    log = [json.loads(line) for line in open(os.path.join(kept, "log.jsonl"))]
    assert lines[1:] == [r for r in log if "loss" not in r] and len(lines) < len(log)  # not the training losses
    points = learning.curve(kept)
    assert [p[0] for p in points] == [2, 4]  # the evaluation along the way and the final one

    # a fresh clone: the folder is gone, the copy is left; the run counts as finished, is not trained
    # again, and its numbers and curve read the same
    for name in os.listdir(kept):
        os.remove(os.path.join(kept, name))
    os.rmdir(kept)
    capsys.readouterr()
    assert runs.run_all([(kept, settings)], parallel=1, keep_logs={kept})[kept] == record
    assert "1 already done, 0 to run" in capsys.readouterr().out and not os.path.exists(kept)
    assert learning.curve(kept) == points
    with pytest.raises(SystemExit, match=r"max_iters=4 \(this job asks for 6\)"):  # its settings are checked too
        runs.run_all([(kept, dict(settings, max_iters=6))], parallel=1, keep_logs={kept})
    assert runs.final_record(str(tmp_path / "runs" / "task" / "never-s1")) is None


def test_kept_logs_are_not_ignored_by_git_but_runs_are():
    # runs/ is ignored; the copies in docs/runs/ must reach the repo (a pattern like "runs/" ignores both)
    import shutil
    import subprocess
    if shutil.which("git") is None or not os.path.isdir(os.path.join(runs.ROOT, ".git")):
        pytest.skip("not a git checkout")
    def ignored(path):
        return subprocess.run(["git", "check-ignore", "-q", path], cwd=runs.ROOT).returncode == 0
    assert ignored("runs/table5/charts/blind-s1/log.jsonl")
    assert not ignored(os.path.relpath(runs.kept_log_path("runs/table5/charts/blind-s1"), runs.ROOT))


def test_run_all_stops_with_the_failing_runs_output(tmp_path):
    try:
        runs.run_all([(str(tmp_path / "bad"), dict(dataset=str(tmp_path / "missing")))], parallel=1)
    except SystemExit as e:
        assert "failed" in str(e) and "missing" in str(e)
    else:
        raise AssertionError("a failing run must stop run_all")


def test_jobs_share_one_budget_and_blind_is_ca_on_blank_images():
    jobs = dict(accuracy.jobs_for(["shapes", "text"], ["ca", "insertion", "blind"], [1, 2]))
    assert len(jobs) == 12
    blind = jobs["runs/accuracy/text/blind-s2"]
    assert blind["variant"] == "ca" and blind["blind"] is True and blind["seed"] == 2
    assert all("blind" not in s for d, s in jobs.items() if "blind" not in d)
    for s in jobs.values():
        assert {k: s[k] for k in accuracy.BUDGET} == accuracy.BUDGET


def test_a_patch_size_for_every_task_changes_only_the_patch_size():
    budget, root = accuracy.long_budget(10000)
    own = dict(accuracy.jobs_for(["shapes", "charts"], ["ca", "blind"], [2], budget, root))
    p8 = dict(accuracy.jobs_for(["shapes", "charts"], ["ca", "blind"], [2], budget, root + "-p8", patch_size=8))
    assert [d.replace(root, root + "-p8") for d in own] == list(p8)
    assert own[f"{root}/charts/ca-s2"]["patch_size"] == 16 and own[f"{root}/shapes/ca-s2"]["patch_size"] == 8
    for (d, s), s8 in zip(own.items(), p8.values()):
        assert s8["patch_size"] == 8 and {k: v for k, v in s8.items() if k != "patch_size"} == \
            {k: v for k, v in s.items() if k != "patch_size"}


def test_a_patch_size_that_is_every_tasks_own_changes_nothing():
    text = accuracy.TASK_SETTINGS["text"]["patch_size"]
    assert accuracy.with_patch_size(["text"], text, "runs/a", "a") == (0, "runs/a", "a")  # the same runs
    assert accuracy.with_patch_size(["text"], 0, "runs/a", "a") == (0, "runs/a", "a")
    other = 16 if text != 16 else 8  # another patch size: its runs kept apart
    assert accuracy.with_patch_size(["text"], other, "runs/a", "a") == (other, f"runs/a-p{other}", f"a_p{other}")
    charts = accuracy.TASK_SETTINGS["charts"]["patch_size"]
    if charts != text:  # one task's own but not the other's: apart too
        assert accuracy.with_patch_size(["text", "charts"], text, "runs/a", "a")[1] == f"runs/a-p{text}"


def test_question_kinds_along_the_way_per_seed_and_mean(tmp_path):
    """The long-budget table's per-question curves: each seed's logged numbers as they are, then
    their mean and sample std at every evaluation."""
    logged = {1: [0.25, 0.75], 2: [0.5, 1.0]}  # seed -> the value question's accuracy at steps 5, 10
    for seed, accs in logged.items():
        run = tmp_path / "charts" / f"ca-s{seed}"
        run.mkdir(parents=True)
        lines = [{"step": 1, "loss": 3.0}]  # a training line, not an evaluation
        lines += [{"step": 5 * (i + 1), "accuracy": a, "accuracy_by_kind": {"charts: value": a, "charts: tallest": 1.0}}
                  for i, a in enumerate(accs)]
        (run / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    rows = accuracy.kind_curve_rows(str(tmp_path), ["charts"], ["ca"], [1, 2])
    value = [r for r in rows if r[3] == "value"]
    assert value[0] == ["charts", "ca", 1, "value", "0.250", "0.750"]
    assert value[1] == ["charts", "ca", 2, "value", "0.500", "1.000"]
    at_10 = [0.75, 1.0]
    assert value[2][:4] == ["charts", "ca", "mean", "value"]
    assert value[2][5] == f"{statistics.mean(at_10):.3f} ± {statistics.stdev(at_10):.3f}"
    assert len(rows) == 6  # two kinds x (two seeds + their mean)


def test_learning_curves_reuse_the_table_runs():
    """learning.py draws text, charts and video from the Table 2 / Table 4 runs: the same folders and
    the same train.py settings, so no run is trained twice; with several seeds, each seed's run."""
    from experiments import learning, video

    jobs, where = learning.learning_jobs(["shapes", "text", "video"], ["ca", "blind"], ["ca", "insertion"], [1], 1000, 100)
    budget, root = accuracy.long_budget(learning.FINE_ITERS)
    table2 = dict(accuracy.jobs_for(["text"], ["ca", "blind"], [1], budget, root))
    assert {where["text", m, 1] for m in ("ca", "blind")} == set(table2)
    assert all(dict(jobs)[d] == s for d, s in table2.items())
    table4 = dict(video.jobs_for(["ca", "insertion"], [1]))
    assert {where["video", m, 1] for m in ("ca", "insertion")} == set(table4) and all(dict(jobs)[d] == s for d, s in table4.items())
    assert where["video", "ca", 1] == "runs/video/ca-s1" and table4["runs/video/ca-s1"]["variant"] == "ca"
    assert dict(jobs)[where["shapes", "blind", 1]]["blind"] is True and len(jobs) == 6

    jobs, where = learning.learning_jobs(["charts", "shapes"], ["ca_tv"], [], [2, 3], 1000, 100)
    table2 = dict(accuracy.jobs_for(["charts"], ["ca_tv"], [2, 3], budget, root))
    assert [where["charts", "ca_tv", s] for s in (2, 3)] == list(table2)
    assert [dict(jobs)[where["shapes", "ca_tv", s]]["seed"] for s in (2, 3)] == [2, 3] and len(set(dict(jobs))) == 4


def test_learning_curve_legend_wraps_inside_the_panels_width(tmp_path):
    """Seven models under one task's panels: the legend wraps into rows, so the picture is as wide
    as its panels and every model's key (its colour) is drawn inside it."""
    from PIL import Image

    models = [f"model {i}" for i in range(7)]
    colors = {m: (20 * i + 10, 200, 255 - 20 * i) for i, m in enumerate(models)}
    curves = {("charts", models[0]): [[(0, 0.0, 0.0), (100, 10.0, 0.5)]]}
    path = tmp_path / "curves.png"
    plots.accuracy_panels(curves, ["charts"], models, str(path), colors=colors)
    im = Image.open(path).convert("RGB")
    one_panel_wide = im.width
    plots.accuracy_panels({("a", m): [] for m in models} | {("b", models[0]): []}, ["a", "b"], models,
                          str(path), colors=colors)
    assert Image.open(path).width > one_panel_wide  # the width follows the panels, not the legend
    drawn = {c for _, c in im.getcolors(maxcolors=1 << 20)}
    assert all(c in drawn for c in colors.values())


def test_mean_spread_is_mean_and_sample_std():
    xs = [0.5, 0.25, 0.375]
    assert runs.mean_spread(xs) == f"{statistics.mean(xs):.3f} ± {statistics.stdev(xs):.3f}"
    assert runs.mean_spread([0.5]) == "0.500"


def test_captions_wrap_to_the_cell_width_in_pixels():
    # a proportional font: a fixed count of characters overflows with wide letters (a model's
    # broken caption such as "pppp...") and wastes room with narrow ones
    fnt = plots.font(12)
    width = plots.ImageDraw.Draw(plots.Image.new("RGB", (1, 1))).textlength
    text = "it moves right " + "p" * 60 + " then " + "i" * 40
    lines = plots.wrap_to_width(text, fnt, 96)
    assert all(width(line, font=fnt) <= 96 for line in lines)
    assert "".join(lines).replace(" ", "") == text.replace(" ", "")  # nothing lost, only cut
    assert lines[0] == "it moves right"  # whole words stay whole
    cut = plots.wrap_to_width(text, fnt, 96, max_lines=3)
    assert len(cut) == 3 and cut[:2] == lines[:2] and cut[2].endswith("...") and width(cut[2], font=fnt) <= 96
    assert plots.wrap_to_width("  ", fnt, 96) == []


def test_a_short_caption_strip_keeps_its_title_and_footer_inside_the_picture(tmp_path):
    # two frames make a strip narrower than the title's one line; everything drawn must stay inside
    # the right margin (10 px), and the strip's width still follows the number of frames
    frames = [torch.rand(3, 16, 16) for _ in range(2)]
    results = [[dict(text="a red circle moves left", delay=0.01), dict(text="p" * 50, delay=2.0)]]
    paths = [tmp_path / f"strip{n}.png" for n in (2, 3)]
    plots.caption_strip(frames, ["ca"], results, ["a red circle moves left", None], 2.0, paths[0])
    plots.caption_strip(frames + frames[:1], ["ca"], [results[0] + results[0][:1]], ["x", None, "x"], 2.0, paths[1])
    with plots.Image.open(paths[0]) as im, plots.Image.open(paths[1]) as im3:
        assert im3.size[0] - im.size[0] == 96 + 6
        margin = im.convert("L").crop((im.size[0] - 10, 0, im.size[0], im.size[1]))
        assert margin.getextrema() == (255, 255)  # white: nothing ran off the right edge
        assert im.size[1] > im3.size[1]  # the narrow strip's title took more lines


def test_activation_bytes_counts_saved_tensors_once_and_leaves_weights_out():
    class Tiny(torch.nn.Module):  # the calling convention of casa.VLM: (idx, images, targets) -> (_, loss)
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(8, 16, bias=False)

        def forward(self, idx, images, targets):
            y = self.lin(images)  # saves its input (4 x 8 floats); the weight is a parameter
            return None, (y * y).sum()  # saves y, twice, one storage (4 x 16 floats)

    images = torch.randn(4, 8)
    assert efficiency.activation_bytes(Tiny(), None, images, None) == 4 * 8 * 4 + 4 * 16 * 4


def test_efficiency_draws_the_stream_picture_from_the_bench_records(tmp_path):
    # stream.py --bench writes the records (--json); efficiency.py draws them (stream.py draws nothing)
    import stream

    records = stream.benchmark(log=lambda *a: None, turns=3, variants="ca,insertion", n_layer=2, n_head=2, n_embd=32,
                               image_tokens=16, gen_tokens=3, n_vis_layer=1, n_vis_head=2, n_vis_embd=32, warmup=1,
                               device="cpu", json=str(tmp_path / "b.json"))
    assert len(records) == 9  # ca, insertion and the text-only row
    efficiency.main([f"--stream_json={tmp_path / 'b.json'}", f"--png={tmp_path / 'b.png'}"])
    with plots.Image.open(tmp_path / "b.png") as img:
        assert img.size[0] > 800 and img.size[1] > 300
    with pytest.raises(SystemExit, match="give its path too, --png=PATH"):
        efficiency.main([f"--stream_json={tmp_path / 'b.json'}"])


def test_kv_projection_of_the_paper_backbones():
    # moved with --analytic from stream.py: an independent count of K/V bytes per token under GQA
    from experiments import kv_projection

    rows = {r["variant"]: r for r in kv_projection.projection_rows("Qwen2.5-VL-3B", image_tokens=1024, text_tokens=16)}
    per_token = 36 * 2 * 2 * 128 * 2  # layers, K and V, 2 K/V heads (GQA), head_dim, bf16
    assert rows["insertion"]["per_turn"] == (1024 + 16) * per_token
    assert rows["ca"]["per_turn"] == 16 * per_token
    k = rows["insertion"]["turn_over_budget"]
    assert rows["insertion"]["kv_1"] + (k - 1) * rows["insertion"]["per_turn"] > 80e9
    assert rows["insertion"]["kv_1"] + (k - 2) * rows["insertion"]["per_turn"] <= 80e9
    assert rows["ca"]["turn_over_budget"] > 50 * k


def test_mass_on_averages_attention_mass_over_length_groups(tmp_path):
    data_dir = write_tiny_dataset(tmp_path / "data", n_val=6)
    torch.manual_seed(0)
    model = casa.VLM(casa.Config(variant="ca_tv", n_layer=2, n_head=2, n_embd=32, n_vis_layer=1, n_vis_head=2,
                                 n_vis_embd=32, image_size=16, patch_size=8)).eval()
    from data.loader import Dataset
    data = Dataset(data_dir, "val", 16)
    got = attention.mass_on(model, data, n_samples=6)
    groups = {}
    for s in data.samples:
        groups.setdefault(len(s.ids), []).append(s)
    assert len(groups) > 1  # the tiny set mixes lengths: the weighting matters
    want = sum(casa.attention_mass(model, torch.tensor([s.ids for s in g]),
                                   torch.cat([data.sample_images(s) for s in g])) * len(g) for g in groups.values()) / 6
    assert torch.allclose(got, want, atol=1e-6)


def tiny_video_checkpoint(tmp_path):
    """tmp_path/video (2 training, 12 validation clips) and tmp_path/ckpt.pt, a tiny random ca model on it."""
    run("data.video.prepare", "--out", tmp_path / "video", "--n_train", 2, "--n_val", 12, module=True)
    config = casa.Config(variant="ca", n_layer=1, n_head=2, n_embd=32, n_vis_layer=1, n_vis_head=2, n_vis_embd=32,
                         image_size=16, patch_size=8, block_size=512)
    casa.save_checkpoint(tmp_path / "ckpt.pt", casa.VLM(config), dataset_dir=str(tmp_path / "video"))


def test_vision_probe_reads_a_clip_question_from_its_first_frame_and_a_frozen_encoder(tmp_path):
    tiny_video_checkpoint(tmp_path)
    question = "what shape was in the first frame"
    images, answers = vision_probe.load_question(str(tmp_path / "video"), "val", question, 16)
    with open(tmp_path / "video" / "val.jsonl") as f:
        clips = [c for c in map(json.loads, f) if question in c["turns"][-1]["prompt"]]
    assert len(clips) > 0 and answers == [c["turns"][-1]["answer"] for c in clips]
    first = torch.stack([load_image(str(tmp_path / "video" / c["images"][0]), 16) for c in clips])
    assert torch.equal(images, first)
    out = run("experiments.vision_probe", f"--ckpt={tmp_path / 'ckpt.pt'}", f"--dataset={tmp_path / 'video'}",
              "--question=what color was", "--steps=4", "--batch_size=4", module=True).stdout
    assert "frozen encoder of" in out and "step 4: " in out


def test_token_scale_measures_the_encoder_output_and_the_text_embeddings_where_they_enter(tmp_path):
    """Block 0 receives the encoder's tokens and the token embeddings unchanged: its RMS values equal
    theirs, computed directly. In ca the image tokens are the same tensor in every block; in insertion
    they travel in the stream and the blocks change them."""
    tok = casa.get_tokenizer()
    rows = [casa.encode_turn(tok, casa.IMAGE + "what is this?")[0], casa.encode_turn(tok, casa.IMAGE + "and that?")[0]]
    T = max(map(len, rows))
    idx = torch.tensor([r + r[-1:] * (T - len(r)) for r in rows])  # (2, T), equal lengths: no padding
    images = torch.rand(2, 3, 16, 16)
    for variant in ("ca", "insertion"):
        torch.manual_seed(0)
        model = casa.VLM(casa.Config(variant=variant, n_layer=3, n_head=2, n_embd=32, n_vis_layer=1, n_vis_head=2,
                                     n_vis_embd=32, image_size=16, patch_size=8)).eval()
        with torch.no_grad():  # the init's text embeddings are tiny: make them larger to tell them apart
            model.wte.weight.mul_(10)
        got = token_scale.token_scale(model, idx, images)
        with torch.no_grad():
            img_rms = token_scale.rms(model.encode_images(idx, images))
            text_rms = token_scale.rms(model.wte(idx))
        assert len(got) == 3
        assert abs(got[0][0] - img_rms) < 1e-5 and abs(got[0][1] - text_rms) < 1e-5
        if variant == "ca":
            assert all(abs(a - img_rms) < 1e-6 for a, _ in got)
        else:
            assert abs(got[2][0] - img_rms) > 1e-4
    tiny_video_checkpoint(tmp_path)  # the command line, on a checkpoint and its validation clips
    out = run("experiments.token_scale", f"--ckpt={tmp_path / 'ckpt.pt'}", "--samples=4", module=True).stdout
    assert "trained  block 0: image" in out and "at init  block 0: image" in out


def test_memory_accuracy_scores_the_last_turn_of_each_memory_clip(tmp_path):
    tiny_video_checkpoint(tmp_path)
    got = video.memory_accuracy(str(tmp_path / "ckpt.pt"))
    with open(tmp_path / "video" / "val.jsonl") as f:
        clips = [json.loads(line) for line in f]
    memory = [c for c in clips if c["task"] == "video_memory"]
    assert got["n"] == len(memory) > 0
    n_color = sum("color" in c["turns"][-1]["prompt"] for c in memory)
    # the overall accuracy is the colour and shape accuracies weighted by their counts
    assert abs(got["all"] * len(memory) - got["color"] * n_color - got["shape"] * (len(memory) - n_color)) < 1e-9


def test_turn_accuracy_groups_every_turn_of_the_clips(tmp_path):
    """Every validation turn is counted once: the memory clips' last turns by question, all others
    (both kinds of clip) as comments."""
    tiny_video_checkpoint(tmp_path)
    got = video.turn_accuracy(str(tmp_path / "ckpt.pt"))
    with open(tmp_path / "video" / "val.jsonl") as f:
        clips = [json.loads(line) for line in f]
    memory = [c for c in clips if c["task"] == "video_memory"]
    n_color = sum("color" in c["turns"][-1]["prompt"] for c in memory)
    assert got["memory: color"][1] == n_color and got["memory: shape"][1] == len(memory) - n_color
    assert got["comment"][1] == sum(len(c["turns"]) for c in clips) - len(memory)
    assert all(0 <= acc <= 1 for acc, _ in got.values())
    # every comment word that names a colour, shape or direction is counted once
    words = [w for c in clips for turn in c["turns"][: len(c["turns"]) - (c["task"] == "video_memory")]
             for w in turn["answer"].split(" ")]
    for role in ("colour", "shape", "direction"):
        assert got[f"word: {role}"][1] == sum(video.WORD_ROLES.get(w) == role for w in words)
    # "which of two moved" is the colour word of each "moves" comment with two objects on screen
    moved = sum(" moves " in c["turns"][t]["answer"] and video.objects_on_screen([u["answer"] for u in c["turns"][:t]]) == 2
                for c in clips for t in range(len(c["turns"])))
    assert got.get("which of two moved", (0, 0))[1] == moved


def test_objects_on_screen_follows_the_comments():
    first_two = ["a red circle and a blue square appear"]
    assert video.objects_on_screen(first_two) == 2
    assert video.objects_on_screen(["an orange cross appears"]) == 1
    assert video.objects_on_screen(["a shape appears", "it moves up", "it changes color"]) == 1
    assert video.objects_on_screen(first_two + ["the red circle moves left", "the blue square disappears"]) == 1
    assert video.objects_on_screen(["a red circle appears", "nothing changes", "a green cross appears"]) == 2
    assert video.objects_on_screen(first_two + ["the red circle disappears", "a yellow diamond appears"]) == 2


def test_word_rights_finds_each_named_word_by_its_bytes():
    """A word of a comment is right when every byte of it is: one wrong byte makes that word wrong and
    no other; words that name no colour, shape or direction are not counted."""
    answer = "the orange circle moves left"
    n = len(answer.encode()) + 1  # the answer's tokens, then <|endoftext|>
    assert video.word_rights(answer, [True] * n) == [("colour", True), ("shape", True), ("direction", True)]
    for word, role in (("orange", "colour"), ("circle", "shape"), ("left", "direction")):
        rights = [True] * n
        rights[answer.index(word) + len(word) - 1] = False  # the word's last byte
        got = video.word_rights(answer, rights)
        assert [ok for r, ok in got if r == role] == [False] and all(ok for r, ok in got if r != role)
    rights = [True] * n
    rights[answer.index("moves")] = False
    assert all(ok for _, ok in video.word_rights(answer, rights))


def test_video_jobs_train_blind_as_ca_on_blank_frames():
    jobs = dict(video.jobs_for(["ca", "blind"], [1]))
    assert jobs["runs/video/blind-s1"] == dict(jobs["runs/video/ca-s1"], blind=True)
    assert "blind" not in jobs["runs/video/ca-s1"]


def test_only_a_default_run_counts_as_published():
    import configurator
    defaults = dict(tasks="shapes,text", seeds="1,2,3")

    def settings(*argv):  # a script's settings after its command line
        return {**defaults, **configurator.parse(list(argv), defaults)}

    assert runs.is_default(settings(), defaults)
    assert runs.is_default(settings("--seeds=1,2,3"), defaults)  # spelled out, still the default
    assert not runs.is_default(settings("--tasks=shapes"), defaults)
    defaults["threads"] = 1  # how runs share the machine, not what they compute
    assert runs.is_default(settings("--threads=2"), defaults)


def test_streamed_answers_equal_one_full_forward_unless_the_cache_is_bounded(tmp_path):
    """Turn by turn through a cache (unbounded, or bounded above the longest clip) the model predicts
    exactly what one full forward of the whole clip predicts; a small bound changes predictions."""
    from data.loader import Dataset

    run("data.video.prepare", "--out", tmp_path / "video", "--n_train", 2, "--n_val", 6, module=True)
    torch.manual_seed(0)
    config = casa.Config(variant="ca", n_layer=2, n_head=2, n_embd=32, n_vis_layer=1, n_vis_head=2, n_vis_embd=32,
                         image_size=16, patch_size=8, block_size=512)
    model = casa.VLM(config).eval()
    with torch.no_grad():  # at init a tied head predicts the current token; louder layers make context count
        for name, w in model.named_parameters():
            if name.startswith("blocks.") and w.dim() == 2:
                w.mul_(8)
    data = Dataset(str(tmp_path / "video"), "val", config.image_size)
    want = {}
    for i, s in enumerate(data.samples):
        logits, _ = model(torch.tensor([s.ids]), data.sample_images(s))
        for t, (_, p, end) in enumerate(s.turns_at):
            want[i, t] = (logits[0, p - 1 : end - 1].argmax(-1).tolist(), s.ids[p:end])
    longest = max(len(s.ids) for s in data.samples)
    assert video.streamed_answers(model, data)[0] == want
    got, most = video.streamed_answers(model, data, sink_tokens=2, recent_tokens=longest)
    assert got == want and most == longest
    got, most = video.streamed_answers(model, data, sink_tokens=2, recent_tokens=4)
    assert most <= 2 + 4 + max(end - start for s in data.samples for start, _, end in s.turns_at)
    assert got != want


def test_seeds_are_parsed_or_refused_in_one_line():
    assert runs.parse_seeds("1,2,3") == [1, 2, 3] and runs.parse_seeds("7") == [7]
    with pytest.raises(SystemExit, match="--seeds='1,x'.*e.g. --seeds=1,2,3"):
        runs.parse_seeds("1,x")
    for bad in ("1,-2", "2,2"):  # a negative seed; a repeated one would run twice into one folder at once
        with pytest.raises(SystemExit, match=f"--seeds='{bad}': each seed once, 0 or more"):
            runs.parse_seeds(bad)


def test_names_and_settings_are_checked_in_one_line():
    assert runs.parse_names("ca, insertion", "models", accuracy.MODELS) == ["ca", "insertion"]
    for bad, message in (("ca,,blind", "give a comma list of names, each once"), ("ca,ca", "each once"),
                         ("ca,banana", "--models: unknown 'banana'; choose from ca, ")):
        with pytest.raises(SystemExit, match=f"^error: .*{message}"):
            runs.parse_names(bad, "models", accuracy.MODELS)
    runs.check_settings({"jobs": 2}, jobs=runs.AT_LEAST_1)
    with pytest.raises(SystemExit, match=r"^error: --jobs must be at least 1, got 0$"):
        runs.check_settings({"jobs": 0}, jobs=runs.AT_LEAST_1)


def test_stream_policies_delay_is_a_queue_behind_real_time():
    """Frame k arrives at k/fps; a turn starts when its frame is in and the last turn is done."""
    from experiments import stream_policies

    got = stream_policies.delays([0.3, 0.3, 0.05, 0.01], fps=10)  # arrivals 0, 0.1, 0.2, 0.3
    assert got == pytest.approx([0.3, 0.5, 0.45, 0.36])  # done at 0.3, 0.6, 0.65, 0.66


def test_stream_policies_table_and_trained_accuracy(tmp_path, monkeypatch):
    """Six policies on one tiny stream: the windows keep what kv_cache_entries says (the benchmark
    checks every turn against the formula), and the trained-model columns come from streaming each
    policy's checkpoint; an insertion window longer than every clip scores as the full cache."""
    from experiments import stream_policies

    monkeypatch.setattr(runs, "ROOT", str(tmp_path))  # its table goes to tmp_path/runs/results
    tiny_video_checkpoint(tmp_path)
    small = dict(n_layer=1, n_head=2, n_embd=32, n_vis_layer=1, n_vis_head=2, n_vis_embd=32, image_size=16, patch_size=8,
                 block_size=512)
    for name, extra in (("insertion", {}), ("compressed", dict(compress_queries=2))):
        torch.manual_seed(0)
        model = casa.VLM(casa.Config(variant="insertion", **small, **extra))
        casa.save_checkpoint(tmp_path / f"{name}.pt", model, dataset_dir=str(tmp_path / "video"))
    common = ["--turns=12", "--n_layer=1", "--n_head=2", "--n_embd=32", "--image_tokens=4", "--gen_tokens=2",
              "--warmup=0", "--device=cpu", f"--png={tmp_path / 'p.png'}", "--text_window=8", "--window_frames=2",
              f"--ckpt_insertion={tmp_path / 'insertion.pt'}", f"--ckpt_compressed={tmp_path / 'compressed.pt'}",
              f"--ckpt_ca={tmp_path / 'ckpt.pt'}"]
    data = stream_policies.main(common)
    assert len(data) == 6 and os.path.exists(tmp_path / "p.png")
    keeps = {name: sum(d["keeps"].values()) for name, d in data.items()}
    T, N = 4, 4  # <|image|> <|answer|> + 2 generated; 2 x 2 patches
    assert keeps["insertion"] == 12 * (T + N) and keeps["insertion, Q = 1"] == 12 * (T + 1)
    assert keeps["insertion, window 16"] == 2 * (N + T) and keeps["ca, text window 8"] == 8 + N
    assert keeps["ca, 4 sinks + window 8"] == 12 + N and keeps["ca"] == 12 * T + N
    for d in data.values():
        assert set(d["accuracy"]) == {"comment", "memory: color", "memory: shape"}
    long_window = stream_policies.main([*common, "--window_frames=1000", "--png="])
    assert long_window["insertion, window 8000"]["accuracy"] == long_window["insertion"]["accuracy"]
    with pytest.raises(SystemExit, match="error: --ckpt_compressed=.* is a ca model: give a compressed one"):
        stream_policies.main([*common[:-2], f"--ckpt_compressed={tmp_path / 'ckpt.pt'}"])


def test_stream_policies_trained_trains_three_video_models_then_reads_their_checkpoints(tmp_path, monkeypatch):
    """--trained=True: Table 4's settings at --train_iters, seed 1, insertion compressed to Q = N/compress
    (64 px, 16 px patches: N = 16); the runs are handed to run_all, then their checkpoints are the
    --ckpt_* of the table; with a --ckpt_* of one's own it stops before training anything."""
    from experiments import stream_policies

    monkeypatch.setattr(stream_policies, "ROOT", str(tmp_path))
    handed = []
    monkeypatch.setattr(stream_policies, "run_all", lambda jobs, parallel, threads: handed.extend(jobs))
    monkeypatch.setattr(stream_policies, "run", lambda s: {k: getattr(s, f"ckpt_{k}") for k in ("insertion", "compressed", "ca")})
    for kind in ("insertion-s1", "insertion-q4-s1", "ca-s1"):  # what run_all would leave
        os.makedirs(tmp_path / "runs/video-4000" / kind)
        (tmp_path / "runs/video-4000" / kind / "ckpt.pt").write_bytes(b"")
    got = stream_policies.main(["--trained=True", "--png="])
    assert got == {k: str(tmp_path / f"runs/video-4000/{d}/ckpt.pt")
                   for k, d in (("insertion", "insertion-s1"), ("compressed", "insertion-q4-s1"), ("ca", "ca-s1"))}
    table4 = dict(video.jobs_for(["ca", "insertion"], [1]))
    jobs = dict(handed)
    assert jobs["runs/video-4000/ca-s1"] == dict(table4["runs/video/ca-s1"], max_iters=4000)
    assert jobs["runs/video-4000/insertion-q4-s1"] == dict(table4["runs/video/insertion-s1"], max_iters=4000,
                                                            compress_queries=4)
    handed.clear()
    with pytest.raises(SystemExit, match=r"^error: --trained=True trains its own models; leave out --ckpt_ca"):
        stream_policies.main(["--trained=True", "--ckpt_ca=x.pt", "--png="])
    assert handed == []


def test_table5_jobs_place_ca_every_nth_block_and_compress_to_a_fraction_of_n():
    """The Table 5 sweep's models: n = 4 on 8 layers keeps two CA layers (blocks 0 and 4); Q = N/4 and
    N/16 become query counts of each task's own N; every run has its own folder."""
    from experiments import table5

    jobs = table5.jobs_for(["charts", "text"], list(table5.MODELS), [1, 2], 8, {"charts": 10, "text": 20})
    assert len({d for d, _ in jobs}) == len(jobs) == 2 * 7 * 2
    by_dir = dict(jobs)
    ca4 = casa.Config(**{k: v for k, v in by_dir["runs/table5/charts/ca_tv-n4-s1"].items()
                         if k in casa.Config.__dataclass_fields__})
    assert [i for i, (_, ca) in enumerate(ca4.layer_kinds()) if ca] == [0, 4]
    assert by_dir["runs/table5/charts/insertion-QN_4-s2"]["compress_queries"] == 4  # 64 px / 16: N = 16
    assert by_dir["runs/table5/text/insertion-QN_16-s1"]["compress_queries"] == 4  # 64 px / 8: N = 64
    assert "compress_queries" not in by_dir["runs/table5/text/insertion-QN-s1"]
    assert by_dir["runs/table5/text/blind-s1"]["blind"] and by_dir["runs/table5/text/blind-s1"]["max_iters"] == 20
    # shapes keeps the recipe its published seeds were run with; charts and text take train.py's defaults
    shapes, charts = (s for _, s in table5.jobs_for(["shapes", "charts"], ["ca_tv n=1"], [1], 8, {"shapes": 50, "charts": 10}))
    assert shapes["focus_errors"] is False and shapes["pos_std"] == 0.0 and shapes["questions_per_image"] == 1
    assert shapes["vision_pretrain_iters"] == 10
    assert not {"focus_errors", "pos_std", "questions_per_image", "augment_shift", "vision_pretrain_iters"} & set(charts)
    assert charts["focus_hardest"] is False  # the draw of the first charts seeds


def test_table5_costs_price_a_compressed_image_at_q_tokens(tmp_path):
    """The cost columns: a measured training speed and activation size, and a turn's KV that grows
    by T + Q per SA layer for compressed insertion (T + N without compression)."""
    from experiments import table5

    write_tiny_dataset(tmp_path)
    small = dict(image_size=16, patch_size=4, n_layer=2, n_head=2, n_embd=32, n_vis_layer=1, n_vis_head=2, n_vis_embd=32)
    full = table5.costs(str(tmp_path), dict(small, variant="insertion"))
    squeezed = table5.costs(str(tmp_path), dict(small, variant="insertion", compress_queries=2))
    per_token = 2 * 2 * 32 * 4 / 1024  # K and V, 2 layers, 32 wide, float32, in KiB
    assert full["kv_per_turn_kib"] == pytest.approx((10 + 16) * per_token)
    assert squeezed["kv_per_turn_kib"] == pytest.approx((10 + 2) * per_token) and squeezed["kv"] == "kT + kQ"
    assert full["tok_s"] > 0 and full["activation_mib"] > squeezed["activation_mib"] > 0
