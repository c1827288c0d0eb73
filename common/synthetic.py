"""A procedural driving world: scenes -> RGB frames -> events (an event-camera simulator) -> Q&A.

Side view of a road: sky, buildings on the horizon, a sidewalk, a 2-3 lane road with lane
markings, static objects (traffic signs, poles, buildings, parked cars) and 0-4 moving agents
(car, truck, cyclist, pedestrian) with a colour, a direction and a speed. Optional ego-motion
shifts the whole background, so static things make events too; without it they make none.
Everything is seeded numpy; nothing happens at import.
"""

from __future__ import annotations

import json
import math
from functools import lru_cache
from importlib import resources
from pathlib import Path

import numpy as np

from common.events import EventStream

__all__ = [
    "AGENT_KINDS",
    "COLOURS",
    "STATIC_KINDS",
    "DIRECTIONS",
    "load_top_questions",
    "sample_scene",
    "render_frames",
    "simulate_events",
    "generate_clip",
    "answer_question",
    "long_answer_questions",
    "tokenizer_corpus",
]

AGENT_KINDS = ("car", "truck", "cyclist", "pedestrian")
STATIC_KINDS = ("traffic sign", "pole", "building", "parked car")
DIRECTIONS = ("left", "right", "towards", "away")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (200, 30, 30),
    "blue": (30, 60, 200),
    "green": (40, 150, 60),
    "white": (235, 235, 235),
    "black": (25, 25, 25),
    "yellow": (230, 200, 40),
    "silver": (170, 175, 180),
}
_BUILDING_COLOURS = {"grey": (150, 150, 155), "brown": (140, 95, 70), "beige": (215, 200, 170)}
_SIZES = {  # (width, height) as fractions of the image height
    "car": (0.30, 0.12), "truck": (0.50, 0.21), "cyclist": (0.10, 0.15), "pedestrian": (0.045, 0.15),
    "parked car": (0.30, 0.12),
}
# layout, as fractions of the image height
_HORIZON, _ROAD_TOP, _ROAD_BOTTOM = 0.42, 0.50, 0.93
_NUMBERS = ("no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")


# ----------------------------------------------------------------------------- questions

def load_top_questions(path: str | Path | None = None) -> list[dict]:
    """The top-50 question list [{"question", "count"}], most frequent first (shipped copy by default)."""
    if path is None:
        text = resources.files("common").joinpath("top50_questions.json").read_text()
    else:
        text = Path(path).read_text()
    items = json.loads(text)
    return [{"question": str(it["question"]), "count": int(it["count"])} for it in items]


# ----------------------------------------------------------------------------- scenes

def _lane_bottoms(height: int, lanes: int) -> list[float]:
    top, bottom = _ROAD_TOP * height, _ROAD_BOTTOM * height
    lane_h = (bottom - top) / lanes
    return [top + lane_h * (i + 0.85) for i in range(lanes)]


def _road_offset(xw: np.ndarray | float, road: dict, height: int) -> np.ndarray | float:
    """Vertical offset of the road at world column xw (0 for a straight road)."""
    if road["shape"] == "straight":
        return 0.0 * np.asarray(xw)
    return road["amplitude"] * height * np.sin(2 * np.pi * np.asarray(xw) / road["period"] + road["phase"])


def _position(cx: float, width: int) -> str:
    return "left" if cx < width / 3 else ("right" if cx > 2 * width / 3 else "center")


