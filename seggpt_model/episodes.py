"""Procedural in-context segmentation episodes, deterministic by seed.

An object class is a (shape, texture, colour pair) triple.  An episode shows a prompt scene
whose label map marks the instances of one or two target classes, and a query scene whose
label map marks the same classes; distractors of other classes (sharing some attributes)
stay background.  Domains split the attributes so that a "shifted" domain holds shapes and
textures never seen in training.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "diamond", "cross", "ring", "hexagon", "star", "crescent")
TEXTURES = ("solid", "stripes", "dots", "checker", "noise", "waves")
COLOURS = np.array([(220, 40, 40), (40, 170, 60), (40, 80, 220), (230, 200, 30), (200, 60, 200),
                    (30, 200, 210), (240, 130, 20), (240, 240, 240), (20, 20, 20), (140, 90, 50)], np.uint8)
EVAL_SEED = 10 ** 9  # held-out episodes start here; training draws seeds below 10**8
PROJECT_SEED = 2 * 10 ** 9  # held-out shifted-domain projects
DOMAINS = {
    "train": dict(shapes=SHAPES[:6], textures=TEXTURES[:5]),
    "shifted": dict(shapes=SHAPES[6:], textures=TEXTURES[:3] + TEXTURES[5:]),
}


@dataclass(frozen=True)
class ObjectClass:
    shape: str
    texture: str
    colours: tuple[int, int]


@dataclass
class Episode:
    prompt_image: np.ndarray  # HxWx3 uint8
    prompt_labels: np.ndarray  # HxW int64, 0 = background, 1..n = target classes
    query_image: np.ndarray
    query_labels: np.ndarray
    num_labels: int
    target_present: bool
    extra_prompts: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)
    distractors: bool = False  # whether the task draws look-alike objects of other classes

    @property
    def prompts(self) -> list[tuple[np.ndarray, np.ndarray]]:
        return [(self.prompt_image, self.prompt_labels), *self.extra_prompts]


def _shape_mask(shape: str, size: int, angle: float) -> np.ndarray:
    """A filled shape in a size x size box, rotated by ``angle`` radians."""
    img = Image.new("L", (size, size), 0)
    d = ImageDraw.Draw(img)
    c, r = size / 2, size / 2 - 1

    def poly(points):
        rot = [(c + x * math.cos(angle) - y * math.sin(angle), c + x * math.sin(angle) + y * math.cos(angle))
               for x, y in points]
        d.polygon(rot, fill=255)

    def ngon(n, radius, phase=0.0):
        return [(radius * math.cos(phase + 2 * math.pi * i / n), radius * math.sin(phase + 2 * math.pi * i / n))
                for i in range(n)]

    if shape == "circle":
        d.ellipse([c - r, c - r, c + r, c + r], fill=255)
    elif shape == "ring":
        d.ellipse([c - r, c - r, c + r, c + r], fill=255)
        d.ellipse([c - r * 0.55, c - r * 0.55, c + r * 0.55, c + r * 0.55], fill=0)
    elif shape == "crescent":
        d.ellipse([c - r, c - r, c + r, c + r], fill=255)
        off = r * 0.5
        d.ellipse([c - r + off * math.cos(angle), c - r + off * math.sin(angle),
                   c + r + off * math.cos(angle), c + r + off * math.sin(angle)], fill=0)
    elif shape == "square":
        poly(ngon(4, r * 1.05, math.pi / 4))
    elif shape == "triangle":
        poly(ngon(3, r, -math.pi / 2))
    elif shape == "diamond":
        poly([(0, -r), (r * 0.6, 0), (0, r), (-r * 0.6, 0)])
    elif shape == "hexagon":
        poly(ngon(6, r))
    elif shape == "cross":
        w = r * 0.35
        poly([(-w, -r), (w, -r), (w, -w), (r, -w), (r, w), (w, w), (w, r), (-w, r), (-w, w), (-r, w), (-r, -w),
              (-w, -w)])
    elif shape == "star":
        poly([(r * (1 if i % 2 == 0 else 0.45) * math.cos(math.pi * i / 5 - math.pi / 2),
               r * (1 if i % 2 == 0 else 0.45) * math.sin(math.pi * i / 5 - math.pi / 2)) for i in range(10)])
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return np.asarray(img) > 127


def _texture(kind: str, size: int, c1: np.ndarray, c2: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """size x size x 3 float texture mixing two colours."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    period = rng.uniform(8, 16)  # coarse enough to survive the model's resize
    if kind == "solid":
        t = np.zeros((size, size), np.float32)
    elif kind == "stripes":
        a = rng.uniform(0, math.pi)
        t = (np.sin((xx * math.cos(a) + yy * math.sin(a)) * 2 * math.pi / period) > 0).astype(np.float32)
    elif kind == "dots":
        t = ((np.mod(xx, period) - period / 2) ** 2 + (np.mod(yy, period) - period / 2) ** 2 < (period / 3.2) ** 2)
        t = t.astype(np.float32)
    elif kind == "checker":
        t = ((np.floor(xx / period) + np.floor(yy / period)) % 2).astype(np.float32)
    elif kind == "noise":
        t = (rng.random((size, size)) > 0.5).astype(np.float32)
    elif kind == "waves":
        t = (np.sin(xx * 2 * math.pi / period + 3 * np.sin(yy * 2 * math.pi / (period * 3))) > 0).astype(np.float32)
    else:
        raise ValueError(f"unknown texture {kind!r}")
    return c1[None, None] * (1 - t[..., None]) + c2[None, None] * t[..., None]


