"""
The experiments' pictures, drawn with Pillow: line charts (the streaming benchmark's records, learning
curves), heat maps (attention), mask panels (docs/masks.png) and the live-captioning strip
(experiments/live_compare.py). The scripts compute; this module only draws. The core scripts draw
nothing from here: sample.py --grid has its own small drawing, stream.py writes JSON.
"""

import math

from PIL import Image, ImageDraw, ImageFont

# one colour per model, the same in every picture
COLORS = {"ca": (31, 119, 180), "ca_shared": (44, 160, 44), "ca_tv": (148, 103, 189),
          "ca_replace": (140, 86, 75), "ca_ffn": (23, 190, 207), "ca_all": (255, 127, 14),
          "insertion": (214, 39, 40), "blind": (127, 127, 127), "text only": (0, 0, 0)}
TEXT_KEY, IMAGE_KEY, EMPTY, GRID = (66, 114, 196), (236, 132, 36), (246, 246, 246), (200, 200, 200)


def font(size=13):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


def nice_ticks(lo, hi, n=5):
    """About n round tick values covering [lo, hi]."""
    if hi <= lo:
        hi = lo + 1
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(s * mag for s in (1, 2, 2.5, 5, 10) if s * mag >= raw)
    start = math.floor(lo / step) * step
    return [start + i * step for i in range(int(math.ceil((hi - start) / step)) + 1)]


def row_of(panels, footer="", gap=10):
    """Panels (PIL images) side by side on one sheet, an optional line of text below (in Pillow's
    default font, as the panels' own labels)."""
    width = sum(p.width for p in panels) + gap * (len(panels) + 1)
    height = max(p.height for p in panels) + 2 * gap + (20 if footer else 0)
    sheet = Image.new("RGB", (width, height), "white")
    x = gap
    for p in panels:
        sheet.paste(p, (x, gap))
        x += p.width + gap
    if footer:
        ImageDraw.Draw(sheet).text((gap, height - 24), footer, fill="black")
    return sheet