def sample_scene(rng: np.random.Generator, width: int = 640, height: int = 480, fps: int = 20,
                 num_frames: int = 20, ego_motion: bool = True) -> dict:
    """Draw a scene's ground truth (road, agents, static objects, ego-motion, per-frame boxes). Cheap."""
    duration_s = num_frames / fps
    times = np.arange(num_frames) / fps
    sx = width / 640.0
    lanes = int(rng.choice([2, 3], p=[0.6, 0.4]))
    straight = rng.random() < 0.7
    road = {
        "shape": "straight" if straight else "curved",
        "lanes": lanes,
        "lane_markings": str(rng.choice(["dashed", "solid", "none"], p=[0.7, 0.2, 0.1])),
        "amplitude": 0.0 if straight else float(rng.uniform(0.02, 0.04)),
        "period": float(rng.uniform(1.5, 3.0) * width),
        "phase": float(rng.uniform(0, 2 * np.pi)),
    }
    ego_moving = bool(ego_motion and rng.random() < 0.5)
    ego_speed = float(rng.uniform(40, 160) * sx) if ego_moving else 0.0
    shifts = ego_speed * times  # background shift (px) per frame: the world slides left
    strip_w = int(width + math.ceil(ego_speed * duration_s) + 2)

    bottoms = _lane_bottoms(height, lanes)
    agents = []
    for _ in range(int(rng.choice(5, p=[0.1, 0.3, 0.3, 0.2, 0.1]))):
        kind = str(rng.choice(AGENT_KINDS, p=[0.45, 0.15, 0.15, 0.25]))
        colour = str(rng.choice(list(COLOURS)))
        if kind == "pedestrian":
            direction = str(rng.choice(DIRECTIONS, p=[0.35, 0.35, 0.15, 0.15]))
            speed_px = float(rng.uniform(15, 45) * sx)
            base_y = _ROAD_TOP * height - 0.005 * height if direction in ("left", "right") else bottoms[-1]
        else:
            direction = str(rng.choice(DIRECTIONS, p=[0.42, 0.42, 0.08, 0.08]))
            lo, hi = {"car": (60, 280), "truck": (50, 200), "cyclist": (30, 110)}[kind]
            speed_px = float(rng.uniform(lo, hi) * sx)
            base_y = bottoms[int(rng.integers(lanes))] if kind != "cyclist" else bottoms[-1]
        w0, h0 = (s * height for s in _SIZES[kind])
        cx_mid = float(rng.uniform(0.2, 0.8) * width)
        boxes = []
        for t in times:
            dt = t - duration_s / 2
            if direction in ("left", "right"):
                cx = cx_mid + (speed_px if direction == "right" else -speed_px) * dt
                scale, yb = 1.0, base_y
            else:
                sign = 1.0 if direction == "towards" else -1.0
                scale = max(0.3, 1.0 + sign * speed_px / (200 * sx) * dt)
                cx, yb = cx_mid, base_y + sign * 0.25 * speed_px * dt
            yb += float(_road_offset(cx + shifts[0], road, height)) if kind != "pedestrian" else 0.0
            w, h = w0 * scale, h0 * scale
            boxes.append([round(cx - w / 2, 1), round(yb - h, 1), round(cx + w / 2, 1), round(yb, 1)])
        fast = speed_px > (130 * sx if kind in ("car", "truck") else 70 * sx)
        agents.append({
            "kind": kind, "colour": colour, "moving": True, "direction": direction,
            "speed": "fast" if fast else "slow", "speed_px_s": round(speed_px, 1),
            "position": _position(cx_mid, width), "bbox": boxes,
        })

    statics = []
    n_build = int(rng.integers(0, 4))
    xs = np.sort(rng.uniform(0, strip_w, n_build))
    for xw in xs:
        w, h = rng.uniform(0.15, 0.35) * width, rng.uniform(0.12, 0.3) * height
        statics.append({"kind": "building", "colour": str(rng.choice(list(_BUILDING_COLOURS))),
                        "world_box": [float(xw), float(_HORIZON * height - h), float(xw + w), float(_HORIZON * height)]})
    for kind, kmax in (("pole", 3), ("traffic sign", 2), ("parked car", 2)):
        for _ in range(int(rng.integers(0, kmax + 1))):
            xw = float(rng.uniform(0.05, 0.95) * strip_w)
            if kind == "parked car":
                w, h = (s * height for s in _SIZES["parked car"])
                yb = _ROAD_TOP * height + 0.1 * (_ROAD_BOTTOM - _ROAD_TOP) * height
                box = [xw - w / 2, yb - h, xw + w / 2, yb]
                colour = str(rng.choice(list(COLOURS)))
            else:
                h = (0.22 if kind == "pole" else 0.17) * height
                yb = _ROAD_TOP * height - 0.01 * height
                box = [xw - 0.006 * height, yb - h, xw + 0.006 * height, yb]
                colour = "grey" if kind == "pole" else str(rng.choice(["red", "blue"]))
            statics.append({"kind": kind, "colour": colour, "world_box": [float(v) for v in box]})
    for obj in statics:
        x0, y0, x1, y1 = obj["world_box"]
        obj["bbox"] = [[round(x0 - s, 1), round(y0, 1), round(x1 - s, 1), round(y1, 1)] for s in shifts]
        obj["visible"] = bool(any(b[2] > 0 and b[0] < width for b in obj["bbox"]))
    statics = [o for o in statics if o["visible"]]

    return {
        "version": 1, "width": width, "height": height, "fps": fps, "num_frames": num_frames,
        "duration_ms": int(round(duration_s * 1000)), "time_start_us": 0,
        "time_end_us": int(round(duration_s * 1e6)),
        "road": road,
        "ego_motion": {"moving": ego_moving, "direction": "forward" if ego_moving else "none",
                       "speed_px_s": round(ego_speed, 1), "shift_px": [round(float(s), 2) for s in shifts]},
        "agents": agents, "static": statics, "strip_width": strip_w,
        "texture_seed": int(rng.integers(2**31)),
    }


# ----------------------------------------------------------------------------- rendering

def _rect(img: np.ndarray, x0: float, y0: float, x1: float, y1: float, colour) -> None:
    h, w = img.shape[:2]
    a, b = max(int(round(x0)), 0), min(int(round(x1)), w)
    c, d = max(int(round(y0)), 0), min(int(round(y1)), h)
    if a < b and c < d:
        img[c:d, a:b] = colour


def _ellipse(img: np.ndarray, cx: float, cy: float, rx: float, ry: float, colour, inner: float = 0.0) -> None:
    h, w = img.shape[:2]
    a, b = max(int(cx - rx), 0), min(int(cx + rx) + 1, w)
    c, d = max(int(cy - ry), 0), min(int(cy + ry) + 1, h)
    if a >= b or c >= d or rx <= 0 or ry <= 0:
        return
    yy, xx = np.ogrid[c:d, a:b]
    r2 = ((xx + 0.5 - cx) / rx) ** 2 + ((yy + 0.5 - cy) / ry) ** 2
    mask = (r2 <= 1.0) & (r2 >= inner**2)
    img[c:d, a:b][mask] = colour


def _shade(colour, f: float) -> tuple[float, float, float]:
    return tuple(min(255.0, c * f) for c in colour)


def _draw_car(img, box, colour, facing_left: bool) -> None:
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    _rect(img, x0 + 0.2 * w, y0, x1 - 0.2 * w, y0 + 0.5 * h, colour)
    _rect(img, x0, y0 + 0.4 * h, x1, y1 - 0.15 * h, colour)
    glass = (95, 115, 135)
    _rect(img, x0 + 0.25 * w, y0 + 0.08 * h, x0 + 0.48 * w, y0 + 0.42 * h, glass)
    _rect(img, x0 + 0.52 * w, y0 + 0.08 * h, x1 - 0.25 * w, y0 + 0.42 * h, glass)
    _rect(img, x0, y0 + 0.62 * h, x1, y0 + 0.68 * h, _shade(colour, 0.6))
    light_x = x0 if facing_left else x1 - 0.05 * w
    _rect(img, light_x, y0 + 0.45 * h, light_x + 0.05 * w, y0 + 0.58 * h, (250, 240, 180))
    for fx in (0.22, 0.78):
        _ellipse(img, x0 + fx * w, y1 - 0.15 * h, 0.16 * h, 0.16 * h, (20, 20, 20))
        _ellipse(img, x0 + fx * w, y1 - 0.15 * h, 0.07 * h, 0.07 * h, (150, 150, 150))


