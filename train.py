"""
Train a CASA vision-language model. One flat loop, in nanoGPT's manner.

    python train.py                                   # ca on the shapes task, a few minutes on 2 CPU cores
    python train.py --variant=insertion --n_layer=6   # any setting below as --name=value
    python train.py --dataset=path/to/folder          # your own data: image size, budget and stages follow it
    python train.py --blind=True                      # blank images: the blind baseline
    python train.py --help                            # every setting and its default
    python train.py --resume=True                     # continue out_dir/ckpt.pt exactly where it stopped
    python train.py --overwrite=True                  # a fresh run over out_dir's (without it, train.py stops)
    torchrun --nproc_per_node=2 train.py              # DDP: gloo on CPU, nccl on CUDA
    # adaptation (the paper's Qwen path): CA layers on a trained insertion model, initialised
    # from its self-attention, old weights frozen except the last vision block
    python train.py --variant=insertion --out_dir=out-ins
    python train.py --init_from=out-ins/ckpt.pt --variant=ca --freeze=vision_but_last,text --out_dir=out-adapt

Metrics go to out_dir/log.jsonl (one JSON object a line); checkpoints to out_dir/ckpt.pt. One run at a
time per out_dir (out_dir/train.lock). Ctrl-C or SIGTERM finishes the step, writes a checkpoint and
exits 130 or 143.
"""

import dataclasses
import glob
import json
import math
import os
import random
import signal
import sys
import time
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

try:
    import fcntl  # Linux, macOS: the out_dir lock
except ImportError:  # Windows: runs are not locked
    fcntl = None

import casa
import configurator
from data.loader import (Dataset, KindErrors, answer, eval_batches, resolve_dataset, score, shift_images,
                         text_tokens, typical_image_side)

# -----------------------------------------------------------------------------
# settings; every one can be overridden on the command line as --name=value
# I/O
out_dir = "out"
dataset = "shapes"  # a folder name under data/ (prepared automatically if needed) or a path
resume = False  # continue from out_dir/ckpt.pt (settings come from the checkpoint, then the command line)
overwrite = False  # a fresh run may replace the run in out_dir (otherwise it stops, to keep it)
init_from = ""  # adaptation: a checkpoint whose vision encoder and text transformer weights to start from
freeze = ""  # comma list of: vision, vision_but_last (or vision_but_lastN), text, pretrained
blind = False  # replace every image by a blank one: the blind baseline
seed = 1337
# model (casa.Config)
variant = "ca"  # one of casa.VARIANTS
n_layer = 4
n_head = 4
n_embd = 128
block_size = 0  # longest text one forward takes; 0: fit the dataset's longest sample
image_size = 0  # pixels a side the images are resized to; 0: follow the images (their size, 32 to 64)
patch_size = 0  # 0: 8 px from 32 to 64 px (16 to 64 image tokens per image; fitted_patch)
n_vis_layer = 2
n_vis_head = 4
n_vis_embd = 128
stem_norm = True  # RMS-normalise the vision stem's output (False: the encoder of the tables before it)
pos_std = 0.5  # initial std of the encoder's row and column embeddings (0: zeros, the tables before it)
stem_he_init = False  # He's init for the vision stem's convs (False: PyTorch's default; docs/recipe.md)
dropout = 0.0
init_std = 0.0  # the text side's initial weights' std; 0: 1/sqrt(n_embd) (GPT-2's 0.02 learns question logic slower)
ca_every = 1  # CA layers in every n-th block only (blocks 0, n, 2n, ...; the paper's Table 5a); CA variants
compress_queries = 0  # insertion only: Q learned queries compress each image to Q tokens (Table 5b); 0: all N
# optimisation
batch_size = 32  # per process, per micro-step
grad_accum = 1  # micro-steps per optimizer step
max_iters = 0  # optimizer steps; 0: follow the data, `epochs` passes over the training samples...
epochs = 3.0  # (two passes left the relations questions still climbing: docs/recipe.md)
min_iters = 300  # ...but at least this many steps (a small set needs many passes)
optimizer = "muon"  # muon: Muon for the weight matrices of linear layers, AdamW for the rest; adamw: AdamW for all
learning_rate = 3e-4  # AdamW's, training from scratch (3e-3 and 1e-3 learn colour, then stall on shape)
muon_lr = 1e-3  # Muon's (its updates scaled to AdamW's size, so the two read alike); adaptation: lr_new, lr_pretrained
balance_kinds = True  # draw every question kind equally often (data.loader turn_kinds), not as the data has them...
focus_errors = True  # ...then by how often the model gets each wrong on recent training batches, so the kinds
# it has learned give way to those it has not (docs/recipe.md)...
focus_hardest = True  # ...True: the kind furthest from learned, against its own answer prior, drawn most (a yes/no
# kind at chance before a half-learned five-way one; data.loader KindErrors.factors); False: 0.1 + its error rate
questions_per_image = 10  # a batch takes up to this many questions about each picture it draws, and encodes it once
vision_pretrain_iters = -1  # stage 1: steps of label-free pretraining of the vision encoder before the VLM;
#                              0: off; -1: a fifth of max_iters, at least min_iters // 3 (100 steps; a fresh run
#                              with images; with 8 px patches 100 steps read shapes as well as 300: docs/recipe.md)
vision_pretrain_lr = 1e-3
vision_pretrain_batch = 32  # images per stage-1 step
augment_shift = 0.0625  # training images move by up to this fraction of their side each way (4 px at 64;
#                        edges repeated): without it small sets are memorised, not learned (docs/recipe.md); 0: off
lr_new = 1e-3  # adaptation (init_from): parameters that are new (CA layers)...
lr_pretrained = 1e-4  # ...and those copied from the checkpoint (the paper: 1e-4 and 1e-5 at 2-3B scale)
warmup_iters = 100
lr_decay_iters = 0  # cosine decay to min_lr_frac * lr until here; 0: max_iters
min_lr_frac = 0.1
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.99
grad_clip = 1.0  # 0: off
# evaluation and logging
eval_interval = 500  # also writes a checkpoint
eval_items = 400  # validation (and training) samples scored per periodic eval (0: all); the final eval uses all
eval_batch_size = 128
log_interval = 10
num_show = 6  # validation samples printed at the end
# system
device = "auto"  # auto: cuda, then mps, then cpu
compile = None  # torch.compile; None: on for CUDA only
threads = 0  # CPU threads; 0: $OMP_NUM_THREADS if set, else the idle cores (casa.pick_threads)
# -----------------------------------------------------------------------------
SETTINGS = list(configurator.settings(globals()))
MODEL_KEYS = ["variant", "n_layer", "n_head", "n_embd", "block_size", "image_size", "patch_size",
              "n_vis_layer", "n_vis_head", "n_vis_embd", "stem_norm", "pos_std", "stem_he_init", "dropout", "init_std", "ca_every", "compress_queries"]