def _background(size: int, rng: np.random.Generator) -> np.ndarray:
    """Muted low-frequency noise with faint stripes: texture without object-like edges."""
    coarse = rng.uniform(60, 170, (4, 4, 3)).astype(np.uint8)
    bg = np.asarray(Image.fromarray(coarse).resize((size, size), Image.BICUBIC)).astype(np.float32)
    bg += rng.normal(0, 10, (size, size, 3))
    if rng.random() < 0.5:
        yy = np.arange(size, dtype=np.float32)[:, None, None]
        bg += 12 * np.sin(yy * 2 * math.pi / rng.uniform(6, 20))
    return bg


def random_class(rng: np.random.Generator, domain: str) -> ObjectClass:
    d = DOMAINS[domain]
    c = rng.choice(len(COLOURS), 2, replace=False)
    return ObjectClass(str(rng.choice(d["shapes"])), str(rng.choice(d["textures"])), (int(c[0]), int(c[1])))


def distractor_of(target: ObjectClass, rng: np.random.Generator, domain: str) -> ObjectClass:
    """A class sharing one or two attributes with ``target``: hard negatives."""
    while True:
        other = random_class(rng, domain)
        keep = rng.integers(0, 3)
        if keep == 0:
            other = ObjectClass(target.shape, other.texture, other.colours)
        elif keep == 1:
            other = ObjectClass(other.shape, target.texture, target.colours)
        if other != target:
            return other