def grid_of(panels, cols):
    """Panels in rows of `cols`, each in a cell the size of the largest panel, no gaps."""
    w, h = max(p.width for p in panels), max(p.height for p in panels)
    sheet = Image.new("RGB", (cols * w, -(-len(panels) // cols) * h), "white")
    for i, p in enumerate(panels):
        sheet.paste(p, ((i % cols) * w, (i // cols) * h))
    return sheet


def line_panels(records, path, panels, title="", x_key="turn", x_label="turn (one frame each)", line_key="variant",
                y_top=None, colors=None):
    """Side-by-side panels, one per (record key, axis label, scale); x_key on x, one line per
    value of line_key; saved to path (if given) and returned. The y axis stops a little above the 99th percentile (points above it are
    drawn at the top, and counted in the label), so rare spikes do not flatten everything else;
    y_top fixes it instead (1 for accuracies). colors: {line name: RGB} (default: COLORS)."""
    small, big = font(14), font(18)
    W, H, pad_l, pad_r, pad_t, pad_b = 700 * len(panels), 560, 90, 30, 70, 70
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    d.text((W // 2, 22), title, fill="black", font=big, anchor="mm")
    lines = list(dict.fromkeys(r[line_key] for r in records))
    panel_w = (W - len(panels) * (pad_l + pad_r)) // len(panels)
    for p, (key, label, scale) in enumerate(panels):
        x0 = pad_l + p * (panel_w + pad_l + pad_r)
        x1, y0, y1 = x0 + panel_w, pad_t, H - pad_b
        xs = [r[x_key] for r in records]
        values = sorted(r[key] * scale for r in records)
        top = y_top or min(values[-1], 1.3 * values[int(0.99 * (len(values) - 1))])
        tx, ty = nice_ticks(0, max(xs) + 1), nice_ticks(0, top if y_top else top * 1.05)
        n_clipped = sum(v > ty[-1] for v in values)
        if n_clipped:
            label += f"; {n_clipped} spikes above {ty[-1]:g} cut"
        X = lambda t: x0 + (x1 - x0) * t / tx[-1]  # noqa: E731
        Y = lambda v: y1 - (y1 - y0) * min(v, ty[-1]) / ty[-1]  # noqa: E731
        for t in tx:
            d.line([(X(t), y1), (X(t), y1 + 5)], fill="black")
            d.line([(X(t), y0), (X(t), y1)], fill=(235, 235, 235))
            d.text((X(t), y1 + 8), f"{t:g}", fill="black", font=small, anchor="mt")
        for v in ty:
            d.line([(x0 - 5, Y(v)), (x0, Y(v))], fill="black")
            d.line([(x0, Y(v)), (x1, Y(v))], fill=(235, 235, 235))
            d.text((x0 - 8, Y(v)), f"{v:g}", fill="black", font=small, anchor="rm")
        d.rectangle([x0, y0, x1, y1], outline="black")
        d.text(((x0 + x1) // 2, y1 + 32), x_label, fill="black", font=small, anchor="mt")
        d.text((x0, y0 - 10), label, fill="black", font=big, anchor="ls")
        for name in lines:
            color = (colors or COLORS).get(name, (0, 0, 0))
            pts = [(X(r[x_key]), Y(r[key] * scale)) for r in records if r[line_key] == name]
            if len(pts) > 1:
                d.line(pts, fill=color, width=2)
            elif pts:
                d.ellipse([pts[0][0] - 2, pts[0][1] - 2, pts[0][0] + 2, pts[0][1] + 2], fill=color)
        if p == 0:  # legend, top left of the first panel
            for i, name in enumerate(lines):
                ly = y0 + 14 + 20 * i
                d.line([(x0 + 12, ly), (x0 + 40, ly)], fill=(colors or COLORS).get(name, (0, 0, 0)), width=3)
                d.text((x0 + 46, ly), name, fill="black", font=small, anchor="lm")
    if path:
        img.save(path)
    return img


def accuracy_panels(curves, tasks, models, path, colors=COLORS):
    """Learning curves: one column of panels per task, accuracy (y) against training seconds (top
    row) and against steps (bottom row: seconds depend on the machine's day, steps do not), one line
    per run in its model's colour. curves: {(task, model): [run's [(step, seconds, accuracy, ...)], ...]},
    one run per seed; colors: {model: (r, g, b)}."""
    W, H, pad = 360, 240, 44
    rows = ((1, "training time (s)", "s"), (0, "steps", ""))  # (index of x in a curve's point, axis name, unit)
    key_w, key_h = 110, 18  # legend: one model's key; keys wrap into rows as wide as the panels
    panels_w = len(tasks) * (W + pad) + pad
    per_row = max(1, (panels_w - pad) // key_w)
    key_rows = -(-len(models) // per_row)
    legend_top = len(rows) * (H + 2 * pad) + 8
    im = Image.new("RGB", (panels_w, legend_top + key_rows * key_h + 12 + 10), "white")
    d = ImageDraw.Draw(im)
    for r, (xi, axis, unit) in enumerate(rows):
        for p, task in enumerate(tasks):
            x0, y0 = pad + p * (W + pad), pad + r * (H + 2 * pad)
            x_max = max((c[-1][xi] for (t, _), runs in curves.items() if t == task for c in runs if c), default=1) or 1
            d.rectangle((x0, y0, x0 + W, y0 + H), outline=(0, 0, 0))
            for a in (0.0, 0.25, 0.5, 0.75, 1.0):
                y = y0 + H - a * H
                d.line((x0, y, x0 + W, y), fill=(225, 225, 225))
                d.text((x0 - 30, y - 5), f"{a:.2f}", fill=(0, 0, 0))
            for v in nice_ticks(0, x_max, 4):
                if v <= x_max:
                    d.text((x0 + v / x_max * W - 8, y0 + H + 4), f"{v:g}{unit}", fill=(0, 0, 0))
            d.text((x0, y0 - 16), f"{task}: accuracy vs {axis}", fill=(0, 0, 0))
            for model in models:
                for run in curves.get((task, model), []):
                    pts = [(x0 + c[xi] / x_max * W, y0 + H - c[2] * H) for c in run]
                    if len(pts) > 1:
                        d.line([(x0, y0 + H)] + pts, fill=colors.get(model, (0, 0, 0)), width=2)
    for i, model in enumerate(models):  # legend
        x, y = pad + (i % per_row) * key_w, legend_top + (i // per_row) * key_h
        d.line((x, y, x + 20, y), fill=colors.get(model, (0, 0, 0)), width=3)
        d.text((x + 24, y - 6), model, fill=(0, 0, 0))
    if any(len(runs) > 1 for runs in curves.values()):
        d.text((pad, legend_top + key_rows * key_h - 6), "(one line per seed)", fill=(0, 0, 0))
    im.save(path)


def to_pil(image):
    """A (3, S, S) float tensor in [0, 1] -> a PIL image."""
    S = image.size(-1)
    data = (image.permute(1, 2, 0) * 255).round().byte().contiguous().numpy().tobytes()
    return Image.frombytes("RGB", (S, S), data)


def wrap_to_width(text, fnt, width, max_lines=None):
    """Greedy word wrap measured in pixels of `fnt` (a character count overflows a proportional
    font); a word wider than a line is cut where it must be, and text past max_lines ends in "..."."""
    if not text.strip():
        return []
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength
    lines, line = [], ""
    for word in text.split():
        candidate = f"{line} {word}" if line else word
        if measure(candidate, font=fnt) <= width:
            line = candidate
            continue
        if line:
            lines.append(line)
        line = ""
        for ch in word:  # start the word on a new line, cutting it where it overflows
            if line and measure(line + ch, font=fnt) > width:
                lines.append(line)
                line = ""
            line += ch
    lines.append(line)
    if max_lines and len(lines) > max_lines:
        last = lines[max_lines - 1]
        while last and measure(last + "...", font=fnt) > width:
            last = last[:-1]
        lines = lines[:max_lines - 1] + [last + "..."]
    return lines


def heat_panel(title, mass, cell=44):
    """Layers down, heads across: the share of attention on image keys in each cell (white 0, orange 1)."""
    L, H = mass.shape
    left, top = 64, 34
    footer = "share of text attention on image keys (0 white, 1 orange)"
    im = Image.new("RGB", (max(left + H * cell + 12, 12 + 6 * max(len(title), len(footer))), top + L * cell + 26), "white")
    d = ImageDraw.Draw(im)
    d.text((6, 6), title, fill="black")
    for h in range(H):
        d.text((left + h * cell + cell // 2 - 10, top - 14), f"head {h}", fill="black")
    for layer in range(L):
        d.text((6, top + layer * cell + cell // 2 - 6), f"layer {layer}", fill="black")
        for h in range(H):
            x = float(mass[layer, h])
            color = tuple(round(255 + (c - 255) * x) for c in (236, 100, 20))
            x0, y0 = left + h * cell, top + layer * cell
            d.rectangle([x0, y0, x0 + cell - 2, y0 + cell - 2], fill=color, outline=(200, 200, 200))
            d.text((x0 + 8, y0 + cell // 2 - 6), f"{x:.2f}", fill="black" if x < 0.6 else "white")
    d.text((6, top + L * cell + 6), footer, fill=(90, 90, 90))
    return im


def mask_panel(title, mask, key_is_image, q_labels, k_labels, cell=14):
    """An attention mask: queries down, keys across; a filled cell may attend (blue text key,
    orange image key)."""
    Tq, Tk = mask.shape
    left, top = 28, 40
    title_width = int(ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(title)) + 8
    im = Image.new("RGB", (max(left + Tk * cell + 10, title_width), top + Tq * cell + 10), "white")
    d = ImageDraw.Draw(im)
    d.text((4, 4), title, fill="black")
    for j, lab in enumerate(k_labels):
        d.text((left + j * cell + 3, top - 14), lab, fill="black")
    for i in range(Tq):
        d.text((6, top + i * cell + 2), q_labels[i], fill="black")
        for j in range(Tk):
            x0, y0 = left + j * cell, top + i * cell
            color = (IMAGE_KEY if key_is_image[j] else TEXT_KEY) if mask[i, j] else EMPTY
            d.rectangle([x0, y0, x0 + cell - 1, y0 + cell - 1], fill=color, outline=GRID)
    return im


def caption_strip(frames, names, results, refs, fps, path, cell=96):
    """Live captioning in the manner of the paper's Fig. 3: a strip of frames (a (3, S, S) tensor
    each), and under each, per model, its caption and its delay (green: ready before the next frame
    arrives, red: later). results[m][i]: dict with 'text', 'delay' and (optional) 'arrival' (seconds)."""
    small, big = font(12), font(14)
    interval = 1 / fps
    line_h = 15
    blocks = [[(wrap_to_width(r[i]["text"], small, cell, max_lines=3) or [""]) for r in results] for i in range(len(frames))]
    rows_h = [line_h * (1 + max(len(b[m]) for b in blocks)) + 6 for m in range(len(names))]
    label_w = 12 + max(int(ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(n, font=big)) for n in names)
    width = label_w + len(frames) * (cell + 6) + 10
    # title and footer wrap to the strip's width: a strip of a few frames is narrower than one line
    title = wrap_to_width(f"live captioning at {fps:g} frames/s (a frame every {1000 * interval:.0f} ms); "
                          "under each frame, per model: its caption and its delay", big, width - 20)
    footer = wrap_to_width("captions in black match the reference exactly, grey ones do not", small, width - 20)
    top = 12 + 18 * len(title)  # where the frames start
    height = top + cell + 24 + sum(rows_h) + 8 + line_h * len(footer)
    im = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(im)
    for k, line in enumerate(title):
        d.text((10, 8 + 18 * k), line, fill="black", font=big)
    for i, frame in enumerate(frames):
        x = label_w + i * (cell + 6)
        im.paste(to_pil(frame).resize((cell, cell), Image.NEAREST), (x, top))
        d.text((x + 2, top + cell + 4), f"t = {results[0][i].get('arrival', i * interval):.2f}s", fill=(90, 90, 90),
               font=small)  # the frame's time in the stream
        if refs[i]:
            d.rectangle([x, top, x + cell - 1, top + cell - 1], outline=(200, 200, 200))
    y = top + cell + 24
    for m, name in enumerate(names):
        d.text((6, y + 2), name, fill=COLORS.get(name.split()[0], (0, 0, 0)), font=big)
        for i in range(len(frames)):
            x = label_w + i * (cell + 6)
            delay = results[m][i]["delay"]
            late = f"{1000 * delay:+.0f} ms" if abs(delay) < 10 else f"{delay:+.1f} s"  # a model far behind
            d.text((x, y), late, font=small,
                   fill=(0, 140, 0) if delay <= interval else (200, 0, 0))
            for k, line in enumerate(blocks[i][m]):
                ok = refs[i] is not None and results[m][i]["text"].strip() == refs[i].strip()
                d.text((x, y + line_h * (k + 1)), line, fill=(0, 0, 0) if ok else (110, 110, 110), font=small)
        y += rows_h[m]
    for k, line in enumerate(footer):
        d.text((10, y + 4 + line_h * k), line, fill=(90, 90, 90), font=small)
    im.save(path)