RANGES = {  # of every number setting, checked in one place (below); [ ] includes the bound, ( ) does not
    "n_layer n_head n_vis_layer n_vis_head": "[1, 1024]",
    "n_embd n_vis_embd": "[1, 65536]",
    "block_size": "[0, 1048576]",
    "image_size patch_size": "[0, 1024]",
    "batch_size grad_accum eval_batch_size vision_pretrain_batch questions_per_image": "[1, 65536]",
    "eval_interval log_interval": "[1, inf)",
    "max_iters min_iters warmup_iters lr_decay_iters eval_items num_show": "[0, inf)",
    "vision_pretrain_iters": "[-1, inf)",
    "seed": f"[0, {2**32 - 1024}]",  # numpy's seeds (seed + rank) are 32-bit
    "learning_rate muon_lr vision_pretrain_lr lr_new lr_pretrained": "(0, inf)",
    "epochs weight_decay grad_clip init_std pos_std": "[0, inf)",
    "augment_shift": "[0, 0.5]",
    "dropout beta1 beta2": "[0, 1)",
    "min_lr_frac": "[0, 1]",
    "threads": "[0, 1024]",
    "ca_every": "[1, 1024]",
    "compress_queries": "[0, 16384]",
}

t_start = time.time()  # wall time of the whole run, reported at the end
cli = configurator.parse(sys.argv[1:], {k: globals()[k] for k in SETTINGS}, __doc__)

# -----------------------------------------------------------------------------
# processes: torchrun sets RANK; the process group starts once the device is known (below)
ddp = int(os.environ.get("RANK", -1)) != -1
rank, local_rank, world_size = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE")) if ddp else (0, 0, 1)
master = rank == 0
log = print if master else (lambda *a, **k: None)


def fail(msg):
    """A clear error and exit (every process hits the same check)."""
    if master:
        print(f"error: {msg}", file=sys.stderr)
    if dist.is_initialized():
        dist.destroy_process_group()
    sys.exit(1)


def stop_now(signum, frame):
    """Ctrl-C (SIGINT) or SIGTERM (a timeout, SLURM, docker stop) outside the training loop: stop at
    once, with the conventional exit code 128 + the signal (130, 143). The loop has its own (below)."""
    log(f"\n{signal.Signals(signum).name}: stopped", file=sys.stderr)
    sys.exit(128 + signum)


signal.signal(signal.SIGINT, stop_now)
signal.signal(signal.SIGTERM, stop_now)


def read_checkpoint(path, what):
    """casa.load_checkpoint (read, check, rebuild the model), any problem one clear error."""
    try:
        return casa.load_checkpoint(path)
    except (OSError, ValueError, RuntimeError) as e:  # RuntimeError: weights that do not fit the model
        msg = str(e) if path in str(e) else f"{path}: {e}"
        fail(f"{what}: {msg if len(msg) < 400 else msg[:400] + ' ...'}")