def render_scene(instances: list[tuple[ObjectClass, int]], size: int, rng: np.random.Generator,
                 object_px: tuple[float, float] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Paint (class, label) instances on a textured background; later ones occlude earlier ones.

    Objects are 0.2-0.42 of the scene side, or ``object_px`` (low, high) pixels wide when given.
    """
    img = _background(size, rng)
    labels = np.zeros((size, size), np.int64)
    low, high = object_px or (0.2 * size, 0.42 * size)
    for cls, label in instances:
        s = max(4, int(rng.uniform(low, high))) if object_px else int(rng.uniform(0.2, 0.42) * size)
        m = _shape_mask(cls.shape, s, rng.uniform(0, 2 * math.pi))
        tex = _texture(cls.texture, s, COLOURS[cls.colours[0]].astype(np.float32),
                       COLOURS[cls.colours[1]].astype(np.float32), rng)
        y, x = rng.integers(0, size - s, 2)
        region = img[y:y + s, x:x + s]
        region[m] = tex[m] * rng.uniform(0.85, 1.15)
        labels[y:y + s, x:x + s][m] = label
    return np.clip(img, 0, 255).astype(np.uint8), labels


class Task:
    """A fixed set of target classes and distractors: one labeling project's world."""

    def __init__(self, rng: np.random.Generator, domain: str, multi_prob: float) -> None:
        self.rng = rng
        self.distractor_prob = 0.7 if rng.random() < 0.7 else 0.0  # some tasks are plain "find these"
        n_targets = 2 if rng.random() < multi_prob else 1
        self.targets: list[ObjectClass] = []
        while len(self.targets) < n_targets:
            c = random_class(rng, domain)
            if c not in self.targets:
                self.targets.append(c)
        distractors = [distractor_of(self.targets[int(rng.integers(n_targets))], rng, domain) for _ in range(3)]
        self.distractors = [d for d in distractors if d not in self.targets]

    def scene(self, size: int, with_targets: bool = True, object_px: tuple[float, float] | None = None
              ) -> tuple[np.ndarray, np.ndarray]:
        rng = self.rng
        inst = [(t, i + 1) for i, t in enumerate(self.targets)
                for _ in range(int(rng.integers(1, 3)))] if with_targets else []
        inst += [(d, 0) for d in self.distractors if rng.random() < self.distractor_prob]
        order = rng.permutation(len(inst))
        return render_scene([inst[i] for i in order], size, rng, object_px)


def make_episode(seed: int, size: int = 128, domain: str = "train", absent_prob: float = 0.1,
                 multi_prob: float = 0.3, num_prompts: int = 1, object_px: tuple[float, float] | None = None
                 ) -> Episode:
    """Prompt scene(s) and a query scene of one task; the same seed always gives the same episode.

    ``object_px`` (low, high) overrides the objects' width (default 0.2-0.42 of ``size``).
    """
    rng = np.random.default_rng(seed)
    task = Task(rng, domain, multi_prob)
    present = rng.random() >= absent_prob
    p_img, p_lab = task.scene(size, object_px=object_px)
    q_img, q_lab = task.scene(size, present, object_px)
    extra = [task.scene(size, object_px=object_px) for _ in range(num_prompts - 1)]
    return Episode(p_img, p_lab, q_img, q_lab, len(task.targets), bool(present and q_lab.any()), extra,
                   task.distractor_prob > 0)


def make_project(seed: int, n: int, size: int = 128, domain: str = "shifted",
                 multi_prob: float = 0.0) -> tuple[list[tuple[np.ndarray, np.ndarray]], int]:
    """``n`` labelled scenes of one task (a project's annotated images) and its label count."""
    task = Task(np.random.default_rng(seed), domain, multi_prob)
    return [task.scene(size) for _ in range(n)], len(task.targets)


HIGHRES_SEED = 4 * 10 ** 9  # held-out high-resolution episodes
HIGHRES_SIZES = (512, 768, 1024)


def make_highres_episode(seed: int, size: int | None = None, object_px: tuple[float, float] = (26, 54),
                         domain: str = "train", multi_prob: float = 0.5, num_prompts: int = 1) -> Episode:
    """A large scene crowded with small objects: what a labeling project's photos look like to SegGPT.

    Prompt and query are ``size`` px square (default one of HIGHRES_SIZES, by seed), with 3-8
    instances of each target class and, in tasks with distractors, 2-5 of each distractor
    class, all ``object_px`` pixels wide: several times smaller, relative to the scene, than
    anything in ``make_episode``'s scenes (which the demo model was trained on).
    """
    rng = np.random.default_rng(seed)
    task = Task(rng, domain, multi_prob)
    size = size or int(rng.choice(HIGHRES_SIZES))

    def scene() -> tuple[np.ndarray, np.ndarray]:
        inst = [(t, i + 1) for i, t in enumerate(task.targets) for _ in range(int(rng.integers(3, 9)))]
        if task.distractor_prob:
            inst += [(d, 0) for d in task.distractors for _ in range(int(rng.integers(2, 6)))]
        order = rng.permutation(len(inst))
        return render_scene([inst[i] for i in order], size, rng, object_px)

    (p_img, p_lab), (q_img, q_lab) = scene(), scene()
    extra = [scene() for _ in range(num_prompts - 1)]
    return Episode(p_img, p_lab, q_img, q_lab, len(task.targets), bool(q_lab.any()), extra,
                   task.distractor_prob > 0)