def _draw_truck(img, box, colour, facing_left: bool) -> None:
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    cargo = (x0 + 0.28 * w, x1) if facing_left else (x0, x1 - 0.28 * w)
    cab = (x0, x0 + 0.26 * w) if facing_left else (x1 - 0.26 * w, x1)
    _rect(img, cargo[0], y0, cargo[1], y1 - 0.18 * h, colour)
    for k in range(1, 4):  # panel lines give the box some texture
        xk = cargo[0] + k * (cargo[1] - cargo[0]) / 4
        _rect(img, xk - 0.004 * w, y0 + 0.05 * h, xk + 0.004 * w, y1 - 0.25 * h, _shade(colour, 0.75))
    _rect(img, cab[0], y0 + 0.3 * h, cab[1], y1 - 0.18 * h, _shade(colour, 0.85))
    _rect(img, cab[0] + 0.03 * w, y0 + 0.36 * h, cab[1] - 0.03 * w, y0 + 0.55 * h, (95, 115, 135))
    for fx in (0.12, 0.3, 0.85) if not facing_left else (0.15, 0.7, 0.88):
        _ellipse(img, x0 + fx * w, y1 - 0.12 * h, 0.12 * h, 0.12 * h, (20, 20, 20))


def _draw_cyclist(img, box, colour) -> None:
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    r = 0.22 * h
    for fx in (0.22, 0.78):
        _ellipse(img, x0 + fx * w, y1 - r, r, r, (30, 30, 30), inner=0.7)
    _rect(img, x0 + 0.22 * w, y1 - r - 0.03 * h, x0 + 0.78 * w, y1 - r + 0.03 * h, (60, 60, 60))
    _rect(img, x0 + 0.38 * w, y0 + 0.2 * h, x0 + 0.62 * w, y0 + 0.6 * h, colour)
    _ellipse(img, x0 + 0.5 * w, y0 + 0.1 * h, 0.09 * h, 0.09 * h, (220, 180, 150))


def _draw_pedestrian(img, box, colour) -> None:
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    _rect(img, x0 + 0.15 * w, y0 + 0.55 * h, x1 - 0.15 * w, y1, (45, 45, 65))
    _rect(img, x0, y0 + 0.16 * h, x1, y0 + 0.58 * h, colour)
    _ellipse(img, x0 + 0.5 * w, y0 + 0.08 * h, 0.45 * w, 0.08 * h, (220, 180, 150))


def _draw_static(img, obj: dict, box) -> None:
    x0, y0, x1, y1 = box
    if obj["kind"] == "pole":
        _rect(img, x0, y0, x1, y1, (110, 110, 115))
        _rect(img, x0 - 0.02 * (y1 - y0), y0, x1 + 0.06 * (y1 - y0), y0 + 0.03 * (y1 - y0), (110, 110, 115))
    elif obj["kind"] == "traffic sign":
        _rect(img, x0, y0, x1, y1, (120, 120, 125))
        r = 0.2 * (y1 - y0)
        cx = (x0 + x1) / 2
        _ellipse(img, cx, y0 + r, r, r, COLOURS["red"] if obj["colour"] == "red" else COLOURS["blue"])
        _ellipse(img, cx, y0 + r, 0.65 * r, 0.65 * r, (240, 240, 240))
    elif obj["kind"] == "parked car":
        _draw_car(img, box, COLOURS[obj["colour"]], facing_left=False)
    elif obj["kind"] == "building":
        colour = _BUILDING_COLOURS[obj["colour"]]
        _rect(img, x0, y0, x1, y1, colour)
        step = max(0.07 * (y1 - y0), 3.0)
        win = _shade(colour, 0.55)
        for wy in np.arange(y0 + step * 0.6, y1 - step, step):
            for wx in np.arange(x0 + step * 0.6, x1 - step * 0.6, step * 1.4):
                _rect(img, wx, wy, wx + 0.6 * step, wy + 0.55 * step, win)