def fitted_patch(image_size):
    """patch_size 0: 8 px patches from 32 to 64 px (16 image tokens per image at 32 px, 36 at 48, 64 at
    64), so that a token can tell apart objects a few pixels across (with 16 px patches at 64 px,
    scenes ended at 0.874 and its binding questions far lower for insertion: docs/recipe.md); above 64 px
    the patch grows with the image, at most 64 tokens; below 32 px a quarter of the side. Always a
    power of 2: the vision stem halves the image log2(patch_size) times."""
    if image_size < 32:
        return max(2, 2 ** int(math.log2(max(1, image_size // 4))))
    return max(8, 2 ** math.ceil(math.log2(image_size / 8)))


# -----------------------------------------------------------------------------
# where the run starts, and so its settings:
#   resume     out_dir/ckpt.pt: its model, optimizer, step, RNG states and settings (the command line
#              on top of them, except the model's sizes, which cannot change; block_size may grow)
#   init_from  adaptation: another checkpoint's sizes and weights, this run's variant
#   else       a fresh model from the settings
asked = {**{k: globals()[k] for k in SETTINGS}, **cli}  # the defaults with the command line on top
ckpt_path = os.path.join(asked["out_dir"], "ckpt.pt")
model = ckpt = src = None
saved = {}  # resume: the checkpoint's settings
saved_errors = None  # resume: focus_errors' running error rate of each question kind
pretrained = set()  # names of parameters copied from a checkpoint (they get lr_pretrained)
if asked["resume"] and asked["overwrite"]:
    fail("--resume=True continues the run in out_dir, --overwrite=True replaces it: choose one")
if asked["resume"]:
    if not os.path.exists(ckpt_path):
        fail(f"--resume=True but there is no checkpoint at {ckpt_path}")
    model, ckpt = read_checkpoint(ckpt_path, "cannot resume")
    if "optimizer" not in ckpt or not isinstance(ckpt.get("train_args"), dict):
        fail(f"{ckpt_path} is not a train.py checkpoint (no optimizer state or settings); "
             "to start from its weights use --init_from instead of --resume")
    config = model.config
    clash = [f"{k}={getattr(config, k)!r} (this run asks for {v!r})" for k, v in cli.items()
             if k in MODEL_KEYS and k != "block_size" and getattr(config, k) != v]  # no weight depends on block_size
    if clash:
        fail(f"cannot resume {ckpt_path}: it was trained with {', '.join(clash)}. A checkpoint resumes only "
             "with the model it was made with: drop those settings, or start a fresh run in another --out_dir")
    saved = {k: v for k, v in ckpt["train_args"].items()
             if k in SETTINGS and k not in ("resume", "overwrite", "out_dir", "device", "compile", "threads")}
    saved.setdefault("balance_kinds", False)  # a checkpoint from before the setting drew plainly
    saved.setdefault("focus_errors", False)  # and every kind equally
    saved.setdefault("focus_hardest", False)  # by 0.1 + each kind's error rate when it did
    saved.setdefault("questions_per_image", 1)  # one question per picture drawn
    saved.setdefault("augment_shift", 0.0)  # images as they are
    saved.setdefault("stem_norm", False)  # and had no stem norm
    saved.setdefault("pos_std", 0.0)  # and zero position embeddings at init
    saved.setdefault("stem_he_init", False)  # and PyTorch's default init for the stem's convs
    saved.setdefault("optimizer", "adamw")  # and trained with AdamW alone
    if cli.get("optimizer", saved["optimizer"]) != saved["optimizer"]:  # its state is the other optimizer's
        fail(f"cannot resume {ckpt_path} with --optimizer={cli['optimizer']}: it was trained with "
             f"--optimizer={saved['optimizer']}; drop the setting, or start a fresh run in another --out_dir")
    pretrained = set(ckpt.get("pretrained", []))
elif asked["init_from"]:
    _, src = read_checkpoint(asked["init_from"], "--init_from")
    sizes = casa.checkpoint_config(src["config"])
    clash = [f"{k}={sizes.get(k)!r} (asked {v!r})" for k, v in cli.items()
             if k in MODEL_KEYS and k not in ("variant", "block_size", "dropout", "init_std", "pos_std", "stem_he_init", "ca_every", "compress_queries")
             and sizes.get(k) != v]
    if clash:
        fail(f"--init_from: {asked['init_from']} has {', '.join(clash)}; the model sizes come from the checkpoint")
    try:
        config = casa.Config(**dict(sizes, variant=asked["variant"], dropout=asked["dropout"], init_std=asked["init_std"],
                                    ca_every=asked["ca_every"], compress_queries=asked["compress_queries"],
                                    block_size=max(asked["block_size"], sizes["block_size"])))
    except ValueError as e:
        fail(f"--init_from: {e}")
globals().update({**saved, **cli})  # the one place settings are applied: defaults < checkpoint's < command line
fresh = not resume and not init_from

# -----------------------------------------------------------------------------
# the settings, checked in one place before any data is read or file written
configurator.check_ranges({k: globals()[k] for k in SETTINGS}, RANGES)
if optimizer not in ("muon", "adamw"):
    fail(f"--optimizer={optimizer} is not one of muon, adamw")
if fresh:  # the model's sizes fit together (casa.Config's checks); image_size 0 stands for 64 until the data is read
    try:
        sizes = {k: globals()[k] for k in MODEL_KEYS if k not in ("block_size", "image_size", "patch_size")}
        config = casa.Config(**sizes, block_size=block_size or 256, image_size=image_size or 64,
                             patch_size=patch_size or fitted_patch(image_size or 64))
    except ValueError as e:  # an unknown variant, sizes that do not divide
        fail(e)
if not out_dir:
    fail("--out_dir is empty: name a folder for the checkpoint and the log")
try:
    device = casa.pick_device(device)
except ValueError as e:
    fail(e)


# -----------------------------------------------------------------------------
# out_dir: one run at a time, and never a run lost to a fresh one by mistake. Only the first
# process writes there.
def lock_out_dir(folder):
    """An exclusive lock on folder/train.lock, held while this process lives: the system drops it when
    the process ends, however it ends (kill -9 too), so a killed run leaves no stale lock. The file
    holds the holder's pid, for the message. Returns the open file (None where there is no lock)."""
    os.makedirs(folder, exist_ok=True)
    f = open(os.path.join(folder, "train.lock"), "a+")
    if fcntl is None:
        return None
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        fail(f"another train.py (pid {f.read().strip() or '?'}) is running in {folder}: wait for it to end "
             f"(or stop it), or choose another --out_dir")
    except OSError as e:  # a file system without locks
        log(f"warning: cannot lock {f.name} ({e.strerror}): make sure no other run writes to {folder}")
        return None
    f.truncate(0)
    f.write(f"{os.getpid()}\n")
    f.flush()
    return f


def describe_checkpoint(path):
    """'step 800, saved 2025-05-01 14:02' for the message that keeps a run from being overwritten."""
    try:  # mmap: the step without reading the weights
        step = torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("step", "?")
    except Exception:  # damaged, or not a torch file: still not ours to replace without being asked
        step = "?"
    return f"step {step}, saved {time.strftime('%Y-%m-%d %H:%M', time.localtime(os.path.getmtime(path)))}"


log_path = os.path.join(out_dir, "log.jsonl")
if master:
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        fail(f"--out_dir={out_dir} is a file, not a folder: choose another --out_dir")
    try:
        lock = lock_out_dir(out_dir)
    except OSError as e:
        fail(f"cannot write to --out_dir={out_dir}: {e.strerror or e}")
    if not resume and os.path.exists(ckpt_path) and not overwrite:
        fail(f"{ckpt_path} already holds a run ({describe_checkpoint(ckpt_path)}): continue it with --resume=True, "
             f"replace it with --overwrite=True, or choose another --out_dir")
    if lock:  # no other run writes here: a temporary file left is from a save that was killed
        for orphan in glob.glob(glob.escape(ckpt_path) + ".tmp*"):
            os.remove(orphan)

# -----------------------------------------------------------------------------
# threads, devices, the process group, seeds
# CPU threads beyond the idle cores wait on each other: on 2 cores beside a busy job, 2 threads run
# many times slower than 1
n_threads, why = casa.pick_threads(threads)
omp = os.environ.get("OMP_NUM_THREADS", "")
if not threads and omp.isdigit() and int(omp) > 0:  # a launcher's choice (experiments/runs.py, torchrun's 1)
    n_threads, why = int(omp), "OMP_NUM_THREADS"
elif ddp and not threads:  # the idle cores shared among this machine's processes
    share = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    n_threads, why = max(1, n_threads // share), f"{why}, {share} processes"
torch.set_num_threads(n_threads)
log(f"threads: {n_threads}{' per process' if ddp else ''} ({why}{'' if threads else '; --threads=N to set'})")
device_type = "cuda" if device.startswith("cuda") else device.split(":")[0]
if ddp:
    if device_type == "cuda":
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
if compile is None:
    compile = device_type == "cuda"
args = {k: globals()[k] for k in SETTINGS}  # the settings of this run, saved in checkpoints

random.seed(seed + rank)
np.random.seed(seed + rank)
torch.manual_seed(seed)  # the same initial weights in every process
data_rng = torch.Generator().manual_seed(seed + rank)  # each process draws its own batches


def rng_state():
    """This process's RNG states, saved in checkpoints (one per process)."""
    np_state = np.random.get_state()
    return {"python": [(s := random.getstate())[0], list(s[1]), s[2]],
            "numpy": [np_state[1].tolist(), *np_state[2:]],
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if device_type == "cuda" else None,
            "data": data_rng.get_state()}


def set_rng_state(states):
    """Resume: back to the RNG states rng_state() saved, so the run draws what it would have drawn."""
    if len(states) != world_size:
        log(f"warning: checkpoint made with {len(states)} processes, now {world_size}: batches will differ")
    st = states[rank % len(states)]
    random.setstate((st["python"][0], tuple(st["python"][1]), st["python"][2]))
    np.random.set_state(("MT19937", np.array(st["numpy"][0], dtype=np.uint32), *st["numpy"][1:]))
    torch.set_rng_state(st["torch"])
    if device_type == "cuda" and st.get("cuda") is not None:
        torch.cuda.set_rng_state(st["cuda"])
    data_rng.set_state(st["data"])


dtype = torch.bfloat16 if device_type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
autocast = torch.autocast(device_type, dtype=dtype) if dtype == torch.bfloat16 else nullcontext()
if device_type == "cuda":
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True

# -----------------------------------------------------------------------------
# data, its images decoded at the model's size
t0 = time.time()
try:
    if master:  # one process prepares a missing built-in dataset, the others wait
        data_dir = resolve_dataset(dataset)
    if ddp:
        dist.barrier()
    data_dir = resolve_dataset(dataset, prepare=False)
    if fresh:  # a fresh model, its image size fitted to the images unless set
        side = typical_image_side(data_dir) or 32
        image_size = image_size or min(64, max(32, side // 16 * 16))
        patch_size = patch_size or fitted_patch(image_size)
        log(f"images: {side} px -> image_size {image_size}, patch_size {patch_size}: {(image_size // patch_size) ** 2} "
            f"tokens per image{' (--image_size / --patch_size to change)' if 'image_size' not in cli else ''}")
        args.update(image_size=image_size, patch_size=patch_size)
        config = dataclasses.replace(config, image_size=image_size, patch_size=patch_size)  # ValueError: do not divide
    train_data = Dataset(data_dir, "train", config.image_size, blind=blind)
    val_data = Dataset(data_dir, "val", config.image_size, blind=blind)
except (OSError, ValueError) as e:  # DataError is a ValueError: it names the file and line
    fail(e)
tokenizer = train_data.tokenizer
several_images = any(len(s.images) > 1 for s in train_data.samples)  # frames of a clip move together
shift_px = round(augment_shift * config.image_size)  # the augmentation's largest move, in pixels
log(f"dataset {data_dir}: {len(train_data)} train / {len(val_data)} val samples, tasks: "
    f"{', '.join(t or '-' for t in val_data.tasks)}{' (BLIND: images blanked)' if blind else ''} "
    f"[{time.time() - t0:.1f}s]")
if max_iters == 0:  # the budget follows the data: passes over the training samples
    per_step = batch_size * grad_accum * world_size
    max_iters = args["max_iters"] = max(min_iters, math.ceil(epochs * len(train_data) / per_step))
    log(f"budget: {max_iters} steps of {per_step} samples = {max_iters * per_step / len(train_data):.1f} passes over "
        f"the training set (--epochs={epochs:g}, at least --min_iters={min_iters}; --max_iters to set it)")
if questions_per_image > 1 and train_data.most_per_image > 1:
    log(f"batches: up to {questions_per_image} questions about each picture drawn ({train_data.per_image:.1f} a picture in "
        f"the data), the picture encoded once for all of them (--questions_per_image=1: one question a picture)"
        f"{'; question kinds balanced (--balance_kinds=False: as the data has them)' if balance_kinds else ''}")
if balance_kinds and focus_errors and focus_hardest:
    log("question kinds: drawn by how far each is from learned on recent training batches (its error rate against "
        "its answer prior's), the furthest most (--focus_hardest=False: 0.1 + its error rate; --focus_errors=False: all alike)")
elif balance_kinds and focus_errors:
    log("question kinds: drawn by how often the model gets each wrong (0.1 + its error rate on recent training "
        "batches; --focus_errors=False: all alike)")
if shift_px and not blind:
    log(f"augmentation: training images move by up to {shift_px} px each way (--augment_shift={augment_shift:g} of "
        f"their side; 0: off)")
if vision_pretrain_iters < 0:  # stage 1 follows the budget
    vision_pretrain_iters = args["vision_pretrain_iters"] = 0 if init_from or blind else max(min_iters // 3, max_iters // 5)
    if vision_pretrain_iters:
        log(f"stage 1: {vision_pretrain_iters} steps of label-free vision pretraining (the encoder learns to redraw "
            f"the images), then the VLM (--vision_pretrain_iters=N to set it, 0: off)")

# -----------------------------------------------------------------------------
# model: a resumed one is already loaded; a fresh or adapted one is built here. The longest text a
# forward takes: --block_size, or 0: at least the data's longest sample (no weight depends on it, so
# a resumed model's may grow too)
if block_size == 0:
    need = max(train_data.max_len(), val_data.max_len())
    config.block_size = max(config.block_size, 64 * math.ceil(need / 64))
elif resume:
    config.block_size = block_size
try:
    train_data.check_block_size(config.block_size)
    val_data.check_block_size(config.block_size)
except ValueError as e:
    fail(e)
try:
    if init_from and not resume:
        model = casa.VLM(config)
        pretrained = model.copy_weights_from(src["model"])  # CA layers start from the SA weights (the paper)
        new = [n for n, _ in model.named_parameters() if n not in pretrained]
        log(f"init_from {init_from} ({src['config']['variant']} -> {config.variant}): {len(pretrained)} tensors "
            f"copied, {len(new)} new ({', '.join(sorted({n.split('.', 2)[-1] for n in new})) or 'none'})")
        src = None  # free memory
    elif model is None:
        model = casa.VLM(config)
except (RuntimeError, MemoryError) as e:  # torch's "can't allocate memory" is a RuntimeError
    fail(f"cannot build the model ({str(e).strip().splitlines()[-1][:200]}): choose smaller --n_embd, --n_layer")


def frozen_names(spec, model):
    """--freeze groups -> the parameter names to freeze."""
    names = [n for n, _ in model.named_parameters()]
    n_vis = model.config.n_vis_layer
    out = set()
    for group in filter(None, (g.strip() for g in spec.split(","))):
        if group == "vision":
            out |= {n for n in names if n.startswith("vision.")}
        elif group.startswith("vision_but_last"):
            keep = group[len("vision_but_last"):] or "1"
            if not keep.isdigit():
                fail(f"--freeze: {group!r}: write vision_but_last or vision_but_lastN (N blocks left trainable)")
            trainable = {f"vision.blocks.{i}." for i in range(max(0, n_vis - int(keep)), n_vis)}
            trainable |= {"vision.ln_f.", "vision.proj.", "vision.ln_out."}  # the head after the last block
            out |= {n for n in names if n.startswith("vision.") and not n.startswith(tuple(trainable))}
        elif group == "text":
            out |= {n for n in names if not n.startswith("vision.") and not casa.is_fusion_param(n)}
        elif group == "pretrained":
            out |= pretrained
        else:
            fail(f"--freeze: unknown group {group!r}; use vision, vision_but_last[N], text, pretrained")
    return out


frozen = frozen_names(freeze, model)
for name, p in model.named_parameters():
    p.requires_grad_(name not in frozen)
trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
if not trainable:
    fail(f"--freeze={freeze} leaves nothing to train")
model.to(device)

# optimizers: Muon for the weight matrices of linear layers (attention, MLPs, fusion, in both towers),
# AdamW for the rest (the tied embedding and head, convolutions, position embeddings, norms); weight
# decay on AdamW's matrices only (Muon was measured without it); with init_from, new and pretrained
# parameters at their own lr. Muon orthogonalises each matrix's update: every direction of the matrix
# moves at one rate, not only the few a gradient favours; the text side learns to pick an object by
# its words in about half the steps (docs/recipe.md).
matrices = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)} - {id(model.lm_head.weight)}
groups = {}
for name, p in trainable:
    is_old = name in pretrained
    kind = "muon" if optimizer == "muon" and id(p) in matrices else "decay" if p.dim() >= 2 else "no_decay"
    base = (lr_pretrained if is_old else lr_new) if init_from else muon_lr if kind == "muon" else learning_rate
    groups.setdefault((kind, is_old), dict(params=[], weight_decay=weight_decay if kind == "decay" else 0.0,
                                           base_lr=base))["params"].append(p)
adamw_groups = [g for k, g in sorted(groups.items()) if k[0] != "muon"]
muon_groups = [g for k, g in sorted(groups.items()) if k[0] == "muon"]
groups = adamw_groups + muon_groups  # in the order of the optimizers' param_groups below
adamw = torch.optim.AdamW(adamw_groups, lr=learning_rate, betas=(beta1, beta2),
                          fused=True if device_type == "cuda" else None) if adamw_groups else None
muon = casa.Muon(muon_groups, lr=muon_lr) if muon_groups else None
optimizers = [o for o in (adamw, muon) if o is not None]

# -----------------------------------------------------------------------------
# resume: the model's weights and settings came with the checkpoint (above); here the rest of where it
# stopped: optimizer, step, RNG states, seconds so far, and the log cut back to the checkpoint's step
# (what the interrupted run logged after it would be logged twice). A fresh run starts a fresh log:
# here, once the data is read and the model built, so a run that fails before never touches the old one.


def read_log(path):
    """The records of a log.jsonl. A last line cut short (a run killed while writing it) is dropped with
    a warning; a bad line elsewhere is an error that names it."""
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = f.read().splitlines()
    records = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            r = None
        if isinstance(r, dict) and "step" in r:
            records.append(r)
        elif i == len(lines):
            log(f"warning: {path}:{i}: dropped a last line cut short (a run killed while writing it)")
        else:
            fail(f"{path}:{i}: not a log record; delete that line (or the file) and resume again")
    return records


step, trained_s, walled_s = 0, 0.0, 0.0  # walled_s: wall seconds of the parts before a resume
if resume:
    if adamw:
        adamw.load_state_dict(ckpt["optimizer"])
    if muon:
        muon.load_state_dict(ckpt["muon"])
    for g, g0 in zip([g for o in optimizers for g in o.param_groups], groups):  # the lrs of this run's settings
        g["base_lr"] = g0["base_lr"]
    step, trained_s = ckpt["step"], ckpt.get("train_s", 0.0)
    walled_s = ckpt.get("wall_s", 0.0)
    saved_errors = ckpt.get("kind_errors")  # focus_errors' running rates, None before it
    set_rng_state(ckpt["rng"])
    if master:
        records = read_log(log_path) if os.path.exists(log_path) else []
        kept = [r for r in records if r.get("stage") == "vision" or r["step"] <= step]
        try:
            with open(log_path + ".tmp", "w") as f:  # then a rename: an interruption here loses nothing
                f.writelines(json.dumps(r) + "\n" for r in kept)
            os.replace(log_path + ".tmp", log_path)
        except OSError as e:
            fail(f"cannot write {log_path}: {e.strerror or e}")
    log(f"resumed {ckpt_path} at step {step}")
    ckpt = None  # free memory
elif master:  # a fresh run (over an earlier one only with --overwrite=True): a fresh log, no old checkpoint
    try:
        open(log_path, "w").close()
        if os.path.exists(ckpt_path):  # a resume must not pair the old run's checkpoint with this run's log
            os.remove(ckpt_path)
    except OSError as e:
        fail(f"cannot write {log_path}: {e.strerror or e}")

n_params = casa.param_counts(model)
log(f"model {config.variant}: {n_params['total'] / 1e6:.2f}M parameters (vision {n_params['vision'] / 1e6:.2f}M, "
    f"fusion {n_params['fusion'] / 1e6:.2f}M, text {n_params['text'] / 1e6:.2f}M), "
    f"{sum(p.numel() for _, p in trainable) / 1e6:.2f}M trainable; {config.n_image_tokens} image tokens per image"
    f"{f' ({config.tokens_per_image} tokens enter the text: compressed)' if config.compress_queries else ''}"
    f"{f'; CA in one block of every {config.ca_every}' if config.ca_every > 1 else ''}; block_size {config.block_size}")

raw_model = model
if compile:
    log("compiling the model (torch.compile)...")
    model = torch.compile(model)
if ddp:
    unused = any(not s.images for s in train_data.samples)  # CA layers idle in an image-free batch
    model = DDP(model, device_ids=[local_rank] if device_type == "cuda" else None, find_unused_parameters=unused)


# -----------------------------------------------------------------------------
# helpers: lr schedule, speed, evaluation, checkpoints


def get_lr(it):
    """Linear warm-up, then cosine decay to min_lr_frac; a fraction of each group's base lr."""
    if it < warmup_iters:
        return (it + 1) / (warmup_iters + 1)
    decay_end = lr_decay_iters or max_iters
    if it >= decay_end:
        return min_lr_frac
    ratio = (it - warmup_iters) / max(1, decay_end - warmup_iters)
    return min_lr_frac + 0.5 * (1 + math.cos(math.pi * ratio)) * (1 - min_lr_frac)


def sync():
    if device_type == "cuda":
        torch.cuda.synchronize()
    elif device_type == "mps":
        torch.mps.synchronize()


def measure_peak_flops():
    """FLOP/s of a large matmul on this machine, in the training dtype: the MFU denominator."""
    n = 4096 if device_type == "cuda" else 1024
    gen = torch.Generator(device=device).manual_seed(0)  # not the global RNG: resuming must not shift it
    a = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    for _ in range(2):
        a @ b
    sync()
    reps, t = 0, time.time()
    while reps < 3 or time.time() - t < 0.3:
        a @ b
        reps += 1
    sync()
    return 2 * n**3 * reps / (time.time() - t)


def evaluate(limit=None):
    """What the model has learned, on the first `limit` validation samples (all when None) and as many
    training samples: answer-token loss and exact-match accuracy (score() in data/loader.py: the answers
    greedy decoding gets right), per task and per question kind, and the image-use check: validation
    accuracy with every image swapped for another one of its batch. A model that reads its images
    loses accuracy when they are shuffled; one that answers from the question alone (the blind
    plateau) does not."""
    raw_model.eval()
    common = dict(batch_size=eval_batch_size, limit=limit, device=device, autocast=autocast)
    val_loss, right = score(raw_model, val_data, **common)
    _, right_shuffled = score(raw_model, val_data, shuffle=True, **common)
    # as many training samples as validation ones: a gap between the two is overfitting
    train_loss, right_train = score(raw_model, train_data, **dict(common, limit=limit or len(val_data)))
    raw_model.train()

    def accuracy(right, group=None):  # group: answer (sample, turn) -> its group; None: all
        groups = {}
        for (i, t), ok in right.items():
            groups.setdefault(group(i, t) if group else "all", []).append(ok)
        acc = {g: sum(oks) / len(oks) for g, oks in sorted(groups.items())}
        return acc if group else acc.get("all", 0.0)

    m = {"val_loss": val_loss, "train_loss": train_loss, "accuracy": accuracy(right),
         "train_accuracy": accuracy(right_train), "shuffled_accuracy": accuracy(right_shuffled),
         "n_answers": len(right), "accuracy_by_kind": accuracy(right, lambda i, t: val_data.turn_kinds[i][t])}
    if len(val_data.tasks) > 1:
        m["accuracy_by_task"] = accuracy(right, lambda i, t: val_data.samples[i].task)
    return m


@torch.no_grad()
def show_samples(n):
    """Print about n validation answers, generated greedily (as sample.py does), spread over the
    question kinds."""
    by_kind = {}
    for it in val_data.eval_items():
        by_kind.setdefault(val_data.turn_kinds[it["sample"]][it["turn"]], []).append(it)
    per_kind = max(1, n // len(by_kind))
    items = [it for its in by_kind.values() for it in its[:per_kind]][:max(n, len(by_kind))]
    raw_model.eval()
    print("validation samples:")
    for idx, images, chunk in eval_batches(items, eval_batch_size):
        with autocast:
            preds = answer(raw_model, idx.to(device), None if images is None else images.to(device), tokenizer,
                           val_data.max_answer_len() + 4)
        for it, pred in zip(chunk, preds):
            ok = "ok " if pred.strip() == it["truth"].strip() else "BAD"
            prompt = it["prompt"].replace(casa.IMAGE, "<img>")
            print(f"  [{ok}] {it['task'] + ': ' if it['task'] else ''}{prompt!r} truth={it['truth']!r} pred={pred!r}")
    raw_model.train()


def write_log(record):
    if master:
        try:
            with open(log_path, "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as e:  # a full disk
            fail(f"cannot write {log_path}: {e.strerror or e}")


def still_climbing(final_accuracy, step, margin=0.02):
    """A warning when validation accuracy rose by more than `margin` over the end of the run (from the
    last periodic evaluation in log.jsonl between 3/5 and 4/5 of the steps to the final one), or None:
    the run stopped before it finished learning. Without an evaluation there, no claim is made."""
    evals = [r for r in read_log(log_path) if "accuracy" in r and not r.get("final")]
    earlier = [r for r in evals if 0.6 * step <= r["step"] <= 0.8 * step]
    if not earlier or final_accuracy - earlier[-1]["accuracy"] <= margin:
        return None
    r = earlier[-1]
    return (f"note: validation accuracy was still climbing ({r['accuracy']:.3f} at step {r['step']}, "
            f"{final_accuracy:.3f} at {step}): a longer run will likely do better, e.g. --epochs={2 * epochs:g} "
            f"or --max_iters={2 * step} in a new --out_dir")


def save(step, train_s):
    """Checkpoint (atomic): model, optimizer, step, the RNG states of every process, settings, and
    the seconds of training and of wall time so far (a resumed run's train_s and wall_s go on from there)."""
    states = [rng_state()]
    if ddp:
        states = [None] * world_size
        dist.all_gather_object(states, rng_state())
        states = [{k: v.cpu() if torch.is_tensor(v) else v for k, v in s.items()} for s in states]
    if master:
        try:  # a failed save leaves the last checkpoint as it was, and no partial file
            casa.save_checkpoint(ckpt_path, raw_model, optimizer=adamw.state_dict() if adamw else {},
                                 muon=muon.state_dict() if muon else {}, step=step, rng=states,
                                 train_s=train_s, wall_s=walled_s + time.time() - t_start, train_args=args,
                                 kind_errors=kind_errors.rates.tolist(),
                                 pretrained=sorted(pretrained), dataset_dir=data_dir)
        except OSError as e:  # a full disk says so (casa.save_checkpoint)
            fail(f"checkpoint of step {step} not saved: {e.strerror or e}")


def format_metrics(m):
    s = (f"val_loss={m['val_loss']:.4f} accuracy={m['accuracy']:.4f} (train {m['train_accuracy']:.3f}, "
         f"images shuffled {m['shuffled_accuracy']:.3f})")
    if len(m["accuracy_by_kind"]) > 1:
        s += " | " + ", ".join(f"{k}: {a:.3f}" for k, a in m["accuracy_by_kind"].items())
    return s


class ImageDecoder(nn.Module):
    """Redraws images from the encoder's tokens: one bidirectional block over the tokens, then an MLP
    that turns each token into the pixels of its patch. Not part of the VLM: train.py's stage 1
    (vision_pretrain_iters) trains the encoder through it, label-free, as a stand-in for the
    pretrained encoder the paper starts from. A training aid, so it lives here, not in casa.py."""

    def __init__(self, config):
        super().__init__()
        self.grid, self.patch = config.image_size // config.patch_size, config.patch_size
        C = config.n_embd
        self.block = casa.VisionBlock(C, config.n_head)
        self.to_pixels = nn.Sequential(nn.Linear(C, 4 * C), nn.GELU(), nn.Linear(4 * C, 3 * config.patch_size**2))

    def forward(self, tokens):  # (M, N, n_embd) -> (M, 3, S, S), on the encoder's input scale [-1, 1]
        M, g, p = tokens.size(0), self.grid, self.patch
        x = self.to_pixels(self.block(tokens))  # (M, N, p*p*3): token r*g + c is patch (r, c)
        return x.view(M, g, g, p, p, 3).permute(0, 5, 1, 3, 2, 4).reshape(M, 3, g * p, g * p)


def pretrain_vision(iters):
    """Stage 1: label-free pretraining of the vision encoder on this dataset's training images. The
    paper's models start from a pretrained encoder; here the encoder learns, for `iters` steps, to
    let a small decoder (ImageDecoder, above) redraw each image from its tokens, so its tokens hold
    where each thing is, its colour and outline before the language model asks about them. The
    decoder is thrown away afterwards; stage 2 (the VLM) starts from the encoder as it is."""
    decoder = ImageDecoder(config).to(device)
    images = train_data.all_images()  # (K, 3, S, S) uint8, each training image once
    if not len(images):
        log("vision pretraining skipped: the training split has no images")
        return
    params = [p for p in raw_model.vision.parameters() if p.requires_grad] + list(decoder.parameters())
    opt = torch.optim.AdamW(params, lr=vision_pretrain_lr, betas=(beta1, beta2), weight_decay=0.0)
    t0 = time.time()
    for it in range(iters):
        for g in opt.param_groups:  # linear warm-up, then constant
            g["lr"] = vision_pretrain_lr * min(1.0, (it + 1) / min(50, iters))
        pick = torch.randint(len(images), (vision_pretrain_batch,), generator=data_rng)
        x = shift_images(images[pick].float() / 255, shift_px, data_rng).to(device)
        with autocast:
            redrawn = decoder(raw_model.vision(x))  # (M, 3, S, S) in the encoder's input scale, [-1, 1]
        loss = F.mse_loss(redrawn.float(), x * 2 - 1)
        loss.backward()
        if ddp:  # every process pretrains the same encoder: average the gradients by hand
            for p in params:
                dist.all_reduce(p.grad)
                p.grad /= world_size
        opt.step()
        opt.zero_grad(set_to_none=True)
        if (it + 1) % (10 * log_interval) == 0 or it + 1 == iters:
            log(f"vision pretraining {it + 1}/{iters}: reconstruction mse {loss.item():.4f} ({time.time() - t0:.0f} s)")
            write_log({"stage": "vision", "step": it + 1, "mse": loss.item(), "train_s": round(time.time() - t0, 2)})


# -----------------------------------------------------------------------------
# training loop
# train_s in the log: seconds of training so far (stage 1 and the time before a resume included),
# evaluations left out
t_loop, eval_s = time.time() - trained_s, 0.0
if vision_pretrain_iters and not resume and not init_from and not blind:  # a fresh run (a blind one has no images)
    pretrain_vision(vision_pretrain_iters)
peak = measure_peak_flops() if master else 0.0
# FLOPs per text token (forward, from casa; x3 for forward + backward), at this dataset's mean text
# tokens per image
per_image = sum(len(s.ids) / max(1, len(s.images)) for s in train_data.samples) / len(train_data)
flops_per_token = 3 * casa.flops_per_text_token(config, max(1, round(per_image)))["total"]
log(f"matmul peak on this machine: {peak / 1e9:.1f} GFLOP/s ({dtype}); {flops_per_token / 1e6:.2f} MFLOP per "
    f"trained text token; {world_size} process(es) x batch {batch_size} x {grad_accum} micro-steps; device {device}")

sample_weights = train_data.kind_weights() if balance_kinds else None
# focus_errors: each kind's running error rate on training batches (teacher-forced: a question counts
# as right when every answer token is the model's top guess) reweights the draw (data.loader.KindErrors)
kind_errors = KindErrors(train_data, saved_errors, hardest=focus_hardest)
equal_weights = sample_weights
if balance_kinds and focus_errors:
    sample_weights = kind_errors.weights(equal_weights)
stop_signal = 0  # the signal that asked the loop to stop


def stop_after_step(signum, frame):
    """In the training loop, Ctrl-C (SIGINT) or SIGTERM finishes the current step, writes a checkpoint
    and exits 128 + the signal; a second one stops at once (a save it cuts short leaves no file)."""
    global stop_signal
    if stop_signal:
        stop_now(signum, frame)
    stop_signal = signum
    log(f"\n{signal.Signals(signum).name}: stopping after this step, with a checkpoint (again: stop now)",
        file=sys.stderr)


signal.signal(signal.SIGINT, stop_after_step)
signal.signal(signal.SIGTERM, stop_after_step)

model.train()
bar = tqdm(total=max_iters, initial=step, disable=not master, dynamic_ncols=True, mininterval=1.0)
t_last, tokens_since = time.time(), 0
while step < max_iters:
    frac = get_lr(step)
    for g in [g for o in optimizers for g in o.param_groups]:
        g["lr"] = g["base_lr"] * frac
    loss_accum, tokens = 0.0, 0
    for micro in range(grad_accum):
        drawn = train_data.draw_groups(batch_size, data_rng, sample_weights, questions_per_image)
        idx, targets, images, image_index = train_data.batch_of_groups(drawn)
        tokens += text_tokens(targets)
        idx, targets = idx.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        if images is not None:  # moved a little (augment_shift), the frames of one clip alike
            images = shift_images(images, shift_px, data_rng, same=several_images).to(device, non_blocking=True)
        image_index = None if image_index is None else image_index.to(device, non_blocking=True)
        sync_ctx = model.no_sync() if ddp and micro < grad_accum - 1 else nullcontext()
        with sync_ctx, autocast:
            logits, loss = model(idx, images, targets, image_index=image_index)
            loss = loss / grad_accum
        if balance_kinds and focus_errors:
            right = ((logits.detach().argmax(-1) == targets) | (targets == -1)).all(1)  # (B,)
            kind_errors.record([r for group in drawn for r in group], right)
            sample_weights = kind_errors.weights(equal_weights)
        loss.backward()
        loss_accum += loss.item()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_([p for _, p in trainable], grad_clip)
    for o in optimizers:
        o.step()
        o.zero_grad(set_to_none=True)
    step += 1
    tokens_since += tokens * world_size
    bar.update(1)

    if step % log_interval == 0 or step == max_iters:
        sync()
        dt = time.time() - t_last
        tok_s = tokens_since / dt
        mfu = tok_s * flops_per_token / peak if peak else 0.0
        bar.set_postfix_str(f"loss {loss_accum:.4f} | {tok_s:,.0f} tok/s | mfu {100 * mfu:.2f}%")
        write_log({"step": step, "loss": loss_accum, "lr": frac * groups[0]["base_lr"], "tok_per_s": tok_s, "mfu": mfu})
        t_last, tokens_since = time.time(), 0
    if step % eval_interval == 0 and step < max_iters:
        t_eval = time.time()
        if master:
            m = evaluate(eval_items or None)
            bar.write(f"step {step}: train_loss={m['train_loss']:.4f} {format_metrics(m)}")
            draw = {"kind_share": kind_errors.shares()} if balance_kinds and focus_errors else {}
            write_log({"step": step, "train_s": round(t_eval - t_loop - eval_s, 2), **m, **draw})
        save(step, t_eval - t_loop - eval_s)
        t_last = time.time()  # evaluation time is not training time
        eval_s += t_last - t_eval
    if ddp:  # the signal may reach the processes steps apart: all stop at the same step
        flag = torch.tensor(stop_signal, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        stop_signal = int(flag)
    if stop_signal:
        break
bar.close()
t_final = time.time()

save(step, t_final - t_loop - eval_s)
signal.signal(signal.SIGINT, stop_now)  # the checkpoint is written: a signal now stops at once
signal.signal(signal.SIGTERM, stop_now)
if stop_signal:
    log(f"stopped at step {step}; checkpoint {ckpt_path} written. Continue with: python train.py --resume=True "
        f"--out_dir={out_dir}")
    if ddp:
        dist.destroy_process_group()
    sys.exit(128 + stop_signal)
if master:
    m = evaluate(None)
    if num_show:
        show_samples(num_show)
    line = f"final: {format_metrics(m)} ({m['n_answers']} answers, step {step})"
    print(line)
    write_log({"step": step, "final": True, "train_s": round(t_final - t_loop - eval_s, 2), **m, "summary": line,
               "wall_s": round(walled_s + time.time() - t_start, 1)})
    climbing = still_climbing(m["accuracy"], step)
    if climbing:
        print(climbing)
if ddp:
    dist.barrier()
    dist.destroy_process_group()