def _background_strip(scene: dict) -> np.ndarray:
    """The static world (sky, buildings, road, markings, static objects) as a float32 strip."""
    H, W = scene["height"], scene["strip_width"]
    road = scene["road"]
    rng = np.random.default_rng(scene["texture_seed"])
    img = np.empty((H, W, 3), dtype=np.float32)
    ys = np.arange(H, dtype=np.float32)[:, None]
    xw = np.arange(W, dtype=np.float32)[None, :]
    sky = np.clip(1.0 - ys / (_HORIZON * H), 0, 1)[..., None]
    img[:] = (150 + 60 * sky) * np.array([0.75, 0.88, 1.0], dtype=np.float32)
    off = _road_offset(xw, road, H).astype(np.float32)
    top, bottom = _ROAD_TOP * H, _ROAD_BOTTOM * H
    img[(ys >= _HORIZON * H) & (ys < top + off)] = (185, 182, 175)  # sidewalk
    road_mask = (ys >= top + off) & (ys < bottom + off)
    img[road_mask] = (80, 80, 84)
    img[ys >= bottom + off] = (95, 125, 70)  # verge
    thick = max(1.0, 0.008 * H)
    for yl in (top, bottom):  # solid edge lines
        img[np.abs(ys - (yl + off)) < thick / 2] = (225, 225, 225)
    if road["lane_markings"] != "none":
        lane_h = (bottom - top) / road["lanes"]
        dash = max(4.0, 0.08 * H)
        on = (np.floor(xw / dash) % 2 == 0) if road["lane_markings"] == "dashed" else np.ones_like(xw, bool)
        for k in range(1, road["lanes"]):
            yl = top + k * lane_h
            img[(np.abs(ys - (yl + off)) < thick / 2) & on] = (225, 225, 225)
    for obj in sorted(scene["static"], key=lambda o: o["world_box"][3]):
        _draw_static(img, obj, obj["world_box"])
    # faint fixed texture: under ego-motion it makes a few events, without it none
    # (4x4-pixel blocks, 3 %: well below the contrast threshold, and cheap to PNG-compress)
    noise = rng.standard_normal((H // 4 + 1, W // 4 + 1, 1)).astype(np.float32)
    img *= 1.0 + 0.03 * np.repeat(np.repeat(noise, 4, axis=0), 4, axis=1)[:H, :W]
    return img


def render_frames(scene: dict) -> np.ndarray:
    """Render the scene's frames: (num_frames, H, W, 3) uint8 RGB."""
    H, W, T = scene["height"], scene["width"], scene["num_frames"]
    strip = _background_strip(scene)
    out = np.empty((T, H, W, 3), dtype=np.uint8)
    shifts = scene["ego_motion"]["shift_px"]
    for k in range(T):
        s = float(shifts[k])
        i, a = int(math.floor(s)), s - math.floor(s)
        frame = strip[:, i:i + W] if a == 0 else (1 - a) * strip[:, i:i + W] + a * strip[:, i + 1:i + 1 + W]
        frame = frame.copy()
        for agent in sorted(scene["agents"], key=lambda g: g["bbox"][k][3]):
            box = agent["bbox"][k]
            colour = COLOURS[agent["colour"]]
            left = agent["direction"] == "left"
            if agent["kind"] == "car":
                _draw_car(frame, box, colour, left)
            elif agent["kind"] == "truck":
                _draw_truck(frame, box, colour, left)
            elif agent["kind"] == "cyclist":
                _draw_cyclist(frame, box, colour)
            else:
                _draw_pedestrian(frame, box, colour)
        out[k] = np.clip(frame, 0, 255).astype(np.uint8)
    return out


# ----------------------------------------------------------------------------- event simulator

def simulate_events(frames: np.ndarray, fps: float = 20.0, threshold: float = 0.2, threshold_jitter: float = 0.0,
                    noise_rate: float = 0.0, eps: float = 0.05, time_start_us: int = 0,
                    duration_us: int | None = None, rng: np.random.Generator | None = None) -> EventStream:
    """Simulate an event camera watching ``frames`` ((T,H,W,3) RGB or (T,H,W) gray, uint8).

    Log intensity L = log(gray/255 + eps) is interpolated linearly between frames; each crossing of
    a per-pixel reference by the contrast threshold C emits one event (n = floor(|L - ref| / C) per
    pixel and interval), timestamped at the crossing, polarity 1 brighter / 0 darker; the reference
    moves by n*C. Noise events (``noise_rate`` per pixel per second) are uniform in space and time.
    Colour is invisible: only gray levels count. Vectorised over pixels.
    """
    rng = rng if rng is not None else np.random.default_rng(0)
    frames = np.asarray(frames)
    if frames.ndim == 4:
        gray = frames.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    else:
        gray = frames.astype(np.float32)
    T, H, W = gray.shape
    frame_dt = 1e6 / fps
    if duration_us is None:
        duration_us = int(round(T * frame_dt))
    logs = np.log(gray.reshape(T, -1) / 255.0 + eps)
    C = np.full(H * W, threshold, dtype=np.float32)
    if threshold_jitter > 0:
        C = np.clip(C * (1 + threshold_jitter * rng.standard_normal(H * W)), 0.25 * threshold, None).astype(np.float32)
    ref = logs[0].copy()
    parts_x, parts_t, parts_p = [], [], []
    for k in range(T - 1):
        L0, L1 = logs[k], logs[k + 1]
        d = L1 - ref
        n = np.floor(np.abs(d) / C).astype(np.int64)
        idx = np.flatnonzero(n)
        if idx.size == 0:
            continue
        counts = n[idx]
        sign = np.sign(d[idx]).astype(np.float32)
        rep = np.repeat(np.arange(idx.size), counts)
        j = np.arange(rep.size) - np.repeat(np.cumsum(counts) - counts, counts) + 1
        level = ref[idx][rep] + sign[rep] * C[idx][rep] * j
        span = (L1 - L0)[idx][rep]
        safe = np.where(span == 0, 1.0, span)
        frac = np.clip(np.where(span == 0, 1.0, (level - L0[idx][rep]) / safe), 0.0, 1.0)
        t = time_start_us + (k + frac.astype(np.float64)) * frame_dt
        order = np.argsort(t, kind="stable")
        parts_x.append(idx[rep][order])
        parts_t.append(t[order])
        parts_p.append((sign[rep][order] > 0).astype(np.uint8))
        ref[idx] += sign * C[idx] * counts
    flat = np.concatenate(parts_x) if parts_x else np.zeros(0, np.int64)
    t = np.concatenate(parts_t) if parts_t else np.zeros(0, np.float64)
    p = np.concatenate(parts_p) if parts_p else np.zeros(0, np.uint8)
    if noise_rate > 0:
        n_noise = int(rng.poisson(noise_rate * H * W * duration_us / 1e6))
        flat = np.concatenate([flat, rng.integers(0, H * W, n_noise)])
        t = np.concatenate([t, time_start_us + rng.uniform(0, duration_us, n_noise)])
        p = np.concatenate([p, rng.integers(0, 2, n_noise).astype(np.uint8)])
        order = np.argsort(t, kind="stable")
        flat, t, p = flat[order], t[order], p[order]
    t_us = np.minimum(np.floor(t).astype(np.int64), time_start_us + duration_us - 1)
    return EventStream(
        x=(flat % W).astype(np.uint16), y=(flat // W).astype(np.uint16), t=t_us, p=p,
        width=W, height=H, time_start=int(time_start_us), time_end=int(time_start_us + duration_us),
    )


def generate_clip(seed: int | np.random.SeedSequence, width: int = 640, height: int = 480, duration_ms: int = 1000,
                  fps: int = 20, noise_rate: float = 0.002, ego_motion: bool = True,
                  threshold: float = 0.2) -> tuple[dict, np.ndarray, EventStream]:
    """One synthetic clip: (ground truth, RGB frames (T,H,W,3) uint8, events). Deterministic for ``seed``."""
    ss = seed if isinstance(seed, np.random.SeedSequence) else np.random.SeedSequence(seed)
    scene_ss, event_ss = ss.spawn(2)
    num_frames = int(round(duration_ms * fps / 1000))
    scene = sample_scene(np.random.default_rng(scene_ss), width, height, fps, num_frames, ego_motion)
    frames = render_frames(scene)
    events = simulate_events(frames, fps=fps, threshold=threshold, noise_rate=noise_rate,
                             duration_us=duration_ms * 1000, rng=np.random.default_rng(event_ss))
    scene["num_events"] = len(events)
    return scene, frames, events


# ----------------------------------------------------------------------------- answers

def _num(n: int) -> str:
    return _NUMBERS[n] if 0 <= n < len(_NUMBERS) else str(n)


def _plural(n: int, word: str) -> str:
    if n == 1:
        return f"one {word}"
    return f"{_num(n)} {word}s" if word[-1] != "s" else f"{_num(n)} {word}es"


def _join(items: list[str]) -> str:
    if not items:
        return ""
    if len(items) == 1:
        return items[0]
    return ", ".join(items[:-1]) + " and " + items[-1]


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _motion(agent: dict) -> str:
    verb = {"pedestrian": "walking", "cyclist": "riding"}.get(agent["kind"], "moving")
    where = {"left": "left", "right": "right", "towards": "towards the camera", "away": "away from the camera"}
    return f"{verb} {where[agent['direction']]}"


def _agent_phrase(agent: dict, motion: bool = True) -> str:
    noun = f"{agent['colour']} {agent['kind']}" if agent["kind"] in ("car", "truck") else agent["kind"]
    if agent["kind"] in ("cyclist", "pedestrian"):
        noun = f"{agent['kind']} in {agent['colour']}"
    text = f"{_article(noun)} {noun}"
    return f"{text} {_motion(agent)}" if motion else text


def _static_counts(gt: dict) -> dict[str, int]:
    counts: dict[str, int] = {}
    for obj in gt["static"]:
        counts[obj["kind"]] = counts.get(obj["kind"], 0) + 1
    return counts


def _static_phrase(gt: dict, limit: int = 3) -> str:
    counts = _static_counts(gt)
    words = []
    for kind in ("building", "traffic sign", "pole", "parked car"):
        if kind in counts:
            words.append(_plural(counts[kind], kind) if counts[kind] > 1 else f"{_article(kind)} {kind}")
    return _join(words[:limit])


def _road_phrase(gt: dict) -> str:
    road = gt["road"]
    return f"a {road['shape']} {_num(road['lanes'])}-lane road"


def _of(gt: dict, *kinds: str) -> list[dict]:
    return [a for a in gt["agents"] if a["kind"] in kinds]


def _cars(gt: dict) -> list[tuple[str, str]]:
    """(colour, state) of every car, moving first, then parked."""
    out = [(a["colour"], _motion(a)) for a in _of(gt, "car")]
    return out + [(o["colour"], "parked") for o in gt["static"] if o["kind"] == "parked car"]


def _yes_no_kind(gt: dict, kind: str, word: str) -> str:
    agents = _of(gt, kind)
    if not agents:
        return f"No, there are no {word}s in the scene."
    return f"Yes, {_join([_agent_phrase(a) for a in agents[:2]])}."


def _fastest(gt: dict) -> dict | None:
    return max(gt["agents"], key=lambda a: a["speed_px_s"], default=None)


def _key_elements(gt: dict) -> str:
    agents = [_agent_phrase(a) for a in gt["agents"][:2]]
    statics = _static_phrase(gt, 2)
    tail = f", with {statics}" if statics else ""
    if not agents:
        return f"A quiet scene: {_road_phrase(gt)}{tail}; nothing is moving."
    head = _join(agents)
    return f"{head[0].upper()}{head[1:]} on {_road_phrase(gt)}{tail}."


def _camera(gt: dict) -> str:
    return "The camera is moving forward" if gt["ego_motion"]["moving"] else "The camera is stationary"


def _describe(gt: dict) -> str:
    parts = [f"{_camera(gt)} beside {_road_phrase(gt)}."]
    if gt["agents"]:
        text = _join([_agent_phrase(a) for a in gt["agents"][:2]])
        parts.append(f"{text[0].upper()}{text[1:]}.")
    else:
        parts.append("No road users are moving.")
    statics = _static_phrase(gt, 2)
    if statics:
        parts.append(f"There {'is' if statics.split()[0] in ('a', 'an') else 'are'} {statics}.")
    return " ".join(parts)


def _moving_list(gt: dict) -> str:
    if not gt["agents"]:
        return "Nothing is moving in the scene."
    text = _join([_agent_phrase(a) for a in gt["agents"][:3]])
    return f"{text[0].upper()}{text[1:]}."


def _vehicles(gt: dict) -> list[tuple[str, str]]:
    out = [(a["kind"], a["colour"]) for a in _of(gt, "car", "truck")]
    return out + [("car", o["colour"]) for o in gt["static"] if o["kind"] == "parked car"]


def _colour_of(gt: dict, kind: str) -> str:
    found = _cars(gt) if kind == "car" else [(a["colour"], "") for a in _of(gt, kind)]
    if not found:
        return f"There is no {kind} in the scene."
    colours = list(dict.fromkeys(c for c, _ in found))
    if len(found) == 1:
        return f"The {kind} is {colours[0]}."
    return f"The {kind}s are {_join(colours)}."


def _car_direction(gt: dict) -> str:
    cars = _of(gt, "car")
    if cars:
        return f"The {cars[0]['colour']} car is {_motion(cars[0])}."
    if any(o["kind"] == "parked car" for o in gt["static"]):
        return "The car is parked and not moving."
    return "There is no car in the scene."


def _direction_vehicle(gt: dict, direction: str) -> str:
    found = [a for a in _of(gt, "car", "truck", "cyclist") if a["direction"] == direction]
    if not found:
        return f"No, no vehicle is moving to the {direction}."
    return f"Yes, {_join([_agent_phrase(a, motion=False) for a in found[:2]])} {'is' if len(found) == 1 else 'are'} moving {direction}."


def _depth(gt: dict, direction: str) -> str:
    found = [a for a in gt["agents"] if a["direction"] == direction]
    where = "towards the camera" if direction == "towards" else "away from the camera"
    if not found:
        return f"No, nothing is moving {where}."
    return f"Yes, {_join([_agent_phrase(a, motion=False) for a in found[:2]])} {'is' if len(found) == 1 else 'are'} moving {where}."


def _doing(gt: dict, kind: str) -> str:
    found = _of(gt, kind)
    if not found:
        return f"There is no {kind} in the scene."
    return f"The {kind} is {_motion(found[0])}."


def _count_kind(gt: dict, kind: str) -> str:
    n = len(_of(gt, kind))
    return f"There {'is' if n == 1 else 'are'} {_plural(n, kind)}."


def _count_cars(gt: dict) -> str:
    cars = _cars(gt)
    parked = sum(1 for _, s in cars if s == "parked")
    if not cars:
        return "There are no cars in the scene."
    if parked == 0 or parked == len(cars):
        state = "parked" if parked else "moving"
        return f"There {'is' if len(cars) == 1 else 'are'} {_plural(len(cars), 'car')}, {state}."
    return f"There are {_plural(len(cars), 'car')}: {_num(len(cars) - parked)} moving and {_num(parked)} parked."


def _count_vehicles(gt: dict) -> str:
    veh = _vehicles(gt)
    if not veh:
        return "No vehicles are visible."
    cars = sum(1 for k, _ in veh if k == "car")
    trucks = len(veh) - cars
    parts = [p for p in (_plural(cars, "car") if cars else "", _plural(trucks, "truck") if trucks else "") if p]
    return f"{_num(len(veh)).capitalize()} {'vehicle is' if len(veh) == 1 else 'vehicles are'} visible: {_join(parts)}."


def _density(gt: dict) -> str:
    n = len(_of(gt, "car", "truck"))
    return ["No traffic: the road is empty.", "Light traffic, with a single vehicle.",
            "Moderate traffic, with two vehicles.", "Heavy traffic, with several vehicles."][min(n, 3)]


def _markings(gt: dict) -> str:
    m = gt["road"]["lane_markings"]
    if m == "none":
        return "Only the road edges are marked; there are no lane markings."
    return f"Yes, {m} white lane markings separate the lanes."


def _has_static(gt: dict, kind: str, plural: str) -> str:
    n = _static_counts(gt).get(kind, 0)
    if n == 0:
        return f"No, there are no {plural}."
    return f"Yes, there {'is' if n == 1 else 'are'} {_plural(n, kind)}."


def _static_objects(gt: dict) -> str:
    text = _static_phrase(gt, 4)
    return f"{text[0].upper()}{text[1:]}." if text else "Only the road and the sidewalk."


def _camera_moving(gt: dict) -> str:
    if gt["ego_motion"]["moving"]:
        return "Yes, the camera moves forward, so the whole background shifts."
    return "No, the camera is stationary."


def _happening(gt: dict) -> str:
    cam = "a moving camera" if gt["ego_motion"]["moving"] else "a stationary camera"
    if not gt["agents"]:
        return f"Nothing much: {_road_phrase(gt)} seen from {cam}, with no road users moving."
    return f"{_moving_list(gt)[:-1]}, seen from {cam}."


def _count_moving(gt: dict) -> str:
    n = len(gt["agents"])
    if n == 0:
        return "No objects are moving."
    kinds = _join(list(dict.fromkeys(a["kind"] for a in gt["agents"])))
    return f"{_num(n).capitalize()} moving {'object' if n == 1 else 'objects'}: {kinds}."


def _fastest_speed(gt: dict) -> str:
    a = _fastest(gt)
    if a is None:
        return "Nothing is moving."
    return f"The fastest, {_agent_phrase(a, motion=False)}, moves {a['speed']} at about {int(round(a['speed_px_s'], -1))} pixels per second."


def _fastest_object(gt: dict) -> str:
    a = _fastest(gt)
    if a is None:
        return "Nothing is moving."
    text = _agent_phrase(a)
    return f"{text[0].upper()}{text[1:]} is the fastest object."


def _main_object(gt: dict) -> str:
    sizes = {"truck": 4, "car": 3, "cyclist": 2, "pedestrian": 1}
    if gt["agents"]:
        a = max(gt["agents"], key=lambda g: sizes[g["kind"]])
        return f"The main object is {_agent_phrase(a)}."
    if gt["static"]:
        obj = gt["static"][0]
        return f"The main object is {_article(obj['kind'])} {obj['kind']}."
    return f"The main object is {_road_phrase(gt)}."


def _crowded(gt: dict) -> str:
    n = len(gt["agents"]) + len(gt["static"])
    if n >= 6:
        return f"Yes, fairly crowded, with {_num(len(gt['agents']))} road users and {_num(len(gt['static']))} static objects."
    return f"No, it is not crowded: {_num(len(gt['agents']))} road users and {_num(len(gt['static']))} static objects."


def _lane_change(gt: dict) -> str:
    veh = _of(gt, "car", "truck")
    if veh:
        return f"Be careful: {_agent_phrase(veh[0])} is nearby, so check before changing lanes."
    return "It appears safe; no other vehicles are moving nearby."


def _road_type(gt: dict) -> str:
    road = gt["road"]
    kind = "An urban street" if any(o["kind"] == "building" for o in gt["static"]) else "A suburban road"
    return f"{kind} with {_num(road['lanes'])} lanes, {road['shape']}."


def _road_ahead(gt: dict) -> str:
    on_road = [a for a in gt["agents"] if a["kind"] != "pedestrian" or a["direction"] in ("towards", "away")]
    if not on_road:
        return "No, the road is clear."
    return f"Yes, {_join([_agent_phrase(a, motion=False) for a in on_road[:2]])} {'is' if len(on_road) == 1 else 'are'} on the road."


def _vehicle_colours(gt: dict) -> str:
    veh = _vehicles(gt)
    if not veh:
        return "There are no vehicles in the scene."
    return f"The vehicles are {_join(list(dict.fromkeys(c for _, c in veh)))}."


def _all_still(gt: dict) -> str:
    if not gt["agents"]:
        return "Yes, all objects are stationary." + (" Only the camera moves." if gt["ego_motion"]["moving"] else "")
    return f"No, {_agent_phrase(gt['agents'][0])}."


def _motion_text(gt: dict) -> str:
    parts = [f"{_agent_phrase(a)} {'quickly' if a['speed'] == 'fast' else 'slowly'}" for a in gt["agents"][:3]]
    cam = "the camera moves forward" if gt["ego_motion"]["moving"] else "the camera is still"
    if not parts:
        return f"No road users move; {cam}."
    text = "; ".join(parts + [cam])
    return f"{text[0].upper()}{text[1:]}."


def _vehicle_kinds(gt: dict) -> str:
    kinds = list(dict.fromkeys(k for k, _ in _vehicles(gt)))
    if _of(gt, "cyclist"):
        kinds.append("bicycle")
    if not kinds:
        return "There are no vehicles."
    words = [f"{k}s" if sum(1 for v, _ in _vehicles(gt) if v == k) > 1 else f"{_article(k)} {k}" for k in kinds]
    text = _join(words)
    return f"{text[0].upper()}{text[1:]}."


def _car_side(gt: dict, side: str) -> str:
    k = gt["num_frames"] // 2
    found = []
    for a in _of(gt, "car"):
        x0, _, x1, _ = a["bbox"][k]
        if _position((x0 + x1) / 2, gt["width"]) == side:
            found.append(a["colour"])
    for o in gt["static"]:
        if o["kind"] == "parked car":
            x0, _, x1, _ = o["bbox"][k]
            if _position((x0 + x1) / 2, gt["width"]) == side:
                found.append(o["colour"])
    if not found:
        return f"No, there is no car in the {side} part of the image."
    return f"Yes, {_article(found[0])} {found[0]} car is in the {side} part."


def _count_static(gt: dict) -> str:
    n = len(gt["static"])
    if n == 0:
        return "There are no static objects besides the road."
    return f"There {'is' if n == 1 else 'are'} {_plural(n, 'static object')}: {_static_phrase(gt, 4)}."


def _colour_car(gt: dict, colour: str) -> str:
    cars = _cars(gt)
    for c, state in cars:
        if c == colour:
            return f"Yes, there is a {colour} car, {state}."
    return f"No, there is no {colour} car."


def _roadside(gt: dict) -> str:
    statics = _static_phrase(gt, 3)
    walkers = [a for a in _of(gt, "pedestrian") if a["direction"] in ("left", "right")]
    extra = f", where {_agent_phrase(walkers[0])}" if walkers else ""
    if statics:
        return f"A sidewalk with {statics}{extra}."
    return f"A plain sidewalk{extra}."


def _smooth(gt: dict) -> str:
    n = len(_of(gt, "car", "truck"))
    if n == 0:
        return "There is no traffic to judge; the road is empty."
    return f"Yes, {_plural(n, 'vehicle')} {'moves' if n == 1 else 'move'} steadily without stopping."


def _summary(gt: dict) -> str:
    who = _join(list(dict.fromkeys(a["kind"] for a in gt["agents"]))) or "no moving road users"
    cam = "a moving" if gt["ego_motion"]["moving"] else "a static"
    return f"{cam.capitalize()} view of {_road_phrase(gt)} with {who}."


_HANDLERS = {
    "what are the key elements in this scene?": _key_elements,
    "describe the scene in detail.": _describe,
    "how many cars are there in the scene?": _count_cars,
    "is there any moving object in the scene?": lambda g: (f"Yes, {_moving_list(g)[0].lower()}{_moving_list(g)[1:]}"
                                                          if g["agents"] else "No, nothing is moving."),
    "what is the color of the car?": lambda g: _colour_of(g, "car"),
    "in which direction is the car moving?": _car_direction,
    "are there any pedestrians in the scene?": lambda g: _yes_no_kind(g, "pedestrian", "pedestrian"),
    "are there any cyclists in the scene?": lambda g: _yes_no_kind(g, "cyclist", "cyclist"),
    "is the road straight?": lambda g: ("Yes, the road is straight." if g["road"]["shape"] == "straight"
                                        else "No, the road curves gently."),
    "what objects are moving in the scene?": _moving_list,
    "are there any trucks in the scene?": lambda g: _yes_no_kind(g, "truck", "truck"),
    "how many vehicles are visible?": _count_vehicles,
    "what is the traffic density on the road?": _density,
    "are there lane markings on the road?": _markings,
    "are there any traffic signs?": lambda g: _has_static(g, "traffic sign", "traffic signs"),
    "what static objects can be seen?": _static_objects,
    "is the camera moving?": _camera_moving,
    "are there any buildings in the scene?": lambda g: _has_static(g, "building", "buildings"),
    "what is happening in this scene?": _happening,
    "how many moving objects are there?": _count_moving,
    "is any vehicle moving to the left?": lambda g: _direction_vehicle(g, "left"),
    "is any vehicle moving to the right?": lambda g: _direction_vehicle(g, "right"),
    "how fast is the fastest object moving?": _fastest_speed,
    "are there any parked cars?": lambda g: _has_static(g, "parked car", "parked cars"),
    "are there any poles along the road?": lambda g: _has_static(g, "pole", "poles"),
    "how many lanes does the road have?": lambda g: f"The road has {_num(g['road']['lanes'])} lanes.",
    "what is the main object in the scene?": _main_object,
    "is there a vehicle approaching the camera?": lambda g: _depth(g, "towards"),
    "is any object moving away from the camera?": lambda g: _depth(g, "away"),
    "what color is the truck?": lambda g: _colour_of(g, "truck"),
    "what is the pedestrian doing?": lambda g: _doing(g, "pedestrian"),
    "what is the cyclist doing?": lambda g: _doing(g, "cyclist"),
    "how many pedestrians are there?": lambda g: _count_kind(g, "pedestrian"),
    "is the scene crowded?": _crowded,
    "is it safe to change lanes?": _lane_change,
    "what type of road is this?": _road_type,
    "is there anything on the road ahead?": _road_ahead,
    "what colors are the vehicles?": _vehicle_colours,
    "are all objects stationary?": _all_still,
    "which object is moving fastest?": _fastest_object,
    "describe the motion in the scene.": _motion_text,
    "what kinds of vehicles are present?": _vehicle_kinds,
    "is there a car in the left part of the image?": lambda g: _car_side(g, "left"),
    "is there a car in the right part of the image?": lambda g: _car_side(g, "right"),
    "how many static objects are there?": _count_static,
    "is there a white car in the scene?": lambda g: _colour_car(g, "white"),
    "is there a red car in the scene?": lambda g: _colour_car(g, "red"),
    "what is on the side of the road?": _roadside,
    "is the traffic moving smoothly?": _smooth,
    "summarize the scene in one sentence.": _summary,
}


# ----------------------------------------------------------------------------- long answers

# Questions answered at length in datasets made with ``--long_answers`` (ground truth ``answer_style: long``).
LONG_QUESTIONS = ("What are the key elements in this scene?", "Describe the scene in detail.",
                  "What happened in this clip?")
_SPEED_WORDS = {"fast": ("quickly", "fast", "at high speed"), "slow": ("slowly", "at a slow pace", "gently")}
_WHERE_WORDS = {"left": ("on the left", "in the left part of the image"),
                "center": ("in the middle", "in the centre of the image"),
                "right": ("on the right", "in the right part of the image")}


def _pick(rng: np.random.Generator, options: tuple[str, ...] | list[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _cap(text: str) -> str:
    return text[0].upper() + text[1:]


def _long_opening(gt: dict, rng: np.random.Generator) -> str:
    road, moving = _road_phrase(gt), gt["ego_motion"]["moving"]
    cam = _pick(rng, ("moving forward", "driving forward") if moving else ("standing still", "still"))
    return _pick(rng, (f"The camera is {cam} beside {road}.", f"This clip shows {road}, filmed by a camera that is {cam}.",
                       f"We look at {road} from a camera that is {cam}."))


def _long_agent(agent: dict, rng: np.random.Generator) -> str:
    noun = _agent_phrase(agent, motion=False)
    speed, where = _pick(rng, _SPEED_WORDS[agent["speed"]]), _pick(rng, _WHERE_WORDS[agent["position"]])
    return _pick(rng, (f"{_cap(noun)} is {_motion(agent)} {speed} {where}.",
                       f"{_cap(where)}, {noun} is {_motion(agent)} {speed}.",
                       f"There is {noun} {where}, {_motion(agent)} {speed}."))


def _long_statics(gt: dict, rng: np.random.Generator) -> list[str]:
    groups: dict[str, int] = {}
    for obj in gt["static"]:
        name = f"{obj['colour']} {obj['kind']}"
        groups[name] = groups.get(name, 0) + 1
    things = [f"{_article(name)} {name}" if n == 1 else _plural(n, name) for name, n in groups.items()]
    things = [things[i] for i in rng.permutation(len(things))]
    markings = gt["road"]["lane_markings"]
    lanes = (f"The lane markings are {markings}." if markings != "none"
             else "The road has no lane markings.")
    if not things:
        return [lanes, _pick(rng, ("Nothing stands beside the road.", "The roadside is empty."))]
    side = _pick(rng, ("Along the road there", "On the side of the road there", "Beside the road there"))
    verb = "is" if len(things) == 1 and things[0].split()[0] in ("a", "an") else "are"
    return [lanes, f"{side} {verb} {_join(things)}."]


def _long_closing(gt: dict, rng: np.random.Generator) -> str:
    n = len(gt["agents"])
    if n == 0:
        return _pick(rng, ("No car, truck, cyclist or pedestrian is moving, so the scene is calm.",
                           "Nothing moves on the road during the clip: there are no cars, trucks, cyclists "
                           "or pedestrians."))
    traffic = ("no", "light", "moderate", "heavy")[min(len(_of(gt, "car", "truck")), 3)]
    moving = _plural(n, "moving road user")
    return _pick(rng, (f"In all there {'is' if n == 1 else 'are'} {moving}, and there is {traffic} traffic.",
                       f"Overall the clip shows {moving} with {traffic} traffic on the road."))


def long_answer(question: str, ground_truth: dict) -> str:
    """A long (>= 40 token) answer from the clip's true content, phrasing drawn from the clip's seed.

    Motion (what events show: who moves where, how fast) and colours and static things (what only
    video shows) both appear; sentence templates, synonyms and order vary with the clip and question.
    """
    key = sum(ord(c) for c in _normalise(question))
    rng = np.random.default_rng([int(ground_truth.get("texture_seed", 0)), key])
    agents = [_long_agent(a, rng) for a in ground_truth["agents"]]
    agents = [agents[i] for i in rng.permutation(len(agents))]
    statics = _long_statics(ground_truth, rng)
    if rng.random() < 0.5:
        statics.reverse()
    middle = agents + statics if rng.random() < 0.6 else statics + agents
    return " ".join([_long_opening(ground_truth, rng), *middle, _long_closing(ground_truth, rng)])


def long_answer_questions() -> list[dict]:
    """The top-50 questions followed by the ``LONG_QUESTIONS`` they lack ("What happened in this clip?").

    Written as DIR/top50_questions.json by datasets made with ``--long_answers``: ``--max_questions 50``
    still asks the top 50 there, ``--max_questions 51`` asks every long-answer question too. Appended
    questions get the last count, so the list stays most frequent first.
    """
    top = load_top_questions()
    have = {_normalise(q["question"]) for q in top}
    extra = [{"question": q, "count": top[-1]["count"]} for q in LONG_QUESTIONS if _normalise(q) not in have]
    return top + extra


def _normalise(question: str) -> str:
    q = question.replace("<event>", "").replace("<video>", "").strip().lower()
    return " ".join(q.replace("colour", "color").split())


def answer_question(question: str, ground_truth: dict) -> str:
    """A short, deterministic answer to one of the top-50 questions from a clip's ground truth.

    Unknown questions get the key-elements description. Ground truth marked ``answer_style: long``
    (datasets made with ``--long_answers``) gets ``long_answer`` for the ``LONG_QUESTIONS``.
    """
    if ground_truth.get("answer_style") == "long" and _normalise(question) in _LONG_KEYS:
        return long_answer(question, ground_truth)
    handler = _HANDLERS.get(_normalise(question), _key_elements)
    return handler(ground_truth)


_LONG_KEYS = frozenset(_normalise(q) for q in LONG_QUESTIONS)


@lru_cache(maxsize=1)
def _corpus() -> tuple[str, ...]:
    questions = [q["question"] for q in load_top_questions()]
    rng = np.random.default_rng(20240601)
    out = dict.fromkeys(questions)
    for _ in range(400):
        scene = sample_scene(rng, 640, 480, 20, 20, ego_motion=True)
        for q in questions:
            out.setdefault(answer_question(q, scene))
    return tuple(out)


def tokenizer_corpus() -> list[str]:
    """Deterministic representative text (the 50 questions and answers over random scenes) for a tiny tokenizer."""
    return list(_corpus())
